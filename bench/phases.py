"""The throughput phases of `just bench`: the two ceilings, IssueCoupon at saturation, and
IssueCoupon at a fixed rate, each on servers started here."""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.generators import (
    BenchBroke,
    openloop_argv,
    run_generator,
    wrk_argv,
    wrk_rate,
)
from bench.search import Probes, search_peak, search_text
from bench.state import post_campaign
from harness.procstat import CpuSnapshot, named
from harness.server import ServerProcess

CAMPAIGN_SIZE = 10_000_000
TITLES = {
    "a1": "(a1) Connect app, constant",
    "a2": "(a2) fast dispatch, constant",
    "b": "(b) IssueCoupon, saturation",
    "a1r": "(a1') Connect app again",
    "a2r": "(a2') fast dispatch again",
    "c": "(c) IssueCoupon, fixed rate",
}
LABELS = {"a1": "a1", "a2": "a2", "b": "b", "a1r": "a1'", "a2r": "a2'", "c": "c"}
CEILINGS = {"a1": "connect", "a2": "fast"}  # key -> noop_app --dispatch
AGAIN = {"a1": "a1r", "a2": "a2r"}
PARTIES = ("server", "generator", "postgres", "redis")
# (c) offers a fixed rate on up to this many keep-alive connections.
OPEN_LOOP_CONNECTIONS = 128


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
        """How the text names the phase: a1, a2, b, a1', a2', c."""
        return LABELS[self.key]

    def cpu_per_request_us(self) -> dict[str, float]:
        """CPU microseconds each party spent per successful answer (an issued coupon in (b)
        and (c); whatever a phase also turned away is paid for by what it issued): unlike
        req/s, barely moved by whatever else the machine is doing."""
        rate = self.ok_per_s
        if not rate:
            return {}
        return {k: self.cores[k] * 1e6 / rate for k in PARTIES}

    def cpu_bound_rate(self, cores: int) -> float:
        """The rate at which the measured parties would fill `cores` idle cores."""
        per_request = sum(self.cpu_per_request_us().values())
        return cores * 1e6 / per_request if per_request else 0.0

    @property
    def ok_per_s(self) -> float:
        return self.requests_per_s * self.ok / self.requests if self.requests else 0.0


def cpu_groups(server: ServerProcess) -> dict[str, list[int]]:
    """The processes whose CPU a phase reports: the server's, PostgreSQL's and Redis's."""
    return {
        "server": server.pids(),
        "postgres": named("postgres"),
        "redis": named("redis-server"),
    }


def measure(
    server: ServerProcess, drive: Callable[[], tuple[dict[str, Any], float]]
) -> tuple[dict[str, Any], dict[str, float]]:
    """Run `drive` (a generator) and the CPU split while it ran, in cores."""
    start, started = CpuSnapshot.take(cpu_groups(server)), time.monotonic()
    result, generator_cpu = drive()
    wall = time.monotonic() - started
    end = CpuSnapshot.take(cpu_groups(server))
    cores = end.cores_used_since(start, wall, extra={"generator": generator_cpu})
    result["other_cpu_users"] = end.top_others(start, wall)
    return result, cores


