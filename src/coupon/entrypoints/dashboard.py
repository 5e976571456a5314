"""The live dashboard: one HTML page and a small script (no build step), served by the
Litestar app, and the two JSON endpoints it polls once a second with the admin token as a
Bearer header. The figures come from PostgreSQL (issued count) and from the per-second
counters every server process adds to Redis (rates, refusals, latency): the same on
every process and instance.

The page and script are revalidated on every load (`no-cache`), so an upgrade's script is
never mixed with an older page; the JSON is never stored (`no-store`). Every error under
/dashboard/, an unknown path included, is `{"code": ..., "message": ...}`."""

from __future__ import annotations

from datetime import datetime
from importlib import resources
from typing import Annotated, Any

from connectrpc.code import Code
from litestar import MediaType, Request, Response, get
from litestar.datastructures import State
from litestar.exceptions import HTTPException, MethodNotAllowedException, NotFoundException
from litestar.exceptions.responses import create_exception_response
from litestar.params import Parameter
from litestar.response.base import ASGIResponse

from coupon.application.live import LiveView, WatchCampaign
from coupon.application.operations import ListCampaigns
from coupon.domain.campaign import Campaign, CampaignStatus
from coupon.domain.errors import CouponError
from coupon.entrypoints.connect_service import ERROR_CODES, AdminGuard, refusal

# The HTTP status the Connect protocol gives each code these endpoints can answer.
HTTP_STATUS = {
    Code.INVALID_ARGUMENT: 400,
    Code.NOT_FOUND: 404,
    Code.FAILED_PRECONDITION: 400,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.UNAUTHENTICATED: 401,
    Code.UNAVAILABLE: 503,
}


# Campaigns in a page of the list: the page asks for the next ones with `pageToken`.
PAGE_SIZE = 100

# The page and its script: revalidated on every load, never framed, never sniffed.
PAGE_HEADERS = {
    "cache-control": "no-cache",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "content-security-policy": "frame-ancestors 'none'",
}
# The JSON: figures of a moment, never stored.
API_HEADERS = {"cache-control": "no-store", "x-content-type-options": "nosniff"}


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
        # Why the live figures below are missing (the counts above still hold), or null.
        "figuresMissing": view.figures_missing or None,
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


def _json(
    body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> Response[Any]:
    return Response(body, status_code=status, headers={**API_HEADERS, **(headers or {})})


def _failure(
    code: str, message: str, status: int, headers: dict[str, str] | None = None
) -> Response[Any]:
    return _json({"code": code, "message": message}, status, headers)


def _error(exc: CouponError) -> Response[Any]:
    code = ERROR_CODES.get(type(exc))
    status = HTTP_STATUS.get(code, 500) if code is not None else 500
    return _failure(code.value if code else "internal", str(exc), status)


def _refused(authorization: str) -> Response[Any]:
    message = refusal(authorization, "the dashboard")
    return _failure("unauthenticated", message, 401, {"www-authenticate": "Bearer"})


def _file(body: bytes, content_type: str) -> ASGIResponse:
    """The page or script (HEAD is served as GET without the body: CouponApp.__call__)."""
    return ASGIResponse(
        body=body,
        headers={**PAGE_HEADERS, "content-type": content_type, "content-length": str(len(body))},
    )


@get("/dashboard", sync_to_thread=False)
def dashboard_page(state: State) -> ASGIResponse:
    # The page holds no data: it asks for the token, and the API checks it.
    return _file(_dashboard(state).page, "text/html; charset=utf-8")


@get("/dashboard/dashboard.js", sync_to_thread=False)
def dashboard_script(state: State) -> ASGIResponse:
    return _file(_dashboard(state).script, "text/javascript; charset=utf-8")


# The code of each HTTP error Litestar itself answers with (a path or method it does not
# route, a parameter it cannot read), in the dashboard API's words.
_FRAMEWORK_CODES = {400: "invalid_argument", 401: "unauthenticated", 404: "not_found"}


def http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    """The app's HTTP errors: under /dashboard/ in the dashboard API's shape (405 with its
    Allow header), Litestar's elsewhere."""
    path = request.scope["path"]
    if path != "/dashboard" and not path.startswith("/dashboard/"):
        return create_exception_response(request, exc)
    status = exc.status_code
    if isinstance(exc, NotFoundException):
        return _failure("not_found", f"no such dashboard path: {path}", 404)
    if isinstance(exc, MethodNotAllowedException):
        allow = next((v for k, v in (exc.headers or {}).items() if k.lower() == "allow"), "")
        methods = [m.strip() for m in allow.split(",") if m.strip()]
        if "GET" in methods and "HEAD" not in methods:
            allow = ", ".join(["HEAD", *methods])  # HEAD is served wherever GET is (app.py)
        message = f"{request.method} is not served at {path} (only {allow})"
        return _failure("unimplemented", message, 405, {"allow": allow})
    code = _FRAMEWORK_CODES.get(status, "internal" if status >= 500 else "unknown")
    return _failure(code, str(exc.detail), status)


@get("/dashboard/api/campaigns", media_type=MediaType.JSON)
async def dashboard_campaigns(
    state: State,
    request: Request[Any, Any, Any],
    status: str | None = None,
    page_token: Annotated[str, Parameter(query="pageToken")] = "",
) -> Response[Any]:
    """A page of PAGE_SIZE campaigns, newest first (of one status if `status` is given), and
    the `nextPageToken` of the next page ("" after the last)."""
    board = _dashboard(state)
    authorization = request.headers.get("authorization", "")
    if not board.admin.allows(authorization):
        return _refused(authorization)
    try:
        wanted = None if not status else CampaignStatus(status)
    except ValueError:
        return _failure("invalid_argument", f"status: unknown status {status!r}", 400)
    try:
        listed = await board.listing.execute(
            page_size=PAGE_SIZE, page_token=page_token, status=wanted
        )
    except CouponError as exc:
        return _error(exc)
    return _json(
        {
            "serverTime": _iso(listed.now),
            "campaigns": [campaign_json(c, listed.now) for c in listed.campaigns],
            "nextPageToken": listed.next_page_token,
        }
    )


@get("/dashboard/api/campaigns/{campaign_id:str}", media_type=MediaType.JSON)
async def dashboard_live(
    state: State, request: Request[Any, Any, Any], campaign_id: str
) -> Response[Any]:
    board = _dashboard(state)
    authorization = request.headers.get("authorization", "")
    if not board.admin.allows(authorization):
        return _refused(authorization)
    try:
        view = await board.watch.execute(campaign_id=campaign_id)
    except CouponError as exc:
        return _error(exc)
    return _json(live_json(view))


ROUTES = [dashboard_page, dashboard_script, dashboard_campaigns, dashboard_live]
