"""The invariants, read from PostgreSQL: the one auditor the load tool, the tests, the bench
and the tools check the source of truth with.

For one campaign: I1 no over-issue (at most `total_coupons` rows, each on its own slot in
1..total_coupons, and the campaign's `issued_count` agreeing), I2 unique codes (within the
campaign and against every other campaign), I3 every `issued_at` in [starts_at, ends_at),
I4 one coupon per user, and what PostgreSQL alone can say of I5: at least as many rows as
coupons acknowledged to clients. Comparing what each client received with the rows is the
caller's part (`read_coupons` gives the rows).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol


class Database(Protocol):
    """An asyncpg connection or pool."""

    async def fetch(self, query: str, *args: Any) -> list[Any]: ...
    async def fetchrow(self, query: str, *args: Any) -> Any: ...


@dataclass(frozen=True)
class CampaignRow:
    id: str
    total_coupons: int
    issued_count: int
    starts_at: datetime
    ends_at: datetime | None  # None: open-ended


@dataclass(frozen=True)
class StoredCoupon:
    user_id: str
    code: str
    issued_at: datetime
    slot: int


@dataclass(frozen=True)
class Finding:
    name: str  # the invariant: I1..I4, "record", "acks", "sold out"
    rule: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Audit:
    """One campaign's rows, summed up by PostgreSQL."""

    campaign: CampaignRow
    rows: int
    distinct_codes: int
    distinct_users: int
    distinct_slots: int
    min_slot: int | None
    max_slot: int | None
    outside_window: int
    codes_elsewhere: int  # codes of this campaign that another campaign holds too
    first_issued_at: datetime | None
    last_issued_at: datetime | None
    acknowledged: int | None = None  # successes clients received, when the caller counted

    def findings(self, *, sold_out: bool = False) -> list[Finding]:
        """I1-I4, the campaign record, and with `acknowledged` the acks; with `sold_out`,
        also that the whole stock was issued."""
        total = self.campaign.total_coupons
        rows = self.rows
        slots_ok = self.distinct_slots == rows and (
            rows == 0 or (self.min_slot is not None and self.min_slot >= 1)
        )
        slots_ok = slots_ok and (rows == 0 or (self.max_slot or 0) <= total)
        found = [
            Finding(
                "I1",
                "coupons <= total_coupons, each on its own slot in 1..total_coupons",
                rows <= total and slots_ok,
                f"{rows:,} of {total:,}; {self.distinct_slots:,} distinct slots in "
                f"{self.min_slot}..{self.max_slot}",
            ),
            Finding(
                "record",
                "issued_count = coupons stored",
                self.campaign.issued_count == rows,
                f"issued_count {self.campaign.issued_count:,}, {rows:,} stored",
            ),
            Finding(
                "I2",
                "no code twice, in the campaign or across campaigns",
                self.distinct_codes == rows and self.codes_elsewhere == 0,
                f"{self.distinct_codes:,} distinct codes in {rows:,} rows; "
                f"{self.codes_elsewhere} also held by another campaign",
            ),
            Finding(
                "I3",
                "issued_at in [starts_at, ends_at)",
                self.outside_window == 0,
                f"{self.outside_window} outside",
            ),
            Finding(
                "I4",
                "at most one coupon per user",
                self.distinct_users == rows,
                f"{self.distinct_users:,} users for {rows:,} coupons",
            ),
        ]
        if self.acknowledged is not None:
            found.append(
                Finding(
                    "acks",
                    "every acknowledged coupon is stored",
                    self.acknowledged <= rows,
                    f"{self.acknowledged:,} acknowledged, {rows:,} stored",
                )
            )
        if sold_out:
            found.append(
                Finding(
                    "sold out",
                    "coupons = total_coupons",
                    rows == total,
                    f"{rows:,} of {total:,}",
                )
            )
        return found

    @property
    def sell_out_span_s(self) -> float | None:
        """From the first coupon's issued_at to the last's."""
        if self.first_issued_at is None or self.last_issued_at is None:
            return None
        return (self.last_issued_at - self.first_issued_at).total_seconds()


