"""The run's settings, and the campaign it targets: created for the run or an existing one."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyqwest
from connectrpc.code import Code
from connectrpc.codec import proto_json_codec
from connectrpc.errors import ConnectError
from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from coupon.entrypoints.reach import (
    cannot_reach,
    not_the_service,
    serves_something_else,
    unreachable,
)
from coupon.entrypoints.settings import without_password
from coupon.gen.coupon.v1 import coupon_pb
from coupon.gen.coupon.v1.coupon_connect import CouponServiceClient
from coupon_loadtest.clock import (
    ClockOffset,
    ClockSample,
    from_http_date,
    iso_ms,
    shortest_round_trip,
)
from coupon_loadtest.verify import Plan

NS_PER_S = 1_000_000_000
MAX_PAGE_SIZE = 10_000
# GetCampaign round trips that sample the server's clock: NTP keeps the best of 8 as well.
CLOCK_SAMPLES = 8


class SetupError(Exception):
    """The run cannot start; the message says what to change."""


@dataclass(frozen=True)
class LoadConfig:
    url: str
    coupons: int
    users: int
    start_in_s: float
    campaign_id: str | None
    rate: float | None
    concurrency: int | None
    duration_s: float | None
    tail_s: float
    max_duration_s: float
    processes: int
    json: bool
    admin_token: str
    database_url: str | None
    report_path: str
    chart_path: str | None
    quiet: bool
    repeat_fraction: float
    timeout_s: float
    max_inflight: int
    max_lag_ms: float
    seed: int
    name: str
    # The crowd model (herd.py) instead of a rate or a concurrency.
    herd: bool = False
    spread_s: float = 1.0
    patience_s: float = 10.0
    retry_floor_s: float = 0.05
    retry_cap_s: float = 2.0
    connections: int = 512  # over all processes
    # The PEM file of the CAs to trust over https:// instead of the system's (--cacert).
    ca_file: str | None = None

    @property
    def open_loop(self) -> bool:
        return self.concurrency is None and not self.herd

    @property
    def load_model(self) -> str:
        return "herd" if self.herd else ("open" if self.open_loop else "closed")


@dataclass(frozen=True)
class Target:
    plan: Plan
    clock: ClockOffset
    created: bool
    name: str


def timestamp_ns(ts: Timestamp | None) -> int | None:
    return None if ts is None else ts.seconds * NS_PER_S + ts.nanos


def to_timestamp(ns: int) -> Timestamp:
    return Timestamp(seconds=ns // NS_PER_S, nanos=ns % NS_PER_S)


def _explain(exc: BaseException, url: str, what: str, *, token_sent: bool) -> SetupError:
    reason = unreachable(exc, url)
    if reason is not None:
        return SetupError(cannot_reach(url, reason))
    if serves_something_else(exc):
        return SetupError(not_the_service(url))
    if isinstance(exc, ConnectError):
        if exc.code is Code.UNAUTHENTICATED and token_sent:
            # A token the service does not take is not reported as none at all.
            return SetupError(
                f"{what}: the server does not take the admin token given: check "
                "--admin-token or COUPON_ADMIN_TOKEN"
            )
        if exc.code is Code.UNAUTHENTICATED:
            return SetupError(
                f"{what}: the server wants an admin token: pass --admin-token or set "
                "COUPON_ADMIN_TOKEN"
            )
        return SetupError(f"{what}: {exc.code.value}: {without_password(exc.message, url)}")
    return SetupError(f"{what}: {type(exc).__name__}: {without_password(str(exc), url)}")


class AdminApi:
    """CreateCampaign and GetCampaign, with the admin token; not on the hot path."""

    def __init__(
        self,
        url: str,
        *,
        admin_token: str,
        json: bool,
        timeout_s: float,
        ca_file: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        ca_pem = None if ca_file is None else Path(ca_file).read_bytes()
        self._transport = pyqwest.HTTPTransport(
            timeout=timeout_s, tls_ca_cert=ca_pem, tls_include_system_certs=ca_pem is None
        )
        self._http = pyqwest.Client(self._transport)
        self._client = CouponServiceClient(
            self.url,
            http_client=self._http,
            codec=proto_json_codec() if json else None,
            send_compression=None,
        )
        self._headers: Mapping[str, str] = (
            {"authorization": f"Bearer {admin_token}"} if admin_token else {}
        )
        self._json = json

    def _failure(self, exc: BaseException, what: str) -> SetupError:
        return _explain(exc, self.url, what, token_sent=bool(self._headers))

    async def aclose(self) -> None:
        await self._client.close()
        await self._transport.aclose()

    async def create_campaign(
        self, name: str, total_coupons: int, starts_at_ns: int
    ) -> tuple[coupon_pb.Campaign, ClockSample]:
        """The campaign, and its created_at as a sample of the server's clock."""
        request = coupon_pb.CreateCampaignRequest(
            name=name, total_coupons=total_coupons, starts_at=to_timestamp(starts_at_ns)
        )
        sent = time.time_ns()
        try:
            response = await self._client.create_campaign(request, headers=self._headers)
        except Exception as exc:
            raise self._failure(exc, "CreateCampaign failed") from exc
        received = time.time_ns()
        campaign = response.campaign
        created_at = timestamp_ns(None if campaign is None else campaign.created_at)
        if campaign is None or created_at is None:
            raise SetupError("CreateCampaign answered without a campaign or its created_at")
        return campaign, ClockSample(sent, created_at, received, "CreateCampaign.created_at")

    async def service_clock_samples(self, count: int) -> list[ClockSample]:
        """ListCampaigns' server_time (a page of one campaign, so it needs no campaign of
        its own) against our send and receipt times; none from a server that does not
        send it or does not serve ListCampaigns."""
        request = coupon_pb.ListCampaignsRequest(page_size=1)

        async def ask() -> Timestamp | None:
            try:
                response = await self._client.list_campaigns(request, headers=self._headers)
            except ConnectError as exc:
                if exc.code is Code.UNIMPLEMENTED:
                    return None
                raise
            stamp: Timestamp | None = response.server_time
            return stamp

        return await self._server_times(count, ask, "ListCampaigns.server_time")

    async def get_page(
        self, campaign_id: str, page_token: str = "", page_size: int = MAX_PAGE_SIZE
    ) -> coupon_pb.GetCampaignResponse:
        request = coupon_pb.GetCampaignRequest(
            campaign_id=campaign_id, page_size=page_size, page_token=page_token
        )
        try:
            return await self._client.get_campaign(request, headers=self._headers)
        except Exception as exc:
            raise self._failure(exc, f"GetCampaign {campaign_id} failed") from exc

    async def list_campaign(
        self, campaign_id: str
    ) -> tuple[coupon_pb.Campaign, list[coupon_pb.Coupon]]:
        """The campaign and every coupon it lists, all pages."""
        coupons: list[coupon_pb.Coupon] = []
        token = ""
        campaign: coupon_pb.Campaign | None = None
        while True:
            page = await self.get_page(campaign_id, token)
            campaign = page.campaign or campaign
            coupons.extend(page.coupons)
            token = page.next_page_token
            if not token:
                break
        if campaign is None:
            raise SetupError(f"GetCampaign {campaign_id} answered without a campaign")
        return campaign, coupons

    async def check_access(self) -> None:
        """Fail fast on a wrong URL or token, before any worker sends anything.

        Asks for a campaign that cannot exist: not_found proves the server is there and the
        token is accepted, without creating anything.
        """
        try:
            await self._client.get_campaign(
                coupon_pb.GetCampaignRequest(campaign_id="00000000-0000-0000-0000-000000000000"),
                headers=self._headers,
            )
        except ConnectError as exc:
            if exc.code in (Code.NOT_FOUND, Code.INVALID_ARGUMENT):
                return
            raise self._failure(exc, "cannot use the admin API") from exc
        except Exception as exc:
            raise self._failure(exc, "cannot use the admin API") from exc

    async def clock_samples(self, campaign_id: str, count: int) -> list[ClockSample]:
        """GetCampaign's server_time (the service's one clock) against our send and receipt
        times, `count` times in a row; none from a server that does not send server_time."""
        request = coupon_pb.GetCampaignRequest(campaign_id=campaign_id, page_size=1)

        async def ask() -> Timestamp | None:
            response = await self._client.get_campaign(request, headers=self._headers)
            stamp: Timestamp | None = response.server_time
            return stamp

        return await self._server_times(count, ask, "GetCampaign.server_time")

    async def _server_times(
        self, count: int, ask: Callable[[], Awaitable[Timestamp | None]], source: str
    ) -> list[ClockSample]:
        """`count` readings of the service's clock by `ask`, each between our send and
        receipt times; none when one of them has no time."""
        samples: list[ClockSample] = []
        for _ in range(count):
            sent = time.time_ns()
            try:
                stamp = await ask()
            except Exception as exc:
                raise self._failure(exc, "clock probe failed") from exc
            received = time.time_ns()
            server = timestamp_ns(stamp)
            if server is None:
                return []
            samples.append(ClockSample(sent, server, received, source))
        return samples

    async def clock_from_date_header(self, campaign_id: str) -> ClockOffset:
        """A coarse offset, for a server that stamps no clock of its own in GetCampaign."""
        body = coupon_pb.GetCampaignRequest(campaign_id=campaign_id, page_size=1)
        headers = dict(self._headers)
        headers["content-type"] = "application/json" if self._json else "application/proto"
        payload = body.to_json().encode() if self._json else body.to_binary()
        sent = time.time_ns()
        try:
            response = await self._http.post(
                f"{self.url}/coupon.v1.CouponService/GetCampaign", headers, payload
            )
        except Exception as exc:
            raise self._failure(exc, "clock probe failed") from exc
        received = time.time_ns()
        try:
            server = email.utils.parsedate_to_datetime(response.headers.get("date", ""))
        except (TypeError, ValueError):
            # No sample of the server's clock at all: assume the clocks agree, but only to
            # within a minute, so client receipt times cannot condemn the server.
            return ClockOffset(0, 60 * NS_PER_S, "none: no usable Date header")
        return from_http_date(sent, received, int(server.timestamp()), "HTTP Date header")

    async def estimate_clock(
        self, campaign_id: str, earlier: Sequence[ClockSample] = ()
    ) -> ClockOffset:
        """The server's clock from the tightest of `earlier` samples and GetCampaign's; from
        the Date header only when there is no sample at all."""
        samples = [*earlier, *await self.clock_samples(campaign_id, CLOCK_SAMPLES)]
        if samples:
            return shortest_round_trip(samples)
        return await self.clock_from_date_header(campaign_id)


