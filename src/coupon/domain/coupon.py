"""Issued coupons and the identifiers requests carry."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime

from coupon.domain.campaign import shows_nothing
from coupon.domain.errors import InvalidArgument

USER_ID_MAX_CHARS = 128
# C0, DEL and C1: a tab, a newline or an escape sequence is no part of a user's id.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


# Not frozen, as Issued and Admission: one is built per issued coupon, and a frozen
# dataclass's __init__ costs three times as much (1.5 against 0.5 us); nothing changes one.
@dataclass(slots=True)
class Coupon:
    code: str
    campaign_id: str
    user_id: str
    issued_at: datetime
    # Position of this coupon in the campaign's stock, 1..total_coupons. The database
    # keeps (campaign_id, slot) unique, which alone makes over-issue impossible (I1).
    slot: int


def validate_user_id(user_id: str, field: str = "user_id") -> str:
    """A user's id (or, as `field`, another id a caller chooses: see validate_request_id)."""
    if not user_id:
        raise InvalidArgument(field, "must not be empty")
    if len(user_id) > USER_ID_MAX_CHARS:
        raise InvalidArgument(
            field, f"must be at most {USER_ID_MAX_CHARS} characters (got {len(user_id)})"
        )
    if not user_id.isprintable():  # beyond visible characters and spaces: rare
        if "\x00" in user_id:
            # Also what lets the Redis gate send a batch's user ids as one NUL-joined string.
            raise InvalidArgument(field, "must not contain NUL characters")
        control = _CONTROL.search(user_id)
        if control is not None:
            raise InvalidArgument(
                field,
                f"must not contain control characters (got {control.group()!r} "
                f"at {control.start()})",
            )
    if user_id.isspace() or (not user_id.isascii() and shows_nothing(user_id)):
        # As a campaign's name: an id that shows nothing (U+200B alone) is blank too.
        raise InvalidArgument(field, "must not be blank")
    return user_id


def validate_request_id(request_id: str) -> str:
    """CreateCampaign's request_id: empty (none), or an id by the rules of a user's id
    (1 to 128 characters, not blank, no control characters), compared exactly as sent."""
    return validate_user_id(request_id, "request_id") if request_id else ""


# Ids already seen, canonical: a burst names one campaign in every request, and parsing a
# UUID costs more than the dictionary lookup. Bounded: emptied when full.
_SEEN_CAMPAIGN_IDS: dict[str, str] = {}
_SEEN_CAMPAIGN_IDS_MAX = 4096


def validate_campaign_id(campaign_id: str) -> str:
    """Campaign ids are canonical UUID strings; anything else cannot name a campaign."""
    seen = _SEEN_CAMPAIGN_IDS.get(campaign_id)
    if seen is not None:
        return seen
    if not campaign_id:
        raise InvalidArgument("campaign_id", "must not be empty")
    try:
        parsed = uuid.UUID(campaign_id)
    except ValueError:
        raise InvalidArgument(
            "campaign_id",
            f"must be a campaign id such as 0192f5e0-7c1a-7b3e-9d2a-5b1c2d3e4f50 "
            f"(got {campaign_id[:64]!r})",
        ) from None
    canonical = str(parsed)
    if len(_SEEN_CAMPAIGN_IDS) >= _SEEN_CAMPAIGN_IDS_MAX:
        _SEEN_CAMPAIGN_IDS.clear()
    _SEEN_CAMPAIGN_IDS[campaign_id] = canonical
    return canonical
