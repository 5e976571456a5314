"""The operators' use cases on the memory adapters: listing, the kill switch (also as seen by
another server process's issue path), a user's coupons, the export, the live view."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from coupon.adapters.memory.live_stats import MemoryLiveStats
from coupon.adapters.memory.store import (
    ManualClock,
    MemoryCampaignRepository,
    MemoryCodeGenerator,
    MemoryCouponLedger,
    MemoryStockGate,
    MemoryStore,
)
from coupon.application.issue import IssueCoupon
from coupon.application.live import (
    ALREADY_ISSUED,
    ISSUED,
    LATENCY_BOUNDS,
    REFUSED,
    WINDOW_SECONDS,
    LiveTally,
    WatchCampaign,
    percentile,
)
from coupon.application.operations import (
    EXPORT_CHUNK,
    STILL_RECORDING_UNKNOWN,
    EndCampaign,
    ExportCoupons,
    ListCampaigns,
    ListUserCoupons,
)
from coupon.application.ports import CampaignRepository, LiveCounts, StockGate
from coupon.application.refusals import RefusalMemory
from coupon.application.use_cases import CampaignDirectory, CreateCampaign
from coupon.domain.campaign import Campaign, CampaignStatus
from coupon.domain.coupon import Coupon
from coupon.domain.errors import (
    CampaignEnded,
    CampaignNotFound,
    CampaignNotStarted,
    InvalidArgument,
    Unavailable,
)

START = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


@dataclass
class Process:
    """One server process's issue path: its own directory (cache) over the shared stores."""

    directory: CampaignDirectory
    gate: StockGate
    issue: IssueCoupon
    memory: RefusalMemory


@dataclass
class World:
    clock: ManualClock
    store: MemoryStore
    campaigns: MemoryCampaignRepository
    ledger: MemoryCouponLedger
    gate: MemoryStockGate
    codes: MemoryCodeGenerator

    def process(self) -> Process:
        directory = CampaignDirectory(self.campaigns)
        memory = RefusalMemory(self.ledger, self.gate, clock=self.clock.seconds)
        issue = IssueCoupon(self.gate, self.ledger, self.codes, directory, memory)
        return Process(directory, self.gate, issue, memory)

    async def campaign(self, total: int = 10, ends_at: datetime | None = None) -> Campaign:
        create = CreateCampaign(self.campaigns, self.gate, self.clock)
        campaign = await create.execute(
            name="launch", total_coupons=total, starts_at=START, ends_at=ends_at
        )
        await asyncio.sleep(0.002)  # ids are ordered by the millisecond they were made in
        return campaign

    def end(
        self,
        process: Process | None = None,
        *,
        campaigns: CampaignRepository | None = None,
        gate: StockGate | None = None,
    ) -> EndCampaign:
        """The kill switch of `process` (a new one by default), on its own campaigns'
        repository or gate when given (one made to fail)."""
        process = process or self.process()
        return EndCampaign(
            campaigns or self.campaigns,
            gate or process.gate,
            self.clock,
            process.directory,
            process.memory,
            self.clock,
        )


@pytest.fixture
def world() -> World:
    clock = ManualClock(START - timedelta(minutes=1))
    store = MemoryStore()
    return World(
        clock,
        store,
        MemoryCampaignRepository(store),
        MemoryCouponLedger(store),
        MemoryStockGate(clock),
        MemoryCodeGenerator(),
    )


# --- ListCampaigns -----------------------------------------------------------------------


async def test_list_campaigns_pages_newest_first(world: World) -> None:
    made = [await world.campaign() for _ in range(5)]
    listing = ListCampaigns(world.campaigns, world.clock)
    first = await listing.execute(page_size=2, page_token="", status=None)
    second = await listing.execute(page_size=2, page_token=first.next_page_token, status=None)
    last = await listing.execute(page_size=2, page_token=second.next_page_token, status=None)
    got = [c.id for page in (first, second, last) for c in page.campaigns]
    assert got == [c.id for c in reversed(made)]
    assert first.next_page_token and second.next_page_token and not last.next_page_token
    assert first.now == world.clock.current


async def test_list_campaigns_filters_by_status_by_the_clock(world: World) -> None:
    scheduled = await world.campaign()
    listing = ListCampaigns(world.campaigns, world.clock)
    found = await listing.execute(page_size=0, page_token="", status=CampaignStatus.SCHEDULED)
    assert [c.id for c in found.campaigns] == [scheduled.id]
    active = await listing.execute(page_size=0, page_token="", status=CampaignStatus.ACTIVE)
    assert not active.campaigns
    world.clock.advance(120)
    found = await listing.execute(page_size=0, page_token="", status=CampaignStatus.ACTIVE)
    assert [c.id for c in found.campaigns] == [scheduled.id]