async def prepare(config: LoadConfig, api: AdminApi) -> Target:
    """Create the run's campaign (starting start_in_s from now) or read the one targeted."""
    await api.check_access()
    if config.campaign_id is None:
        # --start-in counts from the service's now, which opens the window, not from this
        # machine's clock: one that is seconds off would open the campaign before the load
        # could probe it, or leave the load waiting. A server that stamps no time leaves
        # only this machine's clock.
        early = await api.service_clock_samples(CLOCK_SAMPLES // 2)
        offset_ns = shortest_round_trip(early).offset_ns if early else 0
        starts_at_ns = time.time_ns() + offset_ns + round(config.start_in_s * NS_PER_S)
        campaign, created = await api.create_campaign(config.name, config.coupons, starts_at_ns)
        # created_at stays a candidate, but its round trip holds a PostgreSQL commit: the
        # read-only probes are usually several times tighter.
        clock = await api.estimate_clock(campaign.id, [*early, created])
        starts = timestamp_ns(campaign.starts_at)
        plan = Plan(
            campaign_id=campaign.id,
            total_coupons=campaign.total_coupons,
            starts_at_ns=starts if starts is not None else starts_at_ns,
            ends_at_ns=timestamp_ns(campaign.ends_at),
        )
        return Target(plan, clock, created=True, name=campaign.name)
    campaign, coupons = await api.list_campaign(config.campaign_id)
    starts = timestamp_ns(campaign.starts_at)
    if starts is None:
        raise SetupError(f"campaign {config.campaign_id} has no starts_at")
    refuse_unloadable(config, campaign)
    plan = Plan(
        campaign_id=campaign.id,
        total_coupons=campaign.total_coupons,
        starts_at_ns=starts,
        ends_at_ns=timestamp_ns(campaign.ends_at),
        baseline_codes=frozenset(c.code for c in coupons),
    )
    clock = await api.estimate_clock(campaign.id)
    if not config.herd:
        # A burst runs for --duration or at most --max-duration from now: a campaign that
        # opens later would see nothing but refusals, and verify nothing.
        run_for_s = config.duration_s if config.duration_s is not None else config.max_duration_s
        opens_in_s = (starts - clock.offset_ns - time.time_ns()) / NS_PER_S
        if opens_in_s >= run_for_s:
            raise SetupError(
                f"campaign {campaign.id} opens in {opens_in_s:,.0f} s, after the load would "
                f"stop ({run_for_s:g} s): raise --max-duration or --duration, or load it "
                "closer to its start"
            )
    return Target(plan, clock, created=False, name=campaign.name)


def refuse_unloadable(config: LoadConfig, campaign: coupon_pb.Campaign) -> None:
    """An existing campaign that can issue nothing more (ended, or sold out) is refused at
    set-up: a load on it would only be refused, and its checks would judge the refusals."""
    status = campaign.status
    if status == coupon_pb.CampaignStatus.ENDED:
        ended = timestamp_ns(campaign.ended_at) or timestamp_ns(campaign.ends_at)
        when = "" if ended is None else f" at {iso_ms(ended)}"
        raise SetupError(
            f"campaign {campaign.id} has ended{when}: it issues nothing more; load a "
            "scheduled or active campaign, or let the tool create one (no --campaign-id)"
        )
    if status == coupon_pb.CampaignStatus.SOLD_OUT or (
        campaign.total_coupons and campaign.issued_count >= campaign.total_coupons
    ):
        raise SetupError(
            f"campaign {campaign.id} is sold out ({campaign.issued_count:,} of "
            f"{campaign.total_coupons:,} issued): it issues nothing more; load a scheduled "
            "or active campaign, or let the tool create one (no --campaign-id)"
        )
