"""A PostgreSQL server of the test's own: `initdb` into a temporary directory, started on a
port the test chooses, stopped and removed by the test (the shared one is never touched).

The machine's PostgreSQL binaries are used (PATH, else /usr/lib/postgresql/<version>/bin).
PostgreSQL refuses to run as root: as root, the server runs as the `postgres` user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path


def postgres_bindir() -> Path | None:
    """Where `initdb` and `postgres` are, or None when PostgreSQL is not installed."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent  # /usr/local/bin may hold links to initdb alone
    installed = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    installed = [p for p in installed if p.parent.name.isdigit()]
    return max(installed, key=lambda p: int(p.parent.name), default=None)


def _run_as() -> str | None:
    """PostgreSQL will not run as root; the `postgres` user, when root runs the tests."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return None
    return "postgres"


class PrivatePostgres:
    """`initdb` now (trust authentication, superuser `postgres`); `start()` when the test
    wants it up on `port`, `stop()` to take it down, `close()` to remove it all."""

    def __init__(self, port: int) -> None:
        bindir = postgres_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL's initdb is not installed")
        self._bindir = bindir
        self.port = port
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        self._user = _run_as()
        self._dir = Path(tempfile.mkdtemp(prefix="coupon-postgres-"))
        self._data = self._dir / "data"
        self._log = self._dir / "postgres.log"
        self._process: subprocess.Popen[bytes] | None = None
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self._dir, entry.pw_uid, entry.pw_gid)
        subprocess.run(
            [str(bindir / "initdb"), "-D", str(self._data), "-U", "postgres",
             "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions"],
            user=self._user,
            check=True,
            capture_output=True,
            timeout=120,
        )  # fmt: skip

    def start(self, timeout: float = 30.0) -> None:
        log = self._log.open("ab")
        self._process = subprocess.Popen(
            [str(self._bindir / "postgres"), "-D", str(self._data), "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self._dir}",
             "-c", "fsync=off", "-c", "full_page_writes=off"],
            user=self._user,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        try:
            self._wait_ready(self._process, timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, process: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"private PostgreSQL exited:\n{self.log()}")
            ready = subprocess.run(
                [str(self._bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port),
                 "-U", "postgres", "-d", "postgres"],
                capture_output=True,
                check=False,
            )  # fmt: skip
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"private PostgreSQL not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self._log.read_text(errors="replace")[-5000:] if self._log.exists() else ""

    def stop(self) -> None:
        """A fast shutdown (SIGINT): sessions are ended, the data stays."""
        if self._process is not None:
            self.resume()  # were it paused
            self._process.send_signal(signal.SIGINT)
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None

    def pause(self) -> None:
        """Stall the whole server (SIGSTOP to the postmaster and every process it started,
        each in a session of its own): connections stay open and nothing answers, as with
        a server frozen by its host."""
        for pid in self._processes():
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self._processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def _processes(self) -> list[int]:
        assert self._process is not None
        postmaster = self._process.pid
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):
                # pid (comm) state ppid ...: comm may hold spaces, so split after its ')'.
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                    children.append(int(stat.parent.name))
        return [postmaster, *children]

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
