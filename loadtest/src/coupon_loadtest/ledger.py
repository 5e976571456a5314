"""Read back what was issued: from the API (GetCampaign, every page) and from PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg

from coupon.adapters.postgres.migrate import describe_failure
from coupon_loadtest import audit
from coupon_loadtest.scenario import AdminApi, SetupError, timestamp_ns
from coupon_loadtest.verify import CampaignFacts, Ledger, ListedCoupon

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_NO_CAMPAIGN = "00000000-0000-0000-0000-000000000000"
# Reading back after the load: pages of up to 10,000 coupons from a server that may still be
# busy, so a time-out of its own, far above a request's, and a few attempts.
READBACK_TIMEOUT_S = 120.0
READBACK_ATTEMPTS = 3
READBACK_PAUSE_S = 1.0


async def with_retries(
    read: Callable[[], Awaitable[Ledger]],
    *,
    attempts: int = READBACK_ATTEMPTS,
    pause_s: float = READBACK_PAUSE_S,
) -> Ledger | str:
    """The ledger `read` returns, trying up to `attempts` times, or why the last try failed."""
    why = ""
    for attempt in range(attempts):
        if attempt:
            await asyncio.sleep(pause_s * attempt)
        try:
            return await read()
        except Exception as exc:  # noqa: BLE001 - reported in the run's verification
            why = str(exc) if isinstance(exc, SetupError) else f"{type(exc).__name__}: {exc}"
    return f"failed {attempts} times, last: {why}"


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
            ended_at_ns=timestamp_ns(campaign.ended_at),
        ),
        coupons=[ListedCoupon(c.user_id, c.code, timestamp_ns(c.issued_at) or 0) for c in coupons],
    )


def _ns(value: datetime | None) -> int | None:
    return None if value is None else (value - _EPOCH) // _MICROSECOND * 1000


def _unreachable(exc: BaseException, database_url: str) -> str:
    """Why PostgreSQL could not be reached, as `coupon migrate` says it (never the
    password): `connection refused by 127.0.0.1:5433`."""
    return describe_failure(exc, database_url) or f"{type(exc).__name__}: {exc}"


async def check_database(database_url: str, campaign_id: str | None, timeout_s: float) -> None:
    """At set-up, before any load: --database-url answers, and holds the campaign when one
    is named, so that a wrong URL does not cost the run's results at its end."""
    try:
        connection = await asyncpg.connect(database_url, timeout=timeout_s)
    except Exception as exc:
        raise SetupError(
            f"cannot connect to --database-url: {_unreachable(exc, database_url)}"
        ) from exc
    try:
        try:
            # The read-back's queries, on a campaign that cannot exist: a database without
            # the service's tables (or another one) fails now, not after the load.
            await audit.read_campaign(connection, _NO_CAMPAIGN)
            await audit.read_coupons(connection, _NO_CAMPAIGN)
            await audit.codes_held_elsewhere(connection, _NO_CAMPAIGN)
        except asyncpg.PostgresError as exc:
            raise SetupError(
                "--database-url holds no coupon schema (is it the service's database, "
                f"migrated?): {type(exc).__name__}: {exc}"
            ) from exc
        if campaign_id is not None and await audit.read_campaign(connection, campaign_id) is None:
            raise SetupError(f"campaign {campaign_id} is not in the database at --database-url")
    finally:
        await connection.close()


async def database_ledger(
    database_url: str, campaign_id: str, timeout_s: float = READBACK_TIMEOUT_S
) -> Ledger:
    """The source of truth, read directly: rows, not what the API chooses to show."""
    try:
        connection = await asyncpg.connect(database_url, timeout=timeout_s)
    except Exception as exc:
        raise SetupError(
            f"cannot connect to --database-url: {_unreachable(exc, database_url)}"
        ) from exc
    try:
        campaign = await audit.read_campaign(connection, campaign_id)
        if campaign is None:
            raise SetupError(f"campaign {campaign_id} is not in the database at --database-url")
        rows = await audit.read_coupons(connection, campaign_id)
        elsewhere = await audit.codes_held_elsewhere(connection, campaign_id)
    finally:
        await connection.close()
    return Ledger(
        source="database",
        campaign=CampaignFacts(
            total_coupons=campaign.total_coupons,
            issued_count=campaign.issued_count,
            starts_at_ns=_ns(campaign.starts_at) or 0,
            ends_at_ns=_ns(campaign.ends_at),
        ),
        coupons=[ListedCoupon(row.user_id, row.code, _ns(row.issued_at) or 0) for row in rows],
        codes_used_elsewhere=elsewhere,
    )
