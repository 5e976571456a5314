"""Use cases on the memory adapters (hand-written fakes, no mocks)."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from coupon.adapters.memory.store import (
    ManualClock,
    MemoryCampaignRepository,
    MemoryCodeGenerator,
    MemoryCouponLedger,
    MemoryStockGate,
    MemoryStore,
)
from coupon.application.issue import IssueCoupon
from coupon.application.ports import Admission, Recorded
from coupon.application.refusals import RefusalMemory
from coupon.application.use_cases import (
    CampaignDirectory,
    CreateCampaign,
    GetCampaign,
    decode_page_token,
    encode_page_token,
)
from coupon.domain.campaign import Campaign
from coupon.domain.coupon import Coupon
from coupon.domain.errors import (
    CampaignEnded,
    CampaignNotFound,
    CampaignNotStarted,
    InvalidArgument,
    Overloaded,
    SoldOut,
    Unavailable,
)

START = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
REISSUE_DELAY = 0.6


class FlakyLedger(MemoryCouponLedger):
    """A ledger whose commits fail while `failing` is set, like a database going away."""

    failing = False

    async def record(self, coupon: Coupon) -> Recorded:
        await asyncio.sleep(0)
        if self.failing:
            raise Unavailable("PostgreSQL is unavailable")
        return await super().record(coupon)


@dataclass
class World:
    clock: ManualClock
    store: MemoryStore
    gate: MemoryStockGate
    ledger: FlakyLedger
    create: CreateCampaign
    get: GetCampaign
    issue: IssueCoupon

    async def campaign(self, total: int = 10, **kw: object) -> Campaign:
        fields: dict[str, object] = {
            "name": "launch",
            "total_coupons": total,
            "starts_at": START,
            "ends_at": None,
        }
        fields.update(kw)
        return await self.create.execute(**fields)  # type: ignore[arg-type]

    async def all_coupons(self, campaign_id: str) -> list[Coupon]:
        coupons: list[Coupon] = []
        token = ""
        while True:
            view = await self.get.execute(campaign_id=campaign_id, page_size=7, page_token=token)
            coupons.extend(view.coupons)
            token = view.next_page_token
            if not token:
                return coupons


def build_world(
    clock: ManualClock, gate: MemoryStockGate, codes: MemoryCodeGenerator | None = None
) -> World:
    store = MemoryStore()
    campaigns = MemoryCampaignRepository(store)
    ledger = FlakyLedger(store)
    memory = RefusalMemory(ledger, gate, seconds=0.5, clock=clock.seconds)
    return World(
        clock=clock,
        store=store,
        gate=gate,
        ledger=ledger,
        create=CreateCampaign(campaigns, gate, clock),
        get=GetCampaign(ledger, clock),
        issue=IssueCoupon(
            gate, ledger, codes or MemoryCodeGenerator(), CampaignDirectory(campaigns), memory
        ),
    )


@pytest.fixture
def world() -> World:
    clock = ManualClock(START - timedelta(minutes=5))
    return build_world(
        clock, MemoryStockGate(clock, lease_seconds=10, reissue_delay_seconds=REISSUE_DELAY)
    )


async def test_issue_gives_a_coupon_with_the_authoritative_time(world: World) -> None:
    c = await world.campaign()
    world.clock.current = START
    issued = await world.issue.execute(campaign_id=c.id, user_id="alice")
    assert not issued.already_issued
    assert issued.coupon.issued_at == START
    assert 1 <= len(issued.coupon.code) <= 10


async def test_second_request_from_same_user_returns_same_coupon(world: World) -> None:
    c = await world.campaign()
    world.clock.current = START
    first = await world.issue.execute(campaign_id=c.id, user_id="alice")
    second = await world.issue.execute(campaign_id=c.id, user_id="alice")
    assert second.already_issued
    assert second.coupon == first.coupon


async def test_request_before_start_is_refused_with_the_start_time(world: World) -> None:
    c = await world.campaign()
    world.clock.current = START - timedelta(microseconds=1)
    with pytest.raises(CampaignNotStarted) as caught:
        await world.issue.execute(campaign_id=c.id, user_id="alice")
    assert caught.value.starts_at == START
    assert (await world.get.execute(campaign_id=c.id, page_size=0, page_token="")).coupons == []


async def test_request_at_the_end_is_refused(world: World) -> None:
    c = await world.campaign(ends_at=START + timedelta(minutes=1))
    world.clock.current = START + timedelta(minutes=1)
    with pytest.raises(CampaignEnded):
        await world.issue.execute(campaign_id=c.id, user_id="alice")


async def test_stock_runs_out_after_exactly_total_coupons(world: World) -> None:
    c = await world.campaign(total=3)
    world.clock.current = START
    for user in ("a", "b", "c"):
        await world.issue.execute(campaign_id=c.id, user_id=user)
    with pytest.raises(SoldOut):
        await world.issue.execute(campaign_id=c.id, user_id="d")
    assert (await world.issue.execute(campaign_id=c.id, user_id="a")).already_issued


async def test_unknown_campaign_is_not_found(world: World) -> None:
    with pytest.raises(CampaignNotFound):
        await world.issue.execute(
            campaign_id="0192f5e0-7c1a-7b3e-9d2a-5b1c2d3e4f50", user_id="alice"
        )


async def test_thousands_of_concurrent_requests_keep_invariants(world: World) -> None:
    c = await world.campaign(total=300)
    world.clock.current = START
    rng = random.Random(7)
    users = [f"user-{rng.randrange(800)}" for _ in range(3000)]
    results = await asyncio.gather(
        *(world.issue.execute(campaign_id=c.id, user_id=u) for u in users),
        return_exceptions=True,
    )
    successes = [r for r in results if not isinstance(r, BaseException)]
    failures = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(f, SoldOut) for f in failures)
    listed = await world.all_coupons(c.id)
    assert len(listed) == 300  # I1, and stock fully used: more than 300 users asked
    assert len({x.code for x in listed}) == 300  # I2
    assert len({x.user_id for x in listed}) == 300  # I4
    by_user = {x.user_id: x for x in listed}
    for s in successes:  # every success is in the list, the same coupon for the same user
        assert by_user[s.coupon.user_id] == s.coupon
    first_time = Counter(s.coupon.user_id for s in successes if not s.already_issued)
    assert max(first_time.values()) == 1


async def test_failed_commit_returns_the_slot(world: World) -> None:
    c = await world.campaign(total=1)
    world.clock.current = START
    world.ledger.failing = True
    with pytest.raises(Unavailable):
        await world.issue.execute(campaign_id=c.id, user_id="alice")
    world.ledger.failing = False
    # The slot comes back after the reissue delay; until then "retry", not "sold out".
    with pytest.raises(Unavailable) as caught:
        await world.issue.execute(campaign_id=c.id, user_id="bob")
    assert not isinstance(caught.value, SoldOut) and caught.value.retry_after_ms > 0
    world.clock.advance(REISSUE_DELAY)
    issued = await world.issue.execute(campaign_id=c.id, user_id="bob")
    assert issued.coupon.user_id == "bob"


async def test_gate_state_lost_is_rebuilt_from_the_ledger(world: World) -> None:
    c = await world.campaign(total=5)
    world.clock.current = START
    first = {u: await world.issue.execute(campaign_id=c.id, user_id=u) for u in "abc"}
    world.gate.drop(c.id)
    again = await world.issue.execute(campaign_id=c.id, user_id="a")
    assert again.already_issued and again.coupon == first["a"].coupon
    await world.issue.execute(campaign_id=c.id, user_id="d")
    await world.issue.execute(campaign_id=c.id, user_id="e")
    with pytest.raises(SoldOut):
        await world.issue.execute(campaign_id=c.id, user_id="f")
    assert len(await world.all_coupons(c.id)) == 5


async def test_slot_of_a_vanished_request_comes_back_after_the_lease(world: World) -> None:
    """I6: an admission whose process died before recording is settled after the lease."""
    c = await world.campaign(total=1)
    world.clock.current = START
    admission = await world.gate.admit(c.id, "ghost")  # admitted, then the process "died"
    assert admission.slot == 1
    with pytest.raises(SoldOut):
        await world.issue.execute(campaign_id=c.id, user_id="bob")
    world.clock.advance(11)
    with pytest.raises(Unavailable):  # settled: the slot is on its way back
        await world.issue.execute(campaign_id=c.id, user_id="bob")
    world.clock.advance(REISSUE_DELAY)
    issued = await world.issue.execute(campaign_id=c.id, user_id="bob")
    assert issued.coupon.slot == 1


async def test_vanished_request_that_did_commit_keeps_its_coupon(world: World) -> None:
    c = await world.campaign(total=1)
    world.clock.current = START
    admission = await world.gate.admit(c.id, "alice")
    coupon = Coupon("가가가가가가가가가가", c.id, "alice", START, admission.slot)
    await world.ledger.record(coupon)  # committed, but the confirm never reached the gate
    world.clock.advance(11)
    with pytest.raises(SoldOut):
        await world.issue.execute(campaign_id=c.id, user_id="bob")
    assert (await world.issue.execute(campaign_id=c.id, user_id="alice")).coupon == coupon


async def test_pages_cover_every_coupon_once_in_issue_order(world: World) -> None:
    c = await world.campaign(total=20)
    world.clock.current = START
    issued = [await world.issue.execute(campaign_id=c.id, user_id=f"u{i}") for i in range(20)]
    listed = await world.all_coupons(c.id)
    assert listed == [i.coupon for i in issued]


async def test_page_token_of_another_campaign_is_refused(world: World) -> None:
    a = await world.campaign()
    b = await world.campaign()
    token = encode_page_token(a.id, 5)
    with pytest.raises(InvalidArgument) as caught:
        await world.get.execute(campaign_id=b.id, page_size=10, page_token=token)
    assert caught.value.field == "page_token"


@pytest.mark.parametrize("token", ["garbage!", "Zm9v", "x" * 300])
def test_malformed_page_tokens_are_refused(token: str) -> None:
    with pytest.raises(InvalidArgument):
        decode_page_token("0192f5e0-7c1a-7b3e-9d2a-5b1c2d3e4f50", token)


@pytest.mark.parametrize("size", [-1, 10_001])
async def test_page_size_out_of_range_is_refused(world: World, size: int) -> None:
    c = await world.campaign()
    with pytest.raises(InvalidArgument) as caught:
        await world.get.execute(campaign_id=c.id, page_size=size, page_token="")
    assert caught.value.field == "page_size"


@pytest.mark.parametrize("size", [1, 10_000])
async def test_page_size_at_the_bounds_is_accepted(world: World, size: int) -> None:
    c = await world.campaign()
    view = await world.get.execute(campaign_id=c.id, page_size=size, page_token="")
    assert view.campaign.id == c.id


async def test_campaign_status_and_count_follow_issuance(world: World) -> None:
    c = await world.campaign(total=2)
    view = await world.get.execute(campaign_id=c.id, page_size=0, page_token="")
    assert view.campaign.issued_count == 0
    world.clock.current = START
    await world.issue.execute(campaign_id=c.id, user_id="a")
    view = await world.get.execute(campaign_id=c.id, page_size=0, page_token="")
    assert view.campaign.issued_count == 1


async def test_stranded_slot_behind_many_unconfirmed_commits_still_comes_back(
    world: World,
) -> None:
    """Requests killed between commit and confirm leave committed admissions pending; a
    stranded slot queued behind more of them than one stale batch still comes back."""
    c = await world.campaign(total=120)
    world.clock.current = START
    for i in range(119):
        admission = await world.gate.admit(c.id, f"done-{i}")
        await world.ledger.record(
            Coupon(
                await MemoryCodeGenerator().next_code(), c.id, f"done-{i}", START, admission.slot
            )
        )  # committed; the confirm never reached the gate
    world.clock.advance(1)
    await world.gate.admit(c.id, "ghost")  # admitted, never recorded
    world.clock.advance(11)
    with pytest.raises(Unavailable):
        await world.issue.execute(campaign_id=c.id, user_id="bob")
    world.clock.advance(REISSUE_DELAY)
    issued = await world.issue.execute(campaign_id=c.id, user_id="bob")
    assert not issued.already_issued
    assert len(await world.all_coupons(c.id)) == 120


async def test_a_holder_the_gate_lost_gets_their_coupon_even_when_sold_out(world: World) -> None:
    """Redis came back from an older copy that knows only alice: bob and carol still get
    their coupons back, newcomers are refused, and nobody gets a second coupon."""
    c = await world.campaign(total=3)
    world.clock.current = START
    held = {u: (await world.issue.execute(campaign_id=c.id, user_id=u)).coupon for u in "abc"}
    world.gate.drop(c.id)
    await world.gate.load(c, _chunks(held["a"]))
    with pytest.raises(SoldOut):  # slots 2 and 3 turn out taken in the ledger
        await world.issue.execute(campaign_id=c.id, user_id="x")
    for user in "bc":
        again = await world.issue.execute(campaign_id=c.id, user_id=user)
        assert again.already_issued and again.coupon == held[user]
    world.clock.advance(1)
    for user in "abc":
        assert (await world.issue.execute(campaign_id=c.id, user_id=user)).coupon == held[user]
    assert len(await world.all_coupons(c.id)) == 3


async def test_a_holder_gets_their_coupon_after_the_end(world: World) -> None:
    c = await world.campaign(ends_at=START + timedelta(minutes=1))
    world.clock.current = START
    first = await world.issue.execute(campaign_id=c.id, user_id="alice")
    world.clock.advance(61)
    again = await world.issue.execute(campaign_id=c.id, user_id="alice")
    assert again.already_issued and again.coupon == first.coupon
    with pytest.raises(CampaignEnded):
        await world.issue.execute(campaign_id=c.id, user_id="bob")


class CountingGate(MemoryStockGate):
    """The memory gate, counting the admissions it is asked for."""

    asked = 0

    async def admit(self, campaign_id: str, user_id: str, deadline: float = 0.0) -> Admission:
        self.asked += 1
        return await super().admit(campaign_id, user_id, deadline)


async def _crowd(*, total: int) -> tuple[ManualClock, CountingGate, IssueCoupon, Campaign]:
    """A campaign of `total` coupons, started, behind a gate that counts admissions and a
    refusal memory of 0.5 s on the same manual clock."""
    clock = ManualClock(START)
    store = MemoryStore()
    campaigns = MemoryCampaignRepository(store)
    ledger = MemoryCouponLedger(store)
    gate = CountingGate(clock)
    memory = RefusalMemory(ledger, gate, seconds=0.5, clock=clock.seconds)
    issue = IssueCoupon(gate, ledger, MemoryCodeGenerator(), CampaignDirectory(campaigns), memory)
    campaign = await CreateCampaign(campaigns, gate, clock).execute(
        name="crowd", total_coupons=total, starts_at=START, ends_at=None
    )
    return clock, gate, issue, campaign


async def test_after_a_sell_out_refusals_come_from_memory_and_holders_from_the_gate() -> None:
    clock, gate, issue, c = await _crowd(total=2)
    for user in ("a", "b"):
        await issue.execute(campaign_id=c.id, user_id=user)
    with pytest.raises(SoldOut):
        await issue.execute(campaign_id=c.id, user_id="first-refused")
    await asyncio.sleep(0)  # the holders are read
    asked = gate.asked
    for i in range(100):
        with pytest.raises(SoldOut):
            await issue.execute(campaign_id=c.id, user_id=f"crowd-{i}")
        remembered = issue.remembered(c.id, f"crowd-{i}")
        assert remembered is not None and isinstance(remembered.error(), SoldOut)
    assert gate.asked == asked  # none of them reached the gate
    assert (await issue.execute(campaign_id=c.id, user_id="a")).already_issued
    assert gate.asked == asked + 1  # a holder always does
    clock.advance(0.5)
    with pytest.raises(SoldOut):
        await issue.execute(campaign_id=c.id, user_id="after-the-memory")
    assert gate.asked == asked + 2  # remembered for a while only


async def test_one_request_renews_the_sold_out_memory_before_it_ends() -> None:
    """The way the front doors ask: `remembered` first, then `execute(recalled=True)` for a
    request it sends to the gate. While the memory lasts, one request at a time renews it,
    so the crowd never finds it gone."""
    clock, _, issue, c = await _crowd(total=1)
    await issue.execute(campaign_id=c.id, user_id="a")
    with pytest.raises(SoldOut):
        await issue.execute(campaign_id=c.id, user_id="first-refused")
    await asyncio.sleep(0)  # the holders are read

    async def ask(user: str) -> bool:
        """True: answered from memory; False: sent to the gate."""
        if issue.remembered(c.id, user) is not None:
            return True
        with pytest.raises(SoldOut):
            await issue.execute(campaign_id=c.id, user_id=user, recalled=True)
        return False

    for turn in range(10):  # four seconds, eight memories' worth
        clock.advance(0.3)  # past the half of the memory's time
        answers = [await ask(f"crowd-{turn}-{i}") for i in range(50)]
        assert answers.count(False) == 1 and answers[0] is False, turn
        clock.advance(0.1)  # past the end of the memory before that one
        assert all([await ask(f"later-{turn}-{i}") for i in range(50)]), turn


async def test_a_request_past_its_deadline_is_turned_away_untouched(world: World) -> None:
    c = await world.campaign(total=1)
    world.clock.current = START
    with pytest.raises(Overloaded):
        await world.issue.execute(
            campaign_id=c.id, user_id="late", deadline=time.monotonic() - 0.001
        )
    assert (await world.issue.execute(campaign_id=c.id, user_id="bob")).coupon.slot == 1


async def _chunks(*coupons: Coupon) -> AsyncIterator[Sequence[Coupon]]:
    yield list(coupons)


# --- begin: the common course on the ports' futures, the rest through the steps ------------


class HeldGate(MemoryStockGate):
    """The memory gate, deciding only once `decide` is set (a batch on its way)."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(clock, lease_seconds=10, reissue_delay_seconds=REISSUE_DELAY)
        self.decide = asyncio.Event()

    async def admit(self, campaign_id: str, user_id: str, deadline: float = 0.0) -> Admission:
        await self.decide.wait()
        return await super().admit(campaign_id, user_id, deadline)


