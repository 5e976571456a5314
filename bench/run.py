"""`just bench`: how fast is IssueCoupon, against what ceiling, and does it stay correct?

One run measures, each on servers started here on free loopback ports:

  (a) the ceiling: the same uvicorn + Connect stack answering IssueCoupon with a constant
      (bench/noop_app.py), at saturation, with wrk;
  (b) IssueCoupon on a fresh 10,000,000-coupon campaign, a new user per request, at
      saturation, with wrk (bench/issue.lua);
  (a') the ceiling again, right after (b), on the same no-op server and at (a)'s connection
      count: (b)/(a) is taken against the mean of (a) and (a'), so that a machine whose
      speed drifts during the run (a VM's does, by a third within minutes) moves both sides
      of the ratio alike;
  (c) IssueCoupon at a fixed offered rate (open loop, latency from the intended send time),
      with bench/openloop.py (Debian has no wrk2);

"At saturation" means at the peak of throughput over the number of connections: before
(a) and before (b), short probes at each count of a ladder (64 to 1,024 wrk connections),
then halfway to the best count's neighbours and the two best counts once more, find the
count at which that server answers most, and the measured run uses it. The two servers
peak at different counts: the no-op at 64-192, while IssueCoupon keeps gaining to
256-1,024, because its group commits and admission calls grow with the number of requests
waiting. Both are searched the same way; the probes are printed, with (b)/(a) at every
count both probed, and `--connections N` measures every phase at N instead.

then verifies I1-I4 (and "acknowledged <= stored") in PostgreSQL, prints one table, writes
it as JSON to bench/results/ and appends it to bench/RESULTS.md. The CPU each party used
(server workers, load generator, PostgreSQL, Redis, anything else) is measured from /proc
for every phase, so the reader can see whether the generator was the limit.

Everything lives apart from a developer's data: the database `coupon_bench` (dropped at the
start of every run, so runs compare; `coupon serve` recreates it) and the Redis keys under
`coupon-bench:` (deleted with SCAN at the start and the end).

Exit status: 0 when the bench ran (missed targets are reported, not fatal), 1 when an
invariant was violated, 2 when the bench itself broke.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis

from bench.procstat import CpuSnapshot, descendants, machine_seconds, memory_mib, named, workers

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
RESULTS_DIR = BENCH / "results"
RESULTS_MD = BENCH / "RESULTS.md"
WRK_SCRIPT = BENCH / "issue.lua"

DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/coupon_bench"
ADMIN_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_PREFIX = "coupon-bench"
CAMPAIGN_SIZE = 10_000_000

# Targets. Reported as PASS/FAIL; a miss never fails the run.
TARGET_B_PER_S = 10_000
TARGET_RATIO = 0.5
TARGET_C_P99_MS = 10.0

TITLES = {
    "a": "(a) no-op ceiling, saturation",
    "b": "(b) IssueCoupon, saturation",
    "a2": "(a') no-op ceiling again",
    "c": "(c) IssueCoupon, fixed rate",
}
PHASES = ("a", "b", "c")  # what --only takes; (a') comes with a and b
# wrk connection counts searched for each saturation phase's peak.
CONNECTION_LADDER = (64, 128, 256, 512, 1024)
# (c) offers a fixed rate: its generator opens connections as it needs them, up to this.
OPEN_LOOP_CONNECTIONS = 128


PARTIES = ("server", "generator", "postgres", "redis")


class BenchBroke(Exception):
    """The bench could not measure (a server did not start, a tool failed)."""


# --- processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """A server started here in its own session, ready once GET /readyz answers 200."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.argv = [*argv, "--host", "127.0.0.1", "--port", str(self.port)]
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> None:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchBroke(f"{self.name} server exited at start:\n{self.log_tail()}")
            with suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise BenchBroke(f"{self.name} server not ready after {timeout:g} s:\n{self.log_tail()}")

    def pids(self) -> list[int]:
        """The server's main process and its workers (and multiprocessing's helper)."""
        return [] if self.proc is None else [self.proc.pid, *descendants(self.proc.pid)]

    def worker_memory(self) -> list[dict[str, float]]:
        if self.proc is None:
            return []
        return [{"pid": pid, **memory_mib(pid)} for pid in workers(self.proc.pid)]

    def stop(self, timeout: float = 45.0) -> None:
        """Graceful (SIGINT: the server drains, in-flight issues commit), then forceful."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_generator(argv: list[str], timeout: float) -> tuple[dict[str, Any], float]:
    """Run a load generator to the end; its BENCH_RESULT line and the CPU seconds it used
    (every thread; read from the rusage of reaped children, so only it is counted)."""
    before = children_cpu_seconds()
    try:
        done = subprocess.run(
            argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
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


def bench_result(stdout: str) -> dict[str, Any] | None:
    """The BENCH_RESULT line a generator (wrk with bench/issue.lua, openloop) prints."""
    for line in stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            result: dict[str, Any] = json.loads(line.removeprefix("BENCH_RESULT "))
            return result
    return None


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


# One probe of a saturation search: connections -> (requests/s, errors).
Probe = Callable[[int], tuple[float, int]]


def search_peak(
    ladder: Sequence[int], probe: Probe, least: int = 1
) -> tuple[dict[int, dict[str, float]], int]:
    """The probes, by connection count, and the count that answered most.

    Every count of the (sorted) ladder is probed, not only up to the first dip: a VM's
    noise makes a single dip a poor stopping rule. Then the counts halfway to the best
    one's neighbours (when not below `least`), so that a peak between two steps is not
    missed. Then the two best counts once more, so that the choice does not rest on one
    lucky probe: a count's rate is the mean of its probes. A count whose probes saw errors
    is chosen only when every count's did."""
    samples: dict[int, list[float]] = {}
    errors: dict[int, int] = {}

    def run(connections: int) -> None:
        rate, failed = probe(connections)
        samples.setdefault(connections, []).append(rate)
        errors[connections] = errors.get(connections, 0) + failed

    def mean(connections: int) -> float:
        return sum(samples[connections]) / len(samples[connections])

    def ranked() -> list[int]:
        clean = [c for c in samples if not errors[c]] or list(samples)
        return sorted(clean, key=mean, reverse=True)

    for connections in ladder:
        run(connections)
    peak = list(ladder).index(ranked()[0])
    for neighbour in [*ladder[max(0, peak - 1) : peak], *ladder[peak + 1 : peak + 2]]:
        halfway = (ladder[peak] + neighbour) // 2
        if halfway not in samples and halfway >= least:
            run(halfway)
    for connections in sorted(ranked()[:2]):
        run(connections)
    probes = {
        c: {"requests_per_s": mean(c), "errors": errors[c], "probes": len(samples[c])}
        for c in sorted(samples)
    }
    return probes, ranked()[0]


