"""The saturation search: the connection count at which a server answers most."""

from __future__ import annotations

from collections.abc import Callable, Sequence

# One probe of a saturation search: connections -> (requests/s, errors).
Probe = Callable[[int], tuple[float, int]]
Probes = dict[int, dict[str, float]]


def search_peak(ladder: Sequence[int], probe: Probe, least: int = 1) -> tuple[Probes, int]:
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


def search_text(probes: Probes, best: int, seconds: float) -> str:
    """'search, req/s by wrk connections (5 s each): 64 25,970 · 128 27,566 (mean of 2) ...
    → 128'."""
    steps = " · ".join(
        f"{c} {p['requests_per_s']:,.0f}"
        + (f" (mean of {p['probes']:.0f})" if p.get("probes", 1) > 1 else "")
        + (f" ({p['errors']:.0f} errors)" if p["errors"] else "")
        for c, p in probes.items()
    )
    return f"search, req/s by wrk connections ({seconds:g} s each): {steps} → {best}"


def probe_ratios(searches: dict[str, Probes], ceiling: str = "a1") -> str:
    """(b) over a ceiling at each connection count both searches probed, or '' when one
    did not run."""
    a, b = searches.get(ceiling), searches.get("b")
    if not a or not b:
        return ""
    shared = [c for c in a if c in b]
    steps = " · ".join(
        f"{c} {b[c]['requests_per_s'] / a[c]['requests_per_s']:.2f}"
        for c in shared
        if a[c]["requests_per_s"]
    )
    return f"(b)/({ceiling}) at equal connections, from the search probes: {steps}"