class CodesOnlyAfterIO(MemoryCodeGenerator):
    """No code is ever at hand: each must be awaited (a reservation running out)."""

    def code_now(self) -> None:
        return None


class CodesBrokenAtHand(MemoryCodeGenerator):
    """Taking a code at hand fails (a bug, a sequence run out); awaiting one works."""

    def code_now(self) -> str:
        raise RuntimeError("no code at hand")


def _held_world(codes: MemoryCodeGenerator | None = None) -> tuple[World, HeldGate]:
    clock = ManualClock(START)
    gate = HeldGate(clock)
    return build_world(clock, gate, codes), gate


async def test_a_caller_leaving_before_the_gate_decides_gives_the_slot_back() -> None:
    """As the Redis gate's batch, already on its way, may admit a caller that left: the
    slot comes back (after the reissue delay), never pending nor recorded."""
    world, gate = _held_world()
    c = await world.campaign(total=1)
    leaving = asyncio.ensure_future(world.issue.execute(campaign_id=c.id, user_id="leaves"))
    await asyncio.sleep(0.01)
    leaving.cancel()
    gate.decide.set()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    await asyncio.sleep(0.01)
    assert await gate.pending_users(c.id) == []
    world.clock.advance(REISSUE_DELAY)
    issued = await world.issue.execute(campaign_id=c.id, user_id="stays")
    assert issued.coupon.slot == 1
    assert [x.user_id for x in await world.all_coupons(c.id)] == ["stays"]


