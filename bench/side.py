"""`just bench-side REV`: the server's CPU per issued coupon of two versions of the service,
measured at the same moment.

This VM's speed drifts, by a third within minutes, so two versions benched one after the
other differ by as much as the spells they ran in. Here both run at once: each version
(A, the revision REV; B, the working tree or --against-ref) gets a `coupon serve` of one
worker, its own scratch database and its own Redis key prefix, and both servers share core
0. Each round starts one wrk per server at once, both on core 1, on a 10,000,000-coupon
campaign with a new user per request, and reads each worker's CPU seconds from /proc
before and after. Both sides share one core and one spell, so whatever the VM does moves
them alike: the ratio B/A of CPU per answered request is the figure to read, not the
absolute microseconds (which also include the other side's interference). Which wrk starts
first alternates from round to round. A round with wrk errors or non-200 answers on either
side is flagged and left out of the medians.

The scratch databases (`coupon_side_<hex>`) are dropped and the keys under the run's own
prefixes deleted at the end, also on failure or Ctrl-C. The run is written as JSON to
bench/results/ (ignored by git).

`--python-b PYTHON` runs B's server on another interpreter (another Python, or the same
project synced with other dependency versions: `UV_PROJECT_ENVIRONMENT=DIR uv sync --frozen
--python 3.13` makes one in DIR); the code cipher's C network is built for it first.

Exit status: 0 when every round was clean, 1 when a round had errors, 2 when the run broke.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import traceback
import uuid
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.generators import REPO, BenchBroke, bench_result, ensure_wrk, pinned, wrk_argv
from bench.state import (
    ADMIN_DATABASE_URL,
    allow_open_files,
    base_meta,
    build_code_cipher,
    checkout_source,
    delete_redis_keys,
    git_commit,
    new_token,
    post_campaign,
    server_env,
    write_run,
)
from harness.procstat import cpu_seconds
from harness.server import ServerProcess, clean_environment
from harness.services import drop_database, with_database

CAMPAIGN_SIZE = 10_000_000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="just bench-side",
        description="CPU per issued coupon of two versions of the service, side by side.",
    )
    parser.add_argument("ref", help="the git revision to compare against (A), e.g. HEAD~1")
    parser.add_argument(
        "--against-ref", metavar="OTHER", help="compare this revision (B), not the working tree"
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--seconds", type=int, default=8, help="seconds per round (default 8)")
    parser.add_argument(
        "--connections", type=int, default=128, help="wrk connections per server (default 128)"
    )
    parser.add_argument(
        "--python-b",
        metavar="PYTHON",
        help="the interpreter B's server runs on (default: this one), e.g. DIR/bin/python of "
        "an environment made by `UV_PROJECT_ENVIRONMENT=DIR uv sync --frozen --python 3.13`",
    )
    args = parser.parse_args(argv)
    if min(args.rounds, args.seconds, args.connections) < 1:
        parser.error("--rounds, --seconds and --connections take whole numbers from 1")
    return args


@dataclass
class Sample:
    """One side in one round: wrk's answers and errors, the worker's CPU seconds."""

    requests: int
    errors: dict[str, int]
    seconds: float
    cpu_seconds: float

    @property
    def clean(self) -> bool:
        return self.requests > 0 and not any(self.errors.values())

    @property
    def us_per_request(self) -> float:
        return 1e6 * self.cpu_seconds / max(self.requests, 1)

    def text(self) -> str:
        errors = ", ".join(f"{kind} {n}" for kind, n in self.errors.items() if n) or "0"
        rate = self.requests / self.seconds
        return f"{self.us_per_request:6.1f} µs/req {rate:7,.0f}/s errors {errors}"


@dataclass
class Round:
    first: str  # "A" or "B": whose wrk was started first
    a: Sample
    b: Sample

    @property
    def clean(self) -> bool:
        return self.a.clean and self.b.clean

    @property
    def ratio(self) -> float | None:
        a, b = self.a, self.b
        return b.us_per_request / a.us_per_request if a.requests and b.requests else None


@dataclass
class Summary:
    median_a: float | None
    median_b: float | None
    ratios: list[float | None]  # per round, None where the round had errors
    median_ratio: float | None


def summarize(rounds: list[Round]) -> Summary:
    """Medians over the clean rounds only: a round with errors is flagged, never averaged."""

    def median(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    clean = [r for r in rounds if r.clean]
    ratios = [r.ratio if r.clean else None for r in rounds]
    return Summary(
        median([r.a.us_per_request for r in clean]),
        median([r.b.us_per_request for r in clean]),
        ratios,
        median([r for r in ratios if r is not None]),
    )


def round_line(number: int, rnd: Round) -> str:
    flag = "" if rnd.clean else "  ERRORS: left out"
    ratio = "-" if rnd.ratio is None else f"{rnd.ratio:.3f}"
    sides = f"A {rnd.a.text()} | B {rnd.b.text()}"
    return f"round {number} ({rnd.first} first)  {sides} | B/A {ratio}{flag}"


def verdict(summary: Summary, label_a: str, label_b: str) -> str:
    """'working tree: 0.955 of abc1234's CPU per issue (5 rounds, every ratio 0.94-0.97)'."""
    clean = [r for r in summary.ratios if r is not None]
    if summary.median_ratio is None:
        return f"{label_b} against {label_a}: no round without errors, nothing to compare"
    left_out = len(summary.ratios) - len(clean)
    rounds = f"{len(clean)} round{'s' * (len(clean) != 1)}"
    if left_out:
        rounds += f" of {len(summary.ratios)}, {left_out} with errors left out"
    return (
        f"{label_b}: {summary.median_ratio:.3f} of {label_a}'s CPU per issue "
        f"({rounds}, every ratio {min(clean):.2f}-{max(clean):.2f})"
    )


