"""Per-request metrics are tallied in the process and written out in bulk; what a scrape
reads after a flush is exactly what writing every observation would have given."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Gauge, generate_latest, values

from coupon.entrypoints.connect_service import Observed
from coupon.entrypoints.metrics import LATENCY_BUCKETS, Children, Metrics, metrics_files

AMOUNTS = st.lists(
    st.one_of(
        st.floats(min_value=0, max_value=10, allow_nan=False),
        st.sampled_from(LATENCY_BUCKETS),  # exactly on a bound: the bound's own bucket
    ),
    max_size=50,
)


def exposition(metrics: Metrics, registry: CollectorRegistry) -> list[str]:
    """The histogram's samples, without the creation timestamp that differs per registry."""
    lines = generate_latest(registry).decode().splitlines()
    return [line for line in lines if "_created" not in line and "duration" in line]


@given(AMOUNTS)
def test_a_flushed_histogram_tally_reads_as_direct_observations(amounts: list[float]) -> None:
    direct_registry, tallied_registry = CollectorRegistry(), CollectorRegistry()
    direct, tallied = Metrics(direct_registry), Metrics(tallied_registry)
    tally = tallied.histogram(tallied.latency.labels("IssueCoupon"))
    child = direct.latency.labels("IssueCoupon")
    for amount in amounts:
        child.observe(amount)
        tally.observe(amount)
    tallied.flush()
    assert exposition(tallied, tallied_registry) == exposition(direct, direct_registry)
    tallied.flush()  # nothing pending: nothing written twice
    assert exposition(tallied, tallied_registry) == exposition(direct, direct_registry)


def test_a_counter_tally_is_written_on_flush_only() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    tally = metrics.counter(metrics.issued.labels("c1"))
    tally.inc()
    tally.inc(2)

    def value() -> float | None:
        return registry.get_sample_value("coupon_coupons_issued_total", {"campaign_id": "c1"})

    assert value() == 0
    metrics.flush()
    assert value() == 3
    metrics.flush()
    assert value() == 3


async def test_flushing_writes_while_open_and_once_more_on_close() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    tally = metrics.counter(metrics.requests.labels("IssueCoupon", "ok"))
    labels = {"rpc": "IssueCoupon", "code": "ok"}
    async with metrics.flushing(seconds=0.01):
        tally.inc()
        for _ in range(200):
            await asyncio.sleep(0.01)
            if registry.get_sample_value("coupon_rpc_requests_total", labels) == 1:
                break
        assert registry.get_sample_value("coupon_rpc_requests_total", labels) == 1
        tally.inc()
    assert registry.get_sample_value("coupon_rpc_requests_total", labels) == 2


def test_children_are_made_once_per_label_values() -> None:
    made: list[tuple[str, ...]] = []

    def make(*values: str) -> tuple[str, ...]:
        made.append(values)
        return values

    children = Children(make)
    assert children("a", "b") is children("a", "b")
    children("c", "d")
    assert made == [("a", "b"), ("c", "d")]


def test_the_metrics_files_are_exactly_those_prometheus_client_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file of its multiprocess mode (each metric type, each gauge mode) is one, and
    nothing else in the directory is: `coupon serve` deletes these and /metrics reads them."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    value = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    for kind in ("counter", "histogram", "summary"):
        value(kind, "m", "m", (), (), "")
    for mode in Gauge._MULTIPROC_MODES:
        value("gauge", "m", "m", (), (), "", multiprocess_mode=mode)
    written = sorted(tmp_path.glob("*.db"))
    assert len(written) == 3 + 10
    for name in ("users.db", "counter.db", "counter_1.db.bak", "gauge_1.db", "my_counter_1.db"):
        (tmp_path / name).write_text("the operator's")
    assert metrics_files(tmp_path) == written


async def test_an_unexpected_failure_is_internal_in_no_dependency_s_words() -> None:
    """What no rule maps (a bug, or a dependency's error of a kind not foreseen) is answered
    `internal` with its type's name, as IssueCoupon answers it: not `unknown` in the
    dependency's own words, which go to the log."""
    registry = CollectorRegistry()
    observed = Observed(Metrics(registry), "CreateCampaign")

    async def work() -> None:
        raise RuntimeError("cannot execute INSERT in a read-only transaction")

    with pytest.raises(ConnectError) as caught:
        await observed.call(work(), cast("RequestContext[Any, Any]", None))
    assert caught.value.code is Code.INTERNAL
    assert caught.value.message == "RuntimeError"
