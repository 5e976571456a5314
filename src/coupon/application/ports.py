"""Ports: what the use cases need from the outside world, named for what they do.

Adapters under `coupon.adapters` implement these; `entrypoints/ioc.py` alone decides which.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Generic, Protocol, TypeVar

from coupon.domain.campaign import Campaign, CampaignStatus
from coupon.domain.coupon import Coupon
from coupon.domain.errors import Unavailable

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)
_log = logging.getLogger("coupon")


class Settles(Protocol[T_contra]):
    """What an adapter settles a waiting call through: a future (for its own awaiting
    methods) or a Handoff; done once settled or its caller left."""

    def done(self) -> bool: ...

    def set_result(self, result: T_contra, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


class Handoff(Generic[T]):
    """A one-shot result handed to `then` at once, where an asyncio future would schedule
    its callbacks for a later turn of the loop: an adapter settles it from its batch, and
    the caller's next step runs right there, with no handle and no turn in between. To the
    adapter it is a future that nobody awaits (`done`, `set_result`, `set_exception`);
    `cancel` is its caller leaving, after which the adapter treats it as a cancelled
    future would be (an admission gives its slot back, a commit goes on) and `then` is
    never called. `then` receives the result, or the exception."""

    __slots__ = ("_then",)

    def __init__(self, then: Callable[[T | BaseException], object]) -> None:
        self._then: Callable[[T | BaseException], object] | None = then

    def done(self) -> bool:
        return self._then is None

    def cancel(self) -> bool:
        left = self._then is not None
        self._then = None
        return left

    def set_result(self, result: T) -> None:
        self._hand(result)

    def set_exception(self, error: BaseException) -> None:
        self._hand(error)

    def _hand(self, outcome: T | BaseException) -> None:
        then = self._then
        if then is None:
            raise asyncio.InvalidStateError("the handoff was settled or cancelled already")
        self._then = None
        try:
            then(outcome)
        except Exception:  # noqa: BLE001 - an adapter's batch goes on for the others
            _log.exception("a handoff's step failed")


class Clock(Protocol):
    """The one authoritative clock every server process agrees on (I3)."""

    async def now(self) -> datetime: ...


class ViewClock(Clock, Protocol):
    """The clock what is read is dated by (the status GetCampaign, ListCampaigns and the
    dashboard show, a new campaign's created_at): the one clock while it answers, else the
    process's own, so that what PostgreSQL holds stays readable while Redis is down.
    Nothing is decided by it: admission and the kill switch read the one clock alone."""


class CampaignRepository(Protocol):
    async def add(self, campaign: Campaign, request_id: str = "") -> Campaign:
        """Store `campaign` and return it; with a `request_id` (a create's, kept as long as
        the campaign), unless a campaign was stored with that request_id before: then
        nothing is stored, and that campaign is returned, with its current `issued_count`.
        Concurrent adds with one request_id, from any number of processes, store one
        campaign. Empty: no request_id, every add stores its campaign."""
        ...

    async def find_by_request_id(self, request_id: str) -> Campaign | None:
        """The campaign stored with this (non-empty) request_id, with its current
        `issued_count`, or None."""
        ...

    async def get(self, campaign_id: str) -> Campaign | None:
        """The campaign with its current `issued_count`, or None."""
        ...

    async def newest(
        self, *, before: str | None, limit: int, status: CampaignStatus | None, now: datetime
    ) -> Sequence[Campaign]:
        """Up to `limit` campaigns, newest first (ids are time-ordered), those older than
        the campaign `before` when given; only those whose status at `now` is `status`
        when given."""
        ...

    async def end(self, campaign_id: str, at: datetime) -> Campaign | None:
        """Record that issuance ended at `at`; an end recorded before stays. The campaign
        as stored afterwards, or None when there is no such campaign."""
        ...


class RecordOutcome(enum.Enum):
    RECORDED = "recorded"
    # The user already holds a coupon of this campaign (the gate did not know: Redis
    # lost state). The existing coupon is returned in `Recorded.existing`.
    USER_HAS_COUPON = "user_has_coupon"
    # Another coupon already occupies this slot; the slot is not free after all.
    SLOT_TAKEN = "slot_taken"
    # The code is already in use (only possible if the code key changed).
    CODE_TAKEN = "code_taken"


@dataclass(frozen=True, slots=True)
class Recorded:
    outcome: RecordOutcome
    existing: Coupon | None = None


@dataclass(frozen=True, slots=True)
class CouponPage:
    coupons: Sequence[Coupon]
    # Position of the last coupon returned; pass it back as `after` for the next page.
    last_position: int
    has_more: bool


class ConstraintViolation(Exception):
    """The ledger refused a coupon that breaks an invariant (over-issue, outside the window)."""


class CouponLedger(Protocol):
    """The durable record of issued coupons: PostgreSQL in production."""

    async def record(self, coupon: Coupon) -> Recorded:
        """Commit `coupon` durably before returning (I5); adapters may group commits.

        Raises ConstraintViolation for a slot beyond the stock or a time outside the window.
        """
        ...

    def record_soon(self, coupon: Coupon, handoff: Handoff[Recorded]) -> None:
        """`record` for a caller that goes on in a callback rather than a coroutine:
        `handoff` settles as `record` would return or raise. Cancelling it is leaving
        `record` (the coupon may commit all the same)."""
        ...

    async def find_by_user(self, campaign_id: str, user_id: str) -> Coupon | None:
        """The user's coupon of the campaign; adapters may answer concurrent calls with one
        query."""
        ...

    async def page(self, campaign_id: str, after: int, limit: int) -> CouponPage:
        """Coupons of a campaign in issue order, those after position `after` (0: first)."""
        ...

    async def campaign_page(
        self, campaign_id: str, after: int, limit: int
    ) -> tuple[Campaign, CouponPage] | None:
        """The campaign and a page of its coupons (as `page`) read together, as of one
        moment: its issued count counts the coupons the pages show. None: no such campaign."""
        ...

    def holdings(self, campaign_id: str) -> AsyncGenerator[Sequence[Coupon], None]:
        """Every coupon of the campaign, in chunks: what a gate rebuild needs. The read
        holds a connection (and a snapshot) until it ends: whoever starts it closes it
        (`contextlib.aclosing`), so one given up halfway gives them back at once."""
        ...

    def holders(self, campaign_id: str) -> AsyncGenerator[Sequence[str], None]:
        """The ids of the users who hold a coupon of the campaign, in chunks; closed by
        whoever starts it, as `holdings`."""
        ...

    async def user_coupons(
        self, user_id: str, before_campaign: str | None, limit: int
    ) -> UserCouponPage:
        """The user's coupons, newest campaign first (at most one per campaign), those of
        campaigns older than `before_campaign` when given."""
        ...


@dataclass(frozen=True, slots=True)
class UserCouponPage:
    coupons: Sequence[Coupon]
    has_more: bool


class AdmissionKind(enum.Enum):
    ADMITTED = "admitted"
    ALREADY_HELD = "already_held"
    SOLD_OUT = "sold_out"
    NOT_STARTED = "not_started"
    ENDED = "ended"
    # The gate has no state for this campaign (never loaded, or Redis lost it).
    NOT_LOADED = "not_loaded"


@dataclass(frozen=True, slots=True)
class GateView:
    """What the gate knew when it refused a batch of requests (sold out, ended, not started):
    enough to answer the same refusal from memory, for a while, without asking again."""

    # Changes whenever a user may have become a holder (an admission, a rebuild, a holder
    # put back): a set of holders taken at one version is complete for that version.
    version: tuple[str, int]
    # The campaign's window as the gate applies it (a kill switch included).
    starts_at: datetime
    ends_at: datetime | None
    # The earliest moment a slot given back becomes issuable again, or, when none waits,
    # when an admission pending past STUCK is settled (None: the refusal is final).
    reopens_at: datetime | None = None


# How long an admission may stay pending (its coupon being recorded) before a sold-out
# answer counts it as possibly coming back: a commit takes milliseconds, so one pending
# longer was cut off (its process died) or waits on a stalled PostgreSQL. The admit
# script has the same figure (adapters/redis/lua/admit.lua).
STUCK = timedelta(seconds=2)


# Not frozen: one is built per request, and a frozen dataclass takes 1 us to build (a
# setattr call per field) against 0.2 us. Nothing changes one after it is made.
@dataclass(slots=True)
class Admission:
    kind: AdmissionKind
    # The authoritative time of the decision; becomes the coupon's issued_at.
    now: datetime
    slot: int = 0
    # ALREADY_HELD: the holder's coupon is not yet known to be committed.
    pending: bool = False
    # ALREADY_HELD / SOLD_OUT: admissions older than the lease that were never
    # confirmed; the caller settles them against the ledger (I6).
    stale: Sequence[tuple[str, int]] = field(default_factory=tuple)
    # ALREADY_HELD and confirmed: the holder's coupon, so a repeat costs no ledger read.
    held: Coupon | None = None
    # SOLD_OUT / ENDED / NOT_STARTED: the gate's view, shared by the batch's refusals.
    view: GateView | None = None


class StockGate(Protocol):
    """Fast admission in front of the ledger: window, one-per-user and stock, atomically."""

    async def admit(self, campaign_id: str, user_id: str, deadline: float = 0.0) -> Admission:
        """Decide the user's request. `deadline` (time.monotonic(), 0: none): a request still
        waiting to be sent to the gate then is refused with Overloaded, untouched."""
        ...

    def admit_soon(
        self, campaign_id: str, user_id: str, deadline: float, handoff: Handoff[Admission]
    ) -> None:
        """`admit` into a handoff (see CouponLedger.record_soon). Cancelling it before it
        is settled is leaving `admit`: a slot admitted for it is given back."""
        ...

    async def load(self, campaign: Campaign, holdings: AsyncIterator[Sequence[Coupon]]) -> None:
        """(Re)build the campaign's gate state from the ledger's holdings, unless it exists."""
        ...

    def confirm(self, coupon: Coupon) -> None:
        """The coupon is committed: its admission is no longer pending, and repeats of its
        user are answered with it; a holder the gate had lost (Redis lost state) is put
        back. Queued, never waited for: it takes effect later, but before any admission of
        the campaign asked for after this call."""
        ...

    async def release(self, campaign_id: str, user_id: str, slot: int) -> None:
        """Nothing was recorded for this admission: give the slot back. The slot becomes
        issuable again after the gate's reissue delay (see RefusalMemory)."""
        ...

    async def forget(self, campaign_id: str, user_id: str, slot: int) -> None:
        """Drop the user's admission without returning the slot (the ledger holds it)."""
        ...

    async def pending_users(self, campaign_id: str) -> Sequence[str]:
        """Users whose admission is not yet known to be committed."""

    async def pending_count(self, campaign_id: str, end: datetime) -> int:
        """Admissions made before `end` that are still pending (neither confirmed nor given
        back): coupons that may still be recorded. Those admitted longer than the lease
        before `end` are left out: no process is recording them any more (the lease
        settles them)."""
        ...

    async def end(self, campaign_id: str, at: datetime | None) -> datetime:
        """Admit nobody from `at` on (None: now, by the gate's clock, the one that decides
        every admission; its next microsecond, so that an admission at this instant is
        before the end). Kept even when the gate has no state for the campaign, and applied
        by any later `load`; an earlier end stays. Returns the end in force."""
        ...

    async def ended_at(self, campaign_id: str) -> datetime | None:
        """The end recorded by `end`, if any."""
        ...


# Per-second counts of one campaign: (campaign id, unix second) -> counter name -> count.
LiveCounts = Mapping[tuple[str, int], Mapping[str, int]]


class LiveCountsNotStored(Unavailable):
    """LiveStats.add stored only some of the counts, or none: `not_stored` are those it
    knows were not (refused, or never sent), to be added again later. Those whose fate is
    unknown (no answer in time: they may yet be stored) are not among them, so that none
    is counted twice."""

    def __init__(self, message: str, not_stored: LiveCounts, *, detail: str = "") -> None:
        super().__init__(message, detail=detail)
        self.not_stored = not_stored


class LiveStats(Protocol):
    """Per-second counters of the issue path, added up across every server process and
    instance, kept for a short while (the live dashboard reads the last minute)."""

    async def add(self, counts: LiveCounts) -> None:
        """Adds `counts` to the stored ones. Raises LiveCountsNotStored naming what it did
        not store; any other Unavailable means that none was stored."""
        ...

    async def read(self, campaign_id: str, seconds: Sequence[int]) -> dict[int, dict[str, int]]:
        """The counters of each of `seconds` that has any."""
        ...


class CodeGenerator(Protocol):
    async def next_code(self) -> str:
        """A code no other coupon has or will have."""
        ...

    def code_now(self) -> str | None:
        """A code as `next_code` gives, when one is at hand without I/O; None when only
        `next_code` can give the next one (it must reserve more first)."""
        ...
