"""Prometheus metrics. With several worker processes, every worker writes to the directory
named by PROMETHEUS_MULTIPROC_DIR (set by `coupon serve`) and /metrics adds them up."""

from __future__ import annotations

from typing import Generic, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector

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
            "IssueCoupon requests turned away, by reason.",
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

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.commit_latency.observe(seconds)


M = TypeVar("M", bound=MetricWrapperBase)


class Children(Generic[M]):
    """A labelled metric's children, looked up once per label values: `labels()` builds a
    key and takes a lock on every call, which the IssueCoupon path would pay per request."""

    def __init__(self, metric: M) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


_METRICS: Metrics | None = None


def get_metrics() -> Metrics:
    """The process's metrics (registered once: prometheus_client's registry is global)."""
    global _METRICS  # noqa: PLW0603
    if _METRICS is None:
        _METRICS = Metrics()
    return _METRICS


def render(directory: str) -> tuple[bytes, str]:
    """The exposition text: all workers' metrics when running multi-process."""
    if directory:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
