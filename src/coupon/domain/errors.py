"""Domain exceptions: every rule that can refuse a request raises one of these.

The Connect layer maps each class to one Connect code, in one table.
"""

from __future__ import annotations

from datetime import datetime

from coupon.domain.times import rfc3339


class CouponError(Exception):
    """Base of every error the service reports to a caller. `detail`: the failure in a
    dependency's own words, for the service's log alone (Unavailable's; empty otherwise)."""

    detail = ""


class InvalidArgument(CouponError):
    """A field is malformed or out of range; `field` names it."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class CampaignNotFound(CouponError):
    def __init__(self, campaign_id: str) -> None:
        super().__init__(f"campaign {campaign_id} does not exist")
        self.campaign_id = campaign_id


class AlreadyExists(CouponError):
    """A create's request_id was used before by a create that asked for another campaign:
    nothing was created. `campaign_id` is the campaign that request_id created."""

    def __init__(self, field: str, campaign_id: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.campaign_id = campaign_id


class CampaignNotStarted(CouponError):
    def __init__(self, starts_at: datetime) -> None:
        super().__init__(f"campaign has not started yet: it starts at {rfc3339(starts_at)}")
        self.starts_at = starts_at


class CampaignEnded(CouponError):
    def __init__(self, ends_at: datetime) -> None:
        super().__init__(f"campaign has ended: it ended at {rfc3339(ends_at)}")
        self.ends_at = ends_at


class SoldOut(CouponError):
    def __init__(self, total_coupons: int) -> None:
        super().__init__(f"all {total_coupons} coupons of this campaign have been issued")
        self.total_coupons = total_coupons


class Unauthenticated(CouponError):
    pass


class Unavailable(CouponError):
    """A dependency is down or overloaded; nothing was issued, retrying is safe.
    `retry_after_ms`, when known, is when a retry can succeed. `detail` is the failure in
    the dependency's own words (its address, its error), for the service's log alone:
    clients are told the message."""

    def __init__(self, message: str, retry_after_ms: int = 0, *, detail: str = "") -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms
        self.detail = detail


# How an `unavailable` whose write may have been done says so, for programs: its message
# begins with these words (docs/clients.md), in every protocol.
OUTCOME_UNKNOWN_PREFIX = "outcome unknown: "


class OutcomeUnknown(Unavailable):
    """PostgreSQL failed while a write was on its way (the connection broke, or it did not
    answer in time): the write may have been recorded. Retrying is safe all the same — a
    user's coupon is found again, never issued twice. The message begins with
    OUTCOME_UNKNOWN_PREFIX, so that a client can tell this answer from a refusal."""

    def __init__(self, message: str, retry_after_ms: int = 0, *, detail: str = "") -> None:
        super().__init__(OUTCOME_UNKNOWN_PREFIX + message, retry_after_ms, detail=detail)


class Overloaded(Unavailable):
    """The service is at capacity: the request was turned away before any work was done."""
