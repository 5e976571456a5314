"""The ceiling: the real server stack answering IssueCoupon without Redis or PostgreSQL.

`create_app` builds the service's own dispatcher (`CouponApp`: Connect paths straight to the
generated `CouponServiceASGIApplication`, everything else to Litestar) but hands the Connect
app a service whose `issue_coupon` returns one constant response. Running this module serves
it with uvicorn the way `coupon serve` does, so the only difference from the real server is
the work behind the RPC:

    python -m bench.noop_app --port 8001 --workers 2
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from litestar import Litestar

from coupon.entrypoints.app import MAX_REQUEST_BYTES, CouponApp
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


class NoopService(CouponService):
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


class NoopCouponApp(CouponApp):
    """`CouponApp` with its dispatch and Litestar untouched; only the lifespan differs: no
    container, no pools, a Connect app around `NoopService`, and always ready."""

    @asynccontextmanager
    async def _lifespan(self, _: Litestar) -> AsyncIterator[None]:
        self.readiness = Readiness({})
        self.connect = CouponServiceASGIApplication(NoopService(), read_max_bytes=MAX_REQUEST_BYTES)
        try:
            yield
        finally:
            self.connect = None


def create_app() -> NoopCouponApp:
    """Factory for the ASGI server (`factory=True`), like `coupon.entrypoints.app:create_app`."""
    return NoopCouponApp(Settings(backend="memory"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    from coupon.entrypoints.cli import run_asgi

    # The same server and options as `coupon serve`.
    run_asgi("bench.noop_app:create_app", args.host, args.port, args.workers)


if __name__ == "__main__":
    main()
