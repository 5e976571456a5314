"""Refusals from memory: when the process may answer sold out, ended or not started again
without asking the gate, and never to a holder."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

from coupon.adapters.memory.store import (
    ManualClock,
    MemoryCouponLedger,
    MemoryStockGate,
    MemoryStore,
)
from coupon.application.ports import Admission, AdmissionKind, GateView
from coupon.application.refusals import HolderFilter, RefusalMemory
from coupon.domain.campaign import Campaign
from coupon.domain.coupon import Coupon
from coupon.domain.errors import CampaignEnded, CampaignNotStarted, SoldOut

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
CAMPAIGN = "0192f5e0-7c1a-7b3e-9d2a-5b1c2d3e4f50"


def test_a_holder_filter_never_forgets_a_holder_and_rarely_names_a_stranger() -> None:
    rng = random.Random(3)
    holders = [f"user-{rng.getrandbits(64)}" for _ in range(20_000)]
    strangers = [f"other-{rng.getrandbits(64)}" for _ in range(20_000)]
    found = HolderFilter(("g", 1), capacity=len(holders))
    found.add(holders)
    assert all(found.may_hold(u) for u in holders)
    mistaken = sum(found.may_hold(u) for u in strangers)
    assert mistaken < 0.02 * len(strangers)


class World:
    def __init__(self) -> None:
        self.clock = ManualClock(NOW)
        store = MemoryStore()
        self.ledger = MemoryCouponLedger(store)
        self.gate = MemoryStockGate(self.clock)
        self.memory = RefusalMemory(self.ledger, self.gate, seconds=0.5, clock=self.clock.seconds)

    def refusal(
        self,
        kind: AdmissionKind,
        *,
        version: tuple[str, int] = ("g", 1),
        starts_in: float = -60,
        reopens_in: float | None = None,
        ends_in: float | None = None,
    ) -> Admission:
        view = GateView(
            version=version,
            starts_at=NOW + timedelta(seconds=starts_in),
            ends_at=None if ends_in is None else NOW + timedelta(seconds=ends_in),
            reopens_at=None if reopens_in is None else NOW + timedelta(seconds=reopens_in),
        )
        return Admission(kind, self.clock.current, view=view)

    async def settle(self) -> None:
        """Let the holder filter's reading finish."""
        for _ in range(10):
            await asyncio.sleep(0)


async def test_not_started_is_remembered_until_the_start_at_most() -> None:
    w = World()
    w.memory.learn(
        CAMPAIGN, w.refusal(AdmissionKind.NOT_STARTED, starts_in=0.2), 5, w.clock.seconds()
    )
    remembered = w.memory.recall(CAMPAIGN, "anyone")
    assert remembered is not None and isinstance(remembered.error(), CampaignNotStarted)
    w.clock.advance(0.2)
    assert w.memory.recall(CAMPAIGN, "anyone") is None  # at the start the gate decides


async def test_sold_out_is_answered_from_memory_only_to_users_known_not_to_hold() -> None:
    w = World()
    w.memory.learn(CAMPAIGN, w.refusal(AdmissionKind.SOLD_OUT), 5, w.clock.seconds())
    # The holders are not read yet: nobody can be told "sold out" without the gate.
    assert w.memory.recall(CAMPAIGN, "stranger") is None
    await w.settle()
    remembered = w.memory.recall(CAMPAIGN, "stranger")
    assert remembered is not None and isinstance(remembered.error(), SoldOut)
    w.clock.advance(0.5)
    assert w.memory.recall(CAMPAIGN, "stranger") is None  # remembered for a while only


async def test_a_holder_is_never_answered_from_memory() -> None:
    w = World()
    await w.gate.load(_campaign(), _nothing())
    admitted = await w.gate.admit(CAMPAIGN, "holder")  # pending: not yet in the ledger
    assert admitted.kind is AdmissionKind.ADMITTED
    w.memory.learn(CAMPAIGN, w.refusal(AdmissionKind.ENDED, ends_in=-1), 5, w.clock.seconds())
    await w.settle()
    assert w.memory.recall(CAMPAIGN, "holder") is None
    assert not w.memory.surely_not_holder(CAMPAIGN, "holder", ("g", 1))
    remembered = w.memory.recall(CAMPAIGN, "stranger")
    assert remembered is not None and isinstance(remembered.error(), CampaignEnded)


async def test_a_memory_never_outlives_a_slot_coming_back() -> None:
    w = World()
    w.memory.learn(
        CAMPAIGN, w.refusal(AdmissionKind.SOLD_OUT, reopens_in=0.1), 5, w.clock.seconds()
    )
    await w.settle()
    assert w.memory.recall(CAMPAIGN, "stranger") is not None
    w.clock.advance(0.1)
    assert w.memory.recall(CAMPAIGN, "stranger") is None


async def test_holders_read_at_another_version_of_the_gate_are_not_trusted() -> None:
    w = World()
    w.memory.learn(CAMPAIGN, w.refusal(AdmissionKind.SOLD_OUT), 5, w.clock.seconds())
    await w.settle()
    assert w.memory.surely_not_holder(CAMPAIGN, "stranger", ("g", 1))
    # Someone was admitted since: the holders read before may miss them.
    assert not w.memory.surely_not_holder(CAMPAIGN, "stranger", ("g", 2))
    w.memory.learn(
        CAMPAIGN, w.refusal(AdmissionKind.SOLD_OUT, version=("g", 2)), 5, w.clock.seconds()
    )
    assert w.memory.recall(CAMPAIGN, "stranger") is None  # until read again
    await w.settle()
    assert w.memory.recall(CAMPAIGN, "stranger") is not None


def _campaign() -> Campaign:
    return Campaign(CAMPAIGN, "c", 5, NOW - timedelta(minutes=1), None, NOW)


async def _nothing() -> AsyncIterator[Sequence[Coupon]]:
    return
    yield


async def test_one_request_at_a_time_renews_a_memory_before_it_ends() -> None:
    w = World()
    w.memory.learn(CAMPAIGN, w.refusal(AdmissionKind.SOLD_OUT), 5, w.clock.seconds())
    await w.settle()
    assert w.memory.recall(CAMPAIGN, "early") is not None
    w.clock.advance(0.5 * (1 - RefusalMemory.REFRESH_AHEAD))
    assert w.memory.recall(CAMPAIGN, "first") is None  # this one asks the gate
    for user in ("second", "third"):
        remembered = w.memory.recall(CAMPAIGN, user)
        assert remembered is not None and isinstance(remembered.error(), SoldOut)
    # No answer yet: after a while another asks.
    w.clock.advance(RefusalMemory.REFRESH_RETRY)
    assert w.memory.recall(CAMPAIGN, "fourth") is None
    assert w.memory.recall(CAMPAIGN, "fifth") is not None
    # The gate answers "sold out" again: remembered anew from when it was asked.
    w.memory.learn(CAMPAIGN, w.refusal(AdmissionKind.SOLD_OUT), 5, w.clock.seconds())
    w.clock.advance(0.2)  # past the first memory's end
    assert w.memory.recall(CAMPAIGN, "sixth") is not None
    # Not renewed again: it ends on time all the same.
    w.clock.advance(0.5)
    assert w.memory.recall(CAMPAIGN, "seventh") is None
