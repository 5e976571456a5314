"""The one place where protobuf messages and domain objects meet."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from coupon.domain.campaign import Campaign, CampaignStatus
from coupon.domain.coupon import Coupon
from coupon.domain.errors import InvalidArgument
from coupon.gen.coupon.v1 import coupon_pb

# The range google.protobuf.Timestamp allows: 0001-01-01 to 9999-12-31.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799
_EPOCH = datetime.fromtimestamp(0, UTC)
_SECOND = timedelta(seconds=1)

_STATUS = {
    CampaignStatus.SCHEDULED: coupon_pb.CampaignStatus.SCHEDULED,
    CampaignStatus.ACTIVE: coupon_pb.CampaignStatus.ACTIVE,
    CampaignStatus.SOLD_OUT: coupon_pb.CampaignStatus.SOLD_OUT,
    CampaignStatus.ENDED: coupon_pb.CampaignStatus.ENDED,
}


_STATUS_FILTER = {
    coupon_pb.CampaignStatus.UNSPECIFIED: None,
    **{message: status for status, message in _STATUS.items()},
}


def status_filter(value: int) -> CampaignStatus | None:
    """A status to filter by; UNSPECIFIED is no filter."""
    try:
        return _STATUS_FILTER[coupon_pb.CampaignStatus(value)]
    except (ValueError, KeyError):
        raise InvalidArgument(
            "status", f"must be one of SCHEDULED, ACTIVE, SOLD_OUT, ENDED or unset (got {value})"
        ) from None


def to_datetime(field: str, value: Timestamp | None) -> datetime | None:
    if value is None:
        return None
    if not _MIN_SECONDS <= value.seconds <= _MAX_SECONDS or not 0 <= value.nanos < 10**9:
        raise InvalidArgument(
            field, f"is not a valid timestamp (seconds={value.seconds}, nanos={value.nanos})"
        )
    return _EPOCH + timedelta(seconds=value.seconds, microseconds=value.nanos // 1000)


def to_timestamp(value: datetime) -> Timestamp:
    # Whole seconds by timedelta division: exact, and half the cost of replace + timestamp.
    return Timestamp(seconds=(value - _EPOCH) // _SECOND, nanos=value.microsecond * 1000)


def campaign_message(campaign: Campaign, now: datetime) -> coupon_pb.Campaign:
    return coupon_pb.Campaign(
        id=campaign.id,
        name=campaign.name,
        total_coupons=campaign.total_coupons,
        issued_count=campaign.issued_count,
        starts_at=to_timestamp(campaign.starts_at),
        ends_at=None if campaign.ends_at is None else to_timestamp(campaign.ends_at),
        created_at=to_timestamp(campaign.created_at),
        status=_STATUS[campaign.status_at(now)],
        ended_at=None if campaign.ended_at is None else to_timestamp(campaign.ended_at),
    )


def coupon_message(coupon: Coupon) -> coupon_pb.Coupon:
    return coupon_pb.Coupon(
        code=coupon.code,
        campaign_id=coupon.campaign_id,
        user_id=coupon.user_id,
        issued_at=to_timestamp(coupon.issued_at),
    )
