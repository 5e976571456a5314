"""The parent process: set up the campaign, drive the workers, collect, read back, verify."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from coupon_loadtest.herd import UserBook
from coupon_loadtest.histogram import LatencyHistogram
from coupon_loadtest.ledger import (
    READBACK_TIMEOUT_S,
    api_ledger,
    check_database,
    database_ledger,
    with_retries,
)
from coupon_loadtest.progress import Progress, Snapshot
from coupon_loadtest.records import Observations
from coupon_loadtest.scenario import AdminApi, LoadConfig, SetupError, Target, prepare
from coupon_loadtest.verify import Ledger
from coupon_loadtest.worker import (
    COUNTERS,
    NO_STOP,
    Go,
    HerdSpec,
    WorkerResult,
    WorkerSpec,
    process_main,
)
from coupon_loadtest.worker import C as COUNTER

NS_PER_S = 1_000_000_000
_READY_TIMEOUT_S = 60.0
# Workers get this long to start sending after the go, so they all begin at the same t0.
_GO_MARGIN_NS = 100_000_000
_TICK_S = 0.1
_DRAW_EVERY = 3  # ticks
_STOCK_POLL_S = 1.0


@dataclass
class RunData:
    config: LoadConfig
    target: Target
    t0_wall_ns: int
    stop_rel_ns: int
    settled_rel_ns: int | None
    results: list[WorkerResult]
    observations: Observations
    histograms: dict[str, LatencyHistogram]
    ledgers: list[Ledger]
    interrupted: bool = False
    herd: UserBook | None = None  # every user of the herd, in process order
    starts_rel_ns: int = 0  # starts_at in the client's clock, after t0
    # Sources whose coupons could not be read back after the load, and why.
    unread: dict[str, str] = field(default_factory=dict)
    # Why the burst settled at settled_rel_ns: "sold out", "every user served" or
    # "campaign ended".
    settled_by: str = ""


class Console:
    """Phase messages on stderr, unless --quiet."""

    def __init__(self, *, quiet: bool) -> None:
        self.quiet = quiet

    def info(self, message: str) -> None:
        if not self.quiet:
            print(f"loadtest: {message}", file=sys.stderr, flush=True)


def _recv(conn: Connection, timeout_s: float) -> Any:
    if not conn.poll(timeout_s):
        raise TimeoutError(f"no answer from a worker within {timeout_s:g} s")
    return conn.recv()


def _last_words(conn: Connection, exitcode: int | None) -> str:
    """A dead worker's error report, read from its pipe (it sends one before it exits on an
    error), or its exit code when there is none."""
    with contextlib.suppress(EOFError, OSError):
        while conn.poll(0):
            message = conn.recv()
            if message[0] == "error":
                return f"\n{message[2]}"
    return f"exited with code {exitcode}"


def _herd_spec(config: LoadConfig, index: int) -> HerdSpec | None:
    if not config.herd:
        return None
    return HerdSpec(
        spread_ns=round(config.spread_s * NS_PER_S),
        patience_ns=round(config.patience_s * NS_PER_S),
        retry_floor_ns=round(config.retry_floor_s * NS_PER_S),
        retry_cap_ns=round(config.retry_cap_s * NS_PER_S),
        connections=len(range(index, config.connections, config.processes)),
    )


def _specs(config: LoadConfig, user_prefix: str) -> list[WorkerSpec]:
    processes = config.processes
    concurrency = config.concurrency or 0
    return [
        WorkerSpec(
            index=k,
            processes=processes,
            url=config.url,
            json=config.json,
            timeout_s=config.timeout_s,
            ca_file=config.ca_file,
            max_inflight=config.max_inflight,
            rate=config.rate if config.open_loop else None,
            concurrency=len(range(k, concurrency, processes)),
            users=config.users,
            repeat_fraction=config.repeat_fraction,
            seed=config.seed,
            user_prefix=user_prefix,
            herd=_herd_spec(config, k),
        )
        for k in range(processes)
    ]


class _Pool:
    """The worker processes and their pipes; always torn down, whatever happens."""

    def __init__(self, specs: list[WorkerSpec]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.counters: Any = ctx.RawArray("q", len(specs) * len(COUNTERS))
        self.stop_at: Any = ctx.RawValue("q", NO_STOP)
        self.conns: list[Connection] = []
        self.procs: list[BaseProcess] = []
        for spec in specs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=process_main,
                args=(spec, child, self.counters, self.stop_at),
                name=f"loadtest-worker-{spec.index}",
                daemon=True,
            )
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def total(self, name: str) -> int:
        width = len(COUNTERS)
        return sum(self.counters[k * width + COUNTER[name]] for k in range(len(self.procs)))

    def all_done(self) -> bool:
        width = len(COUNTERS)
        return all(self.counters[k * width + COUNTER["done"]] for k in range(len(self.procs)))

    def last_words(self, k: int) -> str:
        """Why worker k died: the traceback it sent, if it sent one before exiting."""
        return _last_words(self.conns[k], self.procs[k].exitcode)

    def dead_worker(self) -> int | None:
        width = len(COUNTERS)
        for k, proc in enumerate(self.procs):
            if not proc.is_alive() and not self.counters[k * width + COUNTER["done"]]:
                return k
        return None

    def stop(self, rel_ns: int) -> None:
        self.stop_at.value = min(self.stop_at.value, rel_ns)

    async def receive(self, what: str, timeout_s: float) -> list[Any]:
        messages = await asyncio.gather(
            *(asyncio.to_thread(_recv, conn, timeout_s) for conn in self.conns),
            return_exceptions=True,
        )
        out: list[Any] = []
        for k, message in enumerate(messages):
            if isinstance(message, BaseException):
                raise SetupError(f"worker {k} failed while {what}: {message!r}")
            if message[0] == "error":
                raise SetupError(f"worker {k} failed while {what}:\n{message[2]}")
            out.append(message)
        return out

    def send_all(self, message: object) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(message)

    async def close(self) -> None:
        # Workers still sending (the parent failed mid-run) stop at once; workers still
        # waiting for the go give up.
        self.stop(0)
        self.send_all(("abort",))
        for proc in self.procs:
            await asyncio.to_thread(proc.join, 5.0)
            if proc.is_alive():
                proc.kill()
                await asyncio.to_thread(proc.join, 5.0)
        for conn in self.conns:
            conn.close()


async def execute(config: LoadConfig, console: Console) -> RunData:
    user_prefix = f"lt-{uuid.uuid4().hex[:8]}-"
    pool = _Pool(_specs(config, user_prefix))
    api = AdminApi(
        config.url,
        admin_token=config.admin_token,
        json=config.json,
        timeout_s=config.timeout_s,
        ca_file=config.ca_file,
    )
    try:
        # Processes start while the campaign does not exist yet, so that a slow spawn does
        # not eat into the time before the start that the early requests are meant to probe.
        await pool.receive("starting", _READY_TIMEOUT_S)
        if config.database_url:
            # Before a campaign is created: an unusable URL stops the run with nothing made.
            await check_database(config.database_url, None, config.timeout_s)
        target = await prepare(config, api)
        plan = target.plan
        if config.database_url:
            await check_database(config.database_url, plan.campaign_id, config.timeout_s)
        clock = (
            f"clock offset {target.clock.offset_ns / 1e6:+.3f} ms "
            f"± {target.clock.uncertainty_ns / 1e6:.3f} ms ({target.clock.source})"
        )
        if target.created:
            # By the service's clock, which decides the start: what is left of --start-in.
            starts_in_s = (plan.starts_at_ns - target.clock.to_server(time.time_ns())) / NS_PER_S
            console.info(
                f"created campaign {plan.campaign_id}: {plan.total_coupons} coupons, starts in "
                f"{starts_in_s:.1f} s; {clock}"
            )
        else:
            console.info(
                f"targeting campaign {plan.campaign_id}: {plan.stock} of "
                f"{plan.total_coupons} coupons left; {clock}"
            )
        t0 = time.time_ns() + _GO_MARGIN_NS
        starts_rel = plan.starts_at_ns - target.clock.offset_ns - t0
        run_for_s = config.duration_s if config.duration_s is not None else config.max_duration_s
        end_rel = round(run_for_s * NS_PER_S)
        if config.herd:
            # The last user presses at the end of the spread; the last answer comes at most
            # a patience and a time-out later.
            last_s = config.spread_s + config.patience_s + config.timeout_s + 5.0
            end_rel = max(starts_rel, 0) + round(last_s * NS_PER_S)
        pool.send_all(("go", Go(plan.campaign_id, t0, end_rel, starts_rel)))
        settled, settled_by, interrupted = await _drive(config, target, pool, api, t0)
        messages = await pool.receive("reporting", config.timeout_s + _READY_TIMEOUT_S)
        results: list[WorkerResult] = sorted((m[1] for m in messages), key=lambda r: r.index)
    finally:
        await pool.close()
        await api.aclose()
    console.info("load finished; reading back the issued coupons")
    ledgers, unread = await _read_back(config, plan.campaign_id)
    for source, why in unread.items():
        console.info(f"could not read back the coupons from the {source}: {why}")
    observations = Observations(user_prefix, t0)
    histograms: dict[str, LatencyHistogram] = {}
    herd = UserBook.empty() if config.herd else None
    for result in results:
        observations.extend(result.observations)
        if herd is not None and result.herd is not None:
            herd.extend(result.herd)
        for name, blob in result.histograms.items():
            histogram = LatencyHistogram.decode(blob)
            if name in histograms:
                histograms[name].merge(histogram)
            else:
                histograms[name] = histogram
    return RunData(
        config=config,
        target=target,
        t0_wall_ns=t0,
        # A herd's processes end when their users have: the load lasts until the last one.
        stop_rel_ns=(max if config.herd else min)(r.stop_rel_ns for r in results),
        settled_rel_ns=settled,
        settled_by=settled_by,
        results=results,
        observations=observations,
        histograms=histograms,
        ledgers=ledgers,
        interrupted=interrupted,
        herd=herd,
        starts_rel_ns=starts_rel,
        unread=unread,
    )


async def _read_back(config: LoadConfig, campaign_id: str) -> tuple[list[Ledger], dict[str, str]]:
    """Every issued coupon from the API (and PostgreSQL), with a time-out of its own and a
    few attempts; a source that still cannot be read is reported, not fatal: the load's
    results are not lost to it."""
    ledgers: list[Ledger] = []
    unread: dict[str, str] = {}
    api = AdminApi(
        config.url,
        admin_token=config.admin_token,
        json=config.json,
        timeout_s=max(READBACK_TIMEOUT_S, config.timeout_s),
        ca_file=config.ca_file,
    )
    try:
        got = await with_retries(lambda: api_ledger(api, campaign_id))
    finally:
        await api.aclose()
    if isinstance(got, str):
        unread["api"] = got
    else:
        ledgers.append(got)
    if config.database_url:
        database_url = config.database_url
        got = await with_retries(lambda: database_ledger(database_url, campaign_id))
        if isinstance(got, str):
            unread["database"] = got
        else:
            ledgers.append(got)
    return ledgers, unread


async def _drive(
    config: LoadConfig, target: Target, pool: _Pool, api: AdminApi, t0: int
) -> tuple[int | None, str, bool]:
    """Watch the workers until they are done; stop them once the campaign has settled.

    A burst's campaign has settled when nothing more can be issued: it is sold out, every
    user holds a coupon, or it has ended (a refusal said so, or its end time has passed by
    the server's clock). The load then goes on for --tail, unless --duration sets it.
    """
    progress = Progress(quiet=config.quiet)
    interrupted = False
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()

    def interrupt() -> None:
        # First Ctrl-C: stop sending, keep what was seen, verify and report it. Second: abort.
        nonlocal interrupted
        if interrupted and me is not None:
            me.cancel()
        interrupted = True
        pool.stop(time.time_ns() - t0)

    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, interrupt)
    stock_left: list[int | None] = [None]
    poller = asyncio.create_task(_poll_stock(api, target, stock_left)) if progress.live else None
    # starts_at in our clock, relative to the load start.
    starts_rel = target.plan.starts_at_ns - target.clock.offset_ns - t0
    # ends_at in our clock: the latest moment the server's clock can still be before it.
    ends_at = target.plan.ends_at_ns
    ends_rel = (
        None
        if ends_at is None
        else ends_at - target.clock.offset_ns + target.clock.uncertainty_ns - t0
    )
    settled: int | None = None
    settled_by = ""
    last_sent, last_time = 0, time.monotonic()
    tick = 0
    try:
        while not pool.all_done():
            await asyncio.sleep(_TICK_S)
            tick += 1
            dead = pool.dead_worker()
            if dead is not None:
                raise SetupError(f"worker {dead} failed mid-run: {pool.last_words(dead)}")
            now_rel = time.time_ns() - t0
            # A herd ends by itself: every user stops at a final answer or their patience.
            if settled is None and not config.herd:
                if pool.total("sold_out") > 0:
                    settled_by = "sold out"
                elif pool.total("users_served") >= config.users:
                    settled_by = "every user served"
                elif pool.total("ended") > 0 or (ends_rel is not None and now_rel >= ends_rel):
                    settled_by = "campaign ended"
                if settled_by:
                    settled = now_rel
                    if config.duration_s is None:
                        pool.stop(now_rel + round(config.tail_s * NS_PER_S))
            if progress.live and tick % _DRAW_EVERY == 0:
                sent = pool.total("sent")
                issued = pool.total("ok")
                # The server's figure is up to a poll old; what clients received is current.
                left = target.plan.stock - issued
                if stock_left[0] is not None:
                    left = min(left, stock_left[0])
                now_mono = time.monotonic()
                rate = (sent - last_sent) / max(now_mono - last_time, 1e-9)
                last_sent, last_time = sent, now_mono
                progress.update(
                    Snapshot(
                        elapsed_s=now_rel / NS_PER_S,
                        to_start_s=(starts_rel - now_rel) / NS_PER_S,
                        sent=sent,
                        issued=issued,
                        repeats=pool.total("ok_repeat"),
                        sold_out=pool.total("sold_out"),
                        not_open=pool.total("not_open"),
                        errors=pool.total("errors"),
                        lost=pool.total("lost"),
                        inflight=pool.total("inflight"),
                        rate=rate,
                        stock_left=max(left, 0),
                    )
                )
    finally:
        progress.close()
        if poller is not None:
            poller.cancel()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
    return settled, settled_by, interrupted


async def _poll_stock(api: AdminApi, target: Target, out: list[int | None]) -> None:
    """Stock left per the server, for the live display only."""
    while True:
        with contextlib.suppress(Exception):
            page = await api.get_page(target.plan.campaign_id, page_size=1)
            if page.campaign is not None:
                out[0] = page.campaign.total_coupons - page.campaign.issued_count
        await asyncio.sleep(_STOCK_POLL_S)
