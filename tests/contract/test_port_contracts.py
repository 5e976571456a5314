"""One contract suite for the ports, run against the memory adapters and against the real
ones (PostgreSQL, Redis). A fake that passes here behaves like production."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TypeVar

import asyncpg
import pytest
import redis.asyncio as aioredis

from coupon.adapters.memory.live_stats import MemoryLiveStats
from coupon.adapters.memory.store import (
    MemoryCampaignRepository,
    MemoryCodeGenerator,
    MemoryCouponLedger,
    MemoryStockGate,
    MemoryStore,
    SystemClock,
)
from coupon.adapters.postgres.campaigns import PostgresCampaignRepository
from coupon.adapters.postgres.ledger import PostgresCodeGenerator, PostgresCouponLedger
from coupon.adapters.redis.clock import RedisClock
from coupon.adapters.redis.live_stats import RedisLiveStats
from coupon.adapters.redis.stock_gate import RedisStockGate
from coupon.application.ports import (
    STUCK,
    Admission,
    AdmissionKind,
    CampaignRepository,
    Clock,
    CodeGenerator,
    ConstraintViolation,
    CouponLedger,
    CouponPage,
    Handoff,
    LiveCountsNotStored,
    LiveStats,
    Recorded,
    RecordOutcome,
    StockGate,
)
from coupon.application.use_cases import new_campaign_id
from coupon.domain.campaign import Campaign, CampaignStatus
from coupon.domain.codes import is_well_formed
from coupon.domain.coupon import Coupon
from coupon.domain.errors import Overloaded

LEASE = 0.3
T = TypeVar("T")
DELAY = 0.2  # the gates' reissue delay here


async def chunks(*coupons: Coupon) -> AsyncIterator[Sequence[Coupon]]:
    yield list(coupons)


@dataclass
class Adapters:
    campaigns: CampaignRepository
    ledger: CouponLedger
    gate: StockGate
    codes: CodeGenerator
    clock: Clock
    # Loses a campaign's gate state, as a Redis flush would.
    lose_gate_state: Callable[[str], Awaitable[None]]
    # What the ledger reported newly recorded, per campaign.
    issued: dict[str, int]

    async def draft(
        self, total: int = 5, *, starts_in: float = -60, ends_in: float | None = None
    ) -> Campaign:
        """A campaign not yet added."""
        now = await self.clock.now()
        return Campaign(
            id=new_campaign_id(),
            name="contract",
            total_coupons=total,
            starts_at=now + timedelta(seconds=starts_in),
            ends_at=None if ends_in is None else now + timedelta(seconds=ends_in),
            created_at=now,
        )

    async def new_campaign(
        self, total: int = 5, *, starts_in: float = -60, ends_in: float | None = None
    ) -> Campaign:
        campaign = await self.draft(total, starts_in=starts_in, ends_in=ends_in)
        assert await self.campaigns.add(campaign) == campaign
        await self.gate.load(campaign, chunks())
        return campaign

    async def coupon(self, campaign: Campaign, user: str, slot: int) -> Coupon:
        return Coupon(await self.codes.next_code(), campaign.id, user, campaign.starts_at, slot)


@pytest.fixture
def memory_adapters() -> Adapters:
    store = MemoryStore()
    clock = SystemClock()
    gate = MemoryStockGate(clock, lease_seconds=LEASE, reissue_delay_seconds=DELAY)

    async def lose(campaign_id: str) -> None:
        gate.drop(campaign_id)

    issued: dict[str, int] = {}
    return Adapters(
        MemoryCampaignRepository(store),
        MemoryCouponLedger(store, on_issued=partial(_add, issued)),
        gate,
        MemoryCodeGenerator(),
        clock,
        lose,
        issued,
    )


def _add(counts: dict[str, int], key: str, count: int) -> None:
    counts[key] = counts.get(key, 0) + count


@pytest.fixture
async def real_adapters(
    pg_pool: asyncpg.Pool, redis_client: aioredis.Redis, redis_prefix: str
) -> AsyncIterator[Adapters]:
    issued: dict[str, int] = {}
    ledger = PostgresCouponLedger(pg_pool, on_issued=partial(_add, issued))
    gate = RedisStockGate(
        redis_client, prefix=redis_prefix, lease_seconds=LEASE, reissue_delay_seconds=DELAY
    )

    async def lose(campaign_id: str) -> None:
        await redis_client.delete(*gate.keys(campaign_id))

    yield Adapters(
        PostgresCampaignRepository(pg_pool),
        ledger,
        gate,
        PostgresCodeGenerator(pg_pool),
        RedisClock(redis_client),
        lose,
        issued,
    )
    await gate.close()
    await ledger.close()


@pytest.fixture(params=["memory", "real"])
def adapters(request: pytest.FixtureRequest) -> Adapters:
    found: Adapters = request.getfixturevalue(f"{request.param}_adapters")
    return found


# --- campaign repository ---------------------------------------------------------------


async def test_repository_returns_what_was_added(adapters: Adapters) -> None:
    c = await adapters.new_campaign(ends_in=3600)
    got = await adapters.campaigns.get(c.id)
    assert got == c


async def test_repository_keeps_open_ended_campaigns_open_ended(adapters: Adapters) -> None:
    c = await adapters.new_campaign()
    got = await adapters.campaigns.get(c.id)
    assert got is not None and got.ends_at is None


async def test_repository_returns_none_for_unknown_id(adapters: Adapters) -> None:
    assert await adapters.campaigns.get(new_campaign_id()) is None


async def test_repository_adds_one_campaign_per_request_id(adapters: Adapters) -> None:
    request_id = f"create-{uuid.uuid4()}"
    first = await adapters.draft(ends_in=3600)
    assert await adapters.campaigns.add(first, request_id) == first
    assert await adapters.campaigns.find_by_request_id(request_id) == first
    await adapters.ledger.record(await adapters.coupon(first, "alice", 1))
    # Another campaign with the same request id: nothing is stored, and the first comes
    # back as it is now, whatever the second one says.
    second = await adapters.draft(total=7)
    stored = await adapters.campaigns.add(second, request_id)
    assert stored == first.with_issued_count(1)
    assert await adapters.campaigns.get(second.id) is None
    assert await adapters.campaigns.find_by_request_id(request_id) == stored


async def test_repository_keeps_request_ids_apart_and_none_for_an_empty_one(
    adapters: Adapters,
) -> None:
    tag = uuid.uuid4().hex
    one, other = await adapters.draft(), await adapters.draft()
    assert await adapters.campaigns.add(one, f"{tag}-1") == one
    assert await adapters.campaigns.add(other, f"{tag}-2") == other
    # Compared exactly: case and surrounding spaces make another request id.
    upper = await adapters.draft()
    assert await adapters.campaigns.add(upper, f"{tag}-1".upper()) == upper
    # An empty request id is none: every add stores its campaign.
    plain = [await adapters.draft() for _ in range(2)]
    assert [await adapters.campaigns.add(c, "") for c in plain] == plain
    assert [await adapters.campaigns.get(c.id) for c in plain] == plain
    assert await adapters.campaigns.find_by_request_id(f"{tag}-3") is None


async def test_repository_concurrent_adds_with_one_request_id_store_one_campaign(
    adapters: Adapters,
) -> None:
    request_id = f"race-{uuid.uuid4()}"
    drafts = [await adapters.draft(total=3) for _ in range(16)]
    stored = await asyncio.gather(*(adapters.campaigns.add(c, request_id) for c in drafts))
    assert len({c.id for c in stored}) == 1
    kept = stored[0]
    assert kept in drafts
    assert [c.id for c in drafts if await adapters.campaigns.get(c.id) is not None] == [kept.id]


# --- ledger --------------------------------------------------------------------------


async def test_ledger_finds_many_users_at_once(adapters: Adapters) -> None:
    c = await adapters.new_campaign(total=50)
    coupons = [await adapters.coupon(c, f"u{i}", i + 1) for i in range(50)]
    for x in coupons:
        await adapters.ledger.record(x)
    asked = [f"u{i}" for i in range(0, 100, 3)]
    found = await asyncio.gather(*(adapters.ledger.find_by_user(c.id, u) for u in asked))
    by_user = {x.user_id: x for x in coupons}
    assert found == [by_user.get(u) for u in asked]


async def test_ledger_records_and_finds_by_user(adapters: Adapters) -> None:
    c = await adapters.new_campaign()
    coupon = await adapters.coupon(c, "alice", 1)
    assert (await adapters.ledger.record(coupon)).outcome is RecordOutcome.RECORDED
    assert await adapters.ledger.find_by_user(c.id, "alice") == coupon
    assert await adapters.ledger.find_by_user(c.id, "bob") is None
    got = await adapters.campaigns.get(c.id)
    assert got is not None and got.issued_count == 1


async def test_ledger_returns_the_existing_coupon_of_a_user(adapters: Adapters) -> None:
    c = await adapters.new_campaign()
    first = await adapters.coupon(c, "alice", 1)
    await adapters.ledger.record(first)
    second = await adapters.ledger.record(await adapters.coupon(c, "alice", 2))
    assert second.outcome is RecordOutcome.USER_HAS_COUPON
    assert second.existing == first


async def test_ledger_record_soon_settles_as_record_does(adapters: Adapters) -> None:
    c = await adapters.new_campaign(total=2)
    alice = await adapters.coupon(c, "alice", 1)
    alice_again = await adapters.coupon(c, "alice", 2)
    bob = await adapters.coupon(c, "bob", 1)
    assert (await _record_soon(adapters, alice)).outcome is RecordOutcome.RECORDED
    again = _record_soon(adapters, alice_again)
    taken = _record_soon(adapters, bob)
    repeat = await again
    assert repeat.outcome is RecordOutcome.USER_HAS_COUPON and repeat.existing == alice
    assert (await taken).outcome is RecordOutcome.SLOT_TAKEN
    with pytest.raises(ConstraintViolation):
        await _record_soon(adapters, await adapters.coupon(c, "carol", 3))
    assert await adapters.ledger.find_by_user(c.id, "alice") == alice


async def test_ledger_record_soon_hands_every_outcome_over_when_one_step_fails(
    adapters: Adapters,
) -> None:
    """The handoffs of one commit are settled one after the other from the ledger's own
    batch: a step that raises must not keep the others from theirs, nor the commit from
    holding its coupons."""
    c = await adapters.new_campaign(total=3)
    coupons = [await adapters.coupon(c, user, slot) for slot, user in enumerate("abc", 1)]
    handed: list[Recorded | BaseException] = []

    def failing(outcome: Recorded | BaseException) -> None:
        handed.append(outcome)
        raise RuntimeError("a step that fails")

    adapters.ledger.record_soon(coupons[0], Handoff(failing))
    rest = [_record_soon(adapters, coupon) for coupon in coupons[1:]]
    recorded = await asyncio.wait_for(asyncio.gather(*rest), 10)
    assert [r.outcome for r in recorded] == [RecordOutcome.RECORDED] * 2
    assert [getattr(r, "outcome", r) for r in handed] == [RecordOutcome.RECORDED]
    for coupon in coupons:
        assert await adapters.ledger.find_by_user(c.id, coupon.user_id) == coupon


async def test_ledger_record_soon_left_by_its_caller_still_commits(adapters: Adapters) -> None:
    c = await adapters.new_campaign(total=1)
    coupon = await adapters.coupon(c, "leaves", 1)
    handed: list[object] = []
    leaving: Handoff[Recorded] = Handoff(handed.append)
    adapters.ledger.record_soon(coupon, leaving)
    assert leaving.cancel()
    for _ in range(100):
        if await adapters.ledger.find_by_user(c.id, "leaves") is not None:
            break
        await asyncio.sleep(0.02)
    assert await adapters.ledger.find_by_user(c.id, "leaves") == coupon
    assert handed == []  # a cancelled handoff's step never runs


async def test_ledger_reports_each_coupon_it_newly_records_once_whoever_waits(
    adapters: Adapters,
) -> None:
    """Counted where the commit settles: a coupon whose caller left is counted as well, one
    the ledger did not record (a taken slot, a user who holds one) is not."""
    c = await adapters.new_campaign(total=3)
    first = await adapters.coupon(c, "alice", 1)
    assert (await adapters.ledger.record(first)).outcome is RecordOutcome.RECORDED
    assert adapters.issued == {c.id: 1}  # by the time the caller hears of it
    leaving: Handoff[Recorded] = Handoff(lambda _: None)
    adapters.ledger.record_soon(await adapters.coupon(c, "leaves", 2), leaving)
    assert leaving.cancel()
    taken = await adapters.ledger.record(await adapters.coupon(c, "bob", 1))
    again = await adapters.ledger.record(await adapters.coupon(c, "alice", 3))
    assert taken.outcome is RecordOutcome.SLOT_TAKEN
    assert again.outcome is RecordOutcome.USER_HAS_COUPON
    for _ in range(250):
        if adapters.issued[c.id] > 1:
            break
        await asyncio.sleep(0.02)
    assert adapters.issued == {c.id: 2}
    assert await adapters.ledger.find_by_user(c.id, "leaves") is not None


async def test_ledger_refuses_a_taken_slot(adapters: Adapters) -> None:
    c = await adapters.new_campaign()
    await adapters.ledger.record(await adapters.coupon(c, "alice", 1))
    result = await adapters.ledger.record(await adapters.coupon(c, "bob", 1))
    assert result.outcome is RecordOutcome.SLOT_TAKEN


async def test_ledger_refuses_a_taken_code(adapters: Adapters) -> None:
    a = await adapters.new_campaign()
    b = await adapters.new_campaign()
    coupon = await adapters.coupon(a, "alice", 1)
    await adapters.ledger.record(coupon)
    clash = Coupon(coupon.code, b.id, "bob", b.starts_at, 1)
    assert (await adapters.ledger.record(clash)).outcome is RecordOutcome.CODE_TAKEN


async def test_ledger_refuses_a_slot_beyond_the_stock(adapters: Adapters) -> None:
    c = await adapters.new_campaign(total=2)
    with pytest.raises(ConstraintViolation):
        await adapters.ledger.record(await adapters.coupon(c, "alice", 3))
    with pytest.raises(ConstraintViolation):
        await adapters.ledger.record(await adapters.coupon(c, "alice", 0))


async def test_ledger_refuses_a_coupon_issued_before_the_start(adapters: Adapters) -> None:
    c = await adapters.new_campaign()
    early = Coupon(
        await adapters.codes.next_code(), c.id, "alice", c.starts_at - timedelta(microseconds=1), 1
    )
    with pytest.raises(ConstraintViolation):
        await adapters.ledger.record(early)


async def test_ledger_refuses_a_coupon_of_an_unknown_campaign(adapters: Adapters) -> None:
    ghost = Coupon(
        await adapters.codes.next_code(), new_campaign_id(), "alice", datetime.now(UTC), 1
    )
    with pytest.raises(ConstraintViolation):
        await adapters.ledger.record(ghost)


async def test_ledger_concurrent_records_keep_one_per_user_and_slot(adapters: Adapters) -> None:
    c = await adapters.new_campaign(total=50)
    coupons = [await adapters.coupon(c, f"user-{i % 30}", 1 + i % 50) for i in range(200)]
    results = await asyncio.gather(*(adapters.ledger.record(x) for x in coupons))
    recorded = [
        x for x, r in zip(coupons, results, strict=True) if r.outcome is RecordOutcome.RECORDED
    ]
    assert len({x.user_id for x in recorded}) == len(recorded)
    assert len({x.slot for x in recorded}) == len(recorded)
    page = await adapters.ledger.page(c.id, 0, 1000)
    assert sorted(x.code for x in page.coupons) == sorted(x.code for x in recorded)


async def test_ledger_batch_with_conflicts_records_the_rest(adapters: Adapters) -> None:
    """Recorded together: a user's second coupon, a taken slot, a stranger's coupon, and
    honest ones; each gets its own answer and the honest ones are stored."""
    c = await adapters.new_campaign(total=10)
    first = await adapters.coupon(c, "alice", 1)
    await adapters.ledger.record(first)
    ghost = Coupon(await adapters.codes.next_code(), new_campaign_id(), "g", c.starts_at, 1)
    batch = [
        await adapters.coupon(c, "alice", 2),  # alice has a coupon
        await adapters.coupon(c, "bob", 1),  # slot 1 is taken
        await adapters.coupon(c, "carol", 3),
        ghost,  # no such campaign
        await adapters.coupon(c, "dave", 4),
    ]
    results = await asyncio.gather(
        *(adapters.ledger.record(x) for x in batch), return_exceptions=True
    )
    assert isinstance(results[3], ConstraintViolation)
    outcomes = [r.outcome for r in results if not isinstance(r, BaseException)]
    assert outcomes == [
        RecordOutcome.USER_HAS_COUPON,
        RecordOutcome.SLOT_TAKEN,
        RecordOutcome.RECORDED,
        RecordOutcome.RECORDED,
    ]
    page = await adapters.ledger.page(c.id, 0, 100)
    assert sorted(x.user_id for x in page.coupons) == ["alice", "carol", "dave"]
    got = await adapters.campaigns.get(c.id)
    assert got is not None and got.issued_count == 3


async def test_ledger_batch_of_many_campaigns_and_times_keeps_each_row_whole(
    adapters: Adapters,
) -> None:
    """Recorded together (one batch where batching exists): coupons of three campaigns,
    issued at different times, by users whose ids hold commas, quotes and braces; each is
    stored with its own campaign, slot, code, user and time."""
    campaigns = [await adapters.new_campaign(total=20) for _ in range(3)]
    users = ["a,b", 'q"uote', "{brace}", "back\\slash", "plain", "space d", "다,나"]
    batch = [
        Coupon(
            await adapters.codes.next_code(),
            campaigns[i % 3].id,
            users[i % len(users)] + f"-{i}",
            campaigns[i % 3].starts_at + timedelta(seconds=1 + i % 4),
            1 + i // 3,
        )
        for i in range(21)
    ]
    results = await asyncio.gather(*(adapters.ledger.record(x) for x in batch))
    assert all(r.outcome is RecordOutcome.RECORDED for r in results)
    for campaign in campaigns:
        page = await adapters.ledger.page(campaign.id, 0, 100)
        mine = [x for x in batch if x.campaign_id == campaign.id]
        assert sorted(page.coupons, key=lambda x: x.slot) == mine


async def test_ledger_pages_in_issue_order_with_stable_positions(adapters: Adapters) -> None:
    c = await adapters.new_campaign(total=10)
    coupons = [await adapters.coupon(c, f"u{i}", i + 1) for i in range(10)]
    for x in coupons:
        await adapters.ledger.record(x)
    first = await adapters.ledger.page(c.id, 0, 4)
    assert list(first.coupons) == coupons[:4] and first.has_more
    second = await adapters.ledger.page(c.id, first.last_position, 4)
    assert list(second.coupons) == coupons[4:8] and second.has_more
    third = await adapters.ledger.page(c.id, second.last_position, 4)
    assert list(third.coupons) == coupons[8:] and not third.has_more
    holdings = [x async for chunk in adapters.ledger.holdings(c.id) for x in chunk]
    assert sorted(holdings, key=lambda x: x.slot) == coupons
    holders = [u async for chunk in adapters.ledger.holders(c.id) for u in chunk]
    assert sorted(holders) == sorted(x.user_id for x in coupons)


async def test_ledger_reads_a_campaign_with_a_page_of_its_coupons_at_once(
    adapters: Adapters,
) -> None:
    c = await adapters.new_campaign(total=10)
    assert await adapters.ledger.campaign_page(c.id, 0, 4) == (c, CouponPage([], 0, False))
    coupons = [await adapters.coupon(c, f"u{i}", i + 1) for i in range(6)]
    for x in coupons:
        await adapters.ledger.record(x)
    found = await adapters.ledger.campaign_page(c.id, 0, 4)
    assert found is not None
    campaign, first = found
    assert campaign == await adapters.campaigns.get(c.id)
    assert campaign.issued_count == 6 and campaign.name == c.name
    assert first == await adapters.ledger.page(c.id, 0, 4)
    found = await adapters.ledger.campaign_page(c.id, first.last_position, 4)
    assert found is not None
    assert found[1] == await adapters.ledger.page(c.id, first.last_position, 4)
    assert list(found[1].coupons) == coupons[4:] and not found[1].has_more
    assert await adapters.ledger.campaign_page(new_campaign_id(), 0, 4) is None


# --- stock gate ----------------------------------------------------------------------


async def test_gate_admits_each_slot_once_then_sells_out(adapters: Adapters) -> None:
    c = await adapters.new_campaign(total=3)
    slots = [(await adapters.gate.admit(c.id, f"u{i}")).slot for i in range(3)]
    assert sorted(slots) == [1, 2, 3]
    assert (await adapters.gate.admit(c.id, "u9")).kind is AdmissionKind.SOLD_OUT


async def test_gate_concurrent_admissions_never_share_a_slot(adapters: Adapters) -> None:
    c = await adapters.new_campaign(total=100)
    results = await asyncio.gather(*(adapters.gate.admit(c.id, f"u{i}") for i in range(300)))
    admitted = [r.slot for r in results if r.kind is AdmissionKind.ADMITTED]
    assert sorted(admitted) == list(range(1, 101))
    assert sum(r.kind is AdmissionKind.SOLD_OUT for r in results) == 200


async def test_gate_admits_a_user_asking_many_times_at_once_only_once(
    adapters: Adapters,
) -> None:
    c = await adapters.new_campaign(total=10)
    asks = ["alice", "bob", "alice", "alice", "carol", "bob"]
    results = await asyncio.gather(*(adapters.gate.admit(c.id, u) for u in asks))
    admitted = {
        u: r.slot for u, r in zip(asks, results, strict=True) if r.kind is AdmissionKind.ADMITTED
    }
    assert sorted(admitted) == ["alice", "bob", "carol"]
    assert sorted(admitted.values()) == [1, 2, 3]
    for user, result in zip(asks, results, strict=True):
        if result.kind is not AdmissionKind.ADMITTED:
            assert result.kind is AdmissionKind.ALREADY_HELD and result.pending
            assert result.slot == admitted[user] and result.held is None


async def test_gate_takes_thousands_of_confirms_at_once(adapters: Adapters) -> None:
    """More confirms than one command takes (they queue while Redis is busy)."""
    c = await adapters.new_campaign(total=5000)
    users = [f"u{i}" for i in range(4500)]
    first = await asyncio.gather(*(adapters.gate.admit(c.id, u) for u in users))
    coupons = [
        Coupon(f"c{i}", c.id, u, a.now, a.slot)
        for i, (u, a) in enumerate(zip(users, first, strict=True))
    ]
    for coupon in coupons:
        adapters.gate.confirm(coupon)
    again = await asyncio.gather(*(adapters.gate.admit(c.id, u) for u in users))
    assert [a.held for a in again] == coupons


async def test_gate_admit_soon_decides_as_admit_does(adapters: Adapters) -> None:
    c = await adapters.new_campaign(total=2)
    futures = [_admit_soon(adapters, c.id, u) for u in ("a", "b", "a", "c")]
    results = await asyncio.gather(*futures)
    assert [r.kind for r in results] == [
        AdmissionKind.ADMITTED,
        AdmissionKind.ADMITTED,
        AdmissionKind.ALREADY_HELD,
        AdmissionKind.SOLD_OUT,
    ]
    assert sorted(r.slot for r in results[:2]) == [1, 2]
    with pytest.raises(Overloaded):
        await _admit_soon(adapters, c.id, "late", deadline=time.monotonic() - 0.001)


async def test_gate_admit_soon_hands_every_decision_over_when_one_step_fails(
    adapters: Adapters,
) -> None:
    """One admission call settles its batch's handoffs one after the other: a step that
    raises must not keep the others from theirs."""
    c = await adapters.new_campaign(total=3)
    handed: list[Admission | BaseException] = []

    def failing(outcome: Admission | BaseException) -> None:
        handed.append(outcome)
        raise RuntimeError("a step that fails")

    adapters.gate.admit_soon(c.id, "a", 0.0, Handoff(failing))
    rest = [_admit_soon(adapters, c.id, u) for u in ("b", "c")]
    decided = await asyncio.wait_for(asyncio.gather(*rest), 10)
    assert [d.kind for d in decided] == [AdmissionKind.ADMITTED] * 2
    assert [getattr(h, "kind", h) for h in handed] == [AdmissionKind.ADMITTED]
    slots = sorted([d.slot for d in decided] + [h.slot for h in handed])  # type: ignore[union-attr]
    assert slots == [1, 2, 3]


async def test_gate_admission_cancelled_before_its_decision_gives_the_slot_back(
    adapters: Adapters,
) -> None:
    c = await adapters.new_campaign(total=1)
    handed: list[object] = []
    leaving: Handoff[Admission] = Handoff(handed.append)
    adapters.gate.admit_soon(c.id, "leaves", 0.0, leaving)
    assert leaving.cancel()
    await asyncio.sleep(DELAY + 0.1)
    assert handed == []  # a cancelled handoff's step never runs
    assert await adapters.gate.pending_users(c.id) == []
    assert (await adapters.gate.admit(c.id, "stays")).slot == 1


async def test_gate_says_already_held_with_the_same_slot(adapters: Adapters) -> None:
    c = await adapters.new_campaign()
    first = await adapters.gate.admit(c.id, "alice")
    again = await adapters.gate.admit(c.id, "alice")
    assert again.kind is AdmissionKind.ALREADY_HELD
    assert again.slot == first.slot and again.pending
    assert again.held is None
    assert again.stale == ()  # well within the lease: nothing to settle yet
    coupon = await adapters.coupon(c, "alice", first.slot)
    adapters.gate.confirm(coupon)
    # Confirms are sent in the background, but before any admission asked after them.
    confirmed = await adapters.gate.admit(c.id, "alice")
    assert confirmed.kind is AdmissionKind.ALREADY_HELD and not confirmed.pending
    assert confirmed.held == coupon  # a repeat is answered by the gate alone


# Any user id but the empty one and NUL: spaces, separators, Hangul, emoji, 128 characters.
ODD_USERS = ["a b", "a|b|c", "|", "1|x|2", "쿠폰사용자", "🎟️", "\t\n", "%z", "x" * 128, "0"]


async def test_gate_keeps_odd_user_ids_apart_in_one_batch(adapters: Adapters) -> None:
    c = await adapters.new_campaign(total=len(ODD_USERS))
    first = await asyncio.gather(*(adapters.gate.admit(c.id, u) for u in ODD_USERS))
    assert [a.kind for a in first] == [AdmissionKind.ADMITTED] * len(ODD_USERS)
    assert sorted(a.slot for a in first) == list(range(1, len(ODD_USERS) + 1))
    coupons = [await adapters.coupon(c, u, a.slot) for u, a in zip(ODD_USERS, first, strict=True)]
    for coupon in coupons:  # queued together: sent in one batch
        adapters.gate.confirm(coupon)
    again = await asyncio.gather(*(adapters.gate.admit(c.id, u) for u in ODD_USERS))
    assert [a.held for a in again] == coupons


async def test_gate_ignores_a_confirm_for_a_released_admission(adapters: Adapters) -> None:
    c = await adapters.new_campaign(total=1)
    a = await adapters.gate.admit(c.id, "alice")
    await adapters.gate.release(c.id, "alice", a.slot)
    await asyncio.sleep(DELAY)
    b = await adapters.gate.admit(c.id, "bob")
    # Alice's confirm names bob's slot now: it neither takes it nor puts alice back into it.
    adapters.gate.confirm(await adapters.coupon(c, "alice", a.slot))
    assert (await adapters.gate.admit(c.id, "bob")).slot == b.slot


async def test_gate_leaves_a_users_newer_admission_alone_when_an_older_one_is_confirmed(
    adapters: Adapters,
) -> None:
    """Alice's first admission was settled while its coupon was being committed, and she was
    admitted again; the first commit's confirm then arrives. Her newer admission stays
    pending (the ledger refuses its coupon, one per user), and gives its slot back."""
    c = await adapters.new_campaign(total=2)
    first = await adapters.gate.admit(c.id, "alice")
    await adapters.gate.release(c.id, "alice", first.slot)
    second = await adapters.gate.admit(c.id, "alice")
    assert second.kind is AdmissionKind.ADMITTED and second.slot != first.slot
    adapters.gate.confirm(await adapters.coupon(c, "alice", first.slot))
    held = await adapters.gate.admit(c.id, "alice")
    assert held.kind is AdmissionKind.ALREADY_HELD
    assert held.slot == second.slot and held.pending
    await adapters.gate.release(c.id, "alice", second.slot)
    await asyncio.sleep(DELAY)
    slots = {(await adapters.gate.admit(c.id, u)).slot for u in ("carol", "dave")}
    assert second.slot in slots


async def test_gate_refuses_before_start_and_at_end(adapters: Adapters) -> None:
    early = await adapters.new_campaign(starts_in=3600)
    assert (await adapters.gate.admit(early.id, "a")).kind is AdmissionKind.NOT_STARTED
    ended = await adapters.new_campaign(starts_in=-10, ends_in=-0.001)
    assert (await adapters.gate.admit(ended.id, "a")).kind is AdmissionKind.ENDED


async def test_gate_decision_time_is_never_before_the_start(adapters: Adapters) -> None:
    c = await adapters.new_campaign(starts_in=0.2)
    seen = []
    deadline = asyncio.get_running_loop().time() + 2
    while asyncio.get_running_loop().time() < deadline:
        admission = await adapters.gate.admit(c.id, f"u{len(seen)}")
        seen.append(admission)
        if admission.kind is AdmissionKind.ADMITTED:
            break
    admitted = [a for a in seen if a.kind is AdmissionKind.ADMITTED]
    assert admitted and admitted[0].now >= c.starts_at
    assert all(a.now < c.starts_at for a in seen if a.kind is AdmissionKind.NOT_STARTED)


async def test_gate_reports_unknown_campaign_as_not_loaded(adapters: Adapters) -> None:
    admission = await adapters.gate.admit(new_campaign_id(), "a")
    assert admission.kind is AdmissionKind.NOT_LOADED


async def test_gate_release_returns_the_slot_after_the_reissue_delay(adapters: Adapters) -> None:
    c = await adapters.new_campaign(total=1)
    a = await adapters.gate.admit(c.id, "alice")
    await adapters.gate.release(c.id, "alice", a.slot)
    waiting = await adapters.gate.admit(c.id, "bob")
    assert waiting.kind is AdmissionKind.SOLD_OUT
    assert waiting.view is not None and waiting.view.reopens_at is not None
    assert DELAY / 2 < (waiting.view.reopens_at - waiting.now).total_seconds() <= DELAY
    await asyncio.sleep(DELAY)
    b = await adapters.gate.admit(c.id, "bob")
    assert b.kind is AdmissionKind.ADMITTED and b.slot == a.slot


async def test_gate_sold_out_behind_a_stuck_admission_is_not_final(adapters: Adapters) -> None:
    """An admission pending past STUCK (its process died mid-commit, or PostgreSQL stalls)
    may still be given back: the sold-out answer says when its lease runs out, rather than
    final; one pending less long, or confirmed, leaves the answer final."""
    c = await adapters.new_campaign(total=1)
    a = await adapters.gate.admit(c.id, "alice")
    young = await adapters.gate.admit(c.id, "bob")
    assert young.kind is AdmissionKind.SOLD_OUT
    assert young.view is not None and young.view.reopens_at is None
    await asyncio.sleep(STUCK.total_seconds() + 0.2)
    stuck = await adapters.gate.admit(c.id, "bob")
    assert stuck.kind is AdmissionKind.SOLD_OUT and stuck.view is not None
    assert stuck.view.reopens_at is not None
    assert stuck.view.reopens_at - a.now == timedelta(seconds=LEASE)
    adapters.gate.confirm(await adapters.coupon(c, "alice", a.slot))
    final = await adapters.gate.admit(c.id, "bob")
    assert final.kind is AdmissionKind.SOLD_OUT
    assert final.view is not None and final.view.reopens_at is None


async def test_gate_release_of_a_slot_the_user_no_longer_holds_does_nothing(
    adapters: Adapters,
) -> None:
    c = await adapters.new_campaign(total=2)
    a = await adapters.gate.admit(c.id, "alice")
    await adapters.gate.release(c.id, "alice", a.slot + 1)
    assert (await adapters.gate.admit(c.id, "alice")).kind is AdmissionKind.ALREADY_HELD
    await adapters.gate.release(c.id, "alice", a.slot)
    await adapters.gate.release(c.id, "alice", a.slot)  # twice: the slot comes back once
    await asyncio.sleep(DELAY)
    slots = [(await adapters.gate.admit(c.id, u)).slot for u in ("b", "c")]
    assert sorted(slots) == [1, 2]
    assert (await adapters.gate.admit(c.id, "d")).kind is AdmissionKind.SOLD_OUT


async def test_gate_forget_drops_the_user_but_not_the_slot(adapters: Adapters) -> None:
    c = await adapters.new_campaign(total=1)
    a = await adapters.gate.admit(c.id, "alice")
    await adapters.gate.forget(c.id, "alice", a.slot)
    assert (await adapters.gate.admit(c.id, "bob")).kind is AdmissionKind.SOLD_OUT


async def test_gate_load_rebuilds_users_and_free_slots(adapters: Adapters) -> None:
    c = await adapters.new_campaign(total=5)
    await adapters.lose_gate_state(c.id)
    assert (await adapters.gate.admit(c.id, "x")).kind is AdmissionKind.NOT_LOADED
    alice = await adapters.coupon(c, "alice", 1)
    await adapters.gate.load(c, chunks(alice, await adapters.coupon(c, "bob", 3)))
    held = await adapters.gate.admit(c.id, "alice")
    assert held.kind is AdmissionKind.ALREADY_HELD and held.slot == 1 and not held.pending
    assert held.held == alice
    # Slot 2 was never recorded: it comes back, after the reissue delay.
    slots = sorted([(await adapters.gate.admit(c.id, u)).slot for u in ("c", "d")])
    assert slots == [4, 5]
    assert (await adapters.gate.admit(c.id, "e")).kind is AdmissionKind.SOLD_OUT
    await asyncio.sleep(DELAY)
    assert (await adapters.gate.admit(c.id, "e")).slot == 2
    assert (await adapters.gate.admit(c.id, "f")).kind is AdmissionKind.SOLD_OUT


async def test_gate_load_leaves_an_existing_state_alone(adapters: Adapters) -> None:
    c = await adapters.new_campaign(total=2)
    first = await adapters.gate.admit(c.id, "alice")
    await adapters.gate.load(c, chunks())  # another process's late rebuild
    again = await adapters.gate.admit(c.id, "alice")
    assert again.kind is AdmissionKind.ALREADY_HELD and again.slot == first.slot


async def test_gate_puts_back_a_holder_it_lost_when_their_coupon_is_confirmed(
    adapters: Adapters,
) -> None:
    """A rebuild that ran while alice's coupon was being committed does not know her, and
    takes her slot for a gap; the confirm that follows the commit puts her back, and her
    slot is no longer free."""
    c = await adapters.new_campaign(total=2)
    a = await adapters.gate.admit(c.id, "alice")
    b = await adapters.gate.admit(c.id, "bob")
    bob = await adapters.coupon(c, "bob", b.slot)
    await adapters.lose_gate_state(c.id)
    await adapters.gate.load(c, chunks(bob))  # alice's commit has not landed yet
    refused = await adapters.gate.admit(c.id, "carol")
    assert refused.view is not None
    alice = await adapters.coupon(c, "alice", a.slot)
    adapters.gate.confirm(alice)
    held = await adapters.gate.admit(c.id, "alice")
    assert held.kind is AdmissionKind.ALREADY_HELD and held.held == alice
    await asyncio.sleep(DELAY)
    sold_out = await adapters.gate.admit(c.id, "carol")
    assert sold_out.kind is AdmissionKind.SOLD_OUT
    assert sold_out.view is not None and sold_out.view.reopens_at is None
    # A new holder: the gate's version moved on.
    assert sold_out.view.version != refused.view.version


async def test_gate_answers_holders_with_their_coupon_after_the_end(adapters: Adapters) -> None:
    c = await adapters.new_campaign(total=3, ends_in=0.3)
    a = await adapters.gate.admit(c.id, "alice")
    coupon = await adapters.coupon(c, "alice", a.slot)
    adapters.gate.confirm(coupon)
    await asyncio.sleep(0.35)
    held = await adapters.gate.admit(c.id, "alice")
    assert held.kind is AdmissionKind.ALREADY_HELD and held.held == coupon
    ended = await adapters.gate.admit(c.id, "bob")
    assert ended.kind is AdmissionKind.ENDED
    assert ended.view is not None and ended.view.ends_at == c.ends_at


async def test_gate_version_moves_with_every_admission(adapters: Adapters) -> None:
    c = await adapters.new_campaign(total=1)
    early = await adapters.new_campaign(total=1, starts_in=3600)
    not_started = await adapters.gate.admit(early.id, "x")
    assert not_started.view is not None and not_started.view.starts_at == early.starts_at
    await adapters.gate.admit(c.id, "alice")
    first = await adapters.gate.admit(c.id, "bob")
    again = await adapters.gate.admit(c.id, "carol")
    assert first.view is not None and again.view is not None
    assert first.view.version == again.view.version  # refusals add no holder
    await adapters.gate.release(c.id, "alice", 1)
    await asyncio.sleep(DELAY)
    await adapters.gate.admit(c.id, "dave")
    later = await adapters.gate.admit(c.id, "erin")
    assert later.view is not None and later.view.version != first.view.version


async def test_gate_lists_pending_users_until_confirmed(adapters: Adapters) -> None:
    c = await adapters.new_campaign(total=3)
    a = await adapters.gate.admit(c.id, "alice")
    await adapters.gate.admit(c.id, "bob")
    assert sorted(await adapters.gate.pending_users(c.id)) == ["alice", "bob"]
    adapters.gate.confirm(await adapters.coupon(c, "alice", a.slot))
    await adapters.gate.admit(c.id, "carol")  # confirms are sent before what follows
    assert sorted(await adapters.gate.pending_users(c.id)) == ["bob", "carol"]


async def test_gate_counts_the_admissions_before_an_end_still_being_recorded(
    adapters: Adapters,
) -> None:
    c = await adapters.new_campaign(total=5)
    stranded = await adapters.gate.admit(c.id, "stranded")  # its process died: no confirm
    await asyncio.sleep(LEASE * 1.5)
    alice = await adapters.gate.admit(c.id, "alice")
    bob = await adapters.gate.admit(c.id, "bob")
    assert stranded.kind is alice.kind is bob.kind is AdmissionKind.ADMITTED
    end = await adapters.gate.end(c.id, None)
    # The stranded admission is older than the lease: nobody is recording it any more.
    assert await adapters.gate.pending_count(c.id, end) == 2
    await adapters.gate.release(c.id, "bob", bob.slot)
    assert await adapters.gate.pending_count(c.id, end) == 1
    adapters.gate.confirm(await adapters.coupon(c, "alice", alice.slot))
    # A confirm is queued, never waited for: it arrives soon after.
    give_up = time.monotonic() + 5
    while await adapters.gate.pending_count(c.id, end) and time.monotonic() < give_up:
        await asyncio.sleep(0.01)
    assert await adapters.gate.pending_count(c.id, end) == 0
    assert await adapters.gate.pending_users(c.id) == ["stranded"]


async def test_gate_turns_away_a_request_past_its_deadline_untouched(adapters: Adapters) -> None:
    c = await adapters.new_campaign(total=1)
    with pytest.raises(Overloaded):
        await adapters.gate.admit(c.id, "late", deadline=time.monotonic() - 0.001)
    assert (await adapters.gate.admit(c.id, "bob")).slot == 1


async def test_gate_reports_unconfirmed_admissions_after_the_lease(adapters: Adapters) -> None:
    c = await adapters.new_campaign(total=1)
    a = await adapters.gate.admit(c.id, "ghost")
    assert (await adapters.gate.admit(c.id, "bob")).stale == ()
    await asyncio.sleep(LEASE + 0.1)
    sold_out = await adapters.gate.admit(c.id, "bob")
    assert sold_out.kind is AdmissionKind.SOLD_OUT
    assert list(sold_out.stale) == [("ghost", a.slot)]
    held = await adapters.gate.admit(c.id, "ghost")
    assert list(held.stale) == [("ghost", a.slot)]


# --- code generator ------------------------------------------------------------------


async def test_codes_are_well_formed_and_distinct(adapters: Adapters) -> None:
    codes = [await adapters.codes.next_code() for _ in range(2000)]
    assert len(set(codes)) == 2000
    assert all(is_well_formed(x) for x in codes)


async def test_codes_at_hand_and_awaited_are_one_sequence(adapters: Adapters) -> None:
    """`code_now` may have nothing at hand (None), but once `next_code` has reserved, codes
    come at hand, never one given before."""
    codes = [await adapters.codes.next_code()]
    for i in range(3000):
        code = adapters.codes.code_now()
        if code is None:
            assert i > 0, "nothing at hand right after next_code"
            code = await adapters.codes.next_code()
        codes.append(code)
    assert len(set(codes)) == len(codes)
    assert all(is_well_formed(x) for x in codes)


# --- operators: listing, the kill switch, a user's coupons --------------------------------


async def test_repository_lists_newest_first_in_pages(adapters: Adapters) -> None:
    made = []
    for _ in range(5):
        made.append(await adapters.new_campaign())
        await asyncio.sleep(0.002)  # ids order by the millisecond they were made in
    now = await adapters.clock.now()
    first = await adapters.campaigns.newest(before=None, limit=3, status=None, now=now)
    # Other tests' campaigns may be newer; ours are in order among what comes back.
    everything = await adapters.campaigns.newest(before=None, limit=10_000, status=None, now=now)
    ids = [c.id for c in everything]
    assert ids == sorted(ids, reverse=True)
    assert [c.id for c in everything if c.id in {m.id for m in made}] == [
        m.id for m in reversed(made)
    ]
    assert [c.id for c in first] == ids[:3]
    after = await adapters.campaigns.newest(before=made[2].id, limit=10, status=None, now=now)
    assert [c.id for c in after][:2] == [made[1].id, made[0].id]
    assert all(c.id < made[2].id for c in after)


async def test_repository_filters_by_status_at_the_given_time(adapters: Adapters) -> None:
    scheduled = await adapters.new_campaign(starts_in=3600)
    active = await adapters.new_campaign(total=2)
    ended = await adapters.new_campaign(starts_in=-10, ends_in=-0.001)
    sold_out = await adapters.new_campaign(total=1)
    await adapters.ledger.record(await adapters.coupon(sold_out, "alice", 1))
    now = await adapters.clock.now()
    mine = {scheduled.id, active.id, ended.id, sold_out.id}

    async def listed(status: CampaignStatus) -> set[str]:
        found = await adapters.campaigns.newest(before=None, limit=10_000, status=status, now=now)
        assert all(c.status_at(now) is status for c in found)
        return {c.id for c in found} & mine

    assert await listed(CampaignStatus.SCHEDULED) == {scheduled.id}
    assert await listed(CampaignStatus.ACTIVE) == {active.id}
    assert await listed(CampaignStatus.ENDED) == {ended.id}
    assert await listed(CampaignStatus.SOLD_OUT) == {sold_out.id}
    later = now + timedelta(hours=2)
    found = await adapters.campaigns.newest(
        before=None, limit=10_000, status=CampaignStatus.ACTIVE, now=later
    )
    assert scheduled.id in {c.id for c in found}


async def test_repository_end_keeps_the_first_end(adapters: Adapters) -> None:
    c = await adapters.new_campaign()
    now = await adapters.clock.now()
    ended = await adapters.campaigns.end(c.id, now)
    assert ended is not None and ended.ended_at == now and ended.ends_at is None
    assert ended.status_at(now) is CampaignStatus.ENDED
    again = await adapters.campaigns.end(c.id, now + timedelta(seconds=5))
    assert again == ended
    assert await adapters.campaigns.get(c.id) == ended
    assert await adapters.campaigns.end(new_campaign_id(), now) is None


async def test_repository_lists_ended_campaigns_by_their_end(adapters: Adapters) -> None:
    c = await adapters.new_campaign(ends_in=3600)
    now = await adapters.clock.now()
    await adapters.campaigns.end(c.id, now - timedelta(seconds=1))
    found = await adapters.campaigns.newest(
        before=None, limit=10_000, status=CampaignStatus.ENDED, now=now
    )
    assert c.id in {x.id for x in found}


async def test_ledger_refuses_a_coupon_issued_at_or_after_the_end(adapters: Adapters) -> None:
    c = await adapters.new_campaign(total=5)
    end = c.starts_at + timedelta(seconds=10)
    await adapters.campaigns.end(c.id, end)
    before = Coupon(await adapters.codes.next_code(), c.id, "a", end - timedelta(microseconds=1), 1)
    assert (await adapters.ledger.record(before)).outcome is RecordOutcome.RECORDED
    for user, at in (("b", end), ("c", end + timedelta(seconds=1))):
        with pytest.raises(ConstraintViolation):
            late = Coupon(await adapters.codes.next_code(), c.id, user, at, 2)
            await adapters.ledger.record(late)
    got = await adapters.campaigns.get(c.id)
    assert got is not None and got.issued_count == 1


async def test_ledger_lists_a_users_coupons_newest_campaign_first(adapters: Adapters) -> None:
    user = f"holder-{new_campaign_id()}"
    campaigns = []
    for _ in range(5):
        campaigns.append(await adapters.new_campaign())
        await asyncio.sleep(0.002)
    held = []
    for c in campaigns:
        coupon = await adapters.coupon(c, user, 1)
        await adapters.ledger.record(coupon)
        await adapters.ledger.record(await adapters.coupon(c, "someone else", 2))
        held.append(coupon)
    newest_first = list(reversed(held))
    first = await adapters.ledger.user_coupons(user, None, 2)
    assert list(first.coupons) == newest_first[:2] and first.has_more
    second = await adapters.ledger.user_coupons(user, first.coupons[-1].campaign_id, 2)
    assert list(second.coupons) == newest_first[2:4] and second.has_more
    last = await adapters.ledger.user_coupons(user, second.coupons[-1].campaign_id, 2)
    assert list(last.coupons) == newest_first[4:] and not last.has_more
    nobody = await adapters.ledger.user_coupons(f"nobody-{new_campaign_id()}", None, 10)
    assert list(nobody.coupons) == [] and not nobody.has_more


async def test_gate_end_refuses_every_admission_from_the_end(adapters: Adapters) -> None:
    c = await adapters.new_campaign(total=10)
    before = await adapters.gate.admit(c.id, "early")
    assert before.kind is AdmissionKind.ADMITTED
    end = await adapters.gate.end(c.id, None)
    assert before.now < end
    assert await adapters.gate.ended_at(c.id) == end
    after = await adapters.gate.admit(c.id, "late")
    assert after.kind is AdmissionKind.ENDED and after.now >= end
    # The first end stays, whether a later or an earlier one is asked for afterwards.
    assert await adapters.gate.end(c.id, end + timedelta(seconds=1)) == end
    assert await adapters.gate.end(c.id, None) == end


async def test_gate_end_of_a_scheduled_campaign_says_ended(adapters: Adapters) -> None:
    c = await adapters.new_campaign(starts_in=3600)
    assert (await adapters.gate.admit(c.id, "a")).kind is AdmissionKind.NOT_STARTED
    await adapters.gate.end(c.id, None)
    assert (await adapters.gate.admit(c.id, "a")).kind is AdmissionKind.ENDED


async def test_gate_end_recorded_without_state_is_applied_by_the_rebuild(
    adapters: Adapters,
) -> None:
    c = await adapters.new_campaign(total=5)
    await adapters.lose_gate_state(c.id)
    end = await adapters.gate.end(c.id, None)
    assert (await adapters.gate.admit(c.id, "a")).kind is AdmissionKind.NOT_LOADED
    await adapters.gate.load(c, chunks())  # the campaign as read before the end was recorded
    assert await adapters.gate.ended_at(c.id) == end
    assert (await adapters.gate.admit(c.id, "a")).kind is AdmissionKind.ENDED


async def test_gate_load_applies_the_campaigns_recorded_end(adapters: Adapters) -> None:
    c = await adapters.new_campaign(total=5)
    await adapters.lose_gate_state(c.id)
    now = await adapters.clock.now()
    await adapters.gate.load(c.ended(now), chunks())
    assert (await adapters.gate.admit(c.id, "a")).kind is AdmissionKind.ENDED


async def test_gate_load_of_a_campaign_ended_before_its_start_says_ended(
    adapters: Adapters,
) -> None:
    """Ended while still scheduled, its gate state then lost: the rebuild's window is empty,
    and a request is told the campaign ended, not that it has not started yet."""
    c = await adapters.new_campaign(starts_in=3600)
    await adapters.lose_gate_state(c.id)
    now = await adapters.clock.now()
    await adapters.gate.load(c.ended(now), chunks())
    assert (await adapters.gate.admit(c.id, "a")).kind is AdmissionKind.ENDED


async def test_gate_ended_at_is_none_for_a_campaign_never_ended(adapters: Adapters) -> None:
    c = await adapters.new_campaign(ends_in=-0.001, starts_in=-10)
    assert await adapters.gate.ended_at(c.id) is None


# --- live stats ----------------------------------------------------------------------------


@pytest.fixture(params=["memory", "real"])
def live_stats(request: pytest.FixtureRequest, redis_prefix: str) -> LiveStats:
    if request.param == "memory":
        return MemoryLiveStats()
    client: aioredis.Redis = request.getfixturevalue("redis_client")
    return RedisLiveStats(client, prefix=redis_prefix)


async def test_live_stats_add_up_every_process_counts(live_stats: LiveStats) -> None:
    a, b = new_campaign_id(), new_campaign_id()
    second = 1_800_000_000
    await live_stats.add({(a, second): {"issued": 3, "refused.sold_out": 1}, (b, second): {"x": 1}})
    await live_stats.add({(a, second): {"issued": 2}, (a, second + 1): {"issued": 7}})
    got = await live_stats.read(a, [second - 1, second, second + 1])
    assert got == {second: {"issued": 5, "refused.sold_out": 1}, second + 1: {"issued": 7}}
    assert await live_stats.read(b, [second]) == {second: {"x": 1}}
    assert await live_stats.read(new_campaign_id(), [second]) == {}


async def test_redis_live_stats_names_the_counts_it_could_not_store(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    """Counts refused in one campaign's call are named, to be sent again; the others are
    stored (each campaign's counts go in a call of their own)."""
    stats = RedisLiveStats(redis_client, prefix=redis_prefix)
    a, b = new_campaign_id(), new_campaign_id()
    second = 1_800_000_000
    await redis_client.set(stats.key(b, second), "not a hash")  # HINCRBY refuses it
    with pytest.raises(LiveCountsNotStored) as caught:
        await stats.add({(a, second): {"issued": 3}, (b, second): {"issued": 4}})
    assert caught.value.not_stored == {(b, second): {"issued": 4}}
    assert "WRONGTYPE" in caught.value.detail
    assert await stats.read(a, [second]) == {second: {"issued": 3}}


def _admit_soon(
    adapters: Adapters, campaign_id: str, user_id: str, deadline: float = 0.0
) -> asyncio.Future[Admission]:
    future: asyncio.Future[Admission] = asyncio.get_running_loop().create_future()
    adapters.gate.admit_soon(campaign_id, user_id, deadline, Handoff(partial(_settle, future)))
    return future


def _record_soon(adapters: Adapters, coupon: Coupon) -> asyncio.Future[Recorded]:
    future: asyncio.Future[Recorded] = asyncio.get_running_loop().create_future()
    adapters.ledger.record_soon(coupon, Handoff(partial(_settle, future)))
    return future


def _settle(future: asyncio.Future[T], outcome: T | BaseException) -> None:
    """A handoff's step that settles a future, for a test to await."""
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