@pytest.mark.parametrize(
    ("page_size", "token"), [(-1, ""), (1001, ""), (0, "garbage"), (0, "x" * 300)]
)
async def test_list_campaigns_refuses_bad_paging(world: World, page_size: int, token: str) -> None:
    listing = ListCampaigns(world.campaigns, world.clock)
    with pytest.raises(InvalidArgument) as refused:
        await listing.execute(page_size=page_size, page_token=token, status=None)
    assert refused.value.field == ("page_size" if token == "" else "page_token")


@pytest.mark.parametrize("page_size", [1, 1000])
async def test_list_pages_at_the_bounds_are_accepted(world: World, page_size: int) -> None:
    made = await world.campaign()
    world.clock.advance(120)
    await world.process().issue.execute(campaign_id=made.id, user_id="alice")
    campaigns = await ListCampaigns(world.campaigns, world.clock).execute(
        page_size=page_size, page_token="", status=None
    )
    assert len(campaigns.campaigns) == 1
    coupons = await ListUserCoupons(world.ledger).execute(
        user_id="alice", page_size=page_size, page_token=""
    )
    assert [c.campaign_id for c in coupons.coupons] == [made.id]


async def test_a_page_token_belongs_to_its_status_filter(world: World) -> None:
    for _ in range(3):
        await world.campaign()
    listing = ListCampaigns(world.campaigns, world.clock)
    first = await listing.execute(page_size=1, page_token="", status=None)
    with pytest.raises(InvalidArgument, match="page_token"):
        await listing.execute(
            page_size=1, page_token=first.next_page_token, status=CampaignStatus.SCHEDULED
        )


# --- EndCampaign -------------------------------------------------------------------------


async def test_end_campaign_ends_now_and_again_returns_it_unchanged(world: World) -> None:
    campaign = await world.campaign()
    world.clock.advance(120)
    end = world.end()
    ended = await end.execute(campaign_id=campaign.id)
    # The next microsecond: a request admitted at this instant is before the end.
    assert ended.campaign.ended_at == world.clock.current + timedelta(microseconds=1)
    assert ended.campaign.status_at(ended.now) is CampaignStatus.ENDED
    world.clock.advance(5)
    again = await end.execute(campaign_id=campaign.id)
    assert again.campaign == ended.campaign


async def test_end_campaign_answers_the_count_once_what_was_admitted_before_is_recorded(
    world: World,
) -> None:
    """A request admitted before the end is recorded after it (allowed: its issued_at is
    before the end): EndCampaign waits for it, so the count it answers is final."""
    campaign = await world.campaign()
    world.clock.advance(120)
    admitted = await world.gate.admit(campaign.id, "before")

    async def record_after_the_end() -> None:
        while (found := await world.campaigns.get(campaign.id)) and found.ended_at is None:
            await asyncio.sleep(0)
        coupon = Coupon(
            await world.codes.next_code(), campaign.id, "before", admitted.now, admitted.slot
        )
        await world.ledger.record(coupon)
        world.gate.confirm(coupon)

    late = asyncio.ensure_future(record_after_the_end())
    ended = await world.end().execute(campaign_id=campaign.id)
    await late
    assert ended.campaign.ended_at is not None and admitted.now < ended.campaign.ended_at
    assert (ended.campaign.issued_count, ended.still_recording) == (1, 0)


async def test_end_campaign_says_what_is_still_being_recorded_when_its_wait_runs_out(
    world: World,
) -> None:
    campaign = await world.campaign()
    world.clock.advance(120)
    await world.gate.admit(campaign.id, "slow")  # its commit never comes
    ended = await world.end().execute(campaign_id=campaign.id, wait_seconds=0.05)
    assert (ended.campaign.issued_count, ended.still_recording) == (0, 1)
    assert ended.changed
    # Asked again, it says the same until the admission is settled.
    again = await world.end().execute(campaign_id=campaign.id, wait_seconds=0)
    assert (again.campaign.issued_count, again.still_recording) == (0, 1)


async def test_end_campaign_of_an_unknown_or_malformed_id(world: World) -> None:
    with pytest.raises(CampaignNotFound):
        await world.end().execute(campaign_id="0192f5e0-7c1a-7b3e-9d2a-5b1c2d3e4f50")
    with pytest.raises(InvalidArgument, match="campaign_id"):
        await world.end().execute(campaign_id="nope")


