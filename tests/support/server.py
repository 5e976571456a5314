"""Real server processes on free loopback ports, for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    def __init__(
        self,
        *,
        env: Mapping[str, str],
        workers: int = 1,
        in_memory: bool = False,
        port: int | None = None,
        log_dir: Path | None = None,
    ) -> None:
        self.port = port or free_port()
        self.workers = workers
        self.url = f"http://127.0.0.1:{self.port}"
        args = [
            sys.executable,
            "-m",
            "coupon",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(workers),
        ]
        if in_memory:
            args.append("--in-memory")
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("COUPON_", "REDIS_"))}
        clean.pop("DATABASE_URL", None)
        clean.pop("APP_ENV", None)
        self._log_path = (log_dir or Path("/tmp")) / f"coupon-server-{self.port}.log"
        self._log = self._log_path.open("wb")
        self.process = subprocess.Popen(
            args,
            env={**clean, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            # Every worker logs "serving" when its start-up is done; a signal that reaches
            # a worker still starting would miss it.
            started = self.log().count('"message": "serving"')
            try:
                ready = httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                ready = False
            if ready and started >= self.workers:
                return
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self, tail: int = 20_000) -> str:
        self._log.flush()
        return self._log_path.read_text(errors="replace")[-tail:]

    def signal(self, sig: int) -> None:
        """SIGKILL hits every process of the server, as a crash of the host would; other
        signals go to the main process only, as an orchestrator sends them."""
        if sig == signal.SIGKILL:
            os.killpg(self.process.pid, sig)
        else:
            self.process.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
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
