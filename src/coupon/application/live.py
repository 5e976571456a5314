"""Watching a campaign live, across every server process: each process tallies its issue
requests per campaign and second in memory (a few dictionary increments per request, no
I/O), adds them to the shared LiveStats once a second, and WatchCampaign reads the last
minute of them back next to the campaign's durable counts."""

from __future__ import annotations

import contextlib
import logging
import time
from bisect import bisect_left
from dataclasses import dataclass
from datetime import datetime

from coupon.application.periodic import periodically
from coupon.application.ports import (
    CampaignRepository,
    LiveCounts,
    LiveCountsNotStored,
    LiveStats,
    ViewClock,
)
from coupon.domain.campaign import Campaign
from coupon.domain.coupon import validate_campaign_id
from coupon.domain.errors import CampaignNotFound, CouponError, Unavailable

log = logging.getLogger("coupon")

ISSUED = "issued"
ALREADY_ISSUED = "already_issued"
REFUSED = "refused."  # + the reason, e.g. refused.sold_out; the set of reasons is open
LATENCY = "latency."  # + the bucket's index
# Latency buckets: upper bounds growing by a quarter from 100 us to about 12 s. A p99 read
# from them is within 25 % of the true one.
LATENCY_BOUNDS = tuple(0.0001 * 1.25**i for i in range(53))
_LATENCY_FIELDS = tuple(f"{LATENCY}{i}" for i in range(len(LATENCY_BOUNDS) + 1))
_FIRST_BUCKET = _LATENCY_FIELDS[0]
# Tallies of more campaigns than this in one second are dropped (a flood of ids).
MAX_CAMPAIGNS_PER_FLUSH = 10_000
# Campaign-seconds of counts a process keeps while its flushes fail, at most.
MAX_KEPT = 10_000
# The seconds the live view shows.
WINDOW_SECONDS = 60


