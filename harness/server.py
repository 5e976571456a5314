"""A real server process on a free loopback port: the one way the tests, the bench and the
tools start and stop one.

`coupon serve` by default; any other ASGI server module (the bench's no-op app) through
`argv`. The process leads a process group of its own, so that a SIGKILL can take every
worker at once, and may be pinned to some CPUs (`taskset -c`), which its workers inherit.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from harness.procstat import descendants, is_resource_tracker, memory_mib

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def metric_value(exposition: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` in a Prometheus exposition that carry `labels`."""
    total = 0.0
    for line in exposition.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def clean_environment() -> dict[str, str]:
    """This process's environment without the service's settings, so that a developer's
    shell (COUPON_*, REDIS_*, DATABASE_URL, APP_ENV) cannot leak into a server under test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COUPON_", "REDIS_"))}
    env.pop("DATABASE_URL", None)
    env.pop("APP_ENV", None)
    return env


class ServerProcess:
    """Started at construction; `wait_ready()` before use, `stop()` (or `with`) after."""

    def __init__(
        self,
        *,
        env: Mapping[str, str],
        workers: int = 1,
        in_memory: bool = False,
        port: int | None = None,
        log_dir: Path | None = None,
        argv: Sequence[str] | None = None,
        name: str = "coupon",
        cpus: str | None = None,
        inherit_env: bool = False,
        open_files: int | None = None,
    ) -> None:
        """`argv`: a server command instead of `coupon serve` (it gets --host, --port and
        --workers too). `cpus`: a `taskset -c` list to pin the server to. `inherit_env`:
        start from this process's whole environment rather than a clean one. `open_files`:
        the server's RLIMIT_NOFILE, soft and hard (its workers inherit it)."""
        self.name = name
        self.port = port or free_port()
        self.workers = workers
        self.url = f"http://127.0.0.1:{self.port}"
        # Only `coupon serve` logs "serving" once per worker when its start-up is done.
        self._counts_serving_lines = argv is None
        command = list(argv or [sys.executable, "-m", "coupon", "serve"])
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers)]
        if in_memory:
            command.append("--in-memory")
        if cpus is not None:
            command = ["taskset", "-c", cpus, *command]
        if open_files is not None:
            command = ["prlimit", f"--nofile={open_files}:{open_files}", *command]
        self.cpus = cpus
        base = dict(os.environ) if inherit_env else clean_environment()
        self.log_path = (log_dir or Path("/tmp")) / f"{name}-server-{self.port}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            env={**base, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def __enter__(self) -> ServerProcess:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()  # a server that never became ready is not left running
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until GET /readyz answers 200 (and, for `coupon serve`, every worker has said
        "serving": a signal that reaches a worker still starting would miss it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} server exited early:\n{self.log()}")
            try:
                ready = httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                ready = False
            started = self.log().count('"message": "serving"')
            if ready and (not self._counts_serving_lines or started >= self.workers):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} server not ready after {timeout:g} s:\n{self.log()}")

    def wait_serving(self, timeout: float = 30.0) -> None:
        """Until every worker serves and GET /healthz answers, whether or not its
        PostgreSQL and Redis are there (unlike `wait_ready`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} server exited early:\n{self.log()}")
            if self.log().count('"message": "serving"') >= self.workers:
                try:
                    if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} server not serving after {timeout:g} s:\n{self.log()}")

    def log(self, tail: int = 20_000) -> str:
        self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return "(no log)"

    def log_entries(self, tail: int = 20_000) -> list[dict[str, Any]]:
        """The JSON lines of the log's end (`log`), parsed; the plain ones left out."""
        return [json.loads(line) for line in self.log(tail).splitlines() if line.startswith("{")]

    def metric(self, name: str, **labels: str) -> float:
        """A metric's value now, from /metrics (other workers' as of their last flush, at
        most a second old)."""
        exposition = httpx.get(f"{self.url}/metrics", timeout=10).raise_for_status().text
        return metric_value(exposition, name, **labels)

    def pids(self) -> list[int]:
        """The main process and everything below it (workers, the resource tracker)."""
        return [self.process.pid, *descendants(self.process.pid)]

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: the workers, or the main process when it
        serves alone (one worker)."""
        below = [pid for pid in descendants(self.process.pid) if not is_resource_tracker(pid)]
        return below or [self.process.pid]

    def worker_memory(self) -> list[dict[str, float]]:
        """RSS now and its peak, in MiB, of each worker."""
        return [{"pid": pid, **memory_mib(pid)} for pid in self.worker_pids()]

    def signal(self, sig: int) -> None:
        """SIGKILL hits every process of the server, as a crash of the host would; other
        signals go to the main process only, as an orchestrator sends them."""
        if sig == signal.SIGKILL:
            os.killpg(self.process.pid, sig)
        else:
            self.process.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (in-flight requests finish, their commits included), SIGKILL after
        `timeout`; returns the exit status."""
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.process.wait()
        else:
            # Workers outlive a main process that was killed alone: leave none behind.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self._log.close()
        return self.process.returncode


@contextlib.contextmanager
def web_server(argv: Sequence[str], port: int, cwd: Path | None = None) -> Iterator[str]:
    """Another web server (`argv`, listening on `port`), as a wrong URL may name: its URL
    once it answers; stopped afterwards."""
    other = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(url)
                break
            time.sleep(0.1)
        yield url
    finally:
        other.kill()
        other.wait()
