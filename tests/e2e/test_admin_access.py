"""Who may call the admin RPCs. CreateCampaign and GetCampaign create stock and reveal every
code: with COUPON_ADMIN_TOKEN configured they need `Authorization: Bearer <token>` exactly
(the scheme's name in any case, as RFC 9110 has it, and whitespace around the value not
part of it), refuse anything else with
`unauthenticated` and change nothing; IssueCoupon is public; with no token configured
(development) the admin RPCs are open. The token comparison is constant time: AdminGuard
goes through hmac.compare_digest for every request.

(APP_ENV=production without a token refusing to start is in tests/unit/test_settings.py.)
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import textwrap
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import asyncpg
import httpx
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from coupon.entrypoints import connect_service
from coupon.entrypoints.connect_service import AdminGuard
from harness.raw_http import open_connection, read_response
from harness.server import ServerProcess
from tests.clients.h2client import H2Client, Response

pytestmark = pytest.mark.e2e

TOKEN = "Adm1n-t0ken-0123456789abcdef"
RPC = "/coupon.v1.CouponService/"
TIMEOUT = httpx.Timeout(10.0)

# Authorization headers that must not pass; raw bytes so that non-ASCII reaches the server.
REFUSED: dict[str, dict[str, bytes]] = {
    "missing": {},
    "empty": {"authorization": b""},
    "wrong token": {"authorization": b"Bearer not-the-token"},
    "no Bearer scheme": {"authorization": TOKEN.encode()},
    "Bearer without a space": {"authorization": f"Bearer{TOKEN}".encode()},
    "Bearer and nothing": {"authorization": b"Bearer"},
    "Basic scheme": {"authorization": f"Basic {TOKEN}".encode()},
    "prefix of the token": {"authorization": f"Bearer {TOKEN[:-1]}".encode()},
    "first character": {"authorization": f"Bearer {TOKEN[0]}".encode()},
    "token plus a character": {"authorization": f"Bearer {TOKEN}x".encode()},
    "token in another case": {"authorization": f"Bearer {TOKEN.lower()}".encode()},
    "lower-case scheme, wrong token": {"authorization": b"bearer not-the-token"},
    "token twice": {"authorization": f"Bearer {TOKEN} {TOKEN}".encode()},
    "non-ASCII": {"authorization": "Bearer tökén".encode()},
    "other header": {"x-admin-token": TOKEN.encode()},
}
GOOD = {"authorization": f"Bearer {TOKEN}".encode()}
# The scheme's name is case-insensitive (RFC 9110, 11.1); the token is not.
ALSO_GOOD: dict[str, dict[str, bytes]] = {
    "lower-case scheme": {"authorization": f"bearer {TOKEN}".encode()},
    "upper-case scheme": {"authorization": f"BEARER {TOKEN}".encode()},
    # One or more spaces after the scheme (RFC 9110, 11.4: auth-scheme 1*SP token68).
    "two spaces": {"authorization": f"Bearer  {TOKEN}".encode()},
}
# Whitespace around a field's value is not part of it (RFC 9110, 5.5). httpx will not
# send these: they go over a socket by hand.
TRAILING_WHITESPACE: dict[str, dict[str, bytes]] = {
    "trailing spaces": {"authorization": f"Bearer {TOKEN}  ".encode()},
    "trailing tab": {"authorization": f"Bearer {TOKEN}\t".encode()},
    "trailing spaces and tabs": {"authorization": f"Bearer {TOKEN} \t \t".encode()},
}


def post(url: str, rpc: str, body: dict[str, Any], headers: dict[str, bytes]) -> httpx.Response:
    return httpx.post(f"{url}{RPC}{rpc}", json=body, headers=headers, timeout=TIMEOUT)


def new_campaign_body(name: str) -> dict[str, Any]:
    return {"name": name, "totalCoupons": "5", "startsAt": "2026-01-01T00:00:00Z"}


NEEDS_THE_HEADER = "this RPC needs the header 'Authorization: Bearer <COUPON_ADMIN_TOKEN>'"
WRONG_TOKEN = "the token given is not the service's COUPON_ADMIN_TOKEN"
# The refused headers that carry a bearer token, just not the service's: the answer says
# the token was refused (a wrong or stale COUPON_ADMIN_TOKEN), not that one is missing.
WRONG_BEARER = {
    "wrong token",
    "prefix of the token",
    "first character",
    "token plus a character",
    "token in another case",
    "lower-case scheme, wrong token",
    "token twice",
    "non-ASCII",
}


def assert_unauthenticated(response: httpx.Response, case: str = "missing") -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"  # RFC 9110, 11.6.1
    body = response.json()
    assert body["code"] == "unauthenticated"
    assert body["message"] == (WRONG_TOKEN if case in WRONG_BEARER else NEEDS_THE_HEADER)


# --- with a token configured -----------------------------------------------------------


class Guarded:
    def __init__(self, server: ServerProcess, database: str | None) -> None:
        self.server = server
        self.url = server.url
        self.database = database
        created = post(self.url, "CreateCampaign", new_campaign_body("guarded"), GOOD)
        assert created.status_code == 200, created.text
        self.campaign_id: str = created.json()["campaign"]["id"]
        issued = post(
            self.url, "IssueCoupon", {"campaignId": self.campaign_id, "userId": "holder"}, {}
        )
        assert issued.status_code == 200, issued.text
        self.code: str = issued.json()["coupon"]["code"]


@pytest.fixture(scope="module", params=["memory", "postgres"])
def guarded(request: pytest.FixtureRequest) -> Iterator[Guarded]:
    env = {"COUPON_ADMIN_TOKEN": TOKEN}
    database = None
    if request.param == "postgres":
        env.update(request.getfixturevalue("server_env"))
        database = env["DATABASE_URL"]
    server = ServerProcess(env=env, in_memory=request.param == "memory")
    try:
        server.wait_ready()
        yield Guarded(server, database)
    finally:
        server.stop()


async def campaigns_named(database: str, name: str) -> int:
    conn = await asyncpg.connect(database)
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM campaigns WHERE name = $1", name)
        return count
    finally:
        await conn.close()


@pytest.mark.parametrize("case", list(REFUSED))
async def test_create_campaign_without_the_token_is_refused_and_creates_nothing(
    guarded: Guarded, case: str
) -> None:
    name = f"refused-{uuid.uuid4()}"
    response = post(guarded.url, "CreateCampaign", new_campaign_body(name), REFUSED[case])
    assert_unauthenticated(response, case)
    assert name not in response.text
    if guarded.database is not None:
        assert await campaigns_named(guarded.database, name) == 0


@pytest.mark.parametrize("case", list(REFUSED))
def test_get_campaign_without_the_token_is_refused_and_reveals_nothing(
    guarded: Guarded, case: str
) -> None:
    response = post(guarded.url, "GetCampaign", {"campaignId": guarded.campaign_id}, REFUSED[case])
    assert_unauthenticated(response, case)
    assert guarded.code not in response.text and "guarded" not in response.text


def test_unknown_campaign_without_the_token_is_unauthenticated_not_not_found(
    guarded: Guarded,
) -> None:
    """Without the token, nobody learns which campaign ids exist."""
    response = post(guarded.url, "GetCampaign", {"campaignId": str(uuid.uuid4())}, {})
    assert_unauthenticated(response)


async def test_the_right_token_passes_and_refusals_changed_nothing(guarded: Guarded) -> None:
    name = f"allowed-{uuid.uuid4()}"
    created = post(guarded.url, "CreateCampaign", new_campaign_body(name), GOOD)
    assert created.status_code == 200, created.text
    got = post(guarded.url, "GetCampaign", {"campaignId": guarded.campaign_id}, GOOD)
    assert got.status_code == 200, got.text
    view = got.json()
    # Only the coupon issued at set-up: the refused requests added nothing.
    assert [c["code"] for c in view["coupons"]] == [guarded.code]
    assert view["campaign"]["issuedCount"] == "1"
    if guarded.database is not None:
        assert await campaigns_named(guarded.database, name) == 1
        assert await campaigns_named(guarded.database, "guarded") >= 1


@pytest.mark.parametrize("case", list(ALSO_GOOD))
def test_the_scheme_passes_in_any_case(guarded: Guarded, case: str) -> None:
    got = post(guarded.url, "GetCampaign", {"campaignId": guarded.campaign_id}, ALSO_GOOD[case])
    assert got.status_code == 200, got.text
    assert guarded.code in got.text


@pytest.mark.parametrize("case", list(TRAILING_WHITESPACE))
async def test_whitespace_after_the_token_is_not_part_of_it(guarded: Guarded, case: str) -> None:
    body = json.dumps({"campaignId": guarded.campaign_id}).encode()
    reader, writer = await open_connection(guarded.url)
    try:
        writer.write(
            f"POST {RPC}GetCampaign HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n".encode()
            + b"Authorization: "
            + TRAILING_WHITESPACE[case]["authorization"]
            + b"\r\n\r\n"
            + body
        )
        response = await asyncio.wait_for(read_response(reader), 10)
    finally:
        writer.close()
    assert response.status == 200, response.body
    assert guarded.code in response.body.decode()


def get_campaign_over_http2(port: int, campaign_id: str, authorization: bytes) -> Response:
    """GetCampaign as a Connect unary call over HTTP/2 (prior knowledge), the header list
    sent as given: h2's own client would trim the whitespace, or refuse it."""
    client = H2Client(port)
    try:
        client.conn.config.validate_outbound_headers = False
        client.conn.config.normalize_outbound_headers = False
        stream_id = client.conn.get_next_available_stream_id()
        body = json.dumps({"campaignId": campaign_id}).encode()
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":authority", b"localhost"),
            (b":path", f"{RPC}GetCampaign".encode()),
            (b"content-type", b"application/json"),
            (b"authorization", authorization),
        ]
        client.conn.send_headers(stream_id, headers)
        client.conn.send_data(stream_id, body, end_stream=True)
        client.responses[stream_id] = Response()
        client.flush()
        [response] = client.wait(stream_id)
        assert client.goaway is None
        return response
    finally:
        client.close()


