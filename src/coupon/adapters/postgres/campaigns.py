from __future__ import annotations

import uuid

import asyncpg

from coupon.adapters.postgres.pool import connection, from_db_end, to_db_end
from coupon.application.ports import ConstraintViolation
from coupon.domain.campaign import Campaign

_INSERT = """
INSERT INTO campaigns (id, name, total_coupons, starts_at, ends_at, created_at)
VALUES ($1, $2, $3, $4, $5, $6)
"""
_SELECT = """
SELECT id, name, total_coupons, issued_count, starts_at, ends_at, created_at
  FROM campaigns WHERE id = $1
"""


def campaign_from_row(row: asyncpg.Record) -> Campaign:
    return Campaign(
        id=str(row["id"]),
        name=row["name"],
        total_coupons=row["total_coupons"],
        starts_at=row["starts_at"],
        ends_at=from_db_end(row["ends_at"]),
        created_at=row["created_at"],
        issued_count=row["issued_count"],
    )


class PostgresCampaignRepository:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def add(self, campaign: Campaign) -> None:
        async with connection(self._pool) as conn:
            try:
                await conn.execute(
                    _INSERT,
                    uuid.UUID(campaign.id),
                    campaign.name,
                    campaign.total_coupons,
                    campaign.starts_at,
                    to_db_end(campaign.ends_at),
                    campaign.created_at,
                )
            except asyncpg.IntegrityConstraintViolationError as exc:
                raise ConstraintViolation(str(exc)) from exc

    async def get(self, campaign_id: str) -> Campaign | None:
        async with connection(self._pool) as conn:
            row = await conn.fetchrow(_SELECT, uuid.UUID(campaign_id))
        return None if row is None else campaign_from_row(row)
