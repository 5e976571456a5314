"""The ceilings: the real server stack answering IssueCoupon with a constant, without Redis
or PostgreSQL.

Both build the service's own dispatcher (`CouponApp`: Connect paths before any web-framework
routing, everything else to Litestar) with a service whose IssueCoupon returns one constant
response; they differ in the path a request takes to it:

  (a1) `--dispatch connect`: the generated Connect application (`CouponServiceASGIApplication`)
       answers, the library's whole protocol machinery included;
  (a2) `--dispatch fast`: IssueCoupon's own fast dispatch answers (the HTTP/1.1 protocol's
       lane and `IssueRoute`, as for the real service's common request), the Connect
       application only for the rest.

Running this module serves it with uvicorn the way `coupon serve` does, so the only
difference from the real server is the work behind the RPC:

    python -m bench.noop_app --port 8001 --workers 2 --dispatch fast
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from litestar import Litestar

from coupon.application.issue import Issued, Pending
from coupon.domain.coupon import Coupon
from coupon.entrypoints.app import MAX_REQUEST_BYTES, CouponApp
from coupon.entrypoints.fast_issue import FastIssue, IssueRoute
from coupon.entrypoints.health import Readiness
from coupon.entrypoints.settings import Settings
from coupon.entrypoints.translate import to_timestamp
from coupon.gen.coupon.v1 import coupon_pb
from coupon.gen.coupon.v1.coupon_connect import CouponService, CouponServiceASGIApplication

# The same shape and size as a real answer: a ten-syllable code, a UUID, a user, a time.
RESPONSE = coupon_pb.IssueCouponResponse(
    coupon=coupon_pb.Coupon(
        code="조차자다도머르누자모",
        campaign_id="01a20e3d-0504-74db-bae5-621eedbfc245",
        user_id="bench-user-000000",
        issued_at=to_timestamp(datetime(2026, 1, 1, 12, 0, tzinfo=UTC)),
    )
)

ISSUED = Issued(
    Coupon(
        code="조차자다도머르누자모",
        campaign_id="01a20e3d-0504-74db-bae5-621eedbfc245",
        user_id="bench-user-000000",
        issued_at=datetime(2026, 1, 1, 12, 0, tzinfo=UTC),
        slot=1,
    ),
    already_issued=False,
)


class NoopService(CouponService):  # type: ignore[misc]
    """IssueCoupon answers at once; the admin RPCs are not part of the ceiling (the others
    answer `unimplemented`, CouponService's own)."""

    async def issue_coupon(
        self,
        request: coupon_pb.IssueCouponRequest,
        ctx: RequestContext[coupon_pb.IssueCouponRequest, coupon_pb.IssueCouponResponse],
        /,
    ) -> coupon_pb.IssueCouponResponse:
        return RESPONSE

    async def create_campaign(
        self,
        request: coupon_pb.CreateCampaignRequest,
        ctx: RequestContext[coupon_pb.CreateCampaignRequest, coupon_pb.CreateCampaignResponse],
        /,
    ) -> coupon_pb.CreateCampaignResponse:
        raise ConnectError(Code.UNIMPLEMENTED, "the no-op bench server only answers IssueCoupon")

    async def get_campaign(
        self,
        request: coupon_pb.GetCampaignRequest,
        ctx: RequestContext[coupon_pb.GetCampaignRequest, coupon_pb.GetCampaignResponse],
        /,
    ) -> coupon_pb.GetCampaignResponse:
        raise ConnectError(Code.UNIMPLEMENTED, "the no-op bench server only answers IssueCoupon")


class ConstantIssue:
    """What `IssueRoute` needs of the service: every request let in, answered at once."""

    def issue_at_once(
        self, request: coupon_pb.IssueCouponRequest, arrived: float
    ) -> ConnectError | None:
        return None

    def issue_unreadable(self, error: ConnectError, arrived: float) -> None:
        pass

    def issue_begin(self, request: coupon_pb.IssueCouponRequest, arrived: float) -> Pending:
        """Settled at once (the service's settles from a callback of the gate's batch)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        outcome: asyncio.Future[Issued] = self._loop.create_future()
        outcome.set_result(ISSUED)
        return Pending(outcome, 0.0)

    def issue_finish(
        self,
        request: coupon_pb.IssueCouponRequest,
        arrived: float,
        outcome: asyncio.Future[Issued],
    ) -> Issued:
        return ISSUED

    doorman = None
    _loop: asyncio.AbstractEventLoop | None = None


class NoopCouponApp(CouponApp):
    """`CouponApp` with its dispatch and Litestar untouched; only the lifespan differs: no
    container, no pools, a Connect app around `NoopService` (and with `fast`, the fast
    dispatch around a constant), and always ready."""

    def __init__(self, settings: Settings, *, fast: bool) -> None:
        super().__init__(settings)
        self._fast = fast

    @asynccontextmanager
    async def _lifespan(self, _: Litestar) -> AsyncIterator[None]:
        self.readiness = Readiness({})
        self.connect = CouponServiceASGIApplication(NoopService(), read_max_bytes=MAX_REQUEST_BYTES)
        if self._fast:
            self.issue_route = IssueRoute(ConstantIssue())
            self.fast_issue = FastIssue(self.issue_route, MAX_REQUEST_BYTES)
        try:
            yield
        finally:
            self.connect = None
            self.issue_route = None
            self.fast_issue = None


def create_connect_app() -> NoopCouponApp:
    """(a1): factory for the ASGI server (`factory=True`), like
    `coupon.entrypoints.app:create_app`."""
    return NoopCouponApp(Settings(backend="memory"), fast=False)


def create_fast_app() -> NoopCouponApp:
    """(a2): the same behind IssueCoupon's fast dispatch."""
    return NoopCouponApp(Settings(backend="memory"), fast=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--dispatch", choices=("connect", "fast"), default="connect")
    args = parser.parse_args()

    from coupon.entrypoints.cli import listen, run_asgi

    # The same server and options as `coupon serve`.
    factory = "create_fast_app" if args.dispatch == "fast" else "create_connect_app"
    sockets = listen(args.host, args.port)
    if isinstance(sockets, str):
        raise SystemExit(f"noop_app: cannot listen on {args.host}:{args.port}: {sockets}")
    run_asgi(f"bench.noop_app:{factory}", sockets, args.workers)


if __name__ == "__main__":
    main()