async def test_a_campaign_over_by_its_schedule_is_returned_unchanged(world: World) -> None:
    campaign = await world.campaign(ends_at=START + timedelta(minutes=5))
    world.clock.advance(600)
    ended = await world.end().execute(campaign_id=campaign.id)
    assert ended.campaign.ended_at is None
    assert ended.campaign.status_at(ended.now) is CampaignStatus.ENDED


async def test_another_process_refuses_as_ended_with_the_end_time(world: World) -> None:
    """Process A has the campaign cached from before the end; process B ends it. A's next
    request is refused as ended, with the recorded end, and its earlier coupon stays."""
    campaign = await world.campaign()
    world.clock.advance(120)
    a = world.process()
    honoured = await a.issue.execute(campaign_id=campaign.id, user_id="before")
    world.clock.advance(1)
    ended = await world.end().execute(campaign_id=campaign.id)
    world.clock.advance(1)
    with pytest.raises(CampaignEnded) as refused:
        await a.issue.execute(campaign_id=campaign.id, user_id="after")
    assert refused.value.ends_at == ended.campaign.ended_at
    stored = [c async for chunk in world.ledger.holdings(campaign.id) for c in chunk]
    assert [c.user_id for c in stored] == ["before"]
    assert stored[0].issued_at == honoured.coupon.issued_at < refused.value.ends_at


async def test_a_gate_rebuilt_from_a_stale_cache_keeps_the_end(world: World) -> None:
    campaign = await world.campaign()
    world.clock.advance(120)
    a = world.process()
    await a.issue.execute(campaign_id=campaign.id, user_id="before")  # caches the campaign
    await world.end().execute(campaign_id=campaign.id)
    world.gate.drop(campaign.id)  # Redis lost the gate
    world.clock.advance(1)
    with pytest.raises(CampaignEnded):
        await a.issue.execute(campaign_id=campaign.id, user_id="after")


async def test_ending_a_scheduled_campaign_refuses_as_ended(world: World) -> None:
    campaign = await world.campaign()
    a = world.process()
    ended = await world.end().execute(campaign_id=campaign.id)
    assert ended.campaign.status_at(ended.now) is CampaignStatus.ENDED
    world.clock.advance(600)
    with pytest.raises(CampaignEnded):
        await a.issue.execute(campaign_id=campaign.id, user_id="u")


async def test_the_process_that_ends_a_campaign_forgets_its_not_started_at_once(
    world: World,
) -> None:
    campaign = await world.campaign()
    a = world.process()
    with pytest.raises(CampaignNotStarted):
        await a.issue.execute(campaign_id=campaign.id, user_id="early")
    assert a.memory.recall(campaign.id, "early") is not None  # remembered: not started
    await world.end(a).execute(campaign_id=campaign.id)
    world.clock.advance(0.01)  # well within the memory's time
    with pytest.raises(CampaignEnded):
        await a.issue.execute(campaign_id=campaign.id, user_id="early")


async def test_an_end_the_database_could_not_record_says_so_and_a_retry_records_it(
    world: World,
) -> None:
    campaign = await world.campaign()
    a = world.process()
    world.clock.advance(120)  # open

    class Failing(MemoryCampaignRepository):
        async def end(self, campaign_id: str, at: datetime) -> Campaign | None:
            raise Unavailable("PostgreSQL is unavailable")

    failing = world.end(a, campaigns=Failing(world.store))
    with pytest.raises(Unavailable) as caught:
        await failing.execute(campaign_id=campaign.id)
    assert "not recorded yet; retry EndCampaign to record it" in str(caught.value)
    world.clock.advance(0.01)
    with pytest.raises(CampaignEnded):  # the gate holds the end meanwhile
        await a.issue.execute(campaign_id=campaign.id, user_id="after")
    world.clock.advance(5)
    retried = await world.end(a).execute(campaign_id=campaign.id)
    assert retried.changed
    ended_at = retried.campaign.ended_at
    assert ended_at is not None and ended_at < START + timedelta(seconds=61)  # the first end


