"""Bursts of IssueCoupon over real HTTP, and the verification of I1-I5 afterwards: what
every client saw, against GetCampaign and against PostgreSQL (through the load tool's
auditor). Used by the e2e and cluster tests and by `just cluster-demo`."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Generic, Protocol, TypeVar

import asyncpg
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from coupon.gen.coupon.v1 import coupon_pb
from coupon.gen.coupon.v1.coupon_connect import CouponServiceClient
from coupon_loadtest import audit
from harness.client import all_coupons, connect_client, retry_delay

ISSUED = "issued"
ALREADY = "already_issued"


class CampaignRef(Protocol):
    """What verification needs of a campaign."""

    @property
    def id(self) -> str: ...
    @property
    def total(self) -> int: ...
    @property
    def starts_at(self) -> datetime: ...


C = TypeVar("C", bound=CampaignRef)


@dataclass(frozen=True)
class Campaign:
    id: str
    total: int
    starts_at: datetime


@dataclass
class Outcome:
    instance: int
    campaign_id: str
    user: str
    sent_at: datetime
    received_at: datetime
    code: str = ""
    issued_at: datetime | None = None
    already: bool = False
    error: str = ""
    message: str = ""

    @property
    def kind(self) -> str:
        """`issued`, `already_issued`, or the Connect code of the error."""
        if self.code:
            return ALREADY if self.already else ISSUED
        return self.error


async def drive(
    urls: Sequence[str],
    requests: Sequence[tuple[str, str]],
    outcomes: list[Outcome],
    *,
    concurrency: int,
    pace: float = 0.0,
    time_limit: float = 30.0,
    timeout_ms: int = 10_000,
    retry_unavailable: int = 0,
) -> None:
    """IssueCoupon for every request, `concurrency` at a time, spread over every URL at
    once (worker i sends to urls[i % len(urls)]); stops early after `time_limit` seconds.
    With `retry_unavailable`, an `unavailable` answer is sent again up to that many times,
    after the delay it asks for, as a well-behaved client does; the last answer counts."""
    queue = list(reversed(requests))
    deadline = time.monotonic() + time_limit

    async def worker(index: int, client: CouponServiceClient) -> None:
        while queue and time.monotonic() < deadline:
            campaign_id, user = queue.pop()
            for attempt in range(retry_unavailable + 1):
                sent = datetime.now(UTC)
                outcome = Outcome(index % len(urls), campaign_id, user, sent, sent)
                delay: float | None = None
                try:
                    reply = await client.issue_coupon(
                        coupon_pb.IssueCouponRequest(campaign_id=campaign_id, user_id=user),
                        timeout_ms=timeout_ms,
                    )
                    assert reply.coupon is not None and reply.coupon.issued_at is not None
                    outcome.code = reply.coupon.code
                    outcome.issued_at = reply.coupon.issued_at.to_datetime()
                    outcome.already = reply.already_issued
                except ConnectError as exc:
                    outcome.error = exc.code.value
                    outcome.message = str(exc)
                    if exc.code is Code.UNAVAILABLE:
                        delay = retry_delay(exc)
                outcome.received_at = datetime.now(UTC)
                if delay is None or attempt == retry_unavailable:
                    break
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            outcomes.append(outcome)
            if pace:
                await asyncio.sleep(pace)

    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(connect_client(url)) for url in urls]
        await asyncio.gather(*(worker(i, clients[i % len(clients)]) for i in range(concurrency)))


@dataclass
class CampaignCheck(Generic[C]):
    campaign: C
    issued: int = 0  # rows in PostgreSQL
    listed: int = 0  # coupons GetCampaign lists
    issued_count: int = 0  # the campaign's issued_count from GetCampaign
    duplicate_codes: int = 0  # within the campaign, or held by another campaign too
    per_user_max: int = 0
    early: int = 0  # coupons issued before starts_at + successes received before it
    acked_missing: int = 0  # successes a client got that PostgreSQL does not have
    codes_mismatch: int = 0  # successes whose code differs from the stored one
    outcomes: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)


async def check_campaign(
    client: CouponServiceClient,
    pool: asyncpg.Pool,
    campaign: C,
    outcomes: Sequence[Outcome],
    *,
    token: str,
) -> CampaignCheck[C]:
    """I1-I4 from PostgreSQL (the load tool's auditor), then what the clients received
    (I3, I5) and what GetCampaign lists against the rows."""
    check = CampaignCheck(campaign)
    mine = [o for o in outcomes if o.campaign_id == campaign.id]
    check.outcomes = Counter(o.kind for o in mine)
    api_campaign, listed = await all_coupons(client, campaign.id, token)
    summary = await audit.audit_campaign(pool, campaign.id)
    rows = await audit.read_coupons(pool, campaign.id)
    stored = {r.user_id: r.code for r in rows}
    check.issued = summary.rows
    check.listed = len(listed)
    check.issued_count = int(api_campaign.issued_count)
    check.duplicate_codes = summary.rows - summary.distinct_codes + summary.codes_elsewhere
    check.per_user_max = max(Counter(r.user_id for r in rows).values(), default=0)
    successes = [o for o in mine if o.code]
    check.early = summary.outside_window
    check.early += sum(
        c.issued_at is not None and c.issued_at.to_datetime() < campaign.starts_at for c in listed
    )
    check.early += sum(o.received_at < campaign.starts_at for o in successes)
    check.acked_missing = sum(o.user not in stored for o in successes)
    check.codes_mismatch = sum(o.user in stored and stored[o.user] != o.code for o in successes)

    v = check.violations
    v += audit.violations(summary.findings())
    if check.early > summary.outside_window:
        v.append(f"I3: {check.early - summary.outside_window} successes before the start")
    if check.acked_missing or check.codes_mismatch:
        v.append(
            f"I5: {check.acked_missing} acknowledged coupons missing, "
            f"{check.codes_mismatch} with another code"
        )
    api_pairs = {(c.user_id, c.code) for c in listed}
    if api_pairs != set(stored.items()) or check.issued_count != len(rows):
        v.append("GetCampaign disagrees with the database")
    return check
