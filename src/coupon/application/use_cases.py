"""Use cases: CreateCampaign, GetCampaign, IssueCoupon. Each orchestrates ports only."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from coupon.application.ports import (
    AdmissionKind,
    CampaignRepository,
    Clock,
    CodeGenerator,
    CouponLedger,
    RecordOutcome,
    StockGate,
)
from coupon.domain.campaign import Campaign, new_campaign
from coupon.domain.coupon import Coupon, validate_campaign_id, validate_user_id
from coupon.domain.errors import (
    CampaignEnded,
    CampaignNotFound,
    CampaignNotStarted,
    InvalidArgument,
    SoldOut,
    Unavailable,
)

log = logging.getLogger("coupon")

PAGE_SIZE_DEFAULT = 1_000
PAGE_SIZE_MAX = 10_000


def new_campaign_id() -> str:
    """A UUIDv7: time-ordered, so new campaigns land at the end of the primary-key index."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | (rand >> 68) << 64
    value |= 0b10 << 62 | rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


class CampaignDirectory:
    """Campaign look-ups for the hot path: immutable fields are cached per process,
    unknown ids are remembered briefly so a flood of them does not reach the database."""

    def __init__(self, campaigns: CampaignRepository, negative_ttl: float = 2.0) -> None:
        self._campaigns = campaigns
        self._known: dict[str, Campaign] = {}
        self._unknown: dict[str, float] = {}
        self._negative_ttl = negative_ttl

    async def require(self, campaign_id: str) -> Campaign:
        cached = self._known.get(campaign_id)
        if cached is not None:
            return cached
        miss = self._unknown.get(campaign_id)
        if miss is not None and time.monotonic() - miss < self._negative_ttl:
            raise CampaignNotFound(campaign_id)
        campaign = await self._campaigns.get(campaign_id)
        if campaign is None:
            if len(self._unknown) > 10_000:
                self._unknown.clear()
            self._unknown[campaign_id] = time.monotonic()
            raise CampaignNotFound(campaign_id)
        self._known[campaign_id] = campaign
        return campaign


class CreateCampaign:
    def __init__(self, campaigns: CampaignRepository, gate: StockGate, clock: Clock) -> None:
        self._campaigns = campaigns
        self._gate = gate
        self._clock = clock

    async def execute(
        self,
        *,
        name: str,
        total_coupons: int,
        starts_at: datetime | None,
        ends_at: datetime | None,
    ) -> Campaign:
        now = await self._clock.now()
        campaign = new_campaign(
            campaign_id=new_campaign_id(),
            name=name,
            total_coupons=total_coupons,
            starts_at=starts_at,
            ends_at=ends_at,
            now=now,
        )
        await self._campaigns.add(campaign)
        try:
            # Prewarm so the burst at the start finds the gate ready.
            await self._gate.load(campaign, ())
        except Unavailable:
            # The campaign is durable; the gate is rebuilt on first use.
            log.warning("gate prewarm failed", extra={"campaign_id": campaign.id})
        return campaign


@dataclass(frozen=True, slots=True)
class CampaignView:
    campaign: Campaign
    coupons: Sequence[Coupon]
    next_page_token: str
    now: datetime


def encode_page_token(campaign_id: str, position: int) -> str:
    raw = f"{campaign_id}:{position}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(campaign_id: str, token: str) -> int:
    if not token:
        return 0
    bad = InvalidArgument("page_token", "is not a next_page_token of this campaign")
    if len(token) > 128:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise bad from None
    owner, _, position = raw.rpartition(":")
    # Positions are bigint keys: plain ASCII digits within int64, nothing else.
    if owner != campaign_id or not (position.isascii() and position.isdigit()):
        raise bad
    value = int(position)
    if value > 2**63 - 1:
        raise bad
    return value


class GetCampaign:
    def __init__(self, campaigns: CampaignRepository, ledger: CouponLedger, clock: Clock) -> None:
        self._campaigns = campaigns
        self._ledger = ledger
        self._clock = clock

    async def execute(self, *, campaign_id: str, page_size: int, page_token: str) -> CampaignView:
        campaign_id = validate_campaign_id(campaign_id)
        if page_size == 0:
            page_size = PAGE_SIZE_DEFAULT
        if not 1 <= page_size <= PAGE_SIZE_MAX:
            raise InvalidArgument(
                "page_size", f"must be between 1 and {PAGE_SIZE_MAX} (got {page_size})"
            )
        after = decode_page_token(campaign_id, page_token)
        campaign = await self._campaigns.get(campaign_id)
        if campaign is None:
            raise CampaignNotFound(campaign_id)
        page = await self._ledger.page(campaign_id, after, page_size)
        token = encode_page_token(campaign_id, page.last_position) if page.has_more else ""
        return CampaignView(campaign, page.coupons, token, await self._clock.now())


@dataclass(slots=True)  # not frozen, as Admission: built per request
class Issued:
    coupon: Coupon
    already_issued: bool