async def test_an_end_in_force_is_answered_when_its_count_cannot_be_settled(
    world: World,
) -> None:
    """Once the end is in force, Redis or PostgreSQL failing while the count is settled
    makes the count uncertain, not the end: the ended campaign is answered, saying so."""
    campaign = await world.campaign()
    a = world.process()
    world.clock.advance(120)  # open

    class Blip(MemoryStockGate):
        async def pending_count(self, campaign_id: str, end: datetime) -> int:
            raise Unavailable("Redis is unavailable")

    blip = world.end(a, gate=Blip(world.clock))
    ended = await blip.execute(campaign_id=campaign.id)
    assert ended.changed and ended.campaign.ended_at is not None
    assert ended.still_recording == STILL_RECORDING_UNKNOWN

    second = await world.campaign()

    class Unreadable(MemoryCampaignRepository):
        ends = 0

        async def end(self, campaign_id: str, at: datetime) -> Campaign | None:
            ended = await super().end(campaign_id, at)
            self.ends += 1
            return ended

        async def get(self, campaign_id: str) -> Campaign | None:
            if self.ends:
                raise Unavailable("PostgreSQL is unavailable")
            return await super().get(campaign_id)

    unreadable = world.end(a, campaigns=Unreadable(world.store))
    ended = await unreadable.execute(campaign_id=second.id)
    assert ended.changed and ended.campaign.ended_at is not None
    assert ended.still_recording == STILL_RECORDING_UNKNOWN


async def test_an_ended_campaign_is_returned_as_it_is_while_the_gate_is_down(
    world: World,
) -> None:
    campaign = await world.campaign()
    a = world.process()
    first = await world.end(a).execute(campaign_id=campaign.id)

    class Down(MemoryStockGate):
        async def end(self, campaign_id: str, at: datetime | None) -> datetime:
            raise Unavailable("Redis is unavailable")

    down = world.end(a, gate=Down(world.clock))
    again = await down.execute(campaign_id=campaign.id)
    assert again.campaign.ended_at == first.campaign.ended_at and not again.changed


# --- ListUserCoupons ---------------------------------------------------------------------


async def test_list_user_coupons_pages_newest_campaign_first(world: World) -> None:
    made = [await world.campaign() for _ in range(3)]
    world.clock.advance(120)
    a = world.process()
    for campaign in made:
        await a.issue.execute(campaign_id=campaign.id, user_id="alice")
        await a.issue.execute(campaign_id=campaign.id, user_id="bob")
    listing = ListUserCoupons(world.ledger)
    first = await listing.execute(user_id="alice", page_size=2, page_token="")
    rest = await listing.execute(user_id="alice", page_size=2, page_token=first.next_page_token)
    got = [c.campaign_id for c in [*first.coupons, *rest.coupons]]
    assert got == [c.id for c in reversed(made)]
    assert all(c.user_id == "alice" for c in [*first.coupons, *rest.coupons])
    assert not rest.next_page_token
    with pytest.raises(InvalidArgument, match="page_token"):
        await listing.execute(user_id="bob", page_size=2, page_token=first.next_page_token)
    with pytest.raises(InvalidArgument, match="user_id"):
        await listing.execute(user_id="", page_size=2, page_token="")


# --- ExportCoupons -----------------------------------------------------------------------


async def test_export_streams_every_coupon_in_issue_order_in_chunks(world: World) -> None:
    campaign = await world.campaign(total=EXPORT_CHUNK + 10)
    world.clock.advance(120)
    a = world.process()
    issued = [
        (await a.issue.execute(campaign_id=campaign.id, user_id=f"u{i}")).coupon
        for i in range(EXPORT_CHUNK + 10)
    ]
    chunks = [
        list(c)
        async for c in await ExportCoupons(world.campaigns, world.ledger).execute(
            campaign_id=campaign.id
        )
    ]
    assert [len(c) for c in chunks] == [EXPORT_CHUNK, 10]
    assert [c for chunk in chunks for c in chunk] == issued


async def test_export_of_an_unknown_campaign_fails_before_streaming(world: World) -> None:
    with pytest.raises(CampaignNotFound):
        await ExportCoupons(world.campaigns, world.ledger).execute(
            campaign_id="0192f5e0-7c1a-7b3e-9d2a-5b1c2d3e4f50"
        )


# --- the live view -----------------------------------------------------------------------


async def test_live_view_adds_up_every_process_tallies(world: World) -> None:
    campaign = await world.campaign(total=3)
    stats = MemoryLiveStats()
    processes = [LiveTally(), LiveTally()]
    for tally in processes:
        tally.record(campaign.id, ISSUED, 0.002)
        tally.record(campaign.id, ALREADY_ISSUED, 0.001)
        tally.record(campaign.id, REFUSED + "sold_out", 0.0005)
        tally.record(campaign.id, REFUSED + "overloaded", 0.0001)  # a reason added later
        tally.record("another", ISSUED, 5.0)
        await tally.flush(stats)
    watch = WatchCampaign(world.campaigns, stats, world.clock, LiveTally())
    view = await watch.execute(campaign_id=campaign.id)
    assert sum(s.issued for s in view.seconds) == 2
    assert sum(s.already_issued for s in view.seconds) == 2
    assert view.refusals == {"sold_out": 2, "overloaded": 2}
    assert view.requests == 8
    assert view.p99_seconds is not None and 0.002 <= view.p99_seconds < 0.0025
    assert len(view.seconds) == WatchCampaign.WINDOW_SECONDS
    assert view.seconds[-1].at == int(time.time()) or view.seconds[-1].at == int(time.time()) - 1