@pytest.mark.parametrize("case", list(TRAILING_WHITESPACE))
def test_whitespace_after_the_token_is_not_part_of_it_over_http2(
    guarded: Guarded, case: str
) -> None:
    response = get_campaign_over_http2(
        guarded.server.port, guarded.campaign_id, TRAILING_WHITESPACE[case]["authorization"]
    )
    assert response.reset is None, response
    assert response.headers[b":status"] == b"200", response
    assert guarded.code in response.body.decode()


@pytest.mark.parametrize("headers", [{}, REFUSED["wrong token"], GOOD])
def test_issue_coupon_needs_no_token(guarded: Guarded, headers: dict[str, bytes]) -> None:
    user = f"user-{uuid.uuid4()}"
    response = post(
        guarded.url, "IssueCoupon", {"campaignId": guarded.campaign_id, "userId": user}, headers
    )
    assert response.status_code == 200, response.text
    assert response.json()["coupon"]["userId"] == user


# --- with no token configured (development) --------------------------------------------


@pytest.fixture(scope="module")
def open_server() -> Iterator[ServerProcess]:
    server = ServerProcess(env={}, in_memory=True)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize(
    "headers", [{}, REFUSED["wrong token"], REFUSED["no Bearer scheme"]], ids=str
)
def test_without_a_configured_token_admin_rpcs_are_open(
    open_server: ServerProcess, headers: dict[str, bytes]
) -> None:
    created = post(open_server.url, "CreateCampaign", new_campaign_body("open"), headers)
    assert created.status_code == 200, created.text
    campaign_id = created.json()["campaign"]["id"]
    got = post(open_server.url, "GetCampaign", {"campaignId": campaign_id}, headers)
    assert got.status_code == 200, got.text
    assert got.json()["campaign"]["name"] == "open"