def step(what: str, server: ServerProcess) -> None:
    print(f"  {what}: {server.name} server on port {server.port} ...", flush=True)


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
    searches: dict[str, Probes] = field(default_factory=dict)
    user_sets: set[str] = field(default_factory=set)  # the users label of every run
    extra: dict[str, Any] = field(default_factory=dict)  # the overload phase's record

    def users(self, label: str) -> str:
        """A users label for one run: a user asks once, and a second run with the same
        users would be answered from the gate (their coupon again), faster and storing
        nothing."""
        if label in self.user_sets:
            raise BenchBroke(f"users {label!r} would repeat an earlier run's users")
        self.user_sets.add(label)
        return f"{label}-{self.run_id}"

    def wrk(
        self,
        server: ServerProcess,
        campaign: str,
        users: str,
        seconds: float,
        connections: int,
        threads: int | None = None,
    ) -> tuple[dict[str, Any], float]:
        threads = threads or self.args.threads
        argv = wrk_argv(
            server.url,
            campaign,
            self.users(users),
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

    def saturation_point(self, key: str, server: ServerProcess, campaign: str) -> int:
        """The connection count at which `server` answers most (see `search_peak`)."""
        ladder: list[int] = self.args.connections
        if len(ladder) == 1:
            return ladder[0]
        probes = itertools.count(1)

        def probe(connections: int) -> tuple[float, int]:
            # Each probe its own users, a count probed twice included.
            users = f"probe{key}{connections}n{next(probes)}"
            result, _ = self.wrk(server, campaign, users, self.args.probe, connections)
            # Successful answers: a count at which the server turns requests away must
            # not win by the cheap 503s.
            ok_rate = wrk_rate(result) * result["ok"] / max(1, result["requests"])
            return ok_rate, int(result["failed"])

        self.searches[key], chosen = search_peak(ladder, probe, least=self.args.threads)
        print(f"    {search_text(self.searches[key], chosen, self.args.probe)}", flush=True)
        return chosen

    def saturation_phase(
        self, key: str, server: ServerProcess, campaign: str, connections: int | None = None
    ) -> Phase:
        """`key` at saturation: at `connections` when given, else at the count the
        saturation search finds."""
        if self.args.warmup > 0:
            warm = connections or self.args.connections[0]
            self.wrk(server, campaign, f"warm{key}", self.args.warmup, warm)
        chosen = connections or self.saturation_point(key, server, campaign)
        result, cores = measure(
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

    def fixed_rate_phase(self, server: ServerProcess, campaign: str) -> Phase:
        """(c): bench/openloop.c at --rate, open loop, at real-time priority when allowed
        (it sleeps between sends, so it keeps its schedule without hogging a core)."""
        argv = openloop_argv(
            server.port,
            campaign,
            self.users("c"),
            rate=self.args.rate,
            seconds=self.args.duration,
            connections=OPEN_LOOP_CONNECTIONS,
            realtime=True,
        )
        result, cores = measure(
            server, lambda: run_generator(argv, timeout=self.args.duration + 60)
        )
        ok = int(result["answers"]["ok"])
        self.acks[campaign] = self.acks.get(campaign, 0) + ok
        latency = result["latency_ms"]["ok"]
        window = float(result["duration_s"]) or 1.0
        return Phase(
            key="c",
            requests_per_s=int(result["answered"]) / window,
            p50_ms=latency.get("p50"),
            p99_ms=latency.get("p99"),
            p999_ms=latency.get("p99.9"),
            errors=int(result["due"]) - ok,
            requests=int(result["due"]),
            ok=ok,
            cores=cores,
            generator={
                "tool": f"bench/openloop.c {self.args.rate:g}/s (open loop)",
                "cores": cores["generator"],
                "kept_up": result["kept_up"],
                "realtime_priority": result["realtime_priority"],
                "dispatch_lag_ms": result["dispatch_lag_ms"],
                "service_time_ms": result["service_time_ms"],
                "saturated": not result["kept_up"],
            },
            worker_memory=server.worker_memory(),
            raw={k: v for k, v in result.items() if k != "timeline"},
        )

    def ceiling_server(self, key: str) -> ServerProcess:
        argv = [sys.executable, "-m", "bench.noop_app", "--dispatch", CEILINGS[key]]
        return ServerProcess(
            env=self.env,
            workers=self.args.workers,
            argv=argv,
            name=f"noop-{CEILINGS[key]}",
            log_dir=self.log_dir,
            inherit_env=True,
        )

    def run_ceiling(self, server: ServerProcess, key: str) -> None:
        """A ceiling at its own peak, or (again) at the count its first run chose."""
        first = next((k for k, again in AGAIN.items() if again == key), None)
        step(TITLES[key], server)
        connections = None if first is None else int(self.phases[first].generator["connections"])
        self.phases[key] = self.saturation_phase(key, server, str(uuid.uuid4()), connections)
        show_phase(self.phases[key])

    def check_generator(self, server: ServerProcess) -> None:
        """(a1) again with fewer wrk threads and with twice the connections: if the
        generator were the limit, the figure would move with it."""
        threads = self.args.threads
        connections = int(self.phases["a1"].generator["connections"])
        for t, c in ((max(1, threads // 2), connections), (threads, connections * 2)):
            if (t, c) == (threads, connections):
                continue

            def drive(t: int = t, c: int = c) -> tuple[dict[str, Any], float]:
                return self.wrk(server, str(uuid.uuid4()), f"g{t}x{c}", 10, c, t)

            result, cores = measure(server, drive)
            rate = wrk_rate(result)
            self.extra_ceilings.append(
                {"threads": t, "connections": c, "requests_per_s": rate, "cores": cores}
            )
            print(f"    generator check: wrk -t{t} -c{c}: {rate:,.0f} req/s", flush=True)

    def coupon_server(self, workers: int | None = None, cpus: str | None = None) -> ServerProcess:
        return ServerProcess(
            env=self.env,
            workers=workers or self.args.workers,
            log_dir=self.log_dir,
            cpus=cpus,
            inherit_env=True,
        )

    def create_campaign(self, url: str, key: str, total: int = CAMPAIGN_SIZE) -> str:
        """A campaign that started a minute ago, recorded for the audit at the end."""
        campaign_id, _ = post_campaign(
            url, self.env["COUPON_ADMIN_TOKEN"], f"bench {self.run_id} {key}", total
        )
        self.campaigns[key] = campaign_id
        return campaign_id

    def run_service(self, keys: list[str], after_b: Callable[[], None] | None = None) -> None:
        with self.coupon_server() as server:
            for key in keys:
                self.create_campaign(server.url, key)
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


def cpu_split(cores: dict[str, float]) -> str:
    parts = ("server", "generator", "postgres", "redis", "other", "idle")
    return " · ".join(f"{name} {cores.get(name, 0):.2f}" for name in parts)


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def show_phase(phase: Phase) -> None:
    at = f" at {phase.generator['connections']} connections" if phase.key != "c" else ""
    print(
        f"    {phase.requests_per_s:,.0f} req/s{at}, p99 {fmt_ms(phase.p99_ms)} ms, "
        f"{phase.errors} errors; cores: {cpu_split(phase.cores)}",
        flush=True,
    )
