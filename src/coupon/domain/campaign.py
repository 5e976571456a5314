"""Campaigns and their rules: the issue window, the stock, the derived status."""

from __future__ import annotations

import enum
import re
import unicodedata
from dataclasses import dataclass, replace
from datetime import datetime

from coupon.domain.errors import InvalidArgument
from coupon.domain.times import rfc3339

NAME_MAX_CHARS = 200
# What a name is shown with (a table row, a page) must not be able to move: no C0, DEL or
# C1 control (a tab, a newline, an escape sequence), no line or paragraph separator, and no
# bidirectional mark, embedding, override or isolate, which would show it reversed.
_UNSHOWABLE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)
# Characters that show nothing but are neither spaces nor format characters (Cf): the
# Hangul fillers, the combining grapheme joiner, variation selectors, the blank braille
# pattern, the Khmer inherent vowels. A name of these alone (and spaces, and Cf) is blank.
_BLANK = frozenset(
    "\u115f\u1160\u3164\uffa0\u034f\u2800\u180b\u180c\u180d\u180f\u17b4\u17b5"
    + "".join(map(chr, range(0xFE00, 0xFE10)))
    + "".join(map(chr, range(0xE0100, 0xE01F0)))
)
TOTAL_COUPONS_MAX = 10_000_000
# Timestamps outside this range cannot be stored by PostgreSQL's timestamptz without
# surprises and make no sense for a campaign; refusing them early gives a clear error.
EARLIEST = datetime.fromisoformat("2000-01-01T00:00:00+00:00")
LATEST = datetime.fromisoformat("9000-01-01T00:00:00+00:00")


class CampaignStatus(enum.Enum):
    SCHEDULED = "scheduled"
    ACTIVE = "active"
    SOLD_OUT = "sold_out"
    ENDED = "ended"


@dataclass(frozen=True, slots=True)
class Campaign:
    id: str
    name: str
    total_coupons: int
    starts_at: datetime
    ends_at: datetime | None
    created_at: datetime
    issued_count: int = 0
    # When EndCampaign (the kill switch) ended issuance. Kept apart from ends_at, which
    # every coupon row carries a copy of.
    ended_at: datetime | None = None

    @property
    def effective_end(self) -> datetime | None:
        """When issuance ends: the scheduled end or the kill switch, whichever comes first."""
        if self.ended_at is None:
            return self.ends_at
        if self.ends_at is None:
            return self.ended_at
        return min(self.ends_at, self.ended_at)

    def status_at(self, now: datetime) -> CampaignStatus:
        end = self.effective_end
        if end is not None and now >= end:
            return CampaignStatus.ENDED
        if self.issued_count >= self.total_coupons:
            return CampaignStatus.SOLD_OUT
        if now < self.starts_at:
            return CampaignStatus.SCHEDULED
        return CampaignStatus.ACTIVE

    def with_issued_count(self, issued_count: int) -> Campaign:
        return replace(self, issued_count=issued_count)

    def ended(self, at: datetime) -> Campaign:
        """Ended by the kill switch at `at`; a campaign ended before keeps its first end."""
        if self.ended_at is not None and self.ended_at <= at:
            return self
        return replace(self, ended_at=at)

    def with_end_applied(self) -> Campaign:
        """The campaign as issuance sees it: `ends_at` is when issuance ends."""
        return replace(self, ends_at=self.effective_end)


def shows_nothing(text: str) -> bool:
    """Empty, or only spaces and characters that show nothing (U+200B, U+FEFF, the Hangul
    fillers, variation selectors, …): blank to whoever reads it."""
    return all(c.isspace() or c in _BLANK or unicodedata.category(c) == "Cf" for c in text)


def validate_name(name: str) -> str:
    if shows_nothing(name):
        raise InvalidArgument("name", "must not be empty or blank")
    if len(name) > NAME_MAX_CHARS:
        raise InvalidArgument(
            "name", f"must be at most {NAME_MAX_CHARS} characters (got {len(name)})"
        )
    unshowable = _UNSHOWABLE.search(name)
    if unshowable is not None:
        raise InvalidArgument(
            "name",
            f"must not contain control or text-direction characters (got "
            f"{unshowable.group()!r} at {unshowable.start()})",
        )
    return name


def validate_total_coupons(total_coupons: int) -> int:
    if not 1 <= total_coupons <= TOTAL_COUPONS_MAX:
        raise InvalidArgument(
            "total_coupons",
            f"must be between 1 and {TOTAL_COUPONS_MAX} (got {total_coupons})",
        )
    return total_coupons


def validate_time(field: str, value: datetime | None, *, required: bool) -> datetime | None:
    if value is None:
        if required:
            raise InvalidArgument(field, "is required")
        return None
    if not EARLIEST <= value < LATEST:
        raise InvalidArgument(
            field,
            f"must be between {rfc3339(EARLIEST)} and {rfc3339(LATEST)} (got {rfc3339(value)})",
        )
    return value


def validate_fields(
    *, name: str, total_coupons: int, starts_at: datetime | None, ends_at: datetime | None
) -> tuple[datetime, datetime | None]:
    """Every field of a new campaign that does not depend on the time now; its window."""
    validate_name(name)
    validate_total_coupons(total_coupons)
    start = validate_time("starts_at", starts_at, required=True)
    assert start is not None
    end = validate_time("ends_at", ends_at, required=False)
    if end is not None and end <= start:
        kept = " (times are kept to the microsecond)" if end == start else ""
        raise InvalidArgument(
            "ends_at",
            f"must be after starts_at ({rfc3339(start)}); got {rfc3339(end)}{kept}",
        )
    return start, end


def new_campaign(
    *,
    campaign_id: str,
    name: str,
    total_coupons: int,
    starts_at: datetime | None,
    ends_at: datetime | None,
    now: datetime,
) -> Campaign:
    """Validate every field of a new campaign; raise InvalidArgument naming the first bad one."""
    start, end = validate_fields(
        name=name, total_coupons=total_coupons, starts_at=starts_at, ends_at=ends_at
    )
    if end is not None and end <= now:
        raise InvalidArgument(
            "ends_at", f"must be in the future (got {rfc3339(end)}, now {rfc3339(now)})"
        )
    return Campaign(
        id=campaign_id,
        name=name,
        total_coupons=total_coupons,
        starts_at=start,
        ends_at=end,
        created_at=now,
    )


def differences(
    campaign: Campaign,
    *,
    name: str,
    total_coupons: int,
    starts_at: datetime | None,
    ends_at: datetime | None,
) -> list[str]:
    """The fields a create asks for otherwise than `campaign` was created with (times as
    kept, to the microsecond), in the request's order."""
    asked = {
        "name": (name, campaign.name),
        "total_coupons": (total_coupons, campaign.total_coupons),
        "starts_at": (starts_at, campaign.starts_at),
        "ends_at": (ends_at, campaign.ends_at),
    }
    return [field for field, (wanted, kept) in asked.items() if wanted != kept]
