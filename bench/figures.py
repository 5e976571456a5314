"""What the overload phase's generator results mean, and the flash-crowd targets drawn
from them (pure: tested without a server)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Targets (issue 15). Reported as PASS/FAIL; a miss never fails the run.
GOODPUT_KEPT = 0.9  # goodput at 4x over goodput at 1x
SUCCESS_P99_MS = 250.0
EXCESS_P99_MS = 20.0
SOLD_OUT_OVER_ISSUE = 3.0
HERD_ANSWERED_WITHIN_S = 5.0
# A core this busy (or more) was the limit: the herd's load tool, or the pinned server.
CORE_BOUND = 0.9


def issued_per_s(result: dict[str, Any]) -> float:
    """Coupons answered per second while the load was offered: what the server sustained.
    Answers that came in the drain after the last send (a queue emptying) do not count."""
    timeline = result["timeline"]
    window_s = float(result["duration_s"])
    buckets = max(1, round(window_s / float(timeline["bucket_s"])))
    return float(sum(timeline["ok"][:buckets])) / (buckets * float(timeline["bucket_s"]))


@dataclass(frozen=True)
class Level:
    """One open-loop level, from bench/openloop.c's result."""

    factor: float
    offered_per_s: float
    goodput_per_s: float
    success_p50_ms: float | None
    success_p99_ms: float | None
    excess: int  # 503 `unavailable` answers
    excess_p99_ms: float | None
    sold_out: int
    other: int
    timeouts: int  # no answer within the time-out, in flight or still waiting to be sent
    connection_errors: int
    kept_up: bool

    @property
    def queued_excess(self) -> bool:
        """More was offered than issued (by a tenth), and none of it was shed."""
        return self.offered_per_s > 1.1 * self.goodput_per_s and self.excess == 0

    @classmethod
    def from_result(cls, factor: float, offered: float, result: dict[str, Any]) -> Level:
        answers, latency = result["answers"], result["latency_ms"]
        return cls(
            factor=factor,
            offered_per_s=offered,
            goodput_per_s=issued_per_s(result),
            success_p50_ms=latency["ok"].get("p50"),
            success_p99_ms=latency["ok"].get("p99"),
            excess=int(answers["unavailable"]),
            excess_p99_ms=latency["unavailable"].get("p99"),
            sold_out=int(answers["sold_out"]),
            other=int(answers["other"]),
            timeouts=int(result["timeouts"]) + int(result["expired_in_queue"]),
            connection_errors=int(result["connection_errors"]) + int(result["connect_failures"]),
            kept_up=bool(result["kept_up"]),
        )


@dataclass(frozen=True)
class SoldOutRates:
    sold_out_after_s: float | None  # from the first answer's bucket to the sell-out
    issue_per_s: float | None
    sold_out_answers_per_s: float | None

    @property
    def ratio(self) -> float | None:
        if not self.issue_per_s or self.sold_out_answers_per_s is None:
            return None
        return self.sold_out_answers_per_s / self.issue_per_s


def sold_out_rates(timeline: dict[str, Any], stock: int) -> SoldOutRates:
    """From completions per bucket: the issue rate until the stock was gone (the bucket in
    which the last coupon was answered ends the selling), and the rate of sold-out answers
    in the whole buckets after it, up to the last bucket that answered anything."""
    bucket = float(timeline["bucket_s"])
    ok = list(timeline["ok"])
    sold = list(timeline["sold_out"])
    issued = 0
    end = None
    for index, count in enumerate(ok):
        issued += count
        if issued >= stock:
            end = index
            break
    if end is None:
        return SoldOutRates(None, None, None)
    first = next((i for i, n in enumerate(ok) if n), 0)
    selling_s = (end - first + 1) * bucket
    after = sold[end + 1 :]
    last = max((i for i, n in enumerate(after) if n), default=-1)
    after = after[: last + 1]
    rate = sum(after) / (len(after) * bucket) if after else None
    return SoldOutRates(selling_s, stock / selling_s, rate)


