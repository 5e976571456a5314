"""The dashboard's HTTP answers against a real server (PostgreSQL, Redis, an admin token)
over real sockets: caching and framing headers, HEAD, the 401's challenge and the shape of
every error under /dashboard/, and the list's pages."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from coupon.entrypoints.dashboard import PAGE_SIZE
from harness.client import connect_client, create_campaign
from harness.raw_http import head
from harness.server import ServerProcess

TOKEN = "dashboard-http-token"
pytestmark = pytest.mark.e2e

FILES = {
    "/dashboard": "text/html",
    "/dashboard/dashboard.js": "text/javascript",
}


@pytest.fixture(scope="module")
def server(server_env: dict[str, str]) -> Iterator[ServerProcess]:
    with ServerProcess(env={**server_env, "COUPON_ADMIN_TOKEN": TOKEN}, workers=1) as proc:
        yield proc


def test_the_page_and_script_are_revalidated_never_sniffed_and_never_framed(
    server: ServerProcess,
) -> None:
    for path, content_type in FILES.items():
        got = httpx.get(server.url + path, timeout=10)
        assert got.status_code == 200
        assert got.headers["content-type"].startswith(content_type)
        assert got.headers["cache-control"] == "no-cache", path
        assert got.headers["x-content-type-options"] == "nosniff", path
    page = httpx.get(server.url + "/dashboard", timeout=10)
    assert page.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


@pytest.mark.parametrize("path", FILES)
async def test_head_answers_like_get_without_the_body(server: ServerProcess, path: str) -> None:
    got = httpx.get(server.url + path, timeout=10)
    status, fields, rest = await head(server.url, path)
    assert status.startswith(b"HTTP/1.1 200"), status
    assert rest == b""
    for name in ("content-type", "content-length", "cache-control", "x-content-type-options"):
        assert fields[name] == got.headers[name], name
    # The same over HTTP/2, where no server below the app drops a body.
    async with httpx.AsyncClient(http1=False, http2=True, timeout=10) as h2:
        response = await h2.head(server.url + path)
    assert response.http_version == "HTTP/2"
    assert response.status_code == 200 and response.content == b""
    assert response.headers["content-length"] == got.headers["content-length"]
    assert response.headers["content-type"] == got.headers["content-type"]


def test_the_api_is_never_stored_and_a_401_names_its_scheme(server: ServerProcess) -> None:
    api = f"{server.url}/dashboard/api/campaigns"
    listed = httpx.get(api, headers={"authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert listed.status_code == 200
    assert listed.headers["cache-control"] == "no-store"
    assert listed.headers["x-content-type-options"] == "nosniff"

    needed = httpx.get(api, timeout=10)
    assert needed.status_code == 401
    assert needed.headers["www-authenticate"] == "Bearer"
    assert needed.headers["cache-control"] == "no-store"
    assert "Authorization: Bearer" in needed.json()["message"]
    wrong = httpx.get(f"{api}/x", headers={"authorization": "Bearer wrong"}, timeout=10)
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert wrong.json() == {
        "code": "unauthenticated",
        "message": "the token given is not the service's COUPON_ADMIN_TOKEN",
    }


@pytest.mark.parametrize(
    "path", ["/dashboard/nope", "/dashboard/api/nope", "/dashboard/api/campaigns/a/b"]
)
def test_an_unknown_dashboard_path_is_a_404_in_the_api_shape(
    server: ServerProcess, path: str
) -> None:
    got = httpx.get(server.url + path, headers={"authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert got.status_code == 404
    assert got.headers["cache-control"] == "no-store"
    assert got.json() == {"code": "not_found", "message": f"no such dashboard path: {path}"}


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", "/dashboard/api/campaigns", "HEAD, GET, OPTIONS"),
        ("DELETE", "/dashboard/api/campaigns/some-id", "HEAD, GET, OPTIONS"),
        ("PUT", "/dashboard", "HEAD, GET, OPTIONS"),
    ],
)
def test_a_method_the_dashboard_does_not_serve_is_a_405_in_the_api_shape(
    server: ServerProcess, method: str, path: str, allowed: str
) -> None:
    got = httpx.request(
        method, server.url + path, headers={"authorization": f"Bearer {TOKEN}"}, timeout=10
    )
    assert got.status_code == 405
    assert sorted(got.headers["allow"].split(", ")) == sorted(allowed.split(", "))
    assert got.headers["cache-control"] == "no-store"
    body = got.json()
    assert set(body) == {"code", "message"}, body
    assert body["code"] == "unimplemented"
    assert method in body["message"] and path in body["message"]


def test_other_paths_keep_their_405(server: ServerProcess) -> None:
    got = httpx.post(server.url + "/healthz", timeout=10)
    assert got.status_code == 405 and "GET" in got.headers["allow"]
    assert got.json() == {"status_code": 405, "detail": "Method Not Allowed"}


def test_other_unknown_paths_keep_their_404(server: ServerProcess) -> None:
    got = httpx.get(server.url + "/nope", timeout=10)
    assert got.status_code == 404
    assert got.json() == {"status_code": 404, "detail": "Not Found"}


async def test_the_list_reaches_every_campaign_a_page_at_a_time(server: ServerProcess) -> None:
    async with connect_client(server.url) as client:
        made = [
            (await create_campaign(client, total=5, name=f"paged-{i}", token=TOKEN)).id
            for i in range(PAGE_SIZE + 5)
        ]
    api = f"{server.url}/dashboard/api/campaigns"
    headers = {"authorization": f"Bearer {TOKEN}"}
    seen: list[str] = []
    params: dict[str, str] = {}
    while True:
        page = httpx.get(api, params=params, headers=headers, timeout=10).json()
        assert len(page["campaigns"]) <= PAGE_SIZE
        seen += [c["id"] for c in page["campaigns"]]
        if not page["nextPageToken"]:
            break
        params = {"pageToken": page["nextPageToken"]}
    assert len(seen) == len(set(seen))
    assert set(made) <= set(seen)  # the oldest of them too, beyond the first page
    assert seen.index(made[0]) >= PAGE_SIZE

    # A token belongs to its listing: another status filter's, or a made-up one, is refused.
    first = httpx.get(api, headers=headers, timeout=10).json()
    for params in (
        {"pageToken": first["nextPageToken"], "status": "active"},
        {"pageToken": "not-a-token"},
    ):
        refused = httpx.get(api, params=params, headers=headers, timeout=10)
        assert refused.status_code == 400, params
        assert refused.json()["code"] == "invalid_argument"
    scheduled = httpx.get(api, params={"status": "scheduled"}, headers=headers, timeout=10)
    assert scheduled.status_code == 200
    assert all(c["status"] == "scheduled" for c in scheduled.json()["campaigns"])


@pytest.mark.parametrize(
    ("path", "token"),
    [
        ("/dashboard/api/campaigns", True),
        ("/dashboard/api/campaigns", False),
        ("/example/", False),
        ("/example/app.js", False),
        ("/metrics", False),
        ("/dashboard/nope", True),
    ],
)
async def test_head_is_served_wherever_get_is(
    server: ServerProcess, path: str, token: bool
) -> None:
    """RFC 9110 §9.1: the GET's status and fields, without its body, on every page."""
    headers = {"authorization": f"Bearer {TOKEN}"} if token else {}
    got = httpx.get(server.url + path, headers=headers, timeout=10)
    for http2 in (False, True):
        async with httpx.AsyncClient(http1=not http2, http2=http2, timeout=10) as client:
            head = await client.head(server.url + path, headers=headers)
        assert head.status_code == got.status_code, (path, http2)
        assert head.content == b""
        assert head.headers["content-type"] == got.headers["content-type"]
        if "content-length" in got.headers and path != "/metrics":  # /metrics moves
            assert head.headers["content-length"] == got.headers["content-length"]
