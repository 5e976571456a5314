"""Use cases for operators and for a user's own coupons: ListCampaigns, EndCampaign (the
kill switch), ListUserCoupons, ExportCoupons. Each orchestrates ports only."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from datetime import datetime

from coupon.application.ports import (
    CampaignRepository,
    Clock,
    CouponLedger,
    StockGate,
    ViewClock,
)
from coupon.application.refusals import RefusalMemory
from coupon.application.use_cases import CampaignDirectory
from coupon.domain.campaign import Campaign, CampaignStatus
from coupon.domain.coupon import Coupon, validate_campaign_id, validate_user_id
from coupon.domain.errors import CampaignNotFound, InvalidArgument, Unavailable
from coupon.domain.times import rfc3339

LIST_PAGE_SIZE_DEFAULT = 100
LIST_PAGE_SIZE_MAX = 1_000
# Rows per keyset read of an export: big enough that a read costs little per row, small
# enough that a chunk in memory stays a few megabytes whatever the campaign's size.
EXPORT_CHUNK = 5_000


def _page_size(value: int) -> int:
    if value == 0:
        return LIST_PAGE_SIZE_DEFAULT
    if not 1 <= value <= LIST_PAGE_SIZE_MAX:
        raise InvalidArgument(
            "page_size", f"must be between 1 and {LIST_PAGE_SIZE_MAX} (got {value})"
        )
    return value


def _encode_token(scope: str, campaign_id: str) -> str:
    return base64.urlsafe_b64encode(f"{scope}:{campaign_id}".encode()).decode().rstrip("=")


def _decode_token(scope: str, token: str, what: str) -> str | None:
    """The campaign id a page token of `scope` carries; None for the first page."""
    if not token:
        return None
    bad = InvalidArgument("page_token", f"is not a next_page_token of {what}")
    if len(token) > 200:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        owner, _, campaign_id = raw.rpartition(":")
        parsed = uuid.UUID(campaign_id)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise bad from None
    if owner != scope or str(parsed) != campaign_id:
        raise bad
    return campaign_id


@dataclass(frozen=True, slots=True)
class CampaignList:
    campaigns: Sequence[Campaign]
    next_page_token: str
    now: datetime


class ListCampaigns:
    """Newest first, a page at a time; statuses dated by the ViewClock, at one `now`."""

    def __init__(self, campaigns: CampaignRepository, clock: ViewClock) -> None:
        self._campaigns = campaigns
        self._clock = clock

    async def execute(
        self, *, page_size: int, page_token: str, status: CampaignStatus | None
    ) -> CampaignList:
        limit = _page_size(page_size)
        # A token belongs to the listing it came from (the same status filter).
        scope = f"campaigns.{status.value if status else 'all'}"
        before = _decode_token(scope, page_token, "this listing (same status filter)")
        now = await self._clock.now()
        found = await self._campaigns.newest(before=before, limit=limit + 1, status=status, now=now)
        page = list(found[:limit])
        token = _encode_token(scope, page[-1].id) if len(found) > limit else ""
        return CampaignList(page, token, now)


@dataclass(frozen=True, slots=True)
class EndedCampaign:
    campaign: Campaign
    now: datetime
    # Whether this call ended it (False: ended before, or over by its schedule).
    changed: bool = False
    # Admissions made before the end whose coupons were still being recorded when the wait
    # for them ran out: 0 when the campaign's issued count is final; STILL_RECORDING_UNKNOWN
    # when Redis or PostgreSQL could not be asked once the end was in force.
    still_recording: int = 0


# How long EndCampaign waits, once the end is in force, for the admissions made before it
# to be recorded (or given back), so that its answer carries the final count. They take a
# request's deadline to be sent to the gate (500 ms) and a group commit (milliseconds;
# up to the 10-s command timeout only when PostgreSQL stalls): 3 s covers every healthy
# case, and a stalled PostgreSQL is answered with what is left to record.
SETTLE_WAIT_SECONDS = 3.0
SETTLE_POLL_SECONDS = 0.02
# The end is in force, but whether its count is final could not be learnt.
STILL_RECORDING_UNKNOWN = -1


class EndCampaign:
    """The kill switch. The end is decided by the gate's clock, the one that admits: a
    request admitted before it is honoured, none is admitted after. PostgreSQL then records
    it, and refuses any coupon issued at or after it from then on; the gate is told the
    recorded end again, for a rebuild that read the campaign before it was recorded."""

    def __init__(
        self,
        campaigns: CampaignRepository,
        gate: StockGate,
        clock: Clock,
        directory: CampaignDirectory,
        refusals: RefusalMemory,
        view_clock: ViewClock,
    ) -> None:
        self._campaigns = campaigns
        self._gate = gate
        self._clock = clock
        self._directory = directory
        self._refusals = refusals
        self._view_clock = view_clock

    def _forget(self, campaign_id: str) -> None:
        """What this process keeps of the campaign: the next request sees the end (other
        processes see it when their memories run out, COUPON_REFUSAL_MEMORY_MS at most)."""
        self._directory.forget(campaign_id)
        self._refusals.forget(campaign_id)

    async def _settle(
        self, campaign: Campaign, end: datetime, wait_seconds: float
    ) -> tuple[Campaign, int]:
        """Wait (`wait_seconds` at most) until no admission made before `end` is still being
        recorded, then read the campaign again: its issued count is then final. Returns it
        with how many were still being recorded when the wait ran out (0: none)."""
        # The end is in force before this is called: a dependency failing now makes the
        # count uncertain, never the end, so it is answered, not raised.
        give_up = time.monotonic() + wait_seconds
        try:
            pending = await self._gate.pending_count(campaign.id, end)
        except Unavailable:
            pending = STILL_RECORDING_UNKNOWN
        while pending > 0 and time.monotonic() < give_up:
            await asyncio.sleep(SETTLE_POLL_SECONDS)
            try:
                pending = await self._gate.pending_count(campaign.id, end)
            except Unavailable:
                break  # the gate went away meanwhile: what is known is said
        try:
            fresh = await self._campaigns.get(campaign.id)
        except Unavailable:
            return campaign, STILL_RECORDING_UNKNOWN  # its count as of the end's record
        return fresh or campaign, pending

    async def execute(
        self, *, campaign_id: str, wait_seconds: float = SETTLE_WAIT_SECONDS
    ) -> EndedCampaign:
        """Ends the campaign, then waits up to `wait_seconds` for the admissions made
        before the end to be recorded, so that the count answered is final."""
        campaign_id = validate_campaign_id(campaign_id)
        campaign = await self._campaigns.get(campaign_id)
        if campaign is None:
            raise CampaignNotFound(campaign_id)
        if campaign.ended_at is not None:
            # Ended before: unchanged. The gate hears of it again, in case the call that
            # ended it stopped before telling it; if it cannot (Redis down), the answer is
            # the same: the ledger refuses any coupon after the recorded end whatever the
            # gate says, and tells the gate again when it admits one.
            pending = 0
            with contextlib.suppress(Unavailable):
                await self._gate.end(campaign_id, campaign.ended_at)
                campaign, pending = await self._settle(campaign, campaign.ended_at, wait_seconds)
            self._forget(campaign_id)
            return EndedCampaign(campaign, await self._view_clock.now(), still_recording=pending)
        now = await self._clock.now()
        if campaign.ends_at is not None and campaign.ends_at <= now:
            return EndedCampaign(campaign, now)  # over by its schedule: nothing to end
        at = await self._gate.end(campaign_id, None)
        try:
            ended = await self._campaigns.end(campaign_id, at)
        except Unavailable as exc:
            # The gate refuses from `at` on already; only PostgreSQL's record is missing,
            # and a retry records this same end (the gate keeps its first).
            raise Unavailable(
                f"{exc}: the campaign ended at {rfc3339(at)} (no coupon is issued any "
                "more) but the end is not recorded yet; retry EndCampaign to record it",
                exc.retry_after_ms,
                detail=exc.detail,
            ) from exc
        if ended is None:
            raise CampaignNotFound(campaign_id)
        end = ended.ended_at
        assert end is not None
        await self._gate.end(campaign_id, end)
        self._forget(campaign_id)
        ended, pending = await self._settle(ended, end, wait_seconds)
        return EndedCampaign(ended, max(now, end), changed=True, still_recording=pending)


@dataclass(frozen=True, slots=True)
class UserCoupons:
    coupons: Sequence[Coupon]
    next_page_token: str


class ListUserCoupons:
    def __init__(self, ledger: CouponLedger) -> None:
        self._ledger = ledger

    async def execute(self, *, user_id: str, page_size: int, page_token: str) -> UserCoupons:
        user_id = validate_user_id(user_id)
        limit = _page_size(page_size)
        # A token belongs to its user (a digest, so the token does not carry the id).
        scope = "user." + hashlib.blake2b(user_id.encode(), digest_size=8).hexdigest()
        before = _decode_token(scope, page_token, "this user's coupons")
        page = await self._ledger.user_coupons(user_id, before, limit)
        token = _encode_token(scope, page.coupons[-1].campaign_id) if page.has_more else ""
        return UserCoupons(page.coupons, token)


class ExportCoupons:
    """Every coupon of a campaign in issue order, in chunks read one after the other by
    position (a keyset), so memory stays flat whatever the campaign's size; the caller takes
    the next chunk only when it has sent the last."""

    def __init__(self, campaigns: CampaignRepository, ledger: CouponLedger) -> None:
        self._campaigns = campaigns
        self._ledger = ledger

    async def execute(self, *, campaign_id: str) -> AsyncGenerator[Sequence[Coupon], None]:
        """Checks the campaign first (errors before anything is streamed), then returns the
        chunks."""
        campaign_id = validate_campaign_id(campaign_id)
        if await self._campaigns.get(campaign_id) is None:
            raise CampaignNotFound(campaign_id)
        return self._chunks(campaign_id)

    async def _chunks(self, campaign_id: str) -> AsyncGenerator[Sequence[Coupon], None]:
        after = 0
        while True:
            page = await self._ledger.page(campaign_id, after, EXPORT_CHUNK)
            if page.coupons:
                yield page.coupons
            if not page.has_more:
                return
            after = page.last_position