def targets(record: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """The flash-crowd targets: (target, met or None when not measured, measured value)."""
    rows: list[tuple[str, bool | None, str]] = []
    levels = {float(k): Level(**v) for k, v in record.get("levels", {}).items()}
    one, four = levels.get(1.0), levels.get(4.0)
    if one and four:
        kept = four.goodput_per_s / one.goodput_per_s if one.goodput_per_s else 0.0
        rows.append(
            (
                f"goodput at 4x >= {GOODPUT_KEPT:.0%} of 1x",
                kept >= GOODPUT_KEPT,
                f"{four.goodput_per_s:,.0f}/s vs {one.goodput_per_s:,.0f}/s ({kept:.0%})",
            )
        )
    if levels:
        worst = max((lv.success_p99_ms or float("inf")) for lv in levels.values())
        rows.append(
            (
                f"success p99 <= {SUCCESS_P99_MS:g} ms at every level",
                worst <= SUCCESS_P99_MS,
                ", ".join(f"{lv.factor:g}x {fmt_ms(lv.success_p99_ms)}" for lv in levels.values()),
            )
        )
        lost = sum(lv.timeouts + lv.connection_errors for lv in levels.values())
        excess_p99 = [
            lv.excess_p99_ms for lv in levels.values() if lv.excess and lv.excess_p99_ms is not None
        ]
        worst_excess = max(excess_p99, default=None)
        # Offered well above what was issued, yet nothing answered `unavailable`: the excess
        # was queued, not answered.
        queued = [f"{lv.factor:g}x" for lv in levels.values() if lv.queued_excess]
        rows.append(
            (
                f"every excess request answered (no time-out or connection error), "
                f"p99 <= {EXCESS_P99_MS:g} ms",
                lost == 0
                and not queued
                and (worst_excess is None or worst_excess <= EXCESS_P99_MS),
                f"{lost} time-outs and connection errors; excess p99 "
                + ", ".join(f"{lv.factor:g}x {fmt_ms(lv.excess_p99_ms)}" for lv in levels.values())
                + (f"; the excess queued unanswered at {', '.join(queued)}" if queued else ""),
            )
        )
    sold = record.get("sold_out")
    if sold:
        rates = SoldOutRates(**sold["rates"])
        rows.append(
            (
                f"sold-out answers >= {SOLD_OUT_OVER_ISSUE:g}x the issue rate",
                None if rates.ratio is None else rates.ratio >= SOLD_OUT_OVER_ISSUE,
                "-"
                if rates.ratio is None
                else f"{rates.sold_out_answers_per_s:,.0f}/s vs {rates.issue_per_s:,.0f}/s "
                f"({rates.ratio:.1f}x)",
            )
        )
    herd = record.get("herd")
    if herd:
        summary = herd.get("summary") or {}
        within = summary.get("answered_within_s", {}).get(f"{HERD_ANSWERED_WITHIN_S:g}")
        ok = (
            bool(herd.get("verified"))
            and bool(summary.get("sold_out"))
            and within is not None
            and within >= 1.0
        )
        rows.append(
            (
                f"herd of {herd['users']:,} on {herd['coupons']:,} coupons: sold out, I1-I6 "
                f"verified, every user answered within {HERD_ANSWERED_WITHIN_S:g} s",
                ok,
                f"sold out in {fmt_s(summary.get('sell_out_s'))}; "
                f"{'verified' if herd.get('verified') else 'NOT verified'}; "
                + ("-" if within is None else f"{within:.1%} answered within 5 s")
                + (f"; {herd_cpu_text(herd['cpu'])}" if herd.get("cpu") else ""),
            )
        )
    return rows


def herd_cpu_text(cpu: dict[str, float]) -> str:
    """Which side's CPU bounded the herd: the one server core, or the load tool's."""
    text = (
        f"over its {cpu['window_s']:.2f} s the server used {cpu['server_cores']:.2f} of its "
        f"core, the load tool's core was {cpu['generator_busy']:.0%} busy"
    )
    if cpu["generator_busy"] >= CORE_BOUND and cpu["server_cores"] < CORE_BOUND:
        text += " (the load tool's core bounded the herd, not the server)"
    return text


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"