async def test_an_outcome_cancelled_once_the_gate_decided_gives_the_slot_back() -> None:
    """A server cancelling what it waits for at shutdown cancels the outcome alone: the
    admission it was given is released, never left pending nor recorded."""
    world, gate = _held_world()
    c = await world.campaign(total=1)
    pending = world.issue.begin(c.id, "leaves")
    pending.outcome.cancel()
    gate.decide.set()
    await asyncio.sleep(0.01)
    assert await gate.pending_users(c.id) == []
    assert await world.all_coupons(c.id) == []
    world.clock.advance(REISSUE_DELAY)
    issued = await world.issue.execute(campaign_id=c.id, user_id="stays")
    assert issued.coupon.slot == 1


async def test_begin_settles_bad_fields_and_late_requests_in_the_outcome() -> None:
    world, gate = _held_world()
    c = await world.campaign(total=1)
    gate.decide.set()
    bad = world.issue.begin(c.id, "")
    with pytest.raises(InvalidArgument, match="user_id"):
        await bad.outcome
    late = world.issue.begin(c.id, "late", deadline=time.monotonic() - 0.001)
    with pytest.raises(Overloaded):
        await late.outcome
    assert await gate.pending_users(c.id) == []
    assert (await world.issue.begin(c.id, "alice").outcome).coupon.slot == 1


