"""Prometheus metrics. With several worker processes, every worker writes to the directory
named by PROMETHEUS_MULTIPROC_DIR (set by `coupon serve`) and /metrics adds them up.

The per-request metrics are tallied in plain Python numbers and written out in bulk (every
`FLUSH_SECONDS`, before this worker renders /metrics, and at shutdown): a write to the
shared files takes a lock, a getpid() and an mmap write, four of them per IssueCoupon
(4.7 us of the worker's CPU; the tallies take 0.2 us). Other workers' figures reach /metrics
within `FLUSH_SECONDS`.
"""

from __future__ import annotations

import contextlib
import math
import re
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.values import ValueClass

from coupon.application.periodic import periodically

if TYPE_CHECKING:
    import asyncpg

    from coupon.entrypoints.overload import Doorman

FLUSH_SECONDS = 1.0

# The files prometheus_client's multiprocess mode writes, one per metric type and process
# (prometheus_client/values.py: `<type>_<pid>.db`, a gauge's type followed by its mode).
# `coupon serve` clears these at start and /metrics reads these alone: any other file in a
# directory given by PROMETHEUS_MULTIPROC_DIR is the operator's, left alone.
METRICS_FILE = re.compile(
    r"(?:counter|histogram|summary|gauge_(?:live)?(?:all|min|max|sum|mostrecent))_[0-9]+\.db"
)


def metrics_files(directory: str | Path) -> list[Path]:
    """The metrics files of every process in `directory`."""
    return sorted(
        path for path in Path(directory).glob("*.db") if METRICS_FILE.fullmatch(path.name)
    )


LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        kw = {"registry": registry} if registry is not None else {}
        self.requests = Counter(
            "coupon_rpc_requests",
            "RPCs answered, by method and Connect code ('ok' for success).",
            ["rpc", "code"],
            **kw,  # type: ignore[arg-type]
        )
        self.latency = Histogram(
            "coupon_rpc_duration_seconds",
            "Time from receiving an RPC to its answer, by method.",
            ["rpc"],
            buckets=LATENCY_BUCKETS,
            **kw,  # type: ignore[arg-type]
        )
        self.issued = Counter(
            "coupon_coupons_issued",
            "Coupons newly issued (committed), by campaign.",
            ["campaign_id"],
            **kw,  # type: ignore[arg-type]
        )
        self.rejections = Counter(
            "coupon_issue_rejections",
            "IssueCoupon requests answered without a new coupon, by reason: turned away "
            "('overloaded', 'sold_out', 'not_started', 'ended', 'not_found', 'invalid', "
            "'unavailable', 'other'), or 'already_issued' (a repeat, answered ok with the "
            "user's coupon).",
            ["reason"],
            **kw,  # type: ignore[arg-type]
        )
        self.batch_size = Histogram(
            "coupon_db_batch_size",
            "Coupons committed per group-commit transaction.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            **kw,  # type: ignore[arg-type]
        )
        self.commit_latency = Histogram(
            "coupon_db_commit_seconds",
            "Duration of one group-commit transaction (insert and commit).",
            buckets=LATENCY_BUCKETS,
            **kw,  # type: ignore[arg-type]
        )
        self.connections_closed = Counter(
            "coupon_connections_closed",
            "Client connections the server closed to protect itself, by reason: "
            "'budget_idle' (idle, to make room past the connection budget), 'budget_full' "
            "(new, with the budget held by busy ones), 'abuse' (an HTTP/2 peer that floods "
            "frames that ask nothing or resets streams: GOAWAY ENHANCE_YOUR_CALM), "
            "'stalled' (a peer that stopped reading its answers).",
            ["reason"],
            **kw,  # type: ignore[arg-type]
        )

        # Gauges of what a process holds now, read when its tallies are written out (once a
        # second, and when this worker renders /metrics), never per request; summed over
        # the live workers. A worker that exits sets its own to 0 (see `watch`), and the
        # supervisor drops the files of one that died (supervisor.py).
        def gauge(name: str, documentation: str) -> Gauge:
            return Gauge(name, documentation, multiprocess_mode="livesum", **kw)  # type: ignore[arg-type]

        self.issue_in_flight = gauge(
            "coupon_issue_in_flight",
            "IssueCoupon requests let in and not yet answered, summed over the workers.",
        )
        self.issue_admission_limit = gauge(
            "coupon_issue_admission_limit",
            "The overload controller's admission limit (IssueCoupon requests let in at "
            "once), summed over the workers: in flight at the limit is overload.",
        )
        self.db_pool_in_use = gauge(
            "coupon_db_pool_connections_in_use",
            "PostgreSQL connections taken from the pools (the group commit keeps one "
            "between its commits), summed over the workers: at the max, the pool is spent.",
        )
        self.db_pool_open = gauge(
            "coupon_db_pool_connections_open",
            "PostgreSQL connections open in the pools, summed over the workers.",
        )
        self.db_pool_max = gauge(
            "coupon_db_pool_connections_max",
            "PostgreSQL connections the pools may open (COUPON_DB_POOL_SIZE per worker).",
        )

        self._tallies: list[CounterTally | HistogramTally] = []
        self._samplers: list[Callable[[], None]] = []
        self.connection_closes = self.counters(self.connections_closed)
        self._issued = self.counters(self.issued)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.commit_latency.observe(seconds)

    def observe_issued(self, campaign_id: str, count: int) -> None:
        """Coupons a commit newly recorded (the ledger says so where the commit settles,
        whether or not their callers still wait for them)."""
        self._issued(campaign_id).inc(count)

    def counter(self, child: Counter) -> CounterTally:
        """A tally in front of `child` (one labelled counter), written out by `flush`."""
        tally = CounterTally(child)
        self._tallies.append(tally)
        return tally

    def counters(self, metric: Counter) -> Children[CounterTally]:
        """Tallies in front of a labelled counter's children, one per label values."""
        return Children(lambda *values: self.counter(metric.labels(*values)))

    def histogram(self, child: Histogram) -> HistogramTally:
        """A tally in front of `child` (one labelled histogram), written out by `flush`."""
        tally = HistogramTally(child)
        self._tallies.append(tally)
        return tally

    def flush(self) -> None:
        """Write every tally out to its metric, and set the gauges to what they watch."""
        for tally in self._tallies:
            tally.flush()
        for sample in self._samplers:
            sample()

    @contextlib.contextmanager
    def watch(self, sample: Callable[[], None], gauges: Iterable[Gauge]) -> Iterator[None]:
        """While open, `sample` sets `gauges` at each flush; closed, they read 0 (the
        worker's share leaves the sum as the worker stops)."""
        self._samplers.append(sample)
        sample()
        try:
            yield
        finally:
            self._samplers.remove(sample)
            for each in gauges:
                each.set(0)

    def watch_doorman(self, doorman: Doorman) -> contextlib.AbstractContextManager[None]:
        def sample() -> None:
            self.issue_in_flight.set(doorman.in_flight)
            self.issue_admission_limit.set(math.floor(doorman.limit))

        return self.watch(sample, (self.issue_in_flight, self.issue_admission_limit))

    def watch_pool(self, pool: asyncpg.Pool) -> contextlib.AbstractContextManager[None]:
        def sample() -> None:
            size = pool.get_size()
            self.db_pool_open.set(size)
            self.db_pool_in_use.set(size - pool.get_idle_size())
            self.db_pool_max.set(pool.get_max_size())

        return self.watch(sample, (self.db_pool_in_use, self.db_pool_open, self.db_pool_max))

    def flushing(
        self, seconds: float = FLUSH_SECONDS
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """Flush every `seconds` while open, and once more when closed."""

        async def flush() -> None:
            self.flush()

        return periodically(seconds, flush)


class CounterTally:
    __slots__ = ("_child", "_pending")

    def __init__(self, child: Counter) -> None:
        self._child = child
        self._pending = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self._pending += amount

    def flush(self) -> None:
        pending = self._pending
        if pending:
            self._pending = 0.0
            self._child.inc(pending)


class HistogramTally:
    """Counts per bucket and a sum, written to the histogram's own values: what `observe`
    writes there, once per bucket instead of once per observation."""

    __slots__ = ("_bounds", "_buckets", "_counts", "_sum", "_total")

    def __init__(self, child: Histogram) -> None:
        # prometheus_client's own fields of a labelled histogram (tests/unit/test_metrics.py
        # checks that a flushed tally reads exactly as the same observations would).
        self._bounds: list[float] = list(child._upper_bounds)
        self._buckets: list[ValueClass] = child._buckets
        self._sum: ValueClass = child._sum
        self._counts = [0] * len(self._bounds)
        self._total = 0.0

    def observe(self, amount: float) -> None:
        self._total += amount
        # The first bucket whose upper bound is >= amount, as `Histogram.observe` picks.
        self._counts[bisect_left(self._bounds, amount)] += 1

    def flush(self) -> None:
        counts = self._counts
        if not any(counts):
            return
        self._counts = [0] * len(counts)
        total, self._total = self._total, 0.0
        self._sum.inc(total)
        for bucket, count in zip(self._buckets, counts, strict=True):
            if count:
                bucket.inc(count)


T = TypeVar("T")


class Children(Generic[T]):
    """A labelled metric's children (or their tallies), made once per label values:
    `labels()` builds a key and takes a lock on every call, which the IssueCoupon path
    would pay per request."""

    def __init__(self, make: Callable[..., T]) -> None:
        self._make = make
        self._children: dict[tuple[str, ...], T] = {}

    def __call__(self, *values: str) -> T:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._make(*values)
        return child


_METRICS: Metrics | None = None


def get_metrics() -> Metrics:
    """The process's metrics (registered once: prometheus_client's registry is global)."""
    global _METRICS  # noqa: PLW0603
    if _METRICS is None:
        _METRICS = Metrics()
    return _METRICS


class _WorkersMetrics:
    """prometheus_client's MultiProcessCollector over the metrics files alone (it reads
    every `*.db` file, and another one fails the whole scrape)."""

    def __init__(self, directory: str) -> None:
        self._directory = directory

    def collect(self) -> Iterable[Metric]:
        files = [str(path) for path in metrics_files(self._directory)]
        merged: Iterable[Metric] = MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
        return merged


def render(directory: str) -> tuple[bytes, str]:
    """The exposition text: all workers' metrics when running multi-process."""
    if directory:
        registry = CollectorRegistry()
        registry.register(_WorkersMetrics(directory))
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