def cpu_groups(server: Server) -> dict[str, list[int]]:
    """The processes whose CPU a phase reports: the server's, PostgreSQL's and Redis's."""
    return {
        "server": server.pids(),
        "postgres": named("postgres"),
        "redis": named("redis-server"),
    }


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


# --- measurements ------------------------------------------------------------------------


@dataclass
class Phase:
    key: str
    requests_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    p999_ms: float | None
    errors: int
    requests: int
    ok: int
    cores: dict[str, float]
    generator: dict[str, Any]
    worker_memory: list[dict[str, float]]
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return TITLES[self.key]

    @property
    def label(self) -> str:
        """How the text names the phase: a, b, a', c."""
        return "a'" if self.key == "a2" else self.key

    def cpu_per_request_us(self) -> dict[str, float]:
        """CPU microseconds each party spent per answered request: unlike req/s, barely
        moved by whatever else the machine is doing."""
        if not self.requests_per_s:
            return {}
        return {k: self.cores[k] * 1e6 / self.requests_per_s for k in PARTIES}

    def cpu_bound_rate(self, cores: int) -> float:
        """The rate at which the measured parties would fill `cores` idle cores."""
        per_request = sum(self.cpu_per_request_us().values())
        return cores * 1e6 / per_request if per_request else 0.0

    @property
    def ok_per_s(self) -> float:
        return self.requests_per_s * self.ok / self.requests if self.requests else 0.0