async def test_a_code_that_must_be_awaited_still_issues_once_per_user() -> None:
    world, gate = _held_world(CodesOnlyAfterIO())
    c = await world.campaign(total=3)
    gate.decide.set()
    results = await asyncio.gather(
        *(world.issue.execute(campaign_id=c.id, user_id=u) for u in ("a", "b", "a", "c"))
    )
    assert sorted(r.coupon.slot for r in results if not r.already_issued) == [1, 2, 3]
    assert len({r.coupon.code for r in results}) == 3
    assert sorted(x.user_id for x in await world.all_coupons(c.id)) == ["a", "b", "c"]


async def test_a_failed_commit_on_the_common_course_gives_the_slot_back(world: World) -> None:
    c = await world.campaign(total=1)
    world.clock.current = START
    world.ledger.failing = True
    with pytest.raises(Unavailable):
        await world.issue.begin(c.id, "unlucky").outcome
    assert await world.gate.pending_users(c.id) == []
    world.ledger.failing = False
    world.clock.advance(REISSUE_DELAY)
    assert (await world.issue.execute(campaign_id=c.id, user_id="next")).coupon.slot == 1


async def test_a_failure_on_the_common_course_still_answers_through_the_steps() -> None:
    world, gate = _held_world(CodesBrokenAtHand())
    c = await world.campaign(total=2)
    gate.decide.set()
    issued = await asyncio.wait_for(world.issue.execute(campaign_id=c.id, user_id="a"), 5)
    assert issued.coupon.slot == 1 and not issued.already_issued
    assert await gate.pending_users(c.id) == []
