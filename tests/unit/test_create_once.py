"""CreateCampaign with a request_id, on the memory adapters: a repeat answers the campaign
the first call created, as it is now, and creates nothing; a repeat that asks for another
campaign is refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from coupon.adapters.memory.store import (
    ManualClock,
    MemoryCampaignRepository,
    MemoryCouponLedger,
    MemoryStockGate,
    MemoryStore,
)
from coupon.application.ports import AdmissionKind
from coupon.application.use_cases import CreateCampaign, Created
from coupon.domain.campaign import CampaignStatus
from coupon.domain.coupon import Coupon
from coupon.domain.errors import AlreadyExists, InvalidArgument

START = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
END = START + timedelta(hours=1)


class World:
    def __init__(self) -> None:
        self.clock = ManualClock(START - timedelta(minutes=5))
        self.store = MemoryStore()
        self.gate = MemoryStockGate(self.clock)
        self.campaigns = MemoryCampaignRepository(self.store)
        self.ledger = MemoryCouponLedger(self.store)
        self.create = CreateCampaign(self.campaigns, self.gate, self.clock)

    async def launch(self, request_id: str, **changed: object) -> Created:
        fields: dict[str, object] = {
            "name": "launch",
            "total_coupons": 10,
            "starts_at": START,
            "ends_at": END,
            "request_id": request_id,
        }
        fields.update(changed)
        return await self.create.create(**fields)  # type: ignore[arg-type]


@pytest.fixture
def world() -> World:
    return World()


async def test_a_repeat_answers_the_first_campaign_as_it_is_now(world: World) -> None:
    first = await world.launch("req-1")
    campaign = first.campaign
    assert first.created and first.at == campaign.created_at
    assert campaign.status_at(first.at) is CampaignStatus.SCHEDULED
    world.clock.current = START + timedelta(seconds=1)
    await world.ledger.record(Coupon("code1", campaign.id, "alice", START, 1))

    again = await world.launch("req-1")
    assert not again.created
    assert again.campaign == campaign.with_issued_count(1)
    assert again.at == world.clock.current  # its status as of now: active, not scheduled
    assert again.campaign.status_at(again.at) is CampaignStatus.ACTIVE
    assert list(world.store.campaigns) == [campaign.id]


async def test_a_repeat_loads_no_second_gate(world: World) -> None:
    """The gate is made once, empty, by the create that created the campaign; a repeat must
    not make it again with no holders (the gate lost, coupons issued meanwhile): it is
    rebuilt from the ledger at the campaign's next request instead."""
    campaign = (await world.launch("req-gate")).campaign
    world.gate.drop(campaign.id)
    await world.launch("req-gate")
    world.clock.current = START
    admission = await world.gate.admit(campaign.id, "bob")
    assert admission.kind is AdmissionKind.NOT_LOADED


async def test_a_repeat_after_the_end_still_answers_the_campaign(world: World) -> None:
    first = await world.launch("req-late", ends_at=START + timedelta(seconds=1))
    world.clock.current = START + timedelta(minutes=1)
    again = await world.launch("req-late", ends_at=START + timedelta(seconds=1))
    assert not again.created and again.campaign == first.campaign
    assert again.campaign.status_at(again.at) is CampaignStatus.ENDED
    # Without the request id the same fields are refused: the end has passed.
    with pytest.raises(InvalidArgument) as caught:
        await world.launch("", ends_at=START + timedelta(seconds=1))
    assert caught.value.field == "ends_at"


@pytest.mark.parametrize(
    ("changed", "named"),
    [
        ({"name": "launch!"}, "name"),
        ({"total_coupons": 11}, "total_coupons"),
        ({"starts_at": START + timedelta(microseconds=1)}, "starts_at"),
        ({"ends_at": None}, "ends_at"),
        ({"ends_at": END + timedelta(microseconds=1)}, "ends_at"),
        ({"name": "other", "total_coupons": 1}, "name, total_coupons"),
    ],
)
async def test_a_repeat_asking_for_another_campaign_is_refused(
    world: World, changed: dict[str, object], named: str
) -> None:
    campaign = (await world.launch("req-2")).campaign
    with pytest.raises(AlreadyExists) as caught:
        await world.launch("req-2", **changed)
    message = str(caught.value)
    assert message.startswith("request_id: ")
    assert campaign.id in message and f"different {named}" in message
    assert list(world.store.campaigns) == [campaign.id]


async def test_a_request_id_refused_as_a_user_id_would_be_creates_nothing(
    world: World,
) -> None:
    for bad, reason in [
        ("x" * 129, "at most 128 characters (got 129)"),
        ("a\nb", "control characters"),
        ("a\x00b", "NUL"),
        ("   ", "blank"),
        ("\u200b", "blank"),
    ]:
        with pytest.raises(InvalidArgument) as caught:
            await world.launch(bad)
        assert caught.value.field == "request_id" and reason in caught.value.reason, bad
    assert world.store.campaigns == {}
    assert (await world.launch("x" * 128)).created


async def test_without_a_request_id_every_create_creates(world: World) -> None:
    one = await world.launch("")
    two = await world.launch("")
    assert one.created and two.created and one.campaign.id != two.campaign.id
    assert len(world.store.campaigns) == 2
