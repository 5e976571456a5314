"""The durable coupon ledger, with group commit.

Concurrent `record` calls are gathered into one INSERT (one transaction, one fsync), so
throughput is not capped by the disk's fsync rate. A call returns only after its row's
transaction has committed (I5).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from datetime import datetime

import asyncpg

from coupon.adapters.postgres.campaigns import campaign_from_row
from coupon.adapters.postgres.pool import (
    COMMAND_TIMEOUT_SECONDS,
    POOL_TIMEOUT_SECONDS,
    KeptConnection,
    connection,
)
from coupon.application.ports import (
    ConstraintViolation,
    CouponPage,
    Handoff,
    Recorded,
    RecordOutcome,
    Settles,
    UserCouponPage,
)
from coupon.domain.campaign import Campaign
from coupon.domain.codes import CodeCipher
from coupon.domain.coupon import Coupon
from coupon.domain.errors import Unavailable

log = logging.getLogger("coupon")

# Stock and window come from the campaign row itself, so the coupons' CHECK constraints
# compare against the real campaign, not against what the caller claims. Rows of unknown
# campaigns drop out of the join.
#
# A batch names few campaigns and few times (every coupon of one admission batch has the
# same issued_at), so each is sent once ($1, $7) and rows point at them by position:
# encoding a timestamptz costs asyncpg 1.4 us and a uuid 0.5 us, per element. The rows'
# positions, slots and codes (digits; Hangul and digits) go as comma-separated text that
# PostgreSQL splits: asyncpg checks each element of an array parameter against
# collections.abc's Iterable and Sized (for nested arrays) before encoding it, which cost
# more than the joining (100-row batches: 176 against 121 us of client CPU, and no more
# time in PostgreSQL). User ids may hold commas; they stay an array.
_INSERT_BATCH = """
INSERT INTO coupons (campaign_id, total_coupons, starts_at, ends_at, slot, code, user_id,
                     issued_at)
SELECT c.id, c.total_coupons, c.starts_at, c.ends_at, r.slot, r.code, r.user_id,
       ($7::timestamptz[])[r.issued]
  FROM unnest(string_to_array($2, ',')::int[], string_to_array($3, ',')::bigint[],
              string_to_array($4, ','), $5::text[], string_to_array($6, ',')::int[])
       AS r(campaign, slot, code, user_id, issued)
  JOIN campaigns c ON c.id = ($1::uuid[])[r.campaign]
{then}
"""
# The common batch conflicts with nothing (Redis admits each user and slot once), and a
# plain insert costs PostgreSQL a quarter less per row than one that must skip conflicts
# (speculative insertion into every unique index): 23-25 against 29-32 us per row in
# 30-row batches. A batch that does conflict fails as a whole and goes again, skipping. A
# plain insert that succeeded stored every row whose campaign exists: its row count says
# whether all went in, with no RETURNING rows to decode.
_INSERT = _INSERT_BATCH.format(then="")
_INSERT_SKIPPING_CONFLICTS = _INSERT_BATCH.format(then="ON CONFLICT DO NOTHING RETURNING code")
_PRESENT = "SELECT code FROM coupons WHERE code = ANY($1::text[])"
_COUPON_COLUMNS = "code, campaign_id, user_id, issued_at, slot"
_BY_USER = f"SELECT {_COUPON_COLUMNS} FROM coupons WHERE campaign_id = $1 AND user_id = $2"
_BY_USERS = f"""
SELECT {_COUPON_COLUMNS} FROM coupons
 WHERE (campaign_id, user_id) IN (SELECT * FROM unnest($1::uuid[], $2::text[]))
"""
_SLOT_TAKEN = """
SELECT r.campaign_id, r.slot FROM unnest($1::uuid[], $2::bigint[]) AS r(campaign_id, slot)
 WHERE EXISTS (SELECT 1 FROM coupons c WHERE c.campaign_id = r.campaign_id AND c.slot = r.slot)
