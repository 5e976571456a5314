"""The Connect service: thin, it translates, calls one use case, translates back."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from coupon.application.issue import IssueCoupon, Issued, Pending
from coupon.application.live import ALREADY_ISSUED, ISSUED, REFUSED, LiveTally
from coupon.application.operations import (
    SETTLE_WAIT_SECONDS,
    EndCampaign,
    ExportCoupons,
    ListCampaigns,
    ListUserCoupons,
)
from coupon.application.ports import AdmissionKind
from coupon.application.refusals import Remembered
from coupon.application.use_cases import CreateCampaign, GetCampaign
from coupon.domain.coupon import validate_campaign_id
from coupon.domain.errors import (
    AlreadyExists,
    CampaignEnded,
    CampaignNotFound,
    CampaignNotStarted,
    CouponError,
    InvalidArgument,
    OutcomeUnknown,
    Overloaded,
    SoldOut,
    Unauthenticated,
    Unavailable,
)
from coupon.domain.times import rfc3339
from coupon.entrypoints.logs import LogQuota, request_id
from coupon.entrypoints.metrics import CounterTally, Metrics
from coupon.entrypoints.overload import Doorman, RetryLater, retry_headers
from coupon.entrypoints.translate import (
    campaign_message,
    coupon_message,
    issue_response,
    status_filter,
    to_datetime,
    to_timestamp,
)
from coupon.gen.coupon.v1 import coupon_pb

log = logging.getLogger("coupon")

# Every domain error maps to one Connect code, here and nowhere else.
ERROR_CODES: dict[type[CouponError], Code] = {
    InvalidArgument: Code.INVALID_ARGUMENT,
    AlreadyExists: Code.ALREADY_EXISTS,
    CampaignNotFound: Code.NOT_FOUND,
    CampaignNotStarted: Code.FAILED_PRECONDITION,
    CampaignEnded: Code.FAILED_PRECONDITION,
    SoldOut: Code.RESOURCE_EXHAUSTED,
    Unauthenticated: Code.UNAUTHENTICATED,
    Unavailable: Code.UNAVAILABLE,
    OutcomeUnknown: Code.UNAVAILABLE,
    Overloaded: Code.UNAVAILABLE,
}

T = TypeVar("T")

# Failures worth a log line: the service's or a dependency's, not the caller's.
_LOGGED_FAILURES = frozenset({Code.INTERNAL, Code.UNKNOWN, Code.UNAVAILABLE, Code.DATA_LOSS})


# The hint when a dependency (Redis, PostgreSQL) failed rather than the process being busy.
DEPENDENCY_RETRY_MS = 1_000


def retry_later(exc: Unavailable, busy_ms: int = 0) -> RetryLater:
    """`unavailable` saying when to come back, so that a crowd spreads its retries: the
    error's own hint; else, the process being busy, `busy_ms`; a dependency having failed,
    at least DEPENDENCY_RETRY_MS."""
    hint = exc.retry_after_ms
    if not hint:
        hint = busy_ms if isinstance(exc, Overloaded) else max(busy_ms, DEPENDENCY_RETRY_MS)
    return RetryLater(str(exc), hint)


# How near its deadline a request that stopped being waited for may be and still be said
# to have run out of time: the Connect server times a deadline by the loop's clock, read
# once per turn of the loop, so its timer can fire a little before the request's own
# remaining time (`RequestContext.timeout_ms`) reaches zero.
DEADLINE_SLACK_MS = 100.0


def cancelled_code(ctx: RequestContext[Any, Any] | None) -> Code:
    """How a request that stopped being waited for ended, as the Connect server answers
    it: `deadline_exceeded` when its deadline has passed, else `canceled` (its caller left:
    a disconnect, a reset stream)."""
    remaining = None if ctx is None else ctx.timeout_ms
    if remaining is not None and remaining <= DEADLINE_SLACK_MS:
        return Code.DEADLINE_EXCEEDED
    return Code.CANCELED


def connect_error(exc: CouponError) -> ConnectError:
    if isinstance(exc, Unavailable) and not isinstance(exc, Overloaded):
        return retry_later(exc)
    return ConnectError(ERROR_CODES.get(type(exc), Code.INTERNAL), str(exc))


# Why IssueCoupon turned a request away, for the rejections metric.
REJECTION_REASONS: dict[type[CouponError], str] = {
    SoldOut: "sold_out",
    CampaignNotStarted: "not_started",
    CampaignEnded: "ended",
    CampaignNotFound: "not_found",
    InvalidArgument: "invalid",
    Unavailable: "unavailable",
    OutcomeUnknown: "unavailable",
    Overloaded: "overloaded",
}
# Refusals that name no campaign of ours: not counted per campaign on the live dashboard.
# Why a remembered refusal refuses, for the rejections metric.
_REMEMBERED_REASONS = {
    AdmissionKind.SOLD_OUT: "sold_out",
    AdmissionKind.ENDED: "ended",
    AdmissionKind.NOT_STARTED: "not_started",
}

_NO_CAMPAIGN = frozenset({"invalid", "not_found"})


class Observed:
    """Counts and times one RPC method."""

    def __init__(self, metrics: Metrics, rpc: str) -> None:
        self._quota = LogQuota()
        self._rpc = rpc
        self._requests = metrics.counters(metrics.requests)
        self.ok = self._requests(rpc, "ok")
        self._by_code: dict[int, CounterTally] = {}
        self.latency = metrics.histogram(metrics.latency.labels(rpc))

    def failed(
        self,
        started: float,
        code: Code,
        message: str = "",
        *,
        logged: bool = True,
        detail: str = "",
    ) -> None:
        # By the member's identity: hashing an Enum member runs Python code, and a refusal
        # from memory is a few microseconds in all.
        counter = self._by_code.get(id(code))
        if counter is None:
            counter = self._by_code[id(code)] = self._requests(self._rpc, code.value)
        counter.inc()
        self.latency.observe(time.monotonic() - started)
        if logged and code in _LOGGED_FAILURES:
            self._log_failure(code, message, detail)

    def _log_failure(self, code: Code, message: str, detail: str = "") -> None:
        """One line per kind of failure a second at most: an outage fails every request,
        and a line per request would cost more than the requests."""
        not_logged = self._quota.admit((code, message[:60]))
        if not_logged is None:
            return
        extra: dict[str, object] = {
            "rpc": self._rpc,
            "code": code.value,
            "error": message,
            "request_id": request_id(),
            "same_failures_not_logged": not_logged,
        }
        if detail:
            extra["cause"] = detail  # the dependency's own words, which clients are not told
        log.warning("rpc failed", extra=extra)

    def succeeded(self, started: float) -> None:
        self.ok.inc()
        self.latency.observe(time.monotonic() - started)

    async def call(self, work: Awaitable[T], ctx: RequestContext[Any, Any]) -> T:
        started = time.monotonic()
        try:
            result = await work
        except CouponError as exc:
            error = connect_error(exc)
            self.failed(started, error.code, error.message, detail=exc.detail)
            if isinstance(error, RetryLater):
                for name, value in retry_headers(error.retry_after_ms):
                    ctx.response_headers[name.decode()] = value.decode()
            raise error from None
        except ConnectError as exc:
            self.failed(started, exc.code, exc.message)
            raise
        except Exception as exc:
            self.failed(started, Code.INTERNAL, f"{type(exc).__name__}: {exc}")
            # `internal`, as IssueCoupon answers it: not `unknown`, and not in the words of
            # a dependency (the log line above has them).
            raise ConnectError(Code.INTERNAL, type(exc).__name__) from exc
        except asyncio.CancelledError:
            self.failed(started, cancelled_code(ctx), logged=False)
            raise
        self.succeeded(started)
        return result


class AdminGuard:
    """Admin RPCs need `Authorization: Bearer <token>` whenever a token is configured."""

    def __init__(self, token: str) -> None:
        self._expected = f"bearer {token}".encode() if token else b""

    def allows(self, authorization: str) -> bool:
        """Whether an Authorization header value passes (also for the dashboard's API). The
        scheme's name is case-insensitive (RFC 9110, 11.1), so it is compared lowered, and
        one or more spaces may follow it (11.4); spaces and tabs around the value are not
        part of it (RFC 9110, 5.5), though the HTTP/1.1 parser leaves trailing ones in."""
        if not self._expected:
            return True
        scheme, space, credentials = authorization.strip(" \t").partition(" ")
        given = scheme.lower() + space + credentials.lstrip(" ")
        # Constant time, so the comparison does not leak how much of a guess was right.
        return hmac.compare_digest(given.encode(), self._expected)

    def check(self, ctx: RequestContext[object, object]) -> None:
        authorization = ctx.request_headers.get("authorization", "")
        if not self.allows(authorization):
            # The Connect protocol's 401 says how to authenticate, as RFC 9110, 11.6.1 asks.
            ctx.response_headers["www-authenticate"] = "Bearer"
            raise ConnectError(Code.UNAUTHENTICATED, refusal(authorization, "this RPC"))


WRONG_TOKEN = "the token given is not the service's COUPON_ADMIN_TOKEN"


def refusal(authorization: str, needer: str) -> str:
    """Why an Authorization header that `AdminGuard.allows` refused was refused: a bearer
    token that is not the service's (a wrong or stale COUPON_ADMIN_TOKEN: "bad
    credentials"), or no bearer token at all (`needer` needs the header)."""
    authorization = authorization.strip(" \t")
    if authorization[:7].lower() == "bearer " and authorization[7:].strip():
        return WRONG_TOKEN
    return f"{needer} needs the header 'Authorization: Bearer <COUPON_ADMIN_TOKEN>'"


@dataclass(frozen=True, slots=True)
class Operations:
    """The operators' use cases, and a user's own coupons."""

    list_campaigns: ListCampaigns
    end_campaign: EndCampaign
    list_user_coupons: ListUserCoupons
    export_coupons: ExportCoupons


class CouponService:
    def __init__(
        self,
        create: CreateCampaign,
        get: GetCampaign,
        issue: IssueCoupon,
        admin: AdminGuard,
        metrics: Metrics,
        operations: Operations,
        live: LiveTally,
        doorman: Doorman,
        deadline_seconds: float = 0.5,
    ) -> None:
        self._doorman = doorman
        self._deadline = deadline_seconds
        self._shed_errors: dict[int, RetryLater] = {}
        self._remembered_errors: dict[int, tuple[Remembered, ConnectError, str, CounterTally]] = {}
        self._create = create
        self._get = get
        self._issue = issue
        self._admin = admin
        self._operations = operations
        self._live = live
        self._rejections = metrics.counters(metrics.rejections)
        self._overloaded = self._rejections("overloaded")
        self._observe_create = Observed(metrics, "CreateCampaign")
        self._observe_get = Observed(metrics, "GetCampaign")
        self._observe_issue = Observed(metrics, "IssueCoupon")
        self._observe_list = Observed(metrics, "ListCampaigns")
        self._observe_end = Observed(metrics, "EndCampaign")
        self._observe_user = Observed(metrics, "ListUserCoupons")
        self._observe_export = Observed(metrics, "ExportCoupons")

    async def create_campaign(
        self,
        request: coupon_pb.CreateCampaignRequest,
        ctx: RequestContext[coupon_pb.CreateCampaignRequest, coupon_pb.CreateCampaignResponse],
        /,
    ) -> coupon_pb.CreateCampaignResponse:
        async def work() -> coupon_pb.CreateCampaignResponse:
            self._admin.check(ctx)
            created = await self._create.create(
                name=request.name,
                total_coupons=request.total_coupons,
                starts_at=to_datetime("starts_at", request.starts_at),
                ends_at=to_datetime("ends_at", request.ends_at),
                request_id=request.request_id,
            )
            campaign = created.campaign
            if created.created:
                log.info(
                    "campaign created",
                    extra={
                        "campaign_id": campaign.id,
                        "campaign_name": campaign.name,
                        "total_coupons": campaign.total_coupons,
                        "starts_at": rfc3339(campaign.starts_at),
                        "request_id": request_id(),
                        # CreateCampaignRequest.request_id: the HTTP request's is above.
                        "create_request_id": request.request_id,
                    },
                )
            return coupon_pb.CreateCampaignResponse(campaign=campaign_message(campaign, created.at))

        return await self._observe_create.call(work(), ctx)

    async def get_campaign(
        self,
        request: coupon_pb.GetCampaignRequest,
        ctx: RequestContext[coupon_pb.GetCampaignRequest, coupon_pb.GetCampaignResponse],
        /,
    ) -> coupon_pb.GetCampaignResponse:
        async def work() -> coupon_pb.GetCampaignResponse:
            self._admin.check(ctx)
            view = await self._get.execute(
                campaign_id=request.campaign_id,
                page_size=request.page_size,
                page_token=request.page_token,
            )
            return coupon_pb.GetCampaignResponse(
                campaign=campaign_message(view.campaign, view.now),
                coupons=[coupon_message(c) for c in view.coupons],
                next_page_token=view.next_page_token,
                server_time=to_timestamp(view.now),
            )

        return await self._observe_get.call(work(), ctx)

    async def list_campaigns(
        self,
        request: coupon_pb.ListCampaignsRequest,
        ctx: RequestContext[coupon_pb.ListCampaignsRequest, coupon_pb.ListCampaignsResponse],
        /,
    ) -> coupon_pb.ListCampaignsResponse:
        async def work() -> coupon_pb.ListCampaignsResponse:
            self._admin.check(ctx)
            listed = await self._operations.list_campaigns.execute(
                page_size=request.page_size,
                page_token=request.page_token,
                status=status_filter(request.status),
            )
            return coupon_pb.ListCampaignsResponse(
                campaigns=[campaign_message(c, listed.now) for c in listed.campaigns],
                next_page_token=listed.next_page_token,
                server_time=to_timestamp(listed.now),
            )

        return await self._observe_list.call(work(), ctx)

    async def end_campaign(
        self,
        request: coupon_pb.EndCampaignRequest,
        ctx: RequestContext[coupon_pb.EndCampaignRequest, coupon_pb.EndCampaignResponse],
        /,
    ) -> coupon_pb.EndCampaignResponse:
        async def work() -> coupon_pb.EndCampaignResponse:
            self._admin.check(ctx)
            # The wait for the admissions made before the end ends well within the caller's
            # own deadline, so that the end's answer reaches it.
            left_ms = ctx.timeout_ms
            wait = SETTLE_WAIT_SECONDS
            if left_ms is not None:
                wait = max(0.0, min(wait, left_ms / 1000 * 0.8 - 0.1))
            ended = await self._operations.end_campaign.execute(
                campaign_id=request.campaign_id, wait_seconds=wait
            )
            campaign = ended.campaign
            end = campaign.effective_end
            if ended.changed:  # not again for a campaign ended before
                log.info(
                    "campaign ended",
                    extra={
                        "campaign_id": campaign.id,
                        "ended_at": None if end is None else rfc3339(end),
                        "request_id": request_id(),
                    },
                )
            return coupon_pb.EndCampaignResponse(
                campaign=campaign_message(campaign, ended.now),
                still_recording=ended.still_recording,
            )

        return await self._observe_end.call(work(), ctx)

    async def list_user_coupons(
        self,
        request: coupon_pb.ListUserCouponsRequest,
        ctx: RequestContext[coupon_pb.ListUserCouponsRequest, coupon_pb.ListUserCouponsResponse],
        /,
    ) -> coupon_pb.ListUserCouponsResponse:
        async def work() -> coupon_pb.ListUserCouponsResponse:
            found = await self._operations.list_user_coupons.execute(
                user_id=request.user_id,
                page_size=request.page_size,
                page_token=request.page_token,
            )
            return coupon_pb.ListUserCouponsResponse(
                coupons=[coupon_message(c) for c in found.coupons],
                next_page_token=found.next_page_token,
            )

        return await self._observe_user.call(work(), ctx)

    async def export_coupons(
        self,
        request: coupon_pb.ExportCouponsRequest,
        ctx: RequestContext[coupon_pb.ExportCouponsRequest, coupon_pb.ExportCouponsResponse],
        /,
    ) -> AsyncIterator[coupon_pb.ExportCouponsResponse]:
        """Chunks of coupons; the next chunk is read only once the last is sent (the server
        waits for the client to take it), so memory stays flat for any campaign."""
        started = time.monotonic()
        observed = self._observe_export
        try:
            self._admin.check(ctx)
            chunks = await self._operations.export_coupons.execute(campaign_id=request.campaign_id)
            # Closed with the stream, however it ends (a client gone midway included).
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    yield coupon_pb.ExportCouponsResponse(
                        coupons=[coupon_message(c) for c in chunk]
                    )
        except CouponError as exc:
            error = connect_error(exc)
            observed.failed(started, error.code, error.message, detail=exc.detail)
            if isinstance(error, RetryLater):
                # The hint as unary answers carry it: in the headers when they have not
                # gone yet, else in the trailers (the end of the stream's metadata).
                for name, value in retry_headers(error.retry_after_ms):
                    ctx.response_headers[name.decode()] = value.decode()
                    ctx.response_trailers[name.decode()] = value.decode()
            raise error from None
        except ConnectError as exc:
            observed.failed(started, exc.code, exc.message)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            # Ended by its deadline or its caller leaving, midway (cancelled in a read, or
            # closed while it waited to send a chunk): counted as the server answers it.
            observed.failed(started, cancelled_code(ctx), logged=False)
            raise
        observed.succeeded(started)

    async def issue_coupon(
        self,
        request: coupon_pb.IssueCouponRequest,
        ctx: RequestContext[coupon_pb.IssueCouponRequest, coupon_pb.IssueCouponResponse],
        /,
    ) -> coupon_pb.IssueCouponResponse:
        try:
            return await self.issue(request, ctx)
        except RetryLater as exc:
            ctx.response_headers["retry-after-ms"] = str(exc.retry_after_ms)
            raise

    async def issue(
        self,
        request: coupon_pb.IssueCouponRequest,
        ctx: RequestContext[Any, Any] | None = None,
    ) -> coupon_pb.IssueCouponResponse:
        arrived = time.monotonic()
        error = self.issue_at_once(request, arrived)
        if error is not None:
            raise error
        return await self.issue_let_in(request, arrived, ctx)

    def issue_at_once(
        self, request: coupon_pb.IssueCouponRequest, arrived: float
    ) -> ConnectError | None:
        """The answer when it needs no I/O: a bad field, a refusal this process remembers,
        or `unavailable` when the process is at capacity. None: the request is let in, and
        the caller must then await `issue_let_in`."""
        try:
            entry = self._issue.remembered(request.campaign_id, request.user_id)
        except CouponError as exc:
            return self._refused(arrived, exc, request.campaign_id)
        if entry is not None:
            return self._remembered(arrived, entry, request.campaign_id)
        if self._doorman.enter():
            return None
        return self._shed(arrived, request.campaign_id)

    def issue_unreadable(self, error: ConnectError, arrived: float) -> None:
        """A body that is not an IssueCouponRequest: answered `error` by the front door,
        counted here as an invalid request (as a bad field is)."""
        self._observe_issue.failed(arrived, error.code, error.message)
        self._rejections("invalid").inc()

    @property
    def doorman(self) -> Doorman:
        return self._doorman

    def _remembered(self, arrived: float, entry: Remembered, campaign_id: str) -> ConnectError:
        """A refusal from memory: the same error for every request while the memory holds
        (the front doors keep its encoded answer), counted as the gate's would be."""
        known = self._remembered_errors.get(id(entry))
        if known is None or known[0] is not entry:
            if len(self._remembered_errors) > 64:
                self._remembered_errors.clear()
            reason = _REMEMBERED_REASONS[entry.kind]
            known = (entry, connect_error(entry.error()), reason, self._rejections(reason))
            self._remembered_errors[id(entry)] = known
        _, error, reason, rejections = known
        self._observe_issue.failed(arrived, error.code, logged=False)
        rejections.inc()
        self._tally(campaign_id, REFUSED + reason)
        return error

    def _shed(self, arrived: float, campaign_id: str) -> ConnectError:
        """Turned away at the door: one error per hint value, made once (the front doors
        keep its encoded answer), counted, never logged."""
        hint = self._doorman.retry_after_ms
        error = self._shed_errors.get(hint)
        if error is None:
            if len(self._shed_errors) > 64:
                self._shed_errors.clear()
            error = self._shed_errors[hint] = RetryLater(
                "the service is at capacity; retry after the hinted delay", hint
            )
        self._observe_issue.failed(arrived, Code.UNAVAILABLE, logged=False)
        self._overloaded.inc()
        self._tally(campaign_id, REFUSED + "overloaded")
        return error

    async def issue_let_in(
        self,
        request: coupon_pb.IssueCouponRequest,
        arrived: float,
        ctx: RequestContext[Any, Any] | None = None,
    ) -> coupon_pb.IssueCouponResponse:
        outcome = await self.issue_begin(request, arrived).settled()
        issued = self.issue_finish(request, arrived, outcome, ctx)
        return issue_response(issued.coupon, issued.already_issued)

    def issue_begin(self, request: coupon_pb.IssueCouponRequest, arrived: float) -> Pending:
        """The request `issue_at_once` let in, on its way: `issue_finish` answers it once
        its outcome is settled."""
        return self._issue.begin(
            request.campaign_id,
            request.user_id,
            arrived + self._deadline,  # issue_at_once asked the refusal memory already
        )

    def issue_finish(
        self,
        request: coupon_pb.IssueCouponRequest,
        arrived: float,
        outcome: asyncio.Future[Issued],
        ctx: RequestContext[Any, Any] | None = None,
    ) -> Issued:
        """What was issued to a request let in, from its settled outcome (ConnectError
        raised; CancelledError when it was cancelled: counted `deadline_exceeded` when
        `ctx`, the Connect request's, says its deadline passed, else `canceled`); the
        request leaves the door."""
        try:
            issued = outcome.result()
        except asyncio.CancelledError:
            # Nobody waits for the answer; a coupon its commit records all the same is
            # counted by the ledger.
            self._observe_issue.failed(arrived, cancelled_code(ctx), logged=False)
            raise
        except CouponError as exc:
            raise self._refused(arrived, exc, request.campaign_id) from None
        except Exception as exc:
            # A fault of ours: logged with what it was, answered `internal` on every path.
            self._observe_issue.failed(arrived, Code.INTERNAL, f"{type(exc).__name__}: {exc}")
            raise ConnectError(Code.INTERNAL, type(exc).__name__) from exc
        finally:
            self._doorman.leave(arrived)
        coupon = issued.coupon
        # A coupon newly issued is counted by the ledger, where its commit settles (also
        # when its caller has left by then).
        if issued.already_issued:
            self._rejections("already_issued").inc()
            outcome_name = ALREADY_ISSUED
        else:
            outcome_name = ISSUED
        self._observe_issue.succeeded(arrived)
        self._live.record(coupon.campaign_id, outcome_name, time.monotonic() - arrived)
        return issued

    def _refused(self, arrived: float, exc: CouponError, campaign_id: str) -> ConnectError:
        error = (
            retry_later(exc, self._doorman.retry_after_ms)
            if isinstance(exc, Unavailable)
            else connect_error(exc)
        )
        # Shedding is the service working as meant: counted, never logged.
        self._observe_issue.failed(
            arrived,
            error.code,
            error.message,
            logged=not isinstance(exc, Overloaded),
            detail=exc.detail,
        )
        reason = REJECTION_REASONS.get(type(exc), "other")
        self._rejections(reason).inc()
        if reason not in _NO_CAMPAIGN:
            # At the time it took: a refusal may come after Redis or PostgreSQL work, or
            # after waiting for the deadline.
            self._tally(campaign_id, REFUSED + reason, time.monotonic() - arrived)
        return error

    def _tally(self, campaign_id: str, outcome: str, took: float | None = None) -> None:
        """The live dashboard's per-campaign count of an answer that took `took` seconds, or
        None: given at once, without I/O (a campaign id that is not one: none)."""
        try:
            campaign_id = validate_campaign_id(campaign_id)
        except InvalidArgument:
            return
        if took is None:
            self._live.record_at_once(campaign_id, outcome)
        else:
            self._live.record(campaign_id, outcome, took)
