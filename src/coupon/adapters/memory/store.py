"""In-memory backend: one process, nothing durable. For unit tests and demos.

It honours the same contracts as the PostgreSQL and Redis adapters (the contract suite in
tests/contract runs against both), including atomicity inside one event loop: no method
awaits between reading and writing shared state.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Sequence,
)
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from coupon.application.ports import (
    STUCK,
    Admission,
    AdmissionKind,
    Clock,
    ConstraintViolation,
    CouponPage,
    GateView,
    Handoff,
    Recorded,
    RecordOutcome,
    UserCouponPage,
)
from coupon.domain.campaign import Campaign, CampaignStatus
from coupon.domain.codes import CodeCipher
from coupon.domain.coupon import Coupon
from coupon.domain.errors import Overloaded

T = TypeVar("T")


class SystemClock:
    async def now(self) -> datetime:
        return datetime.now(UTC)


class ManualClock:
    """A clock the tests move by hand."""

    def __init__(self, now: datetime) -> None:
        self.current = now

    async def now(self) -> datetime:
        return self.current

    def advance(self, seconds: float) -> None:
        self.current += timedelta(seconds=seconds)

    def seconds(self) -> float:
        """The same time as a number, for what is timed by a monotonic clock elsewhere."""
        return self.current.timestamp()


@dataclass
class MemoryStore:
    campaigns: dict[str, Campaign] = field(default_factory=dict)
    coupons: dict[str, list[Coupon]] = field(default_factory=dict)
    by_user: dict[tuple[str, str], Coupon] = field(default_factory=dict)
    slots: set[tuple[str, int]] = field(default_factory=set)
    codes: set[str] = field(default_factory=set)
    # A create's request_id -> the campaign it created.
    request_ids: dict[str, str] = field(default_factory=dict)


class MemoryCampaignRepository:
    def __init__(self, store: MemoryStore) -> None:
        self._store = store

    async def add(self, campaign: Campaign, request_id: str = "") -> Campaign:
        # No await between the look-up and the write: one campaign per request_id.
        if request_id and request_id in self._store.request_ids:
            stored = await self.get(self._store.request_ids[request_id])
            assert stored is not None
            return stored
        if campaign.id in self._store.campaigns:
            raise ConstraintViolation(f"campaign {campaign.id} exists")
        self._store.campaigns[campaign.id] = campaign
        self._store.coupons[campaign.id] = []
        if request_id:
            self._store.request_ids[request_id] = campaign.id
        return campaign

    async def find_by_request_id(self, request_id: str) -> Campaign | None:
        campaign_id = self._store.request_ids.get(request_id)
        return None if campaign_id is None else await self.get(campaign_id)

    async def get(self, campaign_id: str) -> Campaign | None:
        campaign = self._store.campaigns.get(campaign_id)
        if campaign is None:
            return None
        return campaign.with_issued_count(len(self._store.coupons[campaign_id]))

    async def newest(
        self, *, before: str | None, limit: int, status: CampaignStatus | None, now: datetime
    ) -> Sequence[Campaign]:
        found: list[Campaign] = []
        # Ids are UUIDv7 text in canonical form: their order is their creation order.
        for campaign_id in sorted(self._store.campaigns, reverse=True):
            if before is not None and campaign_id >= before:
                continue
            campaign = await self.get(campaign_id)
            assert campaign is not None
            if status is None or campaign.status_at(now) is status:
                found.append(campaign)
                if len(found) >= limit:
                    break
        return found

    async def end(self, campaign_id: str, at: datetime) -> Campaign | None:
        campaign = self._store.campaigns.get(campaign_id)
        if campaign is None:
            return None
        if campaign.ended_at is None:
            self._store.campaigns[campaign_id] = campaign.ended(at)
        return await self.get(campaign_id)


class MemoryCouponLedger:
    def __init__(
        self, store: MemoryStore, on_issued: Callable[[str, int], None] | None = None
    ) -> None:
        self._store = store
        # Told each coupon newly recorded, as PostgreSQL's ledger tells its commits'.
        self._on_issued = on_issued

    def record_soon(self, coupon: Coupon, handoff: Handoff[Recorded]) -> None:
        # A later turn of the loop, as PostgreSQL's group commit answers; a caller that
        # left meanwhile leaves the coupon recorded all the same.
        _keep(_hand_over(handoff, self.record(coupon)))

    async def record(self, coupon: Coupon) -> Recorded:
        store = self._store
        campaign = store.campaigns.get(coupon.campaign_id)
        if campaign is None:
            raise ConstraintViolation(f"campaign {coupon.campaign_id} does not exist")
        if not 1 <= coupon.slot <= campaign.total_coupons:
            raise ConstraintViolation(f"slot {coupon.slot} is outside the stock")
        if coupon.issued_at < campaign.starts_at or (
            campaign.ends_at is not None and coupon.issued_at >= campaign.ends_at
        ):
            raise ConstraintViolation("issued_at is outside the campaign window")
        if campaign.ended_at is not None and coupon.issued_at >= campaign.ended_at:
            raise ConstraintViolation("issued_at is at or after the campaign ended")
        key = (coupon.campaign_id, coupon.user_id)
        existing = store.by_user.get(key)
        if existing is not None:
            return Recorded(RecordOutcome.USER_HAS_COUPON, existing)
        if (coupon.campaign_id, coupon.slot) in store.slots:
            return Recorded(RecordOutcome.SLOT_TAKEN)
        if coupon.code in store.codes:
            return Recorded(RecordOutcome.CODE_TAKEN)
        store.by_user[key] = coupon
        store.slots.add((coupon.campaign_id, coupon.slot))
        store.codes.add(coupon.code)
        store.coupons[coupon.campaign_id].append(coupon)
        if self._on_issued is not None:
            self._on_issued(coupon.campaign_id, 1)
        return Recorded(RecordOutcome.RECORDED)

    async def find_by_user(self, campaign_id: str, user_id: str) -> Coupon | None:
        return self._store.by_user.get((campaign_id, user_id))

    async def page(self, campaign_id: str, after: int, limit: int) -> CouponPage:
        issued = self._store.coupons.get(campaign_id, [])
        chunk = issued[after : after + limit]
        last = after + len(chunk)
        return CouponPage(chunk, last, has_more=last < len(issued))

    async def campaign_page(
        self, campaign_id: str, after: int, limit: int
    ) -> tuple[Campaign, CouponPage] | None:
        campaign = self._store.campaigns.get(campaign_id)
        if campaign is None:
            return None
        issued = len(self._store.coupons[campaign_id])
        return campaign.with_issued_count(issued), await self.page(campaign_id, after, limit)

    async def holdings(self, campaign_id: str) -> AsyncGenerator[Sequence[Coupon], None]:
        yield list(self._store.coupons.get(campaign_id, []))

    async def holders(self, campaign_id: str) -> AsyncGenerator[Sequence[str], None]:
        yield [c.user_id for c in self._store.coupons.get(campaign_id, [])]

    async def user_coupons(
        self, user_id: str, before_campaign: str | None, limit: int
    ) -> UserCouponPage:
        held = sorted(
            (
                coupon
                for (campaign_id, user), coupon in self._store.by_user.items()
                if user == user_id and (before_campaign is None or campaign_id < before_campaign)
            ),
            key=lambda coupon: coupon.campaign_id,
            reverse=True,
        )
        return UserCouponPage(held[:limit], has_more=len(held) > limit)


@dataclass
class _GateState:
    total: int
    starts_at: datetime
    ends_at: datetime | None
    generation: str
    next_slot: int = 0
    # Given-back slots with the time each becomes issuable again.
    free: dict[int, datetime] = field(default_factory=dict)
    # user -> slot for every admitted user; pending keeps admission times, oldest first.
    users: dict[str, int] = field(default_factory=dict)
    pending: dict[str, datetime] = field(default_factory=dict)
    held: dict[str, Coupon] = field(default_factory=dict)
    admissions: int = 0


class MemoryStockGate:
    """The Redis gate's contract in one process: the same decisions, versions and delays."""

    STALE_BATCH = 50

    def __init__(
        self, clock: Clock, lease_seconds: float = 15.0, reissue_delay_seconds: float = 1.0
    ) -> None:
        self._clock = clock
        self._lease = timedelta(seconds=lease_seconds)
        self._delay = timedelta(seconds=reissue_delay_seconds)
        self._states: dict[str, _GateState] = {}
        self._generations = itertools.count(1)
        # Ends recorded by `end`, kept apart from the state as Redis keeps them in a key of
        # their own (a state dropped and rebuilt gets them back).
        self._ended: dict[str, datetime] = {}

    def drop(self, campaign_id: str) -> None:
        """Lose the campaign's state, as a Redis flush would (for tests)."""
        self._states.pop(campaign_id, None)

    def admit_soon(
        self, campaign_id: str, user_id: str, deadline: float, handoff: Handoff[Admission]
    ) -> None:
        _keep(self._admit_into(campaign_id, user_id, deadline, handoff))

    async def _admit_into(
        self, campaign_id: str, user_id: str, deadline: float, handoff: Handoff[Admission]
    ) -> None:
        if handoff.done():
            return  # its caller left before the gate decided: nothing taken
        left = await _hand_over(handoff, self.admit(campaign_id, user_id, deadline))
        if left is not None and left.kind is AdmissionKind.ADMITTED:
            # Its caller left while the gate decided: nobody records it.
            await self.release(campaign_id, user_id, left.slot)

    async def admit(self, campaign_id: str, user_id: str, deadline: float = 0.0) -> Admission:
        if deadline and deadline < time.monotonic():
            raise Overloaded("waited too long for the gate; retry")
        now = await self._clock.now()
        state = self._states.get(campaign_id)
        if state is None:
            return Admission(AdmissionKind.NOT_LOADED, now)
        if now < state.starts_at:
            return Admission(AdmissionKind.NOT_STARTED, now, view=self._view(state))
        held = state.users.get(user_id)
        if held is not None:
            admitted_at = state.pending.get(user_id)
            pending = admitted_at is not None
            stale = ((user_id, held),) if pending and now - admitted_at > self._lease else ()  # type: ignore[operator]
            return Admission(
                AdmissionKind.ALREADY_HELD, now, held, pending, stale, state.held.get(user_id)
            )
        if state.ends_at is not None and now >= state.ends_at:
            return Admission(AdmissionKind.ENDED, now, view=self._view(state))
        ready = [slot for slot, at in state.free.items() if at <= now]
        if ready:
            slot = min(ready, key=lambda s: (state.free[s], s))
            del state.free[slot]
        elif state.next_slot < state.total:
            state.next_slot += 1
            slot = state.next_slot
        else:
            stale_list: list[tuple[str, int]] = []
            for user, admitted_at in state.pending.items():
                if now - admitted_at <= self._lease or len(stale_list) >= self.STALE_BATCH:
                    break
                stale_list.append((user, state.users[user]))
            view = self._view(state)
            if view.reopens_at is None and state.pending:
                # An admission pending longer than a commit takes (its process died, or
                # PostgreSQL stalls) may still come back: not final until the lease says.
                oldest = next(iter(state.pending.values()))
                if now - oldest > STUCK:
                    view = replace(view, reopens_at=oldest + self._lease)
            return Admission(AdmissionKind.SOLD_OUT, now, stale=tuple(stale_list), view=view)
        state.users[user_id] = slot
        state.pending[user_id] = now
        state.admissions += 1
        return Admission(AdmissionKind.ADMITTED, now, slot)

    @staticmethod
    def _view(state: _GateState) -> GateView:
        return GateView(
            version=(state.generation, state.admissions),
            starts_at=state.starts_at,
            ends_at=state.ends_at,
            reopens_at=min(state.free.values(), default=None),
        )

    async def load(self, campaign: Campaign, holdings: AsyncIterator[Sequence[Coupon]]) -> None:
        if campaign.id in self._states:
            return
        coupons = [c async for chunk in holdings for c in chunk]
        taken = {c.slot for c in coupons}
        top = max(taken, default=0)
        reopen = await self._clock.now() + self._delay
        state = self._states[campaign.id] = _GateState(
            total=campaign.total_coupons,
            starts_at=campaign.starts_at,
            ends_at=campaign.effective_end,
            generation=str(next(self._generations)),
            next_slot=top,
            free={s: reopen for s in range(1, top + 1) if s not in taken},
            users={c.user_id: c.slot for c in coupons},
            held={c.user_id: c for c in coupons},
        )
        ended = self._ended.get(campaign.id)
        if ended is not None:
            self._apply_end(state, ended)
        elif state.ends_at is not None:
            self._apply_end(state, state.ends_at)

    @staticmethod
    def _apply_end(state: _GateState, at: datetime) -> None:
        if state.ends_at is None or at < state.ends_at:
            state.ends_at = at
        # Ended before it started: "ended" from then on, as the Redis gate says.
        state.starts_at = min(state.starts_at, at)

    async def end(self, campaign_id: str, at: datetime | None) -> datetime:
        if at is None:
            # The next microsecond, as end.lua: an admission at this instant is before it.
            at = await self._clock.now() + timedelta(microseconds=1)
        recorded = self._ended.get(campaign_id)
        if recorded is not None and recorded < at:
            at = recorded
        self._ended[campaign_id] = at
        state = self._states.get(campaign_id)
        if state is not None:
            self._apply_end(state, at)
        return at

    async def ended_at(self, campaign_id: str) -> datetime | None:
        return self._ended.get(campaign_id)

    def confirm(self, coupon: Coupon) -> None:
        state = self._states.get(coupon.campaign_id)
        if state is None:
            return
        slot = state.users.get(coupon.user_id)
        if slot is None:
            # A holder the gate lost: put back, its slot no longer free.
            state.users[coupon.user_id] = coupon.slot
            state.held[coupon.user_id] = coupon
            state.free.pop(coupon.slot, None)
            state.admissions += 1
        elif slot == coupon.slot and coupon.user_id in state.pending:
            del state.pending[coupon.user_id]
            state.held[coupon.user_id] = coupon

    async def release(self, campaign_id: str, user_id: str, slot: int) -> None:
        await self._end_admission(campaign_id, user_id, slot, slot_back=True)

    async def forget(self, campaign_id: str, user_id: str, slot: int) -> None:
        await self._end_admission(campaign_id, user_id, slot, slot_back=False)

    async def pending_users(self, campaign_id: str) -> Sequence[str]:
        state = self._states.get(campaign_id)
        return [] if state is None else list(state.pending)

    async def pending_count(self, campaign_id: str, end: datetime) -> int:
        state = self._states.get(campaign_id)
        if state is None:
            return 0
        since = end - self._lease
        return sum(1 for at in state.pending.values() if since <= at < end)

    async def _end_admission(
        self, campaign_id: str, user_id: str, slot: int, *, slot_back: bool
    ) -> None:
        """The user no longer holds `slot`; it is free again (after the delay) when
        `slot_back`."""
        state = self._states.get(campaign_id)
        if state is not None and state.users.get(user_id) == slot:
            del state.users[user_id]
            state.pending.pop(user_id, None)
            state.held.pop(user_id, None)
            if slot_back:
                state.free[slot] = await self._clock.now() + self._delay


class MemoryCodeGenerator:
    """Codes from a per-process sequence under a random key: unique within the process."""

    def __init__(self, key: bytes | None = None) -> None:
        self._cipher = CodeCipher(key or secrets.token_bytes(32))
        self._sequence = itertools.count()

    async def next_code(self) -> str:
        return self._cipher.encode(next(self._sequence))

    def code_now(self) -> str:
        return self._cipher.encode(next(self._sequence))


# Tasks of the *_soon methods, kept until they end (the loop holds only weak references).
_RUNNING: set[asyncio.Future[Any]] = set()


def _keep(work: Coroutine[Any, Any, Any]) -> None:
    task = asyncio.ensure_future(work)
    _RUNNING.add(task)
    task.add_done_callback(_RUNNING.discard)


async def _hand_over(handoff: Handoff[T], work: Awaitable[T]) -> T | None:
    """`work`'s result or exception, handed to `handoff`; the result when its caller left
    meanwhile (None otherwise), for the adapter to undo what it took."""
    try:
        result = await work
    except BaseException as exc:
        if not handoff.done():
            handoff.set_exception(exc)
        if not isinstance(exc, Exception):
            raise
        return None
    if handoff.done():
        return result
    handoff.set_result(result)
    return None