"""
_PAGE = f"""
SELECT id, {_COUPON_COLUMNS} FROM coupons
 WHERE campaign_id = $1 AND id > $2 ORDER BY id LIMIT $3
"""
# The campaign and a page of its coupons in one statement, so from one snapshot: the
# issued count is that of the coupons listed (a row with no coupon when the page is empty).
_CAMPAIGN_PAGE = f"""
SELECT c.id, c.name, c.total_coupons, c.issued_count, c.starts_at, c.ends_at, c.created_at,
       c.ended_at, p.id AS position, p.code, p.campaign_id, p.user_id, p.issued_at, p.slot
  FROM campaigns c
  LEFT JOIN LATERAL (
       SELECT id, {_COUPON_COLUMNS} FROM coupons
        WHERE campaign_id = c.id AND id > $2 ORDER BY id LIMIT $3
  ) p ON true
 WHERE c.id = $1
 ORDER BY p.id
"""
_HOLDINGS = f"SELECT {_COUPON_COLUMNS} FROM coupons WHERE campaign_id = $1"
_HOLDERS = "SELECT user_id FROM coupons WHERE campaign_id = $1"
_BY_USERS_OF = f"""
SELECT {_COUPON_COLUMNS} FROM coupons WHERE campaign_id = $1 AND user_id = ANY($2::text[])
"""
# Rows per chunk when reading a whole campaign (a rebuild, the holders of a sold-out one).
READ_CHUNK = 20_000
# One range of the one-per-user constraint (user_id, campaign_id), read backwards.
_USER_COUPONS = f"""
SELECT {_COUPON_COLUMNS} FROM coupons
 WHERE user_id = $1 AND campaign_id < coalesce($2, 'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid)
 ORDER BY campaign_id DESC LIMIT $3
"""


_RECORDED = Recorded(RecordOutcome.RECORDED)


def _insert_arguments(coupons: Sequence[Coupon]) -> tuple[object, ...]:
    campaigns: dict[str, int] = {}  # campaign id -> its position in $1, from 1
    times: dict[datetime, int] = {}  # issued_at -> its position in $7
    campaign_of = [campaigns.setdefault(c.campaign_id, len(campaigns) + 1) for c in coupons]
    issued_at = [times.setdefault(c.issued_at, len(times) + 1) for c in coupons]
    return (
        # Campaign ids are canonical UUID text already; asyncpg encodes str as uuid.
        list(campaigns),
        _joined(campaign_of, len(campaigns)),
        ",".join([str(c.slot) for c in coupons]),
        # Codes are the code cipher's: Hangul syllables and digits, never a comma.
        ",".join([c.code for c in coupons]),
        [c.user_id for c in coupons],
        _joined(issued_at, len(times)),
        list(times),
    )


def _joined(positions: list[int], distinct: int) -> str:
    """Positions from 1, comma-separated; in the usual batch all are 1 (one campaign, one
    issue time)."""
    if distinct == 1:
        return ",".join(["1"] * len(positions))
    return ",".join([str(p) for p in positions])


def coupon_from_row(row: asyncpg.Record, campaign_id: str | None = None) -> Coupon:
    """`campaign_id`: the row's, as text, when the caller knows it (reading a whole
    campaign: made once, not once a row)."""
    return Coupon(
        code=row["code"],
        campaign_id=campaign_id or str(row["campaign_id"]),
        user_id=row["user_id"],
        issued_at=row["issued_at"],
        slot=row["slot"],
    )


BatchObserver = Callable[[int, float], None]
# Told the coupons a commit newly recorded, per campaign: (campaign id, how many).
IssuedObserver = Callable[[str, int], None]

# A coupon handed to the ledger is answered within this many seconds of being queued,
# however long PostgreSQL stalls: its batch's statement gives up after the command
# timeout, and waits for a pooled connection only as long as the coupon that has waited
# longest leaves room for. A coupon still queued behind a stuck commit once the command
# timeout no longer fits in its bound is answered `unavailable` unsent (nothing recorded:
# its slot goes back), rather than wait for that commit's time-out and then its own.
RECORD_BOUND_SECONDS = COMMAND_TIMEOUT_SECONDS + POOL_TIMEOUT_SECONDS
MAX_QUEUE_WAIT_SECONDS = RECORD_BOUND_SECONDS - COMMAND_TIMEOUT_SECONDS


class PostgresCouponLedger:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        max_batch: int = 512,
        # One commit in flight per process: while it runs, the next batch grows. With two,
        # batches were smaller and PostgreSQL spent a third more CPU per coupon (bench:
        # 45 -> 34 us per coupon, IssueCoupon 9,052 -> 10,207/s, p99 at 1,000/s unchanged).
        max_concurrent_batches: int = 1,
        observer: BatchObserver | None = None,
        on_issued: IssuedObserver | None = None,
    ) -> None:
        self._pool = pool
        self._commits = KeptConnection(pool)
        self._max_batch = max_batch
        # Each coupon with the moment it was queued (time.monotonic()).
        self._queue: list[tuple[Coupon, Settles[Recorded], float]] = []
        self._wakeup = asyncio.Event()
        self._batch_slots = asyncio.Semaphore(max_concurrent_batches)
        self._batches: set[asyncio.Task[None]] = set()
        self._observer = observer
        self._on_issued = on_issued
        # Look-ups by user waiting for their campaign's next query (see find_by_user).
        self._lookups: dict[str, list[tuple[str, asyncio.Future[Coupon | None]]]] = {}
        self._looking: set[str] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False
        # The loop the flusher runs on (see `start`): Python 3.11's get_running_loop() is
        # a getpid() system call, and `record` needs the loop for every coupon.
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        if self._flusher is None:
            self._loop = asyncio.get_running_loop()
            self._flusher = self._loop.create_task(self._flush_forever())

    async def close(self) -> None:
        """Commit everything queued, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._flusher is not None:
            await self._flusher
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)
        await self._commits.close()

    async def record(self, coupon: Coupon) -> Recorded:
        self.start()
        assert self._loop is not None
        future: asyncio.Future[Recorded] = self._loop.create_future()
        self._enqueue(coupon, future)
        return await future

    def record_soon(self, coupon: Coupon, handoff: Handoff[Recorded]) -> None:
        self.start()
        self._enqueue(coupon, handoff)

    def _enqueue(self, coupon: Coupon, decision: Settles[Recorded]) -> None:
        if self._closing and self._flusher is not None and self._flusher.done():
            decision.set_exception(Unavailable("the server is shutting down"))
            return
        self._queue.append((coupon, decision, time.monotonic()))
        self._wakeup.set()

    async def _flush_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                # While all batch slots are busy, requests keep queueing: the next batch
                # takes them all at once. That is the group commit.
                await self._batch_slots.acquire()
                now = time.monotonic()
                if self._queue[0][2] < now - MAX_QUEUE_WAIT_SECONDS:
                    self._expire(now - MAX_QUEUE_WAIT_SECONDS)
                    if not self._queue:
                        self._batch_slots.release()
                        break
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                task = loop.create_task(self._commit(batch))
                self._batches.add(task)
                task.add_done_callback(self._batch_done)
            if self._closing:
                return

    def _expire(self, queued_before: float) -> None:
        """Answer the coupons queued before `queued_before` (the queue's head: it is in
        the order queued) `unavailable`, unsent: the commits before them were stuck, and
        theirs would end past their bound."""
        count = 0
        for _, _, queued_at in self._queue:
            if queued_at >= queued_before:
                break
            count += 1
        expired = self._queue[:count]
        del self._queue[:count]
        error = Unavailable(
            "PostgreSQL is unavailable: the commits before this coupon's did not finish in"
            " time; nothing was recorded"
        )
        for _, decision, _ in expired:
            if not decision.done():
                decision.set_exception(error)
        log.warning("coupons not recorded: PostgreSQL is stuck", extra={"coupons": count})

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        self._batch_slots.release()

    async def _commit(self, batch: list[tuple[Coupon, Settles[Recorded], float]]) -> None:
        started = time.perf_counter()
        try:
            results = await self._record_batch(batch)
        except BaseException as exc:
            # Transient database failures arrive as Unavailable already (see `connection`).
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        if self._on_issued is not None:
            self._count_issued(batch, results)
        for (_, future, _), result in zip(batch, results, strict=True):
            if not future.done():
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        if self._observer is not None:
            self._observer(len(batch), time.perf_counter() - started)

    def _count_issued(
        self,
        batch: list[tuple[Coupon, Settles[Recorded], float]],
        results: list[Recorded | Exception],
    ) -> None:
        """Report the coupons the commit newly recorded, here where it settles: a coupon
        whose caller left meanwhile (its deadline passed, it disconnected) is issued all the
        same, and counts as well."""
        assert self._on_issued is not None
        counts: dict[str, int] = {}
        for (coupon, _, _), result in zip(batch, results, strict=True):
            if type(result) is Recorded and result.outcome is RecordOutcome.RECORDED:
                counts[coupon.campaign_id] = counts.get(coupon.campaign_id, 0) + 1
        for campaign_id, count in counts.items():
            self._on_issued(campaign_id, count)

    async def _record_batch(
        self, batch: list[tuple[Coupon, Settles[Recorded], float]]
    ) -> list[Recorded | Exception]:
        """One transaction for the batch; the outcome of each of its coupons."""
        coupons = [coupon for coupon, _, _ in batch]
        # What the oldest coupon's bound leaves beyond the statement's own time-out.
        room = batch[0][2] + MAX_QUEUE_WAIT_SECONDS - time.monotonic()
        async with self._commits.use(acquire_within=room) as conn:
            try:
                inserted = await self._insert_batch(conn, coupons)
            except asyncpg.IntegrityConstraintViolationError as exc:
                if len(coupons) == 1:
                    return [ConstraintViolation(f"{type(exc).__name__}: {exc}")]
                # A CHECK or the campaign check failed for some row: find which, one by one, so
                # that the others still commit.
                return [await self._record_alone(conn, c) for c in coupons]
            if inserted is None:
                return [_RECORDED] * len(coupons)
            return await self._explain_skipped(conn, coupons, inserted)

    async def _insert_batch(
        self, conn: asyncpg.Connection, coupons: Sequence[Coupon]
    ) -> set[str] | None:
        """Insert the batch: None when every row went in, else the codes of those that did."""
        try:
            stored = await self._insert_plainly(conn, coupons)
        except asyncpg.UniqueViolationError:
            # A user or slot recorded already (or a code): skip those rows, keep the others
            # (the caller then says why each skipped row was skipped).
            return await self._insert_skipping_conflicts(conn, coupons)
        if stored == len(coupons):
            return None
        # A campaign is unknown: its rows dropped out of the join.
        rows = await conn.fetch(_PRESENT, [c.code for c in coupons])
        return {row["code"] for row in rows}

    async def _insert_plainly(self, conn: asyncpg.Connection, coupons: Sequence[Coupon]) -> int:
        """Insert plainly (failing on any conflict); the number of rows stored."""
        status = await conn.execute(_INSERT, *_insert_arguments(coupons))
        return int(status.rsplit(" ", 1)[1])  # 'INSERT 0 <rows>'

    async def _insert_skipping_conflicts(
        self, conn: asyncpg.Connection, coupons: Sequence[Coupon]
    ) -> set[str]:
        """Insert skipping conflicting rows; the codes of the rows stored."""
        rows = await conn.fetch(_INSERT_SKIPPING_CONFLICTS, *_insert_arguments(coupons))
        return {row["code"] for row in rows}

    async def _record_alone(self, conn: asyncpg.Connection, coupon: Coupon) -> Recorded | Exception:
        try:
            inserted = await self._insert_skipping_conflicts(conn, [coupon])
        except asyncpg.IntegrityConstraintViolationError as exc:
            return ConstraintViolation(f"{type(exc).__name__}: {exc}")
        result = (await self._explain_skipped(conn, [coupon], inserted))[0]
        return result

    async def _explain_skipped(
        self, conn: asyncpg.Connection, coupons: Sequence[Coupon], inserted: set[str]
    ) -> list[Recorded | Exception]:
        """Say why each row that ON CONFLICT skipped was skipped."""
        recorded = _RECORDED
        skipped = [c for c in coupons if c.code not in inserted]
        if not skipped:
            return [recorded] * len(coupons)
        holders = {
            (str(row["campaign_id"]), row["user_id"]): coupon_from_row(row)
            for row in await conn.fetch(
                _BY_USERS,
                [uuid.UUID(c.campaign_id) for c in skipped],
                [c.user_id for c in skipped],
            )
        }
        taken = {
            (str(row["campaign_id"]), row["slot"])
            for row in await conn.fetch(
                _SLOT_TAKEN, [uuid.UUID(c.campaign_id) for c in skipped], [c.slot for c in skipped]
            )
        }
        results: list[Recorded | Exception] = []
        for coupon in coupons:
            if coupon.code in inserted:
                results.append(recorded)
                continue
            holder = holders.get((coupon.campaign_id, coupon.user_id))
            if holder is not None and holder.code != coupon.code:
                results.append(Recorded(RecordOutcome.USER_HAS_COUPON, holder))
            elif holder is not None:
                results.append(recorded)
            elif (coupon.campaign_id, coupon.slot) in taken:
                results.append(Recorded(RecordOutcome.SLOT_TAKEN))
            elif await conn.fetchval("SELECT 1 FROM coupons WHERE code = $1", coupon.code):
                results.append(Recorded(RecordOutcome.CODE_TAKEN))
            else:
                results.append(ConstraintViolation(f"campaign {coupon.campaign_id} not found"))
        return results

    async def find_by_user(self, campaign_id: str, user_id: str) -> Coupon | None:
        """Concurrent look-ups of one campaign share one query, one at a time per campaign:
        after a sell-out, every refusal is checked against the ledger until the process
        knows the campaign's holders, and a query per request would queue on the pool."""
        loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[Coupon | None] = loop.create_future()
        self._lookups.setdefault(campaign_id, []).append((user_id, future))
        if campaign_id not in self._looking:
            self._looking.add(campaign_id)
            task = loop.create_task(self._look_up(campaign_id))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)
        return await future

    async def _look_up(self, campaign_id: str) -> None:
        try:
            while waiting := self._lookups.pop(campaign_id, None):
                users = list({user for user, _ in waiting})
                try:
                    async with connection(self._pool) as conn:
                        rows = await conn.fetch(_BY_USERS_OF, uuid.UUID(campaign_id), users)
                except BaseException as exc:
                    for _, future in waiting:
                        if not future.done():
                            future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                found = {row["user_id"]: coupon_from_row(row) for row in rows}
                for user, future in waiting:
                    if not future.done():
                        future.set_result(found.get(user))
        finally:
            self._looking.discard(campaign_id)

    async def page(self, campaign_id: str, after: int, limit: int) -> CouponPage:
        async with connection(self._pool) as conn:
            rows = await conn.fetch(_PAGE, uuid.UUID(campaign_id), after, limit + 1)
        has_more = len(rows) > limit
        rows = rows[:limit]
        last = rows[-1]["id"] if rows else after
        return CouponPage([coupon_from_row(r) for r in rows], last, has_more)

    async def campaign_page(
        self, campaign_id: str, after: int, limit: int
    ) -> tuple[Campaign, CouponPage] | None:
        async with connection(self._pool) as conn:
            rows = await conn.fetch(_CAMPAIGN_PAGE, uuid.UUID(campaign_id), after, limit + 1)
        if not rows:
            return None
        campaign = campaign_from_row(rows[0])
        if rows[0]["position"] is None:
            return campaign, CouponPage([], after, has_more=False)
        has_more = len(rows) > limit
        rows = rows[:limit]
        coupons = [coupon_from_row(r, campaign.id) for r in rows]
        page = CouponPage(coupons, rows[-1]["position"], has_more)
        return campaign, page

    async def holdings(self, campaign_id: str) -> AsyncGenerator[Sequence[Coupon], None]:
        campaign = str(uuid.UUID(campaign_id))  # every row's, in the rows' spelling
        async with contextlib.aclosing(self._read_all(_HOLDINGS, campaign_id)) as chunks:
            async for rows in chunks:
                yield [coupon_from_row(r, campaign) for r in rows]

    async def holders(self, campaign_id: str) -> AsyncGenerator[Sequence[str], None]:
        async with contextlib.aclosing(self._read_all(_HOLDERS, campaign_id)) as chunks:
            async for rows in chunks:
                yield [r[0] for r in rows]

    async def _read_all(
        self, query: str, campaign_id: str
    ) -> AsyncGenerator[list[asyncpg.Record], None]:
        """A campaign's rows in chunks, from one snapshot, never all in memory at once. The
        connection stays checked out, in its transaction, while the read waits between
        chunks: a consumer that stops early closes it, or it waits so for good."""
        async with (
            connection(self._pool) as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            cursor = await conn.cursor(query, uuid.UUID(campaign_id))
            while rows := await cursor.fetch(READ_CHUNK):
                yield rows

    async def user_coupons(
        self, user_id: str, before_campaign: str | None, limit: int
    ) -> UserCouponPage:
        before = None if before_campaign is None else uuid.UUID(before_campaign)
        async with connection(self._pool) as conn:
            rows = await conn.fetch(_USER_COUPONS, user_id, before, limit + 1)
        return UserCouponPage([coupon_from_row(r) for r in rows[:limit]], len(rows) > limit)


class PostgresCodeGenerator:
    """Sequence numbers in blocks from one PostgreSQL sequence, shared by every process:
    no two processes ever hold the same number, and restarts only leave gaps."""

    BLOCK = 10_000

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        # Loaded on first use, so the server starts (and reports unready) while
        # PostgreSQL is down.
        self._encode: Callable[[int], str] | None = None
        self._next = 0
        self._end = 0
        self._refill: asyncio.Future[None] | None = None

    async def warm(self) -> None:
        """Load the key and reserve a block now rather than at the first issue."""
        with contextlib.suppress(Unavailable):
            await self._ensure_block()

    async def next_code(self) -> str:
        if self._next >= self._end:
            await self._ensure_block()
        code = self.code_now()
        assert code is not None  # a block is reserved, and the key is loaded with the first
        return code

    def code_now(self) -> str | None:
        if self._next >= self._end or self._encode is None:
            return None
        sequence = self._next
        self._next += 1
        return self._encode(sequence)

    async def _ensure_block(self) -> None:
        """Until a number is free: one reservation at a time, the others wait for it."""
        while self._next >= self._end:
            if self._refill is None:
                self._refill = asyncio.ensure_future(self._reserve_block())
                try:
                    await self._refill
                finally:
                    self._refill = None
            else:
                await asyncio.shield(self._refill)

    async def _reserve_block(self) -> None:
        if self._encode is None:
            self._encode = CodeCipher(await load_code_key(self._pool)).encode
        async with connection(self._pool) as conn:
            block = int(await conn.fetchval("SELECT nextval('coupon_code_blocks')"))
        self._next, self._end = block * self.BLOCK, (block + 1) * self.BLOCK


async def load_code_key(pool: asyncpg.Pool) -> bytes:
    async with connection(pool) as conn:
        key = await conn.fetchval("SELECT key FROM code_key WHERE id = 1")
    if key is None:
        raise RuntimeError("code_key is missing: run `coupon migrate`")
    return bytes(key)