# --- the comparison ----------------------------------------------------------------------


def fake_context(headers: dict[str, str]) -> Any:
    """AdminGuard reads the request headers of the Connect request context, and adds to
    its response headers."""
    return SimpleNamespace(request_headers=headers, response_headers={})


@pytest.mark.parametrize("case", [*REFUSED, "good", *ALSO_GOOD, *TRAILING_WHITESPACE])
def test_admin_guard_compares_through_hmac_compare_digest(
    monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """Every check, right or wrong, short or long, is decided by hmac.compare_digest on
    the whole header value: nothing returns early on a length or a prefix."""
    calls: list[tuple[bytes, bytes]] = []
    real = connect_service.hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(connect_service.hmac, "compare_digest", recording)
    raw = (
        GOOD
        if case == "good"
        else ALSO_GOOD.get(case) or TRAILING_WHITESPACE.get(case) or REFUSED[case]
    )
    headers = {k: v.decode("latin-1") for k, v in raw.items()}
    guard = AdminGuard(TOKEN)
    if case not in REFUSED:
        guard.check(fake_context(headers))
    else:
        with pytest.raises(ConnectError) as refused:
            guard.check(fake_context(headers))
        assert refused.value.code == Code.UNAUTHENTICATED
    expected = f"bearer {TOKEN}".encode()
    assert len(calls) == 1
    given, against = calls[0]
    assert against == expected
    # The whole value, its scheme lowered and the spaces after the scheme made one.
    scheme, space, credentials = headers.get("authorization", "").strip(" \t").partition(" ")
    assert given == (scheme.lower() + space + credentials.lstrip(" ")).encode()


def test_admin_guard_has_no_other_comparison_of_the_header() -> None:
    """No ==, !=, in, startswith... on the secret: only compare_digest decides."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(AdminGuard)))
    compares = [node for node in ast.walk(tree) if isinstance(node, ast.Compare)]
    assert compares == [], [ast.unparse(node) for node in compares]
    methods = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in ("startswith", "endswith", "find")
    }
    assert methods == set()
    calls = [ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)]
    assert "hmac.compare_digest" in calls


def test_no_token_configured_lets_everything_through_without_comparing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fail(a: bytes, b: bytes) -> bool:
        raise AssertionError("nothing to compare against")

    monkeypatch.setattr(connect_service.hmac, "compare_digest", fail)
    AdminGuard("").check(fake_context({}))
    AdminGuard("").check(fake_context({"authorization": "Bearer anything"}))