class LiveTally:
    """This process's counts since the last flush, by campaign and (wall-clock) second, and
    how its flushes fare: counts a flush could not store are kept for the next one (those
    of the last WINDOW_SECONDS, MAX_KEPT at most), and while flushes fail the live view
    says its figures are missing, and why."""

    # A flush every second: counts not stored for longer than this are late.
    LATE_SECONDS = 5.0

    def __init__(self) -> None:
        self._counts: dict[tuple[str, int], dict[str, int]] = {}
        self._kept: dict[tuple[str, int], dict[str, int]] = {}
        self._stored_at = time.monotonic()  # the end of the last flush that stored all
        self._failing = ""  # why the last flush failed; "" once one succeeds
        self._failed_flushes = 0

    def record(self, campaign_id: str, outcome: str, seconds: float) -> None:
        """One IssueCoupon answer: `outcome` is ISSUED, ALREADY_ISSUED or REFUSED + reason;
        `seconds` its latency."""
        self._add(campaign_id, outcome, _LATENCY_FIELDS[bisect_left(LATENCY_BOUNDS, seconds)])

    def record_at_once(self, campaign_id: str, outcome: str) -> None:
        """An answer given at once, without I/O (a refusal from memory, a request turned
        away): in the first latency bucket."""
        self._add(campaign_id, outcome, _FIRST_BUCKET)

    def _add(self, campaign_id: str, outcome: str, bucket: str) -> None:
        key = (campaign_id, int(time.time()))
        counts = self._counts.get(key)
        if counts is None:
            if len(self._counts) >= MAX_CAMPAIGNS_PER_FLUSH:
                return
            counts = self._counts[key] = {}
        counts[outcome] = counts.get(outcome, 0) + 1
        counts[bucket] = counts.get(bucket, 0) + 1

    def take(self) -> LiveCounts:
        """Everything to store: the counts since the last flush and those kept from flushes
        that failed."""
        counts, self._counts = self._counts, {}
        if not self._kept:
            return counts
        taken, self._kept = self._kept, {}
        _merge(taken, counts)
        return taken

    def _keep(self, counts: LiveCounts) -> None:
        """Counts a flush did not store, for the next: none older than the live view's
        window (it no longer shows them), and the newest MAX_KEPT seconds of campaigns."""
        _merge(self._kept, counts)
        oldest = int(time.time()) - WINDOW_SECONDS
        kept = [key for key in self._kept if key[1] >= oldest]
        kept.sort(key=lambda k: k[1], reverse=True)
        self._kept = {key: self._kept[key] for key in kept[:MAX_KEPT]}

    async def flush(self, stats: LiveStats) -> None:
        counts = self.take()
        try:
            if counts:
                await stats.add(counts)
        except LiveCountsNotStored as exc:
            self._keep(exc.not_stored)
            self._failed(exc)
            raise
        except CouponError as exc:
            self._keep(counts)
            self._failed(exc)
            raise
        self._stored_at = time.monotonic()
        self._failing = ""

    def _failed(self, exc: CouponError) -> None:
        self._failing = str(exc)
        self._failed_flushes += 1

    def figures_missing(self) -> str:
        """Why the shared figures lack this process's latest counts, or "": its flushes
        fail, or have not stored them for longer than they should."""
        late = time.monotonic() - self._stored_at
        if not self._failing and late <= self.LATE_SECONDS:
            return ""
        why = self._failing or "the last flush has not ended"
        return f"{why}; this server's counts of the last {late:.0f} s are not stored"

    def flushing(
        self, stats: LiveStats, seconds: float = 1.0
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """Add the tallies to `stats` every `seconds` while open, and once more when closed
        (a shutdown does not wait for them longer than one flush waits, see LiveStats.add).
        A failing flush is logged once, with its cause, until one succeeds again (or fails
        for another reason)."""
        logged = ""

        async def flush_quietly() -> None:
            nonlocal logged
            try:
                await self.flush(stats)
            except CouponError as exc:
                if str(exc) != logged:
                    logged = str(exc)
                    log.warning(
                        "live stats flush failed",
                        extra={"error": logged, "cause": exc.detail, "kept": len(self._kept)},
                    )
                return
            if logged:
                logged = ""
                log.info("live stats flushed again", extra={"failed_flushes": self._failed_flushes})
            self._failed_flushes = 0

        async def flush_last() -> None:
            try:
                await self.flush(stats)
            except CouponError as exc:
                log.warning(
                    "live figures not flushed at shutdown",
                    extra={"error": str(exc), "cause": exc.detail},
                )

        return periodically(seconds, flush_quietly, flush_last)


def _merge(into: dict[tuple[str, int], dict[str, int]], counts: LiveCounts) -> None:
    for key, fields in counts.items():
        merged = into.setdefault(key, {})
        for name, count in fields.items():
            merged[name] = merged.get(name, 0) + count


@dataclass(frozen=True, slots=True)
class Second:
    at: int  # unix second
    issued: int
    already_issued: int
    refused: int


@dataclass(frozen=True, slots=True)
class LiveView:
    campaign: Campaign  # issued_count from the ledger: every process's coupons
    now: datetime
    seconds: tuple[Second, ...]  # the window, oldest first, one per second
    issued_per_second: int  # in the last complete second
    refusals: dict[str, int]  # by reason, over the window
    p99_seconds: float | None  # IssueCoupon latency over the last P99_SECONDS
    requests: int  # IssueCoupon answers over the window
    # Why the figures above are missing (the window empty, the numbers zero), or "": the
    # campaign's own counts come from PostgreSQL and are shown whatever this says.
    figures_missing: str = ""


class WatchCampaign:
    WINDOW_SECONDS = WINDOW_SECONDS
    P99_SECONDS = 10
    # Processes add their counts once a second: the second before last is complete.
    SETTLE_SECONDS = 2

    def __init__(
        self, campaigns: CampaignRepository, stats: LiveStats, clock: ViewClock, tally: LiveTally
    ) -> None:
        self._campaigns = campaigns
        self._stats = stats
        self._clock = clock
        self._tally = tally  # this process's: whether its counts reach `stats`

    async def execute(self, *, campaign_id: str) -> LiveView:
        campaign_id = validate_campaign_id(campaign_id)
        campaign = await self._campaigns.get(campaign_id)
        if campaign is None:
            raise CampaignNotFound(campaign_id)
        now = await self._clock.now()
        # The processes count by their own wall clocks: read the same seconds.
        newest = int(time.time())
        window = range(newest - self.WINDOW_SECONDS + 1, newest + 1)
        try:
            counts = await self._stats.read(campaign_id, list(window))
        except Unavailable as exc:
            return LiveView(campaign, now, (), 0, {}, None, 0, figures_missing=str(exc))
        # Redis may answer reads and refuse writes (full, a replica): what it holds then
        # is not what was answered, and a quiet window would hide an outage.
        missing = self._tally.figures_missing()
        if missing:
            return LiveView(campaign, now, (), 0, {}, None, 0, figures_missing=missing)
        seconds = []
        refusals: dict[str, int] = {}
        latency = [0] * len(_LATENCY_FIELDS)
        requests = 0
        for second in window:
            fields = counts.get(second, {})
            refused = 0
            for name, count in fields.items():
                if name.startswith(REFUSED):
                    reason = name[len(REFUSED) :]
                    refusals[reason] = refusals.get(reason, 0) + count
                    refused += count
                elif name.startswith(LATENCY) and second > newest - self.P99_SECONDS:
                    index = int(name[len(LATENCY) :])
                    if 0 <= index < len(latency):
                        latency[index] += count
            issued = fields.get(ISSUED, 0)
            already = fields.get(ALREADY_ISSUED, 0)
            requests += issued + already + refused
            seconds.append(Second(second, issued, already, refused))
        complete = newest - self.SETTLE_SECONDS
        rate = next((s.issued for s in seconds if s.at == complete), 0)
        return LiveView(
            campaign=campaign,
            now=now,
            seconds=tuple(seconds),
            issued_per_second=rate,
            refusals=refusals,
            p99_seconds=percentile(latency, 0.99),
            requests=requests,
        )


def percentile(buckets: list[int], quantile: float) -> float | None:
    """The upper bound of the bucket holding the quantile (None without observations)."""
    total = sum(buckets)
    if not total:
        return None
    rank = quantile * total
    seen = 0
    for index, count in enumerate(buckets):
        seen += count
        if seen >= rank:
            return LATENCY_BOUNDS[min(index, len(LATENCY_BOUNDS) - 1)]
    return LATENCY_BOUNDS[-1]
