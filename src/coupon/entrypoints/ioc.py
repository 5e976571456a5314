"""dishka providers: the only place that knows which adapter serves which port."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator

import asyncpg
from dishka import (
    AsyncContainer,
    Provider,
    Scope,
    from_context,
    make_async_container,
    provide,
)
from redis.exceptions import ResponseError as RedisResponseError

from coupon.adapters.memory.live_stats import MemoryLiveStats
from coupon.adapters.memory.store import (
    MemoryCampaignRepository,
    MemoryCodeGenerator,
    MemoryCouponLedger,
    MemoryStockGate,
    MemoryStore,
    SystemClock,
)
from coupon.adapters.postgres.campaigns import PostgresCampaignRepository
from coupon.adapters.postgres.ledger import PostgresCodeGenerator, PostgresCouponLedger
from coupon.adapters.postgres.migrate import current_version, latest_version
from coupon.adapters.postgres.pool import close_pool, create_pool, warm
from coupon.adapters.redis.client import (
    QueueingRedisCluster,
    RedisClient,
    answers,
    create_client,
)
from coupon.adapters.redis.clock import RedisClock
from coupon.adapters.redis.live_stats import RedisLiveStats
from coupon.adapters.redis.stock_gate import RedisStockGate
from coupon.application.clocks import ReadingClock
from coupon.application.issue import IssueCoupon
from coupon.application.live import LiveTally, WatchCampaign
from coupon.application.operations import (
    EndCampaign,
    ExportCoupons,
    ListCampaigns,
    ListUserCoupons,
)
from coupon.application.ports import (
    CampaignRepository,
    Clock,
    CodeGenerator,
    CouponLedger,
    LiveStats,
    StockGate,
    ViewClock,
)
from coupon.application.refusals import RefusalMemory
from coupon.application.use_cases import CampaignDirectory, CreateCampaign, GetCampaign
from coupon.entrypoints.connect_service import AdminGuard, CouponService, Operations
from coupon.entrypoints.dashboard import Dashboard
from coupon.entrypoints.health import NotReady, Readiness, read_only_replica, refuses_writes
from coupon.entrypoints.metrics import Metrics, get_metrics
from coupon.entrypoints.overload import Doorman
from coupon.entrypoints.settings import Settings

log = logging.getLogger("coupon")


class MemoryProvider(Provider):
    scope = Scope.APP

    @provide
    def store(self) -> MemoryStore:
        return MemoryStore()

    campaigns = provide(MemoryCampaignRepository, provides=CampaignRepository)

    @provide
    def ledger(self, store: MemoryStore, metrics: Metrics) -> CouponLedger:
        return MemoryCouponLedger(store, on_issued=metrics.observe_issued)

    clock = provide(SystemClock, provides=Clock)

    @provide
    def gate(self, clock: Clock, settings: Settings) -> StockGate:
        return MemoryStockGate(
            clock,
            lease_seconds=settings.pending_lease_seconds,
            reissue_delay_seconds=reissue_delay(settings),
        )

    @provide
    def codes(self) -> CodeGenerator:
        return MemoryCodeGenerator()

    @provide
    def readiness(self) -> Readiness:
        return Readiness({})

    live_stats = provide(MemoryLiveStats, provides=LiveStats)


class StorageProvider(Provider):
    """PostgreSQL as the source of truth, Redis as the admission gate."""

    scope = Scope.APP

    @provide
    async def pool(self, settings: Settings, metrics: Metrics) -> AsyncIterator[asyncpg.Pool]:
        pool = await create_pool(settings.database_url, settings.db_pool_size)
        warming = asyncio.ensure_future(warm(pool, settings.db_pool_size))
        try:
            with metrics.watch_pool(pool):
                yield pool
        finally:
            warming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await warming
            await close_pool(pool)

    @provide
    async def redis(self, settings: Settings) -> AsyncIterator[RedisClient]:
        client = create_client(settings.redis_url)
        try:
            yield client
        finally:
            await client.aclose()

    campaigns = provide(PostgresCampaignRepository, provides=CampaignRepository)

    @provide
    async def ledger(
        self, pool: asyncpg.Pool, settings: Settings, metrics: Metrics
    ) -> AsyncIterator[CouponLedger]:
        ledger = PostgresCouponLedger(
            pool,
            max_batch=settings.max_batch,
            observer=metrics.observe_batch,
            on_issued=metrics.observe_issued,
        )
        ledger.start()
        try:
            yield ledger
        finally:
            # Commit what is queued before the pool closes: graceful shutdown loses nothing.
            await ledger.close()

    @provide
    def clock(self, client: RedisClient) -> Clock:
        return RedisClock(client)

    @provide
    async def gate(self, client: RedisClient, settings: Settings) -> AsyncIterator[StockGate]:
        gate = RedisStockGate(
            client,
            prefix=settings.redis_prefix,
            lease_seconds=settings.pending_lease_seconds,
            reissue_delay_seconds=reissue_delay(settings),
        )
        try:
            yield gate
        finally:
            await gate.close()

    @provide
    async def codes(self, pool: asyncpg.Pool) -> AsyncIterator[CodeGenerator]:
        codes = PostgresCodeGenerator(pool)
        # Reserve the first block now rather than at the first issue; owned here, so a
        # shutdown during start-up does not leave it running.
        warming = asyncio.ensure_future(codes.warm())
        try:
            yield codes
        finally:
            warming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await warming

    @provide
    def readiness(self, pool: asyncpg.Pool, client: RedisClient) -> Readiness:
        async def postgres() -> None:
            async with pool.acquire(timeout=2) as conn:
                version = await current_version(conn)
                read_only = await conn.fetchval("SELECT current_setting('transaction_read_only')")
            if read_only == "on":
                # Sessions keep what they opened with: new ones, to see when it is writable.
                await pool.expire_connections()
                raise NotReady(
                    "read-only (a standby, or default_transaction_read_only): "
                    "coupons cannot be recorded"
                )
            if version < latest_version():
                raise NotReady(
                    f"schema version {version}, expected {latest_version()}: being applied "
                    "(coupon serve applies it once PostgreSQL answers; or run coupon migrate)"
                )

        async def info(section: str) -> dict[str, object]:
            try:
                return dict(await client.info(section))
            except RedisResponseError:
                # A user the ACL does not let run INFO (or INFO renamed away): PING
                # decides, as without these checks.
                return {}

        async def redis() -> None:
            try:
                try:
                    await answers(client, timeout=1.5)  # within the check's 2 s
                except TimeoutError:
                    raise NotReady("no answer within 1.5 s") from None
                if not isinstance(client, QueueingRedisCluster):
                    refusal = refuses_writes(await info("memory")) or read_only_replica(
                        await info("replication")
                    )
                    if refusal:
                        raise NotReady(refusal)
            except RedisResponseError as exc:
                # Redis's own words (a REDIS_DB beyond its databases, a refused password,
                # a dataset still loading) name no address, and say what to fix.
                raise NotReady(f"{type(exc).__name__}: {exc}") from exc

        return Readiness({"postgres": postgres, "redis": redis})

    @provide
    def live_stats(self, client: RedisClient, settings: Settings) -> LiveStats:
        return RedisLiveStats(client, prefix=settings.redis_prefix)


class ApplicationProvider(Provider):
    scope = Scope.APP

    settings = from_context(provides=Settings, scope=Scope.APP)

    @provide
    def directory(self, campaigns: CampaignRepository) -> CampaignDirectory:
        return CampaignDirectory(campaigns)

    @provide
    def view_clock(self, clock: Clock) -> ViewClock:
        return ReadingClock(clock)

    create = provide(CreateCampaign)
    get = provide(GetCampaign)

    @provide
    async def refusals(
        self, ledger: CouponLedger, gate: StockGate, settings: Settings
    ) -> AsyncIterator[RefusalMemory]:
        memory = RefusalMemory(
            ledger,
            gate,
            seconds=settings.refusal_memory_ms / 1000,
            max_holders=settings.holder_filter_max,
        )
        try:
            yield memory
        finally:
            await memory.close()

    @provide
    async def issue(
        self,
        gate: StockGate,
        ledger: CouponLedger,
        codes: CodeGenerator,
        directory: CampaignDirectory,
        memory: RefusalMemory,
    ) -> AsyncIterator[IssueCoupon]:
        issue = IssueCoupon(gate, ledger, codes, directory, memory)
        try:
            yield issue
        finally:
            await issue.close()

    @provide
    def doorman(self, settings: Settings, metrics: Metrics) -> Iterator[Doorman]:
        ceiling = settings.max_in_flight
        doorman = Doorman(
            target_seconds=settings.target_latency_ms / 1000,
            initial=min(Doorman.INITIAL, ceiling),
            floor=min(Doorman.FLOOR, ceiling),
            ceiling=ceiling,
        )
        try:
            with metrics.watch_doorman(doorman):
                yield doorman
        finally:
            doorman.close()

    @provide
    def admin(self, settings: Settings) -> AdminGuard:
        return AdminGuard(settings.admin_token)

    @provide
    async def metrics(self) -> AsyncIterator[Metrics]:
        metrics = get_metrics()
        async with metrics.flushing():
            yield metrics

    list_campaigns = provide(ListCampaigns)
    end_campaign = provide(EndCampaign)
    list_user_coupons = provide(ListUserCoupons)
    export_coupons = provide(ExportCoupons)
    operations = provide(Operations)
    watch = provide(WatchCampaign)

    @provide
    async def live_tally(self, stats: LiveStats) -> AsyncIterator[LiveTally]:
        tally = LiveTally()
        async with tally.flushing(stats):
            yield tally

    @provide
    def service(
        self,
        create: CreateCampaign,
        get: GetCampaign,
        issue: IssueCoupon,
        admin: AdminGuard,
        metrics: Metrics,
        operations: Operations,
        live: LiveTally,
        doorman: Doorman,
        settings: Settings,
    ) -> CouponService:
        return CouponService(
            create,
            get,
            issue,
            admin,
            metrics,
            operations,
            live,
            doorman,
            deadline_seconds=settings.request_deadline_ms / 1000,
        )

    dashboard = provide(Dashboard)


def reissue_delay(settings: Settings) -> float:
    """A slot given back becomes issuable only after every process's memory of "sold out"
    has expired (see RefusalMemory); the margin covers the processes' clocks ticking apart
    over that time. Every process of a deployment must use the same setting."""
    return settings.refusal_memory_ms / 1000 + 0.1


def make_container(settings: Settings) -> AsyncContainer:
    backend = MemoryProvider() if settings.backend == "memory" else StorageProvider()
    return make_async_container(ApplicationProvider(), backend, context={Settings: settings})
