"""What `just bench` prints: the table, the ratios against both ceilings, CPU per request,
whether the generators were the limit, and the targets."""

from __future__ import annotations

import os
from typing import Any

from bench.phases import PARTIES, Bench, Phase, cpu_split, fmt_ms
from bench.search import probe_ratios, search_text
from bench.state import Verdict, commit_label

# Targets. Reported as PASS/FAIL; a miss never fails the run.
TARGET_B_PER_S = 10_000
TARGET_RATIO = 0.5  # (b) against (a1), the ceiling the project has always measured
TARGET_C_P99_MS = 10.0


def ceiling(phases: dict[str, Phase], key: str) -> float | None:
    """A ceiling (b) is compared with: the mean of its run before (b) and after, when both
    ran, so that a machine whose speed drifts moves both sides of the ratio alike."""
    rates = [phases[k].requests_per_s for k in (key, f"{key}r") if k in phases]
    return sum(rates) / len(rates) if rates else None


def ratio(phases: dict[str, Phase], key: str = "a1") -> float | None:
    top = ceiling(phases, key)
    # What (b) issued, not what it answered: requests turned away (503) cost little and
    # would count as throughput.
    return None if top is None or "b" not in phases else phases["b"].ok_per_s / top


def ratio_text(phases: dict[str, Phase], key: str) -> str:
    """'(b)/(a1) = 0.46', against each run of the ceiling when it ran twice, and the same
    ratio of the CPU-bound rates (what the two would do if idle time and drift did not
    count)."""
    text = f"(b)/({key}) = {ratio(phases, key):.2f}"
    again = f"{key}r"
    if again in phases:
        b = phases["b"].ok_per_s
        text += (
            f" (against the mean of ({key}) and ({key}'); "
            f"{b / phases[key].requests_per_s:.2f} against ({key}) alone, "
            f"{b / phases[again].requests_per_s:.2f} against ({key}') alone)"
        )
    cores = os.cpu_count() or 1
    ceilings = [phases[k].cpu_bound_rate(cores) for k in (key, again) if k in phases]
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
            "-" if b is None else f"{b.ok_per_s:,.0f} issued/s, {b.errors} errors",
        )
    )
    measured = ratio(phases)
    rows.append(
        (
            f"(b)/(a1) >= {TARGET_RATIO}",
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


def memory_text(phases: dict[str, Phase]) -> list[str]:
    lines = []
    for label, key in (
        ("no-op server (a1)", "a1"),
        ("no-op server (a2)", "a2"),
        ("coupon server", "c" if "c" in phases else "b"),
    ):
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
    lines += [text for key in ("a1", "a2") if (text := probe_ratios(bench.searches, key))]
    return lines


def generator_lines(bench: Bench) -> list[str]:
    lines = []
    for phase in bench.phases.values():
        gen = phase.generator
        if phase.key == "c":
            lag = gen["dispatch_lag_ms"]
            lines.append(
                f"generator (c): kept up: {'yes' if gen['kept_up'] else 'NO'} "
                f"(dispatch lag p50 {fmt_ms(lag.get('p50'))} / p99 {fmt_ms(lag.get('p99'))} ms; "
                f"server service time p99 {fmt_ms(gen['service_time_ms'].get('p99'))} ms)"
            )
        else:
            lines.append(
                f"generator ({phase.label}): {gen['tool']} used {gen['cores']:.2f} cores of "
                f"{gen['threads']} threads: {'SATURATED' if gen['saturated'] else 'not the limit'}"
            )
    for extra in bench.extra_ceilings:
        lines.append(
            f"generator check (a1): wrk -t{extra['threads']} -c{extra['connections']}: "
            f"{extra['requests_per_s']:,.0f} req/s; cores: {cpu_split(extra['cores'])}"
        )
    return lines


def markdown_table(bench: Bench) -> list[str]:
    """The table as docs/performance.md shows it, to copy there."""
    out = [
        "| phase | req/s | connections | p50 ms | p99 ms | p99.9 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for phase in bench.phases.values():
        title = phase.title + (f" {bench.args.rate:g}/s" if phase.key == "c" else "")
        out.append(
            f"| {title} | {phase.requests_per_s:,.0f} | {phase_connections(phase)} | "
            f"{fmt_ms(phase.p50_ms)} | {fmt_ms(phase.p99_ms)} | {fmt_ms(phase.p999_ms)} | "
            f"{phase.errors} |"
        )
    return out


def report_lines(bench: Bench, meta: dict[str, Any], verdicts: list[Verdict]) -> list[str]:
    phases = bench.phases
    header = (
        f"{'phase':<34} {'req/s':>9} {'conns':>6} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} "
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
            f"{title:<34} {phase.requests_per_s:>9,.0f} {phase_connections(phase):>6} "
            f"{fmt_ms(phase.p50_ms):>8} {fmt_ms(phase.p99_ms):>8} {fmt_ms(phase.p999_ms):>9} "
            f"{phase.errors:>7}"
        )
    lines.append("")
    lines += [ratio_text(phases, key) for key in ("a1", "a2") if ratio(phases, key) is not None]
    lines.extend(search_lines(bench))
    lines.extend(memory_text(phases))
    lines.append("CPU while measuring, in cores (of " + str(meta["cores"]) + "):")
    for phase in phases.values():
        lines.append(
            f"  {phase.label}: {cpu_split(phase.cores)}{other_users(phase)}; "
            f"interrupts {phase.cores.get('irq', 0):.2f} (within the above)"
        )
    lines.extend(cpu_per_request(phase, meta["cores"]) for phase in phases.values())
    lines.extend(generator_lines(bench))
    lines.append("targets:")
    for name, ok, value in targets(phases):
        lines.append(f"  {verdict_word(ok):<4} {name}: {value}")
    if verdicts:
        lines.append("invariants (PostgreSQL, bench campaigns):")
        for v in verdicts:
            lines.append(f"  {'ok' if v.ok else 'VIOLATED':<8} {v.name} {v.rule}  {v.detail}")
    if phases:
        lines += ["", "for docs/performance.md:", "", *markdown_table(bench)]
    return lines


def run_document(bench: Bench, meta: dict[str, Any], verdicts: list[Verdict]) -> dict[str, Any]:
    """The run's JSON (bench/results/)."""
    return {
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
        # (b) over the mean of each ceiling's two runs when both ran, else over the one.
        "ratio_b_over_a1": ratio(bench.phases, "a1"),
        "ratio_b_over_a2": ratio(bench.phases, "a2"),
        "ceilings_requests_per_s": {k: ceiling(bench.phases, k) for k in ("a1", "a2")},
        "generator_checks": bench.extra_ceilings,
        # phase key -> wrk connections -> {requests_per_s, errors} of the probes
        "saturation_search": bench.searches,
        "campaigns": bench.campaigns,
        "targets": [
            {"target": name, "met": ok, "value": value} for name, ok, value in targets(bench.phases)
        ],
        "invariants": [v.__dict__ for v in verdicts],
        **bench.extra,
    }