def _ends(value: datetime) -> datetime | None:
    # asyncpg hands 'infinity' back as a naive datetime.max: an open-ended campaign.
    if value.tzinfo is None or value.year >= 9999:
        return None
    return value


def _campaign(row: Any, campaign_id: str) -> CampaignRow:
    return CampaignRow(
        id=campaign_id,
        total_coupons=int(row["total_coupons"]),
        issued_count=int(row["issued_count"]),
        starts_at=row["starts_at"],
        ends_at=_ends(row["ends_at"]),
    )


async def read_campaign(db: Database, campaign_id: str) -> CampaignRow | None:
    row = await db.fetchrow(
        "SELECT total_coupons, issued_count, starts_at, ends_at FROM campaigns WHERE id = $1",
        uuid.UUID(campaign_id),
    )
    return None if row is None else _campaign(row, campaign_id)


async def read_coupons(db: Database, campaign_id: str) -> list[StoredCoupon]:
    """The campaign's coupons, in issue order."""
    rows = await db.fetch(
        "SELECT user_id, code, issued_at, slot FROM coupons WHERE campaign_id = $1 ORDER BY id",
        uuid.UUID(campaign_id),
    )
    return [StoredCoupon(r["user_id"], r["code"], r["issued_at"], int(r["slot"])) for r in rows]


async def codes_held_elsewhere(db: Database, campaign_id: str) -> list[str]:
    """I2 is global: codes of this campaign that a coupon of another campaign has too."""
    rows = await db.fetch(
        "SELECT DISTINCT k.code FROM coupons k"
        "  JOIN coupons o ON o.code = k.code AND o.campaign_id <> k.campaign_id"
        " WHERE k.campaign_id = $1",
        uuid.UUID(campaign_id),
    )
    return [r["code"] for r in rows]


_SUMMARY = """
SELECT c.total_coupons, c.issued_count, c.starts_at, c.ends_at,
       count(k.id) AS rows,
       count(DISTINCT k.code) AS codes,
       count(DISTINCT k.user_id) AS users,
       count(DISTINCT k.slot) AS slots,
       min(k.slot) AS min_slot,
       max(k.slot) AS max_slot,
       count(k.id) FILTER (WHERE k.issued_at < c.starts_at OR k.issued_at >= c.ends_at)
           AS outside,
       min(k.issued_at) AS first_issued_at,
       max(k.issued_at) AS last_issued_at
  FROM campaigns c LEFT JOIN coupons k ON k.campaign_id = c.id
 WHERE c.id = $1
 GROUP BY c.id
"""


class CampaignMissing(LookupError):
    """The campaign is not in the database audited."""


async def audit_campaign(
    db: Database, campaign_id: str, *, acknowledged: int | None = None
) -> Audit:
    row = await db.fetchrow(_SUMMARY, uuid.UUID(campaign_id))
    if row is None:
        raise CampaignMissing(f"campaign {campaign_id} is not in the database")
    elsewhere = await codes_held_elsewhere(db, campaign_id)
    return Audit(
        campaign=_campaign(row, campaign_id),
        rows=int(row["rows"]),
        distinct_codes=int(row["codes"]),
        distinct_users=int(row["users"]),
        distinct_slots=int(row["slots"]),
        min_slot=row["min_slot"],
        max_slot=row["max_slot"],
        outside_window=int(row["outside"]),
        codes_elsewhere=len(elsewhere),
        first_issued_at=row["first_issued_at"],
        last_issued_at=row["last_issued_at"],
        acknowledged=acknowledged,
    )


async def duplicate_codes_anywhere(db: Database) -> int:
    """I2 over the whole table, every campaign: codes stored more than once."""
    row = await db.fetchrow(
        "SELECT count(*) AS n FROM (SELECT code FROM coupons GROUP BY code HAVING count(*) > 1) d"
    )
    return int(row["n"])


def violations(findings: Sequence[Finding]) -> list[str]:
    return [f"{f.name}: {f.rule} ({f.detail})" for f in findings if not f.ok]
