"""The load generators the bench drives: wrk (closed loop, with bench/issue.lua) and
bench/openloop.c (open or closed loop, compiled here with the machine's gcc on first use).
Both print one line "BENCH_RESULT {json}"."""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WRK_SCRIPT = REPO / "bench" / "issue.lua"
OPENLOOP_SOURCE = REPO / "bench" / "openloop.c"
# Built beside the source, ignored by git: rebuilt whenever the source is newer.
OPENLOOP_BINARY = REPO / "bench" / "build" / "openloop"


class BenchBroke(Exception):
    """The bench could not measure (a server did not start, a tool failed)."""


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bench_result(stdout: str) -> dict[str, Any] | None:
    """The BENCH_RESULT line a generator printed."""
    for line in stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            result: dict[str, Any] = json.loads(line.removeprefix("BENCH_RESULT "))
            return result
    return None


def run_generator(argv: Sequence[str], timeout: float) -> tuple[dict[str, Any], float]:
    """Run a load generator to the end; its BENCH_RESULT and the CPU seconds it used (every
    thread; read from the rusage of reaped children, so only it is counted)."""
    before = children_cpu_seconds()
    try:
        done = subprocess.run(
            list(argv), cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchBroke(f"{argv[0]} did not finish in {timeout:g} s") from exc
    cpu = children_cpu_seconds() - before
    result = bench_result(done.stdout)
    if result is not None:
        return result, cpu
    raise BenchBroke(
        f"{shlex.join(argv)} gave no result (exit {done.returncode}):\n"
        f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    )


def pinned(argv: Sequence[str], cpus: str | None) -> list[str]:
    """`argv` run on the CPUs listed (`taskset -c`), or as it is."""
    return list(argv) if cpus is None else ["taskset", "-c", cpus, *argv]


# --- wrk ------------------------------------------------------------------------------


def wrk_rate(result: dict[str, Any]) -> float:
    """Requests per second of one wrk run (its BENCH_RESULT)."""
    return float(result["requests"]) / (float(result["duration_us"]) / 1e6)


def wrk_argv(
    url: str, campaign: str, users: str, *, threads: int, connections: int, seconds: int
) -> list[str]:
    """wrk sending binary IssueCoupon (bench/issue.lua) to `campaign`, a new user per
    request, user ids prefixed with `users`."""
    return [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(WRK_SCRIPT),
        url,
        "--",
        campaign,
        users,
    ]


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0:
        raise BenchBroke("wrk is not installed; run `apt-get install -y wrk` as root")
    print("installing wrk (apt-get) ...", flush=True)
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BenchBroke(f"{shlex.join(argv)} failed:\n{done.stderr[-2000:]}")
    found = shutil.which("wrk")
    if not found:
        raise BenchBroke("wrk still missing after apt-get install")
    return found


# --- openloop (C) -----------------------------------------------------------------------


def openloop_binary() -> Path:
    """bench/openloop.c compiled with the machine's gcc, when missing or older than the
    source."""
    binary = OPENLOOP_BINARY
    if binary.exists() and binary.stat().st_mtime >= OPENLOOP_SOURCE.stat().st_mtime:
        return binary
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise BenchBroke("no C compiler (gcc) to build bench/openloop.c: apt-get install gcc")
    binary.parent.mkdir(parents=True, exist_ok=True)
    argv = [compiler, "-O2", "-o", str(binary), str(OPENLOOP_SOURCE), "-lm"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchBroke(f"{shlex.join(argv)} failed:\n{done.stderr[-3000:]}")
    return binary


def openloop_argv(
    port: int,
    campaign: str,
    users: str,
    *,
    rate: float,
    seconds: float,
    connections: int,
    timeout: float = 10.0,
    drain: float = 10.0,
    realtime: bool = False,
) -> list[str]:
    """IssueCoupon at `rate` per second (open loop) or, with rate 0, as fast as the server
    answers on `connections` connections (closed loop); a new user per request."""
    argv = [
        str(openloop_binary()),
        "--port",
        str(port),
        "--campaign",
        campaign,
        "--users",
        users,
        "--rate",
        f"{rate:g}",
        "--duration",
        f"{seconds:g}",
        "--connections",
        str(connections),
        "--timeout",
        f"{timeout:g}",
        "--drain",
        f"{drain:g}",
    ]
    return [*argv, "--realtime"] if realtime else argv
