"""Use cases: CreateCampaign, GetCampaign (IssueCoupon has a module of its own). Each
orchestrates ports only."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime

from coupon.application.ports import (
    CampaignRepository,
    CouponLedger,
    StockGate,
    ViewClock,
)
from coupon.domain.campaign import Campaign, differences, new_campaign, validate_fields
from coupon.domain.coupon import Coupon, validate_campaign_id, validate_request_id
from coupon.domain.errors import (
    AlreadyExists,
    CampaignNotFound,
    InvalidArgument,
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

    async def fresh(self, campaign_id: str) -> Campaign:
        """Read from the repository again: what a gate rebuild starts from (a kill switch's
        end is the one thing of a campaign that changes)."""
        self.forget(campaign_id)
        return await self.require(campaign_id)

    def forget(self, campaign_id: str) -> None:
        self._known.pop(campaign_id, None)


async def _no_holdings() -> AsyncIterator[Sequence[Coupon]]:
    return
    yield


@dataclass(frozen=True, slots=True)
class _Asked:
    """What a create asks for."""

    name: str
    total_coupons: int
    starts_at: datetime | None
    ends_at: datetime | None


@dataclass(frozen=True, slots=True)
class Created:
    campaign: Campaign
    # When its status is decided: its creation; for a repeat, now.
    at: datetime
    # False for a repeat: the campaign the same request_id created before.
    created: bool


class CreateCampaign:
    PREWARM_WAIT_S = 1.0

    def __init__(self, campaigns: CampaignRepository, gate: StockGate, clock: ViewClock) -> None:
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
        request_id: str = "",
    ) -> Campaign:
        """The campaign `create` answers."""
        created = await self.create(
            name=name,
            total_coupons=total_coupons,
            starts_at=starts_at,
            ends_at=ends_at,
            request_id=request_id,
        )
        return created.campaign

    async def create(
        self,
        *,
        name: str,
        total_coupons: int,
        starts_at: datetime | None,
        ends_at: datetime | None,
        request_id: str,
    ) -> Created:
        """A new campaign; with a `request_id` used before, the campaign that create made,
        as it is now, and nothing made (AlreadyExists when it asked for another one)."""
        request_id = validate_request_id(request_id)
        asked = _Asked(name, total_coupons, starts_at, ends_at)
        if request_id:
            # Fields first, the request_id's campaign next: a repeat is answered whenever
            # it comes, also once the campaign's end has passed (which a new one refuses).
            validate_fields(
                name=name, total_coupons=total_coupons, starts_at=starts_at, ends_at=ends_at
            )
            found = await self._campaigns.find_by_request_id(request_id)
            if found is not None:
                return await self._repeat(found, request_id, asked)
        now = await self._clock.now()
        campaign = new_campaign(
            campaign_id=new_campaign_id(),
            name=name,
            total_coupons=total_coupons,
            starts_at=starts_at,
            ends_at=ends_at,
            now=now,
        )
        stored = await self._campaigns.add(campaign, request_id)
        if stored.id != campaign.id:
            # A concurrent create with the same request_id stored its campaign first.
            return await self._repeat(stored, request_id, asked)
        await self._prewarm(campaign)
        return Created(campaign, campaign.created_at, created=True)

    async def _repeat(self, campaign: Campaign, request_id: str, asked: _Asked) -> Created:
        """The campaign `request_id` created, for a repeat of its create. No gate is made:
        the first create made it (or it is rebuilt from the ledger at the next request)."""
        different = differences(
            campaign,
            name=asked.name,
            total_coupons=asked.total_coupons,
            starts_at=asked.starts_at,
            ends_at=asked.ends_at,
        )
        if different:
            raise AlreadyExists(
                "request_id",
                campaign.id,
                f"campaign {campaign.id} was created with this request_id and a different "
                f"{', '.join(different)}; nothing was created (send the same fields to get "
                "that campaign, or a new request_id for another campaign)",
            )
        log.info(
            "campaign create repeated",
            extra={"campaign_id": campaign.id, "create_request_id": request_id},
        )
        return Created(campaign, await self._clock.now(), created=False)

    async def _prewarm(self, campaign: Campaign) -> None:
        try:
            # Prewarm so the burst at the start finds the gate ready; not for longer than
            # the clock is waited for: a Redis that hangs does not hold the answer.
            async with asyncio.timeout(self.PREWARM_WAIT_S):
                await self._gate.load(campaign, _no_holdings())
        except (Unavailable, TimeoutError) as exc:
            # The campaign is durable; the gate is rebuilt on first use.
            log.warning(
                "gate prewarm failed",
                extra={
                    "campaign_id": campaign.id,
                    "error": str(exc) or "Redis is unavailable",
                    "cause": exc.detail
                    if isinstance(exc, Unavailable)
                    else f"no answer from Redis within {self.PREWARM_WAIT_S:g} s",
                },
            )


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
    def __init__(self, ledger: CouponLedger, clock: ViewClock) -> None:
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
        # One read: the issued count is that of the coupons the pages list.
        found = await self._ledger.campaign_page(campaign_id, after, page_size)
        if found is None:
            raise CampaignNotFound(campaign_id)
        campaign, page = found
        token = encode_page_token(campaign_id, page.last_position) if page.has_more else ""
        return CampaignView(campaign, page.coupons, token, await self._clock.now())