def summary_lines(summary: Summary, label_a: str, label_b: str) -> list[str]:
    def us(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    ratios = " ".join("errors" if r is None else f"{r:.3f}" for r in summary.ratios)
    median = "-" if summary.median_ratio is None else f"{summary.median_ratio:.3f}"
    return [
        f"median µs of server CPU per request: A ({label_a}) {us(summary.median_a)}, "
        f"B ({label_b}) {us(summary.median_b)}",
        f"B/A per round: {ratios}; median {median}",
        verdict(summary, label_a, label_b),
    ]


# --- running it ---------------------------------------------------------------------------


def prepare(stack: ExitStack, source: Path | None, token: str) -> dict[str, str]:
    """A scratch database with the schema (`coupon migrate` creates it) and a Redis prefix
    of its own, both removed when `stack` closes; the server's environment."""
    tag = uuid.uuid4().hex[:12]
    database, prefix = f"coupon_side_{tag}", f"coupon-side-{tag}"
    database_url = with_database(ADMIN_DATABASE_URL, database)

    def drop() -> None:
        asyncio.run(drop_database(database_url, prefix="coupon_side_"))
        print(f"dropped database {database}")

    def delete_keys() -> None:
        print(f"deleted {delete_redis_keys(prefix)} Redis keys under '{prefix}:'")

    # The stack closes in reverse: the server stops, then the keys go, then the database.
    stack.callback(drop)
    stack.callback(delete_keys)
    env = server_env(source, token, database_url)
    env["COUPON_REDIS_PREFIX"] = prefix
    done = subprocess.run(
        [sys.executable, "-m", "coupon", "migrate"],
        cwd=REPO,
        env={**clean_environment(), **env},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BenchBroke(f"coupon migrate ({database}): {done.stderr[-2000:]}")
    return env


def python_version(path: str) -> str:
    """The version of the interpreter at `path`, once it has shown that it imports the
    service (BenchBroke: it cannot run B's server)."""
    probe = "import platform, coupon.entrypoints.app; print(platform.python_version())"
    try:
        done = subprocess.run(
            [path, "-c", probe], cwd=REPO, capture_output=True, text=True, check=False
        )
    except OSError as exc:
        raise BenchBroke(f"--python-b {path}: {exc}") from exc
    if done.returncode != 0:
        raise BenchBroke(
            f"--python-b {path} cannot import the service (its environment needs the "
            f"project: UV_PROJECT_ENVIRONMENT=DIR uv sync --frozen --python X.Y):\n"
            f"{done.stderr[-1500:]}"
        )
    return done.stdout.strip()


def measure_round(
    args: argparse.Namespace, targets: list[tuple[int, str, str]], a_first: bool
) -> Round:
    """One wrk per target (worker pid, url, campaign), started at once, all on core 1."""
    conns, seconds = args.connections, args.seconds
    before = [cpu_seconds(pid) for pid, _, _ in targets]
    wrks: dict[int, subprocess.Popen[str]] = {}
    try:
        for i in (0, 1) if a_first else (1, 0):
            _, url, campaign = targets[i]
            users = f"side-{uuid.uuid4().hex[:8]}"  # new users for each server and round
            argv = wrk_argv(url, campaign, users, threads=1, connections=conns, seconds=seconds)
            wrks[i] = subprocess.Popen(pinned(argv, "1"), stdout=subprocess.PIPE, text=True)
        outputs = [wrks[i].communicate(timeout=args.seconds + 60)[0] for i in (0, 1)]
    except subprocess.TimeoutExpired as exc:
        raise BenchBroke(f"wrk did not finish in {args.seconds + 60} s") from exc
    finally:
        for wrk in wrks.values():
            if wrk.poll() is None:
                wrk.kill()
                wrk.wait()
    samples = []
    for (pid, _, _), start, output in zip(targets, before, outputs, strict=True):
        if (result := bench_result(output)) is None:
            raise BenchBroke(f"wrk gave no result:\n{output[-2000:]}")
        cpu = cpu_seconds(pid) - start
        seconds_run = result["duration_us"] / 1e6
        samples.append(Sample(result["requests"], result["errors"], seconds_run, cpu))
    return Round("A" if a_first else "B", *samples)


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="coupon-side-"))
    (workdir / "a").mkdir()
    label_a, source_a = checkout_source(args.ref, workdir / "a")
    source_b: Path | None = None
    if args.against_ref is None:
        (commit, dirty), label_b = git_commit(), "working tree"
    else:
        (workdir / "b").mkdir()
        commit, source_b = checkout_source(args.against_ref, workdir / "b")
        dirty, label_b = False, commit
    python_b = sys.executable
    if args.python_b is not None:
        python_b = args.python_b
        label_b += f" on Python {python_version(python_b)}"
        # B imports this source whatever the environment holds (or has as its editable
        # install).
        source_b = source_b or REPO / "src"
        build_code_cipher(source_b, python_b)
    meta: dict[str, Any] = {
        **base_meta("bench-side", argv, commit, dirty),
        "a": label_a,
        "b": label_b,
        "seconds": args.seconds,
        "connections": args.connections,
        "python_a": sys.executable,
        "python_b": python_b,
    }
    print(f"A = {label_a}, B = {label_b}; server logs in {workdir}", flush=True)
    ensure_wrk()
    allow_open_files(2 * args.connections)
    token = new_token()
    rounds: list[Round] = []
    stack = ExitStack()
    try:
        envs = [prepare(stack, source, token) for source in (source_a, source_b)]
        targets = []
        for side, env, python in zip("AB", envs, (sys.executable, python_b), strict=True):
            serve = [python, "-m", "coupon", "serve"]
            server = ServerProcess(
                env=env, workers=1, cpus="0", argv=serve, log_dir=workdir, name=side
            )
            stack.enter_context(server)
            campaign, _ = post_campaign(server.url, token, "bench-side", CAMPAIGN_SIZE)
            targets.append((server.worker_pids()[0], server.url, campaign))
        for number in range(1, args.rounds + 1):
            rounds.append(measure_round(args, targets, a_first=number % 2 == 1))
            print(round_line(number, rounds[-1]), flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C leaves nothing behind
        stack.close()
    summary = summarize(rounds)
    print("\n" + "\n".join(summary_lines(summary, label_a, label_b)))
    document = {
        **meta,
        "rounds": [{**asdict(r), "ratio": r.ratio, "clean": r.clean} for r in rounds],
        "summary": asdict(summary),
        "verdict": verdict(summary, label_a, label_b),
    }
    path = write_run(document, "-side")
    print(f"\nwrote {path.relative_to(REPO)} (ignored by git)")
    return 0 if all(r.clean for r in rounds) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        print("bench-side needs 2 cores: the servers on core 0, wrk on core 1", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up as on Ctrl-C
    try:
        return run(args, argv)
    except BenchBroke as exc:
        print(f"\nbench-side broke: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - anything unexpected is a broken run, say so
        traceback.print_exc()
    return 2


if __name__ == "__main__":
    sys.exit(main())
