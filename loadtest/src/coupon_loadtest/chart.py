"""Requests per second and latency percentiles over time, with the start and sell-out marked."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from coupon_loadtest.records import LOST, NOT_OPEN, OK, SOLD_OUT, UNAVAILABLE, Observations

NS_PER_S = 1_000_000_000
_MAX_BUCKETS = 300
_WIDTHS_S = (0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("max", 100.0))


@dataclass(frozen=True)
class Series:
    """Per-bucket figures; time in seconds relative to starts_at (0 = the start)."""

    bucket_s: float
    time_s: list[float]
    sent_per_s: list[float]
    due_per_s: list[float]  # by intended send time: the schedule, or a crowd's presses
    rates: dict[str, list[float]]  # responses per second by kind
    latency_ms: dict[str, list[float | None]]  # percentile name -> value per bucket

    def as_dict(self) -> dict[str, object]:
        return {
            "bucket_s": self.bucket_s,
            "time_s": self.time_s,
            "sent_per_s": self.sent_per_s,
            "due_per_s": self.due_per_s,
            "responses_per_s": self.rates,
            "latency_ms": self.latency_ms,
        }


def _bucket_width(span_s: float) -> float:
    for width in _WIDTHS_S:
        if span_s / width <= _MAX_BUCKETS:
            return width
    return _WIDTHS_S[-1]


def _i64(values: object) -> npt.NDArray[np.int64]:
    return np.frombuffer(values, dtype=np.int64)  # type: ignore[call-overload,no-any-return]


def series(observations: Observations, starts_rel_ns: int) -> Series:
    """Bucket the rows by when things happened; starts_rel_ns is starts_at after t0."""
    if not len(observations):
        return Series(1.0, [], [], [], {}, {})
    sent = _i64(observations.sent_ns) - starts_rel_ns
    done = _i64(observations.done_ns) - starts_rel_ns
    intended = _i64(observations.intended_ns) - starts_rel_ns
    outcome = np.frombuffer(observations.outcome, dtype=np.uint8)
    origin = int(min(sent.min(), done.min()))
    span_s = (int(max(sent.max(), done.max())) - origin) / NS_PER_S
    width = _bucket_width(span_s)
    width_ns = round(width * NS_PER_S)
    first = origin // width_ns
    count = int((max(sent.max(), done.max()) // width_ns) - first) + 1
    sent_bucket = sent // width_ns - first
    done_bucket = done // width_ns - first
    # A request due before the first send or answer counts in the first bucket.
    due_bucket = np.maximum(intended // width_ns - first, 0)

    def per_second(buckets: npt.NDArray[np.int64]) -> list[float]:
        counts = np.bincount(buckets, minlength=count)[:count]
        return [round(float(c) / width, 3) for c in counts]

    already = np.zeros(len(outcome), dtype=bool)
    ok_rows = np.frombuffer(observations.ok_row, dtype=np.int64)
    already[ok_rows] = np.frombuffer(observations.ok_already, dtype=np.uint8).astype(bool)
    is_ok = outcome == OK
    errors = ~np.isin(outcome, (OK, SOLD_OUT, NOT_OPEN, UNAVAILABLE))
    rates = {
        "issued": per_second(done_bucket[is_ok & ~already]),
        "already_issued": per_second(done_bucket[is_ok & already]),
        "sold_out": per_second(done_bucket[outcome == SOLD_OUT]),
        "not_open": per_second(done_bucket[outcome == NOT_OPEN]),
        "unavailable": per_second(done_bucket[outcome == UNAVAILABLE]),
        "errors_and_lost": per_second(done_bucket[errors]),
    }

    answered = outcome != LOST
    latency = (done - intended)[answered]
    latency_bucket = done_bucket[answered]
    order = np.argsort(latency_bucket, kind="stable")
    latency, latency_bucket = latency[order], latency_bucket[order]
    bounds = np.searchsorted(latency_bucket, np.arange(count + 1))
    percentiles: dict[str, list[float | None]] = {name: [] for name, _ in _PERCENTILES}
    for b in range(count):
        chunk = latency[bounds[b] : bounds[b + 1]]
        for name, q in _PERCENTILES:
            percentiles[name].append(
                round(float(np.percentile(chunk, q)) / 1e6, 3) if len(chunk) else None
            )
    return Series(
        bucket_s=width,
        time_s=[round((first + b) * width, 3) for b in range(count)],
        sent_per_s=per_second(sent_bucket),
        due_per_s=per_second(due_bucket),
        rates=rates,
        latency_ms=percentiles,
    )


def draw(
    data: Series,
    path: str,
    *,
    title: str,
    markers: dict[str, float],
    answers_s: list[float] | None = None,
    crowd: int = 0,
) -> None:
    """Write the PNG; markers are labelled vertical lines (seconds relative to starts_at).
    With `answers_s` (a herd: the time of each final answer, seconds after starts_at) and
    `crowd` (the herd's users), a third panel shows the share of users answered by then."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if answers_s is not None else 2
    fig, axes = plt.subplots(panels, 1, figsize=(12, 4 * panels), sharex=True)
    top, bottom = axes[0], axes[1]
    try:
        # Plot each bucket at its middle so a line does not lag the events by half a bucket.
        x = [t + data.bucket_s / 2 for t in data.time_s]
        if answers_s is not None:
            # A crowd presses faster than connections free up: both lines tell.
            top.plot(x, data.due_per_s, label="pressed", color="grey", linewidth=1.5)
        # Dashed and on top: once every request sent is answered alike (all sold out, say),
        # the two lines coincide, and a solid one underneath would look like nothing sent.
        top.plot(
            x,
            data.sent_per_s,
            label="sent",
            color="black",
            linewidth=1.2,
            linestyle="--",
            zorder=3,
        )
        colours = {
            "issued": "tab:green",
            "already_issued": "tab:olive",
            "sold_out": "tab:orange",
            "not_open": "tab:blue",
            "unavailable": "tab:purple",
            "errors_and_lost": "tab:red",
        }
        for name, values in data.rates.items():
            if any(values):
                top.plot(x, values, label=name.replace("_", " "), color=colours.get(name))
        top.set_ylabel("per second")
        top.set_title(title)
        top.grid(alpha=0.3)

        for name, latencies in data.latency_ms.items():
            points = [
                (xi, v) for xi, v in zip(x, latencies, strict=True) if v is not None and v > 0
            ]
            if points:
                bottom.plot([p[0] for p in points], [p[1] for p in points], label=name)
        bottom.set_yscale("log")
        bottom.set_ylabel("latency from intended send (ms)")
        bottom.set_xlabel("seconds since starts_at")
        bottom.grid(alpha=0.3, which="both")

        if answers_s is not None:
            panel = axes[2]
            ordered = sorted(answers_s)
            shares = [(i + 1) / max(crowd, 1) for i in range(len(ordered))]
            panel.step(ordered, shares, where="post", label="users with a final answer")
            panel.set_ylim(0, 1.02)
            panel.set_ylabel("share of users answered")
            panel.set_xlabel("seconds since starts_at")
            panel.grid(alpha=0.3)

        for axis in axes:
            for (label, at), style in zip(markers.items(), ("--", ":", "-."), strict=False):
                axis.axvline(at, color="grey", linestyle=style, label=label)
            axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
