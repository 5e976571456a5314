"""The live dashboard: one HTML page and a small script (no build step), served by the
Litestar app, and the two JSON endpoints it polls once a second with the admin token as a
Bearer header. The figures come from PostgreSQL (issued count) and from the per-second
counters every server process adds to Redis (rates, refusals, latency): the same on
every process and instance."""

from __future__ import annotations

from datetime import datetime
from importlib import resources
from typing import Any

from connectrpc.code import Code
from litestar import MediaType, Request, Response, get
from litestar.datastructures import State

from coupon.application.live import LiveView, WatchCampaign
from coupon.application.operations import ListCampaigns
from coupon.domain.campaign import Campaign, CampaignStatus
from coupon.domain.errors import CouponError
from coupon.entrypoints.connect_service import ERROR_CODES, AdminGuard

# The HTTP status the Connect protocol gives each code these endpoints can answer.
HTTP_STATUS = {
    Code.INVALID_ARGUMENT: 400,
    Code.NOT_FOUND: 404,
    Code.FAILED_PRECONDITION: 400,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.UNAUTHENTICATED: 401,
    Code.UNAVAILABLE: 503,
}


def _static(name: str) -> str:
    return resources.files("coupon.entrypoints").joinpath("static", name).read_text()


class Dashboard:
    def __init__(self, listing: ListCampaigns, watch: WatchCampaign, admin: AdminGuard) -> None:
        self.listing = listing
        self.watch = watch
        self.admin = admin
        self.page = _static("dashboard.html").encode()
        self.script = _static("dashboard.js").encode()


def _dashboard(state: State) -> Dashboard:
    found = state.coupon.dashboard
    if found is None:
        raise RuntimeError("the dashboard is served once the app has started")
    assert isinstance(found, Dashboard)
    return found


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def campaign_json(campaign: Campaign, now: datetime) -> dict[str, Any]:
    return {
        "id": campaign.id,
        "name": campaign.name,
        "status": campaign.status_at(now).value,
        "totalCoupons": campaign.total_coupons,
        "issuedCount": campaign.issued_count,
        "remaining": max(0, campaign.total_coupons - campaign.issued_count),
        "startsAt": _iso(campaign.starts_at),
        "endsAt": _iso(campaign.ends_at),
        "endedAt": _iso(campaign.ended_at),
    }


def live_json(view: LiveView) -> dict[str, Any]:
    return {
        "campaign": campaign_json(view.campaign, view.now),
        "serverTime": _iso(view.now),
        "issuedPerSecond": view.issued_per_second,
        "refusals": dict(sorted(view.refusals.items())),
        "p99Ms": None if view.p99_seconds is None else round(view.p99_seconds * 1000, 3),
        "requests": view.requests,
        "windowSeconds": len(view.seconds),
        "seconds": [
            {
                "at": s.at,
                "issued": s.issued,
                "alreadyIssued": s.already_issued,
                "refused": s.refused,
            }
            for s in view.seconds
        ],
    }


def _error(exc: CouponError) -> Response[dict[str, str]]:
    code = ERROR_CODES.get(type(exc))
    status = HTTP_STATUS.get(code, 500) if code is not None else 500
    return Response(
        {"code": code.value if code else "internal", "message": str(exc)}, status_code=status
    )


def _refused() -> Response[dict[str, str]]:
    return Response(
        {
            "code": "unauthenticated",
            "message": (
                "the dashboard needs the header 'Authorization: Bearer <COUPON_ADMIN_TOKEN>'"
            ),
        },
        status_code=401,
    )


@get("/dashboard", media_type=MediaType.HTML, sync_to_thread=False)
def dashboard_page(state: State) -> Response[bytes]:
    # The page holds no data: it asks for the token, and the API checks it.
    return Response(_dashboard(state).page, media_type=MediaType.HTML)


@get("/dashboard/dashboard.js", sync_to_thread=False)
def dashboard_script(state: State) -> Response[bytes]:
    return Response(_dashboard(state).script, media_type="text/javascript")


@get("/dashboard/api/campaigns", media_type=MediaType.JSON)
async def dashboard_campaigns(
    state: State, request: Request[Any, Any, Any], status: str | None = None
) -> Response[Any]:
    board = _dashboard(state)
    if not board.admin.allows(request.headers.get("authorization", "")):
        return _refused()
    try:
        wanted = None if not status else CampaignStatus(status)
    except ValueError:
        return Response(
            {"code": "invalid_argument", "message": f"status: unknown status {status!r}"},
            status_code=400,
        )
    try:
        listed = await board.listing.execute(page_size=100, page_token="", status=wanted)
    except CouponError as exc:
        return _error(exc)
    return Response(
        {
            "serverTime": _iso(listed.now),
            "campaigns": [campaign_json(c, listed.now) for c in listed.campaigns],
        }
    )


@get("/dashboard/api/campaigns/{campaign_id:str}", media_type=MediaType.JSON)
async def dashboard_live(
    state: State, request: Request[Any, Any, Any], campaign_id: str
) -> Response[Any]:
    board = _dashboard(state)
    if not board.admin.allows(request.headers.get("authorization", "")):
        return _refused()
    try:
        view = await board.watch.execute(campaign_id=campaign_id)
    except CouponError as exc:
        return _error(exc)
    return Response(live_json(view))


ROUTES = [dashboard_page, dashboard_script, dashboard_campaigns, dashboard_live]