@dataclass
class Bench:
    args: argparse.Namespace
    env: dict[str, str]
    log_dir: Path
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    phases: dict[str, Phase] = field(default_factory=dict)
    acks: dict[str, int] = field(default_factory=dict)  # campaign id -> 2xx answers seen
    campaigns: dict[str, str] = field(default_factory=dict)  # phase key -> campaign id
    extra_ceilings: list[dict[str, Any]] = field(default_factory=list)
    # phase key -> {connections: {"requests_per_s": .., "errors": ..}}: the saturation search
    searches: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    user_sets: set[str] = field(default_factory=set)  # the users label of every wrk run

    def measure(
        self, server: Server, drive: Callable[[], tuple[dict[str, Any], float]]
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """Run `drive` (a generator) and the CPU split while it ran, in cores."""

        start, started = CpuSnapshot.take(cpu_groups(server)), time.monotonic()
        result, generator_cpu = drive()
        wall = time.monotonic() - started
        end = CpuSnapshot.take(cpu_groups(server))
        cores = end.cores_used_since(start, wall, extra={"generator": generator_cpu})
        result["other_cpu_users"] = end.top_others(start, wall)
        return result, cores

    def wrk(
        self,
        server: Server,
        campaign: str,
        users: str,
        seconds: float,
        connections: int,
        threads: int | None = None,
    ) -> tuple[dict[str, Any], float]:
        threads = threads or self.args.threads
        # A user asks once: a second run with the same users would be answered from the gate
        # (the user's coupon again), which is faster and stores nothing.
        if users in self.user_sets:
            raise BenchBroke(f"wrk users {users!r} would repeat an earlier run's users")
        self.user_sets.add(users)
        argv = wrk_argv(
            server.url,
            campaign,
            f"{users}-{self.run_id}",
            threads=threads,
            connections=connections,
            seconds=max(1, math.ceil(seconds)),  # wrk takes whole seconds
        )
        result, cpu = run_generator(argv, timeout=seconds + 60)
        errors = result["errors"]
        result["ok"] = result["requests"] - errors["status"]
        result["failed"] = sum(errors.values())
        result["threads"] = threads
        result["connections"] = connections
        self.acks[campaign] = self.acks.get(campaign, 0) + result["ok"]
        return result, cpu

    def saturation_point(self, key: str, server: Server, campaign: str) -> int:
        """The connection count at which `server` answers most (see `search_peak`)."""
        ladder: list[int] = self.args.connections
        if len(ladder) == 1:
            return ladder[0]

        probes = itertools.count(1)

        def probe(connections: int) -> tuple[float, int]:
            # Each probe its own users, a count probed twice included.
            users = f"probe{key}{connections}n{next(probes)}"
            result, _ = self.wrk(server, campaign, users, self.args.probe, connections)
            return wrk_rate(result), int(result["failed"])

        self.searches[key], chosen = search_peak(ladder, probe, least=self.args.threads)
        print(f"    {search_text(self.searches[key], chosen, self.args.probe)}", flush=True)
        return chosen

    def saturation_phase(
        self, key: str, server: Server, campaign: str, connections: int | None = None
    ) -> Phase:
        """`key` at saturation: at `connections` when given, else at the count the
        saturation search finds."""
        if self.args.warmup > 0:
            warm = connections or self.args.connections[0]
            self.wrk(server, campaign, f"warm{key}", self.args.warmup, warm)
        chosen = connections or self.saturation_point(key, server, campaign)
        result, cores = self.measure(
            server, lambda: self.wrk(server, campaign, key, self.args.duration, chosen)
        )
        latency = result["latency_us"]
        threads = result["threads"]
        return Phase(
            key=key,
            requests_per_s=wrk_rate(result),
            p50_ms=latency["p50"] / 1000,
            p99_ms=latency["p99"] / 1000,
            p999_ms=latency["p99.9"] / 1000,
            errors=result["failed"],
            requests=result["requests"],
            ok=result["ok"],
            cores=cores,
            generator={
                "tool": f"wrk -t{threads} -c{result['connections']} (closed loop)",
                "threads": threads,
                "connections": result["connections"],
                "cores": cores["generator"],
                # wrk's threads are event loops; one at 100 % of a core would be the limit.
                "saturated": cores["generator"] >= 0.9 * threads,
            },
            worker_memory=server.worker_memory(),
            raw=result,
        )

    def fixed_rate_phase(self, server: Server, campaign: str) -> Phase:
        argv = [
            sys.executable,
            "-m",
            "bench.openloop",
            "--port",
            str(server.port),
            "--campaign",
            campaign,
            "--user-prefix",
            f"c-{self.run_id}",
            "--rate",
            f"{self.args.rate:g}",
            "--duration",
            f"{self.args.duration:g}",
            "--connections",
            str(OPEN_LOOP_CONNECTIONS),
        ]
        result, cores = self.measure(
            server, lambda: run_generator(argv, timeout=self.args.duration + 60)
        )
        self.acks[campaign] = self.acks.get(campaign, 0) + result["ok"]
        latency = result["latency_ms"]
        return Phase(
            key="c",
            requests_per_s=result["requests_per_s"],
            p50_ms=latency["p50"],
            p99_ms=latency["p99"],
            p999_ms=latency["p99.9"],
            errors=result["errors"],
            requests=result["requests"],
            ok=result["ok"],
            cores=cores,
            generator={
                "tool": f"bench/openloop.py {self.args.rate:g}/s (open loop)",
                "cores": cores["generator"],
                "kept_up": result["kept_up"],
                "realtime_priority": result.get("realtime_priority", False),
                "dispatch_lag_ms": result["dispatch_lag_ms"],
                "service_time_ms": result["service_time_ms"],
                "saturated": not result["kept_up"],
            },
            worker_memory=server.worker_memory(),
            raw=result,
        )

    def ceiling_server(self) -> Server:
        argv = [sys.executable, "-m", "bench.noop_app", "--workers", str(self.args.workers)]
        return Server("noop", argv, self.env, self.log_dir)

    def run_ceiling(self, server: Server, key: str = "a") -> None:
        """(a), or (a') at the connection count (a) was measured at."""
        step(TITLES[key].split(",")[0], server)
        first = self.phases.get("a") if key == "a2" else None
        connections = None if first is None else int(first.generator["connections"])
        self.phases[key] = self.saturation_phase(key, server, str(uuid.uuid4()), connections)
        show_phase(self.phases[key])

    def check_generator(self, server: Server) -> None:
        """The ceiling again with fewer wrk threads and with twice the connections: if the
        generator were the limit, the figure would move with it."""
        threads = self.args.threads
        connections = int(self.phases["a"].generator["connections"])
        for t, c in ((max(1, threads // 2), connections), (threads, connections * 2)):
            if (t, c) == (threads, connections):
                continue

            def drive(t: int = t, c: int = c) -> tuple[dict[str, Any], float]:
                return self.wrk(server, str(uuid.uuid4()), f"g{t}x{c}", 10, c, t)

            result, cores = self.measure(server, drive)
            rate = wrk_rate(result)
            self.extra_ceilings.append(
                {"threads": t, "connections": c, "requests_per_s": rate, "cores": cores}
            )
            print(f"    generator check: wrk -t{t} -c{c}: {rate:,.0f} req/s", flush=True)

    def run_service(self, keys: list[str], after_b: Callable[[], None] | None = None) -> None:
        argv = [sys.executable, "-m", "coupon", "serve", "--workers", str(self.args.workers)]
        with Server("coupon", argv, self.env, self.log_dir) as server:
            for key in keys:
                self.campaigns[key] = create_campaign(server, self.env, key, self.run_id)
            if "b" in keys:
                step("(b) IssueCoupon at saturation", server)
                self.phases["b"] = self.saturation_phase("b", server, self.campaigns["b"])
                show_phase(self.phases["b"])
                if after_b is not None:
                    after_b()
            if "c" in keys:
                if "b" in keys:
                    time.sleep(3)  # let the last group commits and the backlog settle
                elif self.args.warmup > 0:
                    campaign = self.campaigns["c"]
                    self.wrk(server, campaign, "warmc", self.args.warmup, OPEN_LOOP_CONNECTIONS)
                    time.sleep(1)
                step(f"(c) IssueCoupon at {self.args.rate:g}/s", server)
                self.phases["c"] = self.fixed_rate_phase(server, self.campaigns["c"])
                show_phase(self.phases["c"])


def step(what: str, server: Server) -> None:
    print(f"  {what}: {server.name} server on port {server.port} ...", flush=True)


def show_phase(phase: Phase) -> None:
    at = f" at {phase.generator['connections']} connections" if phase.key != "c" else ""
    print(
        f"    {phase.requests_per_s:,.0f} req/s{at}, p99 {fmt_ms(phase.p99_ms)} ms, "
        f"{phase.errors} errors; cores: {cpu_split(phase.cores)}",
        flush=True,
    )


def create_campaign(server: Server, env: dict[str, str], key: str, run_id: str) -> str:
    campaign_id, _ = post_campaign(
        server.url, env["COUPON_ADMIN_TOKEN"], f"bench {run_id} {key}", CAMPAIGN_SIZE
    )
    return campaign_id


def post_campaign(url: str, token: str, name: str, total: int) -> tuple[str, datetime]:
    """CreateCampaign (Connect JSON) of a campaign that started a minute ago: its id and
    starts_at."""
    starts_at = datetime.now(UTC) - timedelta(minutes=1)
    answer = httpx.post(
        f"{url}/coupon.v1.CouponService/CreateCampaign",
        json={
            "name": name,
            "totalCoupons": total,
            "startsAt": starts_at.isoformat().replace("+00:00", "Z"),
        },
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    if answer.status_code != 200:
        raise BenchBroke(f"CreateCampaign: HTTP {answer.status_code} {answer.text[:300]}")
    return str(answer.json()["campaign"]["id"]), starts_at


# --- state outside the processes ---------------------------------------------------------


def delete_redis_keys(prefix: str = REDIS_PREFIX) -> int:
    """Delete the Redis keys under `prefix:` (the bench's own) and nothing else."""
    client = redis.Redis.from_url(REDIS_URL)
    deleted = 0
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += client.unlink(*batch)
                batch.clear()
        if batch:
            deleted += client.unlink(*batch)
    finally:
        client.close()
    return deleted


async def drop_database() -> None:
    admin = await asyncpg.connect(ADMIN_DATABASE_URL)
    try:
        await admin.execute("DROP DATABASE IF EXISTS coupon_bench WITH (FORCE)")
    finally:
        await admin.close()


@dataclass
class Verdict:
    name: str
    rule: str
    ok: bool
    detail: str


async def verify(campaigns: dict[str, str], acks: dict[str, int]) -> list[Verdict]:
    """I1-I4 from the database for the bench campaigns (phase key -> id), and every
    acknowledged coupon stored (a necessary condition of I5: rows >= 2xx answers counted)."""
    ids = list(campaigns.values())
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        rows = await conn.fetch(
            "SELECT c.id::text AS id, c.total_coupons, count(k.id) AS stored"
            "  FROM campaigns c LEFT JOIN coupons k ON k.campaign_id = c.id"
            " WHERE c.id = ANY($1::uuid[]) GROUP BY c.id, c.total_coupons",
            ids,
        )
        duplicate_codes = await conn.fetchval(
            "SELECT count(*) FROM (SELECT code FROM coupons GROUP BY code HAVING count(*) > 1) d"
        )
        outside_window = await conn.fetchval(
            "SELECT count(*) FROM coupons k JOIN campaigns c ON c.id = k.campaign_id"
            " WHERE c.id = ANY($1::uuid[])"
            "   AND (k.issued_at < c.starts_at OR k.issued_at >= c.ends_at)",
            ids,
        )
        repeat_users = await conn.fetchval(
            "SELECT count(*) FROM (SELECT 1 FROM coupons WHERE campaign_id = ANY($1::uuid[])"
            " GROUP BY campaign_id, user_id HAVING count(*) > 1) d",
            ids,
        )
    finally:
        await conn.close()
    found = {r["id"]: r for r in rows}
    if set(found) != set(ids):
        raise BenchBroke(f"bench campaigns missing from the database: {set(ids) - set(found)}")
    stored = {key: found[cid]["stored"] for key, cid in campaigns.items()}
    total = {key: found[cid]["total_coupons"] for key, cid in campaigns.items()}
    acked = {key: acks.get(cid, 0) for key, cid in campaigns.items()}
    return [
        Verdict(
            "I1",
            "coupons <= total_coupons",
            all(stored[k] <= total[k] for k in campaigns),
            ", ".join(f"({k}) {stored[k]:,} of {total[k]:,}" for k in campaigns),
        ),
        Verdict("I2", "no duplicate code", duplicate_codes == 0, f"{duplicate_codes} duplicated"),
        Verdict(
            "I3",
            "issued_at in [starts_at, ends_at)",
            outside_window == 0,
            f"{outside_window} outside",
        ),
        Verdict("I4", "<= 1 coupon per user", repeat_users == 0, f"{repeat_users} repeated"),
        Verdict(
            "acks",
            "every 2xx answer is stored",
            all(acked[k] <= stored[k] for k in campaigns),
            ", ".join(f"({k}) {acked[k]:,} acked, {stored[k]:,} stored" for k in campaigns),
        ),
    ]


# --- reporting ---------------------------------------------------------------------------


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def search_text(probes: dict[int, dict[str, float]], best: int, seconds: float) -> str:
    """'search, req/s by wrk connections (5 s each): 64 25,970 · 128 27,566 (mean of 2) ...
    → 128'."""
    steps = " · ".join(
        f"{c} {p['requests_per_s']:,.0f}"
        + (f" (mean of {p['probes']:.0f})" if p.get("probes", 1) > 1 else "")
        + (f" ({p['errors']:.0f} errors)" if p["errors"] else "")
        for c, p in probes.items()
    )
    return f"search, req/s by wrk connections ({seconds:g} s each): {steps} → {best}"


def probe_ratios(searches: dict[str, dict[int, dict[str, float]]]) -> str:
    """(b)/(a) at each connection count both searches probed, or '' when one did not run."""
    a, b = searches.get("a"), searches.get("b")
    if not a or not b:
        return ""
    shared = [c for c in a if c in b]
    steps = " · ".join(
        f"{c} {b[c]['requests_per_s'] / a[c]['requests_per_s']:.2f}"
        for c in shared
        if a[c]["requests_per_s"]
    )
    return f"(b)/(a) at equal connections, from the search probes: {steps}"


def cpu_split(cores: dict[str, float]) -> str:
    parts = ("server", "generator", "postgres", "redis", "other", "idle")
    return " · ".join(f"{name} {cores.get(name, 0):.2f}" for name in parts)


def cpu_per_request(phase: Phase, cores: int | None) -> str:
    costs = phase.cpu_per_request_us()
    text = ", ".join(f"{name} {costs[name]:.0f}" for name in PARTIES)
    text = f"({phase.label}) CPU µs per request: {text}"
    if phase.key != "c" and cores:
        text += f" → CPU-bound at ~{phase.cpu_bound_rate(cores):,.0f} req/s on {cores} idle cores"
    return text


def other_users(phase: Phase) -> str:
    users = phase.raw.get("other_cpu_users") or []
    if not users:
        return ""
    return " (other: " + ", ".join(f"{name} {cores:.2f}" for name, cores in users) + ")"


def commit_label(meta: dict[str, Any], quote: str = "") -> str:
    return f"{quote}{meta['commit']}{quote}" + " (+uncommitted src/ changes)" * bool(meta["dirty"])


def git_commit() -> tuple[str, bool]:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    # What the servers run: src/ differing from the commit, new files included.
    dirty = bool(git("status", "--porcelain", "--", "src"))
    return commit, dirty


def ceiling(phases: dict[str, Phase]) -> float | None:
    """The ceiling (b) is compared with: the mean of (a) and (a') when both ran."""
    rates = [phases[k].requests_per_s for k in ("a", "a2") if k in phases]
    return sum(rates) / len(rates) if rates else None


def ratio(phases: dict[str, Phase]) -> float | None:
    top = ceiling(phases)
    return None if top is None or "b" not in phases else phases["b"].requests_per_s / top


def ratio_text(phases: dict[str, Phase]) -> str:
    """'(b)/(a) = 0.46', against each ceiling run when (a') ran too, and the same ratio of
    the CPU-bound rates (what the two would do if idle time and drift did not count)."""
    text = f"(b)/(a) = {ratio(phases):.2f}"
    if "a2" in phases:
        b = phases["b"].requests_per_s
        text += (
            f" (against the mean of (a) and (a'); {b / phases['a'].requests_per_s:.2f} against"
            f" (a) alone, {b / phases['a2'].requests_per_s:.2f} against (a') alone)"
        )
    cores = os.cpu_count() or 1
    ceilings = [phases[k].cpu_bound_rate(cores) for k in ("a", "a2") if k in phases]
    issues = phases["b"].cpu_bound_rate(cores)
    if issues and all(ceilings):
        text += f"; by CPU per request {issues / (sum(ceilings) / len(ceilings)):.2f}"
    return text


def targets(phases: dict[str, Phase]) -> list[tuple[str, bool | None, str]]:
    """(target, met or None when not measured, measured value)."""
    rows: list[tuple[str, bool | None, str]] = []
    b, c = phases.get("b"), phases.get("c")
    rows.append(
        (
            f"(b) >= {TARGET_B_PER_S:,} issued/s with zero errors",
            None if b is None else b.ok_per_s >= TARGET_B_PER_S and b.errors == 0,
            "-" if b is None else f"{b.requests_per_s:,.0f}/s, {b.errors} errors",
        )
    )
    measured = ratio(phases)
    rows.append(
        (
            f"(b)/(a) >= {TARGET_RATIO}",
            None if measured is None else measured >= TARGET_RATIO,
            "-" if measured is None else f"{measured:.2f}",
        )
    )
    rows.append(
        (
            f"(c) p99 <= {TARGET_C_P99_MS:g} ms",
            None if c is None or c.p99_ms is None else c.p99_ms <= TARGET_C_P99_MS,
            "-" if c is None else f"{fmt_ms(c.p99_ms)} ms",
        )
    )
    return rows


def verdict_word(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def memory_text(phases: dict[str, Phase]) -> list[str]:
    lines = []
    for label, key in (("no-op server", "a"), ("coupon server", "c" if "c" in phases else "b")):
        phase = phases.get(key)
        if phase is None:
            continue
        each = ", ".join(
            f"{m.get('rss', 0):.0f} MiB (peak {m.get('peak', 0):.0f})" for m in phase.worker_memory
        )
        lines.append(f"{label} RSS per worker: {each}")
    return lines


def phase_connections(phase: Phase) -> str:
    """The wrk connections a saturation phase ran with; '-' for the open-loop (c)."""
    return "-" if phase.key == "c" else str(phase.generator["connections"])


def connections_text(meta: dict[str, Any]) -> str:
    ladder = meta["connections"]
    if len(ladder) == 1:
        return f"{ladder[0]} connections"
    return "each saturation phase's peak of " + ",".join(map(str, ladder)) + " connections"


def search_lines(bench: Bench) -> list[str]:
    lines = []
    for key, probes in bench.searches.items():
        phase = bench.phases.get(key)
        if phase is not None:
            best = int(phase.generator["connections"])
            lines.append(f"({phase.label}) {search_text(probes, best, bench.args.probe)}")
    ratios = probe_ratios(bench.searches)
    return [*lines, ratios] if ratios else lines


def report_lines(bench: Bench, meta: dict[str, Any], verdicts: list[Verdict]) -> list[str]:
    phases = bench.phases
    header = (
        f"{'phase':<32} {'req/s':>9} {'conns':>6} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} "
        f"{'errors':>7}"
    )
    lines = [
        f"coupon bench {meta['date']}  commit {commit_label(meta)}",
        f"{meta['cores']} cores, {meta['workers']} worker(s), {meta['duration']:g} s per phase, "
        f"wrk -t{meta['threads']} at {connections_text(meta)}; service from {meta['source']}; "
        f"busy before start: {meta['background_cores']:.2f} cores",
        "",
        header,
        "-" * len(header),
    ]
    for phase in phases.values():
        title = phase.title + (f" {bench.args.rate:g}/s" if phase.key == "c" else "")
        lines.append(
            f"{title:<32} {phase.requests_per_s:>9,.0f} {phase_connections(phase):>6} "
            f"{fmt_ms(phase.p50_ms):>8} {fmt_ms(phase.p99_ms):>8} {fmt_ms(phase.p999_ms):>9} "
            f"{phase.errors:>7}"
        )
    lines.append("")
    if ratio(phases) is not None:
        lines.append(ratio_text(phases))
    lines.extend(search_lines(bench))
    lines.extend(memory_text(phases))
    lines.append("CPU while measuring, in cores (of " + str(meta["cores"]) + "):")
    for phase in phases.values():
        lines.append(
            f"  {phase.label}: {cpu_split(phase.cores)}{other_users(phase)}; "
            f"interrupts {phase.cores.get('irq', 0):.2f} (within the above)"
        )
    lines.extend(cpu_per_request(phase, meta["cores"]) for phase in phases.values())
    for phase in phases.values():
        gen = phase.generator
        if phase.key == "c":
            lag = gen["dispatch_lag_ms"]
            lines.append(
                f"generator (c): kept up: {'yes' if gen['kept_up'] else 'NO'} "
                f"(dispatch lag p50 {fmt_ms(lag['p50'])} / p99 {fmt_ms(lag['p99'])} ms; "
                f"server service time p99 {fmt_ms(gen['service_time_ms']['p99'])} ms)"
            )
        else:
            lines.append(
                f"generator ({phase.label}): {gen['tool']} used {gen['cores']:.2f} cores of "
                f"{gen['threads']} threads: {'SATURATED' if gen['saturated'] else 'not the limit'}"
            )
    for extra in bench.extra_ceilings:
        lines.append(
            f"generator check (a): wrk -t{extra['threads']} -c{extra['connections']}: "
            f"{extra['requests_per_s']:,.0f} req/s; cores: {cpu_split(extra['cores'])}"
        )
    lines.append("targets:")
    for name, ok, value in targets(phases):
        lines.append(f"  {verdict_word(ok):<4} {name}: {value}")
    if verdicts:
        lines.append("invariants (PostgreSQL, bench campaigns):")
        for v in verdicts:
            lines.append(f"  {'ok' if v.ok else 'VIOLATED':<8} {v.name} {v.rule}  {v.detail}")
    return lines


def markdown_section(bench: Bench, meta: dict[str, Any], verdicts: list[Verdict]) -> str:
    phases = bench.phases
    out = [
        f"## {meta['date']} · commit {commit_label(meta, '`')}",
        "",
        f"`{meta['command']}` · {meta['cores']} cores · {meta['workers']} worker(s) · "
        f"{meta['duration']:g} s per phase · wrk -t{meta['threads']} at {connections_text(meta)} · "
        f"service from {meta['source']} · busy before start: {meta['background_cores']:.2f} cores",
        "",
        "| phase | req/s | connections | p50 ms | p99 ms | p99.9 ms | errors (non-2xx) "
        "| CPU: server / generator / PostgreSQL / Redis / other / idle (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for phase in phases.values():
        title = phase.title + (f" {bench.args.rate:g}/s" if phase.key == "c" else "")
        c = phase.cores
        split = " / ".join(
            f"{c.get(k, 0):.2f}"
            for k in ("server", "generator", "postgres", "redis", "other", "idle")
        )
        out.append(
            f"| {title} | {phase.requests_per_s:,.0f} | {phase_connections(phase)} | "
            f"{fmt_ms(phase.p50_ms)} | "
            f"{fmt_ms(phase.p99_ms)} | {fmt_ms(phase.p999_ms)} | {phase.errors} | {split} |"
        )
    out.append("")
    notes = []
    if ratio(phases) is not None:
        notes.append(ratio_text(phases))
    notes.extend(search_lines(bench))
    notes.extend(memory_text(phases))
    notes.extend(cpu_per_request(phase, meta["cores"]) for phase in phases.values())
    notes.extend(
        f"({phase.label}) biggest other CPU users{other_users(phase).removeprefix(' (other')[:-1]}"
        for phase in phases.values()
        if other_users(phase)
    )
    for phase in phases.values():
        gen = phase.generator
        if phase.key == "c":
            lag = gen["dispatch_lag_ms"]
            notes.append(
                f"generator (c) kept up: {'yes' if gen['kept_up'] else 'NO'} (dispatch lag p99 "
                f"{fmt_ms(lag['p99'])} ms)"
            )
        else:
            notes.append(
                f"generator ({phase.label}): {gen['cores']:.2f} cores for {gen['threads']} wrk "
                f"threads ({'SATURATED' if gen['saturated'] else 'not the limit'})"
            )
    for extra in bench.extra_ceilings:
        notes.append(
            f"generator check (a): wrk -t{extra['threads']} -c{extra['connections']} → "
            f"{extra['requests_per_s']:,.0f} req/s (cores: {cpu_split(extra['cores'])})"
        )
    notes.append(
        "targets: "
        + "; ".join(
            f"**{verdict_word(ok)}** {name} ({value})" for name, ok, value in targets(phases)
        )
    )
    if verdicts:
        notes.append(
            "invariants: "
            + ", ".join(f"{v.name} {'ok' if v.ok else '**VIOLATED**'}" for v in verdicts)
        )
    out.extend(f"- {note}" for note in notes)
    return "\n".join(out) + "\n"


RESULTS_MD_HEAD = """# Bench results

Appended by `just bench` (bench/run.py), newest last. (a) is the ceiling: the same server
(granian up to the switch to uvicorn noted below, uvicorn since) and Connect stack answering
IssueCoupon with a constant; (b) IssueCoupon at saturation on a fresh 10,000,000-coupon
campaign, a new user per request; (a') the ceiling again right after (b), (b)/(a) being
taken against the mean of the two; (c) IssueCoupon at a fixed offered rate,
open loop, latency from the intended send time. Errors are non-2xx answers plus transport
failures. The CPU column is what each party used while the phase was measured, in cores;
"other" is everything else on the machine (other people's processes, and interrupt time that
lands on an otherwise idle core, which is why (c) shows ~0.1 there). Each saturation phase
runs at its own peak of connections, found by short probes.
"""


def write_outputs(bench: Bench, meta: dict[str, Any], verdicts: list[Verdict]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"{stamp}-{meta['commit']}.json"
    document = {
        **meta,
        "phases": {
            key: {
                "title": phase.title,
                "requests_per_s": phase.requests_per_s,
                "latency_ms": {"p50": phase.p50_ms, "p99": phase.p99_ms, "p99.9": phase.p999_ms},
                "errors": phase.errors,
                "requests": phase.requests,
                "ok": phase.ok,
                "cpu_cores": phase.cores,
                "cpu_us_per_request": phase.cpu_per_request_us(),
                "generator": phase.generator,
                "worker_memory_mib": phase.worker_memory,
                "raw": phase.raw,
            }
            for key, phase in bench.phases.items()
        },
        # (b) over the mean of (a) and (a') when both ran, else over (a).
        "ratio_b_over_a": ratio(bench.phases),
        "ceiling_requests_per_s": ceiling(bench.phases),
        "generator_checks": bench.extra_ceilings,
        # phase key -> wrk connections -> {requests_per_s, errors} of the probes
        "saturation_search": bench.searches,
        "campaigns": bench.campaigns,
        "targets": [
            {"target": name, "met": ok, "value": value} for name, ok, value in targets(bench.phases)
        ],
        "invariants": [v.__dict__ for v in verdicts],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    if not RESULTS_MD.exists():
        RESULTS_MD.write_text(RESULTS_MD_HEAD)
    with RESULTS_MD.open("a") as md:
        md.write("\n" + markdown_section(bench, meta, verdicts))
    return path


# --- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="just bench", description="Measure IssueCoupon against the no-op ceiling."
    )
    parser.add_argument("--workers", type=int, default=2, help="server workers (default 2)")
    parser.add_argument("--duration", type=float, help="seconds per phase (default 30)")
    parser.add_argument(
        "--connections",
        default=",".join(map(str, CONNECTION_LADDER)),
        help="wrk connections: a comma-separated ladder, searched for each saturation "
        "phase's peak (default %(default)s), or one count to measure every phase at",
    )
    parser.add_argument(
        "--probe", type=float, help="seconds per step of the saturation search (5; 2 quick)"
    )
    parser.add_argument("--only", default="a,b,c", help="phases to run, e.g. 'b' or 'a,b'")
    parser.add_argument("--quick", action="store_true", help="5 s per phase, 1 s warm-up")
    parser.add_argument("--rate", type=float, default=1000, help="(c) requests/s (1000)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="wrk threads (cores)"
    )
    parser.add_argument("--warmup", type=float, help="seconds of unmeasured load first (3)")
    parser.add_argument(
        "--ref",
        help="bench the service as committed at this git revision (e.g. HEAD) instead of "
        "the working tree, which others may be editing",
    )
    parser.add_argument(
        "--generator-check",
        action="store_true",
        help="rerun (a) for 10 s with half the wrk threads and twice the connections",
    )
    args = parser.parse_args(argv)
    args.only = sorted({p.strip() for p in args.only.split(",") if p.strip()})
    if not args.only or set(args.only) - set(PHASES):
        parser.error("--only takes a comma-separated subset of a,b,c")
    try:
        args.connections = sorted({int(c) for c in args.connections.split(",") if c.strip()})
    except ValueError:
        parser.error("--connections takes whole numbers, e.g. 128 or 64,128,256")
    if not args.connections or args.connections[0] < args.threads:
        parser.error("--connections: wrk needs at least one connection per thread")
    if args.duration is None:
        args.duration = 5.0 if args.quick else 30.0
    if args.probe is None:
        args.probe = 2.0 if args.quick else 5.0
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 3.0
    return args


def checkout_source(ref: str, into: Path) -> tuple[str, Path]:
    """src/ as committed at `ref`, unpacked under `into` (git archive: the repository and
    the working tree are untouched); its short commit and the directory to import from."""
    done = subprocess.run(
        ["git", "rev-parse", "--short", f"{ref}^{{commit}}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BenchBroke(f"--ref {ref}: {done.stderr.strip()}")
    commit = done.stdout.strip()
    archive = subprocess.run(
        ["git", "archive", commit, "src"], cwd=REPO, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return commit, into / "src"


def background_load(seconds: float = 2.0) -> float:
    """Cores the machine is busy with before the bench starts anything (others' work)."""
    busy = machine_seconds()["busy"]
    time.sleep(seconds)
    return (machine_seconds()["busy"] - busy) / seconds


def server_env(source: Path | None) -> dict[str, str]:
    """Servers import `coupon` from `source` when given (before the editable install), and
    `bench` from this repository."""
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": DATABASE_URL,
            "REDIS_URL": REDIS_URL,
            "COUPON_REDIS_PREFIX": REDIS_PREFIX,
            "COUPON_BACKEND": "postgres",
            # A token of our own: the admin RPCs work whatever APP_ENV says.
            "COUPON_ADMIN_TOKEN": uuid.uuid4().hex,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(source or ""), str(REPO), env.get("PYTHONPATH")])
            ),
        }
    )
    return env


@contextmanager
def bench_state() -> Iterator[None]:
    """A fresh bench database and no bench keys in Redis; the keys go again at the end."""
    asyncio.run(drop_database())
    delete_redis_keys()
    try:
        yield
    finally:
        deleted = delete_redis_keys()
        print(f"deleted {deleted} Redis keys under '{REDIS_PREFIX}:'", flush=True)


def base_meta(recipe: str, argv: list[str] | None, commit: str, dirty: bool) -> dict[str, Any]:
    """What every recorded run says of itself: when, which commit, which command, cores."""
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "dirty": dirty,
        "command": shlex.join(["just", recipe, *(sys.argv[1:] if argv is None else argv)]),
        "cores": os.cpu_count(),
    }


def allow_open_files(connections: int) -> None:
    """Room for wrk's sockets and the servers' (children inherit the limit): the soft limit
    on open files raised as far as the hard one allows, when it is short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * connections + 1024
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    allow_open_files(max(args.connections))
    log_dir = Path(tempfile.mkdtemp(prefix="coupon-bench-"))
    source = None
    if args.ref:
        try:
            commit, source = checkout_source(args.ref, log_dir)
        except (BenchBroke, subprocess.CalledProcessError) as exc:
            print(f"bench broke: {exc}", file=sys.stderr)
            return 2
        dirty = False
    else:
        commit, dirty = git_commit()
    meta: dict[str, Any] = {
        **base_meta("bench", argv, commit, dirty),
        "workers": args.workers,
        "duration": args.duration,
        "warmup": args.warmup,
        "threads": args.threads,
        "connections": args.connections,
        "rate": args.rate,
        "only": args.only,
        "source": f"git archive {commit}" if source else "working tree",
    }
    meta["background_cores"] = background_load()
    bench = Bench(args, server_env(source), log_dir)
    print(
        f"coupon bench: phases {','.join(args.only)}; "
        f"service from {f'commit {commit}' if source else 'the working tree'}; "
        f"server logs in {log_dir}",
        flush=True,
    )
    if meta["background_cores"] > 0.2:
        print(
            f"warning: the machine was already busy ({meta['background_cores']:.2f} cores) "
            "before the bench started: the figures will be lower than on a quiet machine",
            flush=True,
        )
    verdicts: list[Verdict] = []
    try:
        if set(args.only) & {"a", "b"}:
            ensure_wrk()
        with bench_state(), ExitStack() as servers:
            noop = None
            if "a" in args.only:
                noop = servers.enter_context(bench.ceiling_server())
                bench.run_ceiling(noop)
                if args.generator_check:
                    bench.check_generator(noop)
            service = [key for key in ("b", "c") if key in args.only]
            if service:
                # The no-op server idles meanwhile, ready to measure (a') right after (b).
                again = noop if "b" in service else None
                bench.run_service(
                    service, None if again is None else lambda: bench.run_ceiling(again, "a2")
                )
                verdicts = asyncio.run(verify(bench.campaigns, bench.acks))
    except BenchBroke as exc:
        print(f"\nbench broke: {exc}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - anything unexpected is a broken bench, say so
        traceback.print_exc()
        return 2
    lines = report_lines(bench, meta, verdicts)
    print("\n" + "\n".join(lines))
    path = write_outputs(bench, meta, verdicts)
    print(f"\nwrote {path.relative_to(REPO)} and appended to {RESULTS_MD.relative_to(REPO)}")
    return 0 if all(v.ok for v in verdicts) else 1
