from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

import asyncpg

from coupon.adapters.postgres.pool import connection, from_db_end, to_db_end
from coupon.application.ports import ConstraintViolation
from coupon.domain.campaign import Campaign, CampaignStatus

# A request_id taken already stores nothing (NULL, none, never conflicts). The insert that
# meets a concurrent one's uncommitted row waits for its end, then does nothing if it
# committed: the campaign it stored is then read in a statement of its own, whose snapshot
# has it.
_INSERT = """
INSERT INTO campaigns (id, name, total_coupons, starts_at, ends_at, created_at, request_id)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (request_id) DO NOTHING
"""
_COLUMNS = "id, name, total_coupons, issued_count, starts_at, ends_at, created_at, ended_at"
_SELECT = f"SELECT {_COLUMNS} FROM campaigns WHERE id = $1"
_SELECT_BY_REQUEST_ID = f"SELECT {_COLUMNS} FROM campaigns WHERE request_id = $1"
# The status as Campaign.status_at decides it, at $2; newest first by the time-ordered ids.
_STATUS_AT = """
CASE WHEN least(ends_at, coalesce(ended_at, 'infinity')) <= $2 THEN 'ended'
     WHEN issued_count >= total_coupons THEN 'sold_out'
     WHEN $2 < starts_at THEN 'scheduled'
     ELSE 'active' END
"""
_NEWEST = f"""
SELECT {_COLUMNS} FROM campaigns
 WHERE id < coalesce($1, 'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid)
   AND ($3::text IS NULL OR {_STATUS_AT} = $3::text)
 ORDER BY id DESC LIMIT $4
"""
# The first end stays (and a trigger refuses to move it).
_END = f"""
UPDATE campaigns SET ended_at = $2 WHERE id = $1 AND ended_at IS NULL RETURNING {_COLUMNS}
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
        ended_at=row["ended_at"],
    )


class PostgresCampaignRepository:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def add(self, campaign: Campaign, request_id: str = "") -> Campaign:
        async with connection(self._pool) as conn:
            # A campaign found by its request_id is never deleted by the service; should
            # one be all the same between the two statements, the insert goes again.
            for _ in range(3):
                try:
                    status = await conn.execute(
                        _INSERT,
                        uuid.UUID(campaign.id),
                        campaign.name,
                        campaign.total_coupons,
                        campaign.starts_at,
                        to_db_end(campaign.ends_at),
                        campaign.created_at,
                        request_id or None,
                    )
                except asyncpg.IntegrityConstraintViolationError as exc:
                    raise ConstraintViolation(str(exc)) from exc
                if status == "INSERT 0 1":
                    return campaign
                row = await conn.fetchrow(_SELECT_BY_REQUEST_ID, request_id)
                if row is not None:
                    return campaign_from_row(row)
        raise ConstraintViolation(f"request_id {request_id!r}: its campaign keeps vanishing")

    async def find_by_request_id(self, request_id: str) -> Campaign | None:
        async with connection(self._pool) as conn:
            row = await conn.fetchrow(_SELECT_BY_REQUEST_ID, request_id)
        return None if row is None else campaign_from_row(row)

    async def get(self, campaign_id: str) -> Campaign | None:
        async with connection(self._pool) as conn:
            row = await conn.fetchrow(_SELECT, uuid.UUID(campaign_id))
        return None if row is None else campaign_from_row(row)

    async def newest(
        self, *, before: str | None, limit: int, status: CampaignStatus | None, now: datetime
    ) -> Sequence[Campaign]:
        async with connection(self._pool) as conn:
            rows = await conn.fetch(
                _NEWEST,
                None if before is None else uuid.UUID(before),
                now,
                None if status is None else status.value,
                limit,
            )
        return [campaign_from_row(row) for row in rows]

    async def end(self, campaign_id: str, at: datetime) -> Campaign | None:
        async with connection(self._pool) as conn:
            row = await conn.fetchrow(_END, uuid.UUID(campaign_id), at)
            if row is None:
                # Ended already, perhaps by a concurrent call: read it in a statement of its
                # own, whose snapshot has that end.
                row = await conn.fetchrow(_SELECT, uuid.UUID(campaign_id))
        return None if row is None else campaign_from_row(row)