class IssueCoupon:
    """Admit in the gate, record durably, then answer; give the slot back on failure."""

    # How long a request waits for a concurrent request of the same user to commit.
    HOLDER_WAIT_SECONDS = 3.0
    MAX_ROUNDS = 8
    MAX_SETTLES = 200

    def __init__(
        self,
        gate: StockGate,
        ledger: CouponLedger,
        codes: CodeGenerator,
        directory: CampaignDirectory,
    ) -> None:
        self._gate = gate
        self._ledger = ledger
        self._codes = codes
        self._directory = directory
        self._warming: dict[str, asyncio.Future[None]] = {}
        self._settling: dict[str, asyncio.Lock] = {}

    async def execute(self, *, campaign_id: str, user_id: str) -> Issued:
        campaign_id = validate_campaign_id(campaign_id)
        user_id = validate_user_id(user_id)
        holder_deadline = 0.0
        rounds = settles = 0
        while rounds < self.MAX_ROUNDS:
            rounds += 1
            admission = await self._gate.admit(campaign_id, user_id)
            kind = admission.kind
            if kind is AdmissionKind.ADMITTED:
                issued = await self._record(campaign_id, user_id, admission.now, admission.slot)
                if issued is not None:
                    return issued
                continue
            if kind is AdmissionKind.ALREADY_HELD:
                if admission.held is not None:
                    return Issued(admission.held, already_issued=True)
                existing = await self._ledger.find_by_user(campaign_id, user_id)
                if existing is not None:
                    await self._gate.confirm(existing)
                    return Issued(existing, already_issued=True)
                if admission.stale and settles < self.MAX_SETTLES:
                    settles += 1
                    rounds -= 1
                    await self._settle(campaign_id, admission.stale)
                    continue
                if not admission.pending:
                    # The gate says committed but the ledger has nothing: the gate is wrong.
                    await self._gate.release(campaign_id, user_id, admission.slot)
                    continue
                # A request of this user is being recorded right now; wait for it (a wait
                # of its own, not one of the rounds).
                rounds -= 1
                now = time.monotonic()
                if holder_deadline == 0.0:
                    holder_deadline = now + self.HOLDER_WAIT_SECONDS
                if now > holder_deadline:
                    raise Unavailable(
                        "an earlier request of this user is still being recorded; retry"
                    )
                await asyncio.sleep(0.02)
                continue
            if kind is AdmissionKind.NOT_LOADED:
                await self._warm(campaign_id)
                continue
            if kind is AdmissionKind.NOT_STARTED:
                raise CampaignNotStarted((await self._directory.require(campaign_id)).starts_at)
            if kind is AdmissionKind.ENDED:
                ends_at = (await self._directory.require(campaign_id)).ends_at
                assert ends_at is not None
                raise CampaignEnded(ends_at)
            if kind is AdmissionKind.SOLD_OUT:
                # Stranded admissions may hide behind the reported ones: keep settling while
                # there are any (a budget of its own, so a long backlog is worked through).
                if admission.stale and settles < self.MAX_SETTLES:
                    settles += 1
                    rounds -= 1
                    await self._settle(campaign_id, admission.stale)
                    continue
                raise SoldOut((await self._directory.require(campaign_id)).total_coupons)
        raise Unavailable("could not settle this request; retry")

    async def _record(
        self, campaign_id: str, user_id: str, now: datetime, slot: int
    ) -> Issued | None:
        try:
            code = await self._codes.next_code()
            coupon = Coupon(
                code=code, campaign_id=campaign_id, user_id=user_id, issued_at=now, slot=slot
            )
        except BaseException:
            await self._release_quietly(campaign_id, user_id, slot)
            raise
        try:
            recorded = await self._ledger.record(coupon)
        except asyncio.CancelledError:
            # The caller left while its coupon was being committed. The row may still commit
            # with its batch: the admission stays pending, and the lease settles it against
            # the ledger (the user's retry gets the coupon, or the slot comes back).
            raise
        except BaseException:
            # I6: nothing was recorded (or we cannot know; then the lease settles it).
            await self._release_quietly(campaign_id, user_id, slot)
            raise
        outcome = recorded.outcome
        if outcome is RecordOutcome.RECORDED:
            await self._gate.confirm(coupon)
            return Issued(coupon, already_issued=False)
        if outcome is RecordOutcome.USER_HAS_COUPON:
            assert recorded.existing is not None
            await self._gate.release(campaign_id, user_id, slot)
            return Issued(recorded.existing, already_issued=True)
        if outcome is RecordOutcome.SLOT_TAKEN:
            await self._gate.forget(campaign_id, user_id, slot)
            return None
        await self._gate.release(campaign_id, user_id, slot)
        return None

    async def _release_quietly(self, campaign_id: str, user_id: str, slot: int) -> None:
        try:
            await self._gate.release(campaign_id, user_id, slot)
        except Unavailable:
            log.warning(
                "slot release failed; the lease will return it",
                extra={"campaign_id": campaign_id, "slot": slot},
            )

    async def _settle(self, campaign_id: str, stale: Sequence[tuple[str, int]]) -> None:
        """Settle admissions whose requests vanished (I6): confirm those the ledger holds,
        give the others' slots back. One settle per campaign at a time in this process;
        requests arriving meanwhile wait for it and then look again."""
        lock = self._settling.setdefault(campaign_id, asyncio.Lock())
        if lock.locked():
            async with lock:
                return
        async with lock:
            found = await asyncio.gather(
                *(self._ledger.find_by_user(campaign_id, user_id) for user_id, _ in stale)
            )
            for (user_id, slot), coupon in zip(stale, found, strict=True):
                if coupon is not None:
                    await self._gate.confirm(coupon)
                else:
                    await self._gate.release(campaign_id, user_id, slot)

    async def _warm(self, campaign_id: str) -> None:
        """Rebuild the gate from the ledger, once per process however many requests ask."""
        pending = self._warming.get(campaign_id)
        if pending is not None:
            await asyncio.shield(pending)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._warming[campaign_id] = future
        try:
            campaign = await self._directory.require(campaign_id)
            holdings = await self._ledger.holdings(campaign_id)
            await self._gate.load(campaign, holdings)
            future.set_result(None)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters get it, nobody else must
            raise
        finally:
            del self._warming[campaign_id]
