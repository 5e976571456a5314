"""Real server processes for the client tests, and the clients nobody here wrote: buf curl
and connect-es on Node (both from npm, installed by tools/test-deps.sh)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.server import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "node_modules" / ".bin" / "buf"
NODE_CALLS = ROOT / "tests" / "clients" / "node" / "calls.mjs"
TOKEN = "client-tests-admin-token"


def need_node_packages() -> None:
    if shutil.which("node") is None or not (ROOT / "node_modules" / "@connectrpc").is_dir():
        pytest.skip("node and the npm packages (npm ci, run by `just test`) are needed")


@pytest.fixture(scope="package")
def coupon_server(server_env: dict[str, str]) -> Iterator[ServerProcess]:
    """PostgreSQL and Redis behind it, an admin token required."""
    with ServerProcess(env={**server_env, "COUPON_ADMIN_TOKEN": TOKEN}) as proc:
        yield proc


@pytest.fixture(scope="package")
def redis_down_server(server_env: dict[str, str]) -> Iterator[ServerProcess]:
    """The same database, but Redis at a port where nothing listens."""
    env = {**server_env, "COUPON_ADMIN_TOKEN": TOKEN}
    env["REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    proc = ServerProcess(env=env)
    try:
        proc.wait_serving()
        yield proc
    finally:
        proc.stop()


def node_calls(
    base_url: str,
    transport: str,
    calls: list[dict[str, Any]],
    *,
    binary: bool,
    http_version: str = "1.1",
) -> list[dict[str, Any]]:
    """Each call's result from connect-es on Node: {"response", "header", "trailer"} or
    {"error": {"code", "message"}, "metadata"}."""
    need_node_packages()
    plan = {
        "baseUrl": base_url,
        "transport": transport,
        "binary": binary,
        "httpVersion": http_version,
        "calls": calls,
    }
    done = subprocess.run(
        ["node", str(NODE_CALLS), json.dumps(plan)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def buf_curl(*args: str, data: str | None = None) -> subprocess.CompletedProcess[str]:
    need_node_packages()
    command = [str(BUF), "curl", *args]
    if data is not None:
        command[2:2] = ["--data", data]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
