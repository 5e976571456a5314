"""The run's figures and verdicts: a JSON document, a human summary, and the exit code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from coupon.entrypoints.settings import redacted
from coupon_loadtest.chart import Series
from coupon_loadtest.clock import iso_ms
from coupon_loadtest.herd import HerdSummary, press_origin_ns, summarize
from coupon_loadtest.histogram import LatencyHistogram
from coupon_loadtest.records import (
    ENDED_NAME,
    LOST,
    NOT_OPEN,
    NOT_STARTED_NAME,
    OUTCOMES,
    SOLD_OUT,
    Observations,
)
from coupon_loadtest.runner import RunData
from coupon_loadtest.schedule import GeneratorVerdict, judge_generator, judge_herd_generator
from coupon_loadtest.verify import Verification

NS_PER_S = 1_000_000_000

EXIT_OK = 0
EXIT_VIOLATION = 1
EXIT_SETUP = 2
EXIT_RATE_NOT_OFFERED = 3
# The load ran, but what the server issued could not be read back: not verified.
EXIT_UNVERIFIED = 4
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Verdict:
    passed: bool
    exit_code: int
    reasons: list[str]


def _iso(ns: int | None) -> str | None:
    return None if ns is None else iso_ms(ns)


def generator_verdict(run: RunData) -> GeneratorVerdict | None:
    """Open loop and herd: in closed loop the server sets the pace, there is no asked rate."""
    config = run.config
    if config.herd and run.herd is not None:
        lag = run.histograms.get("send_lag") or LatencyHistogram()
        book = run.herd
        obs = run.observations
        first_sent_ns = min(obs.sent_ns) if len(obs) else 0
        return judge_herd_generator(
            users=len(book),
            window_ns=max(0, run.stop_rel_ns - first_sent_ns),
            sent=len(obs),
            gave_up_unsent=sum(
                1 for g, p in zip(book.gave_up, book.presses, strict=True) if g and not p
            ),
            lag_p99_ms=lag.percentile_ms(99.0),
            max_lag_ms=config.patience_s * 1000 / 10,
            connection_waits=sum(r.inflight_cap_waits for r in run.results),
        )
    if config.rate is None or not config.open_loop:
        return None
    lag = run.histograms.get("send_lag") or LatencyHistogram()
    return judge_generator(
        rate=config.rate,
        window_ns=run.stop_rel_ns,
        due=sum(r.due for r in run.results),
        sent=sum(r.sent for r in run.results),
        lag_p99_ms=lag.percentile_ms(99.0),
        max_lag_ms=config.max_lag_ms,
        inflight_cap_waits=sum(r.inflight_cap_waits for r in run.results),
    )


def decide(
    verification: Verification,
    generator: GeneratorVerdict | None,
    *,
    interrupted: bool,
    requests: int | None = None,
) -> Verdict:
    """The exit code; `requests` is how many requests the run sent (None: not known)."""
    reasons = [
        f"{c.source}: {c.name}: {c.detail}" + (f" (e.g. {c.examples[0]})" if c.examples else "")
        for c in verification.failures
    ]
    if reasons:
        return Verdict(False, EXIT_VIOLATION, reasons)
    unverified = [f"{c.source}: {c.detail}" for c in verification.not_done]
    if unverified:
        return Verdict(False, EXIT_UNVERIFIED, unverified)
    lag: list[str] = []
    if generator is not None and not generator.kept_up:
        # A herd has no asked rate (asked_rps 0): its crowd is what was not offered.
        what = "asked rate not offered" if generator.asked_rps else "crowd not offered as modelled"
        lag = [f"{what}: {generator.message}"]
    if interrupted:
        # Said first: a run cut short may well have fallen behind too, but the operator
        # stopped it, and a script waits for 130 (the lag stays among the reasons).
        return Verdict(False, EXIT_INTERRUPTED, ["interrupted before the planned end", *lag])
    if requests == 0:
        # Checks of nothing pass vacuously: a run that tested nothing has not passed.
        return Verdict(
            False, EXIT_RATE_NOT_OFFERED, ["no request was sent: the run tested nothing"]
        )
    if lag:
        return Verdict(False, EXIT_RATE_NOT_OFFERED, lag)
    return Verdict(True, EXIT_OK, [])


def first_sold_out_rel(run: RunData) -> int | None:
    obs = run.observations
    times = (d for o, d in zip(obs.outcome, obs.done_ns, strict=True) if o == SOLD_OUT)
    return min(times, default=None)


def outcome_counts(run: RunData) -> dict[str, int]:
    """Requests per outcome (only those that happened): new coupons apart from repeats, and
    a campaign's refusals apart by the edge of its window they were at, before the start or
    after the end."""
    obs = run.observations
    counts = obs.counts()
    fresh = sum(1 for a in obs.ok_already if not a)
    out = {"ok_new": fresh, "ok_already_issued": counts.get("ok", 0) - fresh}
    ended = sum(r.ended for r in run.results)
    for name, n in counts.items():
        if name == OUTCOMES[NOT_OPEN]:
            out |= {k: v for k, v in ((NOT_STARTED_NAME, n - ended), (ENDED_NAME, ended)) if v}
        elif name != "ok":
            out[name] = n
    return out


def first_coupon_answers(obs: Observations) -> list[int]:
    """When each user first received their coupon (ns after the load start), one time per
    user: a coupon whose first answer was lost comes back `alreadyIssued` on a retry, and
    counts then, once."""
    first: dict[int, int] = {}
    for row in obs.ok_row:
        user, done = obs.user[row], obs.done_ns[row]
        if user not in first or done < first[user]:
            first[user] = done
    return sorted(first.values())


def herd_summary(run: RunData, sell_out_s: float | None, sold_out: bool) -> HerdSummary | None:
    """The crowd's figures: each user's time to a final answer, retries, goodput over time."""
    if run.herd is None:
        return None
    return summarize(
        run.herd,
        # From when the herd began pressing: the campaign's start, or the load's start when
        # it was open already.
        starts_rel_ns=press_origin_ns(run.starts_rel_ns),
        patience_ns=round(run.config.patience_s * NS_PER_S),
        fresh_done_ns=first_coupon_answers(run.observations),
        sell_out_s=sell_out_s,
        sold_out=sold_out,
    )


def build(
    run: RunData,
    verification: Verification,
    generator: GeneratorVerdict | None,
    verdict: Verdict,
    timeline: Series,
    chart_path: str | None,
) -> dict[str, Any]:
    config, target, obs = run.config, run.target, run.observations
    plan, clock = target.plan, target.clock
    outcomes = outcome_counts(run)
    completed = len(obs) - outcomes.get("lost", 0)
    # From the first request sent: a herd presses only around the start, seconds after the
    # load began, and its rate counted from then would read far lower than it was.
    first_sent_ns = min(obs.sent_ns) if len(obs) else 0
    window_s = max(0, run.stop_rel_ns - first_sent_ns) / NS_PER_S
    # Answers while the load was on: the drain of slow answers after the stop is not
    # throughput the server sustained.
    answered_in_window = sum(
        1
        for o, d in zip(obs.outcome, obs.done_ns, strict=True)
        if o != LOST and d <= run.stop_rel_ns
    )
    api = next((ledger for ledger in run.ledgers if ledger.source == "api"), None)
    run_issued = (
        sorted(c.issued_at_ns for c in api.coupons if c.code not in plan.baseline_codes)
        if api is not None
        else []
    )
    sold_out = api is not None and len(api.coupons) >= plan.total_coupons
    # From the start, or from the load start when targeting a campaign that opened earlier.
    opened = max(plan.starts_at_ns, clock.to_server(run.t0_wall_ns))
    issue_span_s = (run_issued[-1] - opened) / NS_PER_S if run_issued else 0.0
    first_sold_out = first_sold_out_rel(run)

    examples: dict[str, str] = {}
    for result in run.results:
        for code, message in result.error_examples.items():
            examples.setdefault(code, message)
    lost_reasons: dict[str, int] = {}
    for result in run.results:
        for reason, n in result.lost_reasons.items():
            lost_reasons[reason] = lost_reasons.get(reason, 0) + n

    def server(rel: int | None) -> int | None:
        # The timeline is in the server's clock, as starts_at and issued_at are: this
        # machine's times (relative to the load start) are shifted by the measured offset.
        return None if rel is None else clock.to_server(run.t0_wall_ns + rel)

    sell_out_s = round(issue_span_s, 3) if sold_out and run_issued else None
    herd = herd_summary(run, sell_out_s, sold_out)

    return {
        "tool": "coupon loadtest",
        "report_version": 1,
        "created_at": _iso(run.t0_wall_ns + run.stop_rel_ns),
        "target": {
            "url": redacted(config.url),  # the report may be shared: never the password
            "campaign_id": plan.campaign_id,
            "created_by_run": target.created,
            "name": target.name,
            "total_coupons": plan.total_coupons,
            "stock_for_run": plan.stock,
            "starts_at": _iso(plan.starts_at_ns),
            "ends_at": _iso(plan.ends_at_ns),
        },
        "scenario": {
            "users": config.users,
            # Settings a herd does not read are null in its report.
            "repeat_fraction": None if config.herd else config.repeat_fraction,
            "load_model": config.load_model,
            "rate": config.rate if config.open_loop else None,
            "concurrency": config.concurrency,
            "processes": config.processes,
            "encoding": "json" if config.json else "proto",
            "duration_s": config.duration_s,
            "tail_s": config.tail_s if config.duration_s is None and not config.herd else None,
            "start_in_s": config.start_in_s if target.created else None,
            "timeout_s": config.timeout_s,
            "max_inflight_per_process": config.max_inflight if config.open_loop else None,
            "user_prefix": obs.user_prefix,
            "database_checked": config.database_url is not None,
        },
        "clock": clock.as_dict(),
        "timeline": {
            "load_started_at": _iso(server(0)),
            "starts_at": _iso(plan.starts_at_ns),
            "first_sold_out_answer_at": _iso(server(first_sold_out)),
            "last_coupon_issued_at": _iso(run_issued[-1]) if run_issued else None,
            "sold_out": sold_out,
            "sell_out_s": sell_out_s,
            "load_stopped_at": _iso(server(run.stop_rel_ns)),
            "interrupted": run.interrupted,
        },
        "throughput": {
            "requests": len(obs),
            "completed": completed,
            "asked_rps": config.rate if config.open_loop else None,
            "offered_rps": round(len(obs) / window_s, 1) if window_s else 0.0,
            "achieved_rps": round(answered_in_window / window_s, 1) if window_s else 0.0,
            "issued": len(run_issued),
            "issued_per_s": round(len(run_issued) / issue_span_s, 1) if issue_span_s > 0 else None,
        },
        "generator": None
        if generator is None
        else {
            "kept_up": generator.kept_up,
            "asked_rps": generator.asked_rps,
            "offered_rps": round(generator.offered_rps, 1),
            "due": generator.due,
            "sent": generator.sent,
            "unsent": generator.unsent,
            "send_lag_p99_ms": generator.lag_p99_ms,
            "max_lag_ms": generator.max_lag_ms,
            "inflight_cap_waits": generator.inflight_cap_waits,
            "message": generator.message,
        },
        "outcomes": outcomes,
        "messages": examples,
        "lost": {"count": outcomes.get("lost", 0), "reasons": lost_reasons},
        "latency_ms": {
            "measured_from": "send time" if config.load_model == "closed" else "intended send time",
            **{name: histogram.summary() for name, histogram in sorted(run.histograms.items())},
        },
        "verification": verification.as_dict(),
        "verdict": {
            "passed": verdict.passed,
            "exit_code": verdict.exit_code,
            "reasons": verdict.reasons,
        },
        "herd": None
        if herd is None
        else {
            **herd.as_dict(),
            "spread_s": config.spread_s,
            "patience_s": config.patience_s,
            "retry_floor_s": config.retry_floor_s,
            "retry_cap_s": config.retry_cap_s,
            "connections": config.connections,
            "waits_for_a_connection": sum(r.inflight_cap_waits for r in run.results),
        },
        "chart": chart_path,
        "timeseries": timeline.as_dict(),
    }


def _latency_line(name: str, summary: dict[str, Any]) -> str:
    if not summary.get("count"):
        return f"  {name:<9} (none)"
    return f"  {name:<9} n={summary['count']:<8}" + "".join(
        f" {p} {summary[p]:>8.2f}" for p in ("p50", "p90", "p99", "p99.9", "max")
    )


def _herd_lines(herd: dict[str, Any] | None, send_lag_p99: float | None = None) -> list[str]:
    if not herd:
        return []
    ttf = herd["time_to_final_ms"]
    retries = herd["retries"]
    within = ", ".join(f"{s} s {share:.1%}" for s, share in herd["answered_within_s"].items())
    peak = max(herd["goodput_per_s"], default=0.0)
    return [
        "",
        f"herd: {herd['users']} users, spread {herd['spread_s']:g} s, patience "
        f"{herd['patience_s']:g} s, retry {herd['retry_floor_s'] * 1000:g} ms to "
        f"{herd['retry_cap_s']:g} s, after the hint plus up to half of it",
        f"  final answers: coupon {herd['got_coupon']}, sold out {herd['got_sold_out']}, "
        f"error {herd['got_error']}"
        + (f", campaign ended {herd['got_ended']}" if herd.get("got_ended") else "")
        + f"; gave up {herd['gave_up']}, unanswered {herd['unanswered']}",
        f"  gave up before sending anything (waiting for one of the tool's connections): "
        f"{herd.get('gave_up_before_sending', 0)}; presses that waited for a connection: "
        f"{herd.get('waits_for_a_connection', 0)}"
        + (f", p99 send lag {send_lag_p99:.1f} ms" if send_lag_p99 is not None else ""),
        f"  answered within their patience: {herd['answered_within_patience']:.1%} of users; "
        f"after the start: {within}",
        "  time to a final answer (ms, from the first press): "
        + (" ".join(f"{k} {v:.1f}" for k, v in ttf.items()) if ttf else "(none)"),
        "  retries per user: "
        + (
            f"mean {retries['mean']:.2f}, p50 {retries['p50']:g}, p99 {retries['p99']:g}, "
            f"max {retries['max']:g}"
            if retries
            else "(none)"
        ),
        f"  goodput: peak {peak:,.0f} issued/s ({herd['goodput_bucket_s']:g} s buckets); "
        + (
            f"sold out {herd['sell_out_s']:.3f} s after the start"
            if herd["sell_out_s"]
            else "not sold out"
        ),
    ]


def summary_text(report: dict[str, Any]) -> str:
    t, th, tl = report["target"], report["throughput"], report["timeline"]
    lines = [
        f"campaign {t['campaign_id']} ({t['total_coupons']} coupons, {t['stock_for_run']} for "
        f"this run), starts_at {t['starts_at']}",
        f"clock offset {report['clock']['offset_ms']:+.3f} ms ± "
        f"{report['clock']['uncertainty_ms']:.3f} ms ({report['clock']['source']})",
        "",
        "throughput:",
        f"  requests {th['requests']}, completed {th['completed']}; "
        + (f"asked {th['asked_rps']:.0f}/s, " if th["asked_rps"] else "")
        + f"offered {th['offered_rps']:.0f}/s, achieved {th['achieved_rps']:.0f}/s",
        f"  issued {th['issued']}"
        + (f" at {th['issued_per_s']:.0f}/s" if th["issued_per_s"] else "")
        + (f", sold out in {tl['sell_out_s']:.3f} s" if tl["sell_out_s"] is not None else ""),
    ]
    generator = report["generator"]
    if generator is not None:
        lines.append(
            f"  generator {'kept up' if generator['kept_up'] else 'FELL BEHIND'}: "
            f"{generator['message']}"
        )
    send_lag = report["latency_ms"].get("send_lag") or {}
    lines += _herd_lines(report.get("herd"), send_lag.get("p99") if send_lag.get("count") else None)
    lines += ["", f"latency (ms, from {report['latency_ms']['measured_from']}):"]
    for name in ("success", "rejected", "service", "send_lag"):
        if name in report["latency_ms"]:
            lines.append(_latency_line(name, report["latency_ms"][name]))
    lines += ["", "outcomes:"]
    width = max(20, *map(len, report["outcomes"]))
    for name, n in report["outcomes"].items():
        example = report["messages"].get(name, "")
        lines.append(f"  {name:<{width}} {n:>9}" + (f"   e.g. {example}" if example else ""))
    for reason, n in report["lost"]["reasons"].items():
        lines.append(f"    lost: {n} x {reason}")
    lines += ["", "verification:"]
    for check in report["verification"]["checks"]:
        mark = "PASS" if check["passed"] else ("FAIL" if check.get("done", True) else "SKIP")
        invariant = f"[{check['invariant']}] " if check["invariant"] else ""
        lines.append(
            f"  {mark} {check['source']:<12} {invariant}{check['name']}: {check['detail']}"
        )
        for example in check["examples"]:
            lines.append(f"         - {example}")
    verdict = report["verdict"]
    lines += [
        "",
        ("PASSED" if verdict["passed"] else "FAILED")
        + f" (exit {verdict['exit_code']})"
        + "".join(f"\n  {reason}" for reason in verdict["reasons"]),
    ]
    return "\n".join(lines)