class DownStats(MemoryLiveStats):
    """Live stats whose store is down: `add` stores nothing and says so (as the port
    allows), until `up`."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True

    async def add(self, counts: LiveCounts) -> None:
        if self.down:
            raise Unavailable("Redis is unavailable", detail="ConnectionError: refused")
        await super().add(counts)


async def test_counts_a_flush_could_not_store_are_stored_by_the_next_and_said_missing(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    campaign = await world.campaign(total=3)
    stats = DownStats()
    tally = LiveTally()
    watch = WatchCampaign(world.campaigns, stats, world.clock, tally)
    now = time.time()
    # Counts of a second beyond the view's window are not kept: it would never show them.
    monkeypatch.setattr(time, "time", lambda: now - WINDOW_SECONDS - 5)
    tally.record(campaign.id, REFUSED + "unavailable", 0.0001)
    monkeypatch.setattr(time, "time", lambda: now)
    tally.record(campaign.id, REFUSED + "unavailable", 3.0)
    with pytest.raises(Unavailable):
        await tally.flush(stats)
    tally.record(campaign.id, REFUSED + "unavailable", 3.0)
    with pytest.raises(Unavailable):
        await tally.flush(stats)
    missing = (await watch.execute(campaign_id=campaign.id)).figures_missing
    assert missing.startswith("Redis is unavailable; this server's counts"), missing
    stats.down = False
    await tally.flush(stats)
    view = await watch.execute(campaign_id=campaign.id)
    assert view.figures_missing == ""
    assert view.refusals == {"unavailable": 2}
    assert view.p99_seconds is not None and view.p99_seconds >= 3.0


async def test_counts_not_stored_for_longer_than_a_flush_takes_are_said_late(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    campaign = await world.campaign(total=3)
    stats = MemoryLiveStats()
    tally = LiveTally()
    watch = WatchCampaign(world.campaigns, stats, world.clock, tally)
    assert (await watch.execute(campaign_id=campaign.id)).figures_missing == ""
    stalled = time.monotonic() + LiveTally.LATE_SECONDS + 1
    monkeypatch.setattr(time, "monotonic", lambda: stalled)
    missing = (await watch.execute(campaign_id=campaign.id)).figures_missing
    assert "the last flush has not ended" in missing, missing
    await tally.flush(stats)
    assert (await watch.execute(campaign_id=campaign.id)).figures_missing == ""


def test_percentile_is_the_bucket_bound_holding_the_rank() -> None:
    buckets = [0] * (len(LATENCY_BOUNDS) + 1)
    assert percentile(buckets, 0.99) is None
    buckets[3] = 99
    buckets[10] = 1
    assert percentile(buckets, 0.99) == LATENCY_BOUNDS[3]
    assert percentile(buckets, 1.0) == LATENCY_BOUNDS[10]
    buckets[-1] = 1000  # beyond the last bound: reported as the last bound
    assert percentile(buckets, 0.99) == LATENCY_BOUNDS[-1]


# --- the campaign's end ------------------------------------------------------------------


def test_status_reads_ended_from_the_first_of_the_scheduled_and_recorded_ends() -> None:
    campaign = Campaign(
        id="c",
        name="n",
        total_coupons=5,
        starts_at=START,
        ends_at=START + timedelta(hours=2),
        created_at=START,
    )
    killed = campaign.ended(START + timedelta(hours=1))
    assert killed.effective_end == START + timedelta(hours=1)
    assert killed.status_at(START + timedelta(minutes=59)) is CampaignStatus.ACTIVE
    assert killed.status_at(START + timedelta(hours=1)) is CampaignStatus.ENDED
    assert killed.ended(START + timedelta(hours=3)) == killed  # the first end stays
    later = campaign.ended(START + timedelta(hours=3))
    assert later.effective_end == campaign.ends_at
    assert killed.with_end_applied().ends_at == START + timedelta(hours=1)
    assert killed.with_issued_count(5).status_at(START + timedelta(hours=1)) is (
        CampaignStatus.ENDED
    )
