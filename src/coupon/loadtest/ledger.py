"""Read back what was issued: from the API (GetCampaign, every page) and from PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg

from coupon.loadtest.scenario import AdminApi, SetupError, timestamp_ns
from coupon.loadtest.verify import CampaignFacts, Ledger, ListedCoupon

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


async def api_ledger(api: AdminApi, campaign_id: str) -> Ledger:
    campaign, coupons = await api.list_campaign(campaign_id)
    starts = timestamp_ns(campaign.starts_at)
    return Ledger(
        source="api",
        campaign=CampaignFacts(
            total_coupons=campaign.total_coupons,
            issued_count=campaign.issued_count,
            starts_at_ns=0 if starts is None else starts,
            ends_at_ns=timestamp_ns(campaign.ends_at),
        ),
        coupons=[ListedCoupon(c.user_id, c.code, timestamp_ns(c.issued_at) or 0) for c in coupons],
    )


def _ns(value: datetime) -> int | None:
    # asyncpg hands 'infinity' back as a naive datetime.max: an open-ended campaign.
    if value.tzinfo is None or value.year >= 9999:
        return None
    return (value - _EPOCH) // _MICROSECOND * 1000


async def database_ledger(database_url: str, campaign_id: str) -> Ledger:
    """The source of truth, read directly: rows, not what the API chooses to show."""
    try:
        connection = await asyncpg.connect(database_url)
    except Exception as exc:
        raise SetupError(f"cannot connect to --database-url: {type(exc).__name__}: {exc}") from exc
    try:
        campaign = await connection.fetchrow(
            "SELECT total_coupons, issued_count, starts_at, ends_at FROM campaigns WHERE id = $1",
            campaign_id,
        )
        if campaign is None:
            raise SetupError(f"campaign {campaign_id} is not in the database at --database-url")
        rows = await connection.fetch(
            "SELECT user_id, code, issued_at FROM coupons WHERE campaign_id = $1 ORDER BY id",
            campaign_id,
        )
        # I2 is global: a code of this campaign must not exist in any other campaign.
        elsewhere = await connection.fetch(
            "SELECT DISTINCT code FROM coupons WHERE code = ANY($1::text[]) AND campaign_id <> $2",
            [row["code"] for row in rows],
            campaign_id,
        )
    finally:
        await connection.close()
    starts = _ns(campaign["starts_at"])
    return Ledger(
        source="database",
        campaign=CampaignFacts(
            total_coupons=campaign["total_coupons"],
            issued_count=campaign["issued_count"],
            starts_at_ns=0 if starts is None else starts,
            ends_at_ns=_ns(campaign["ends_at"]),
        ),
        coupons=[
            ListedCoupon(row["user_id"], row["code"], _ns(row["issued_at"]) or 0) for row in rows
        ],
        codes_used_elsewhere=[row["code"] for row in elsewhere],
    )
