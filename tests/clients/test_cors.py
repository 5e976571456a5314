"""CORS on the Connect and gRPC-Web paths, against a real server process: allowed origins
get the preflight and the response headers a browser needs, others and the default
configuration get none."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from coupon.entrypoints.settings import SettingsError, load_settings
from harness.server import ServerProcess
from tests.clients.h2client import H2Client, Response

pytestmark = pytest.mark.e2e

PAGE = "http://127.0.0.1:5173"
ISSUE = "/coupon.v1.CouponService/IssueCoupon"


@pytest.fixture(scope="module")
def cors_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"COUPON_CORS_ORIGINS": f"{PAGE}, https://shop.example.com"}
    with ServerProcess(env=env, in_memory=True, log_dir=tmp_path_factory.mktemp("cors")) as proc:
        yield proc


def preflight(
    url: str, origin: str, headers: str = "content-type,connect-protocol-version"
) -> httpx.Response:
    return httpx.options(
        url + ISSUE,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": headers,
        },
    )


def listed(value: str) -> set[str]:
    return {h.strip().lower() for h in value.split(",")}


def issue(url: str, origin: str | None, content_type: str = "application/json") -> httpx.Response:
    headers = {"Content-Type": content_type}
    if origin:
        headers["Origin"] = origin
    body = json.dumps({"campaignId": "nope", "userId": "ana"})
    return httpx.post(url + ISSUE, headers=headers, content=body)


def test_preflight_from_an_allowed_origin_is_answered_and_cached(
    cors_server: ServerProcess,
) -> None:
    response = preflight(cors_server.url, PAGE)
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == PAGE
    # Only what is served: every RPC answers GET with 405.
    assert listed(response.headers["access-control-allow-methods"]) == {"post"}
    allowed = {
        h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")
    }
    assert {
        "content-type",
        "connect-protocol-version",
        "connect-timeout-ms",
        "grpc-timeout",
        "x-grpc-web",
        "x-user-agent",
        "authorization",
    } <= allowed
    assert response.headers["access-control-max-age"] == "7200"


# What a compressing browser client sends: Content-Encoding and Accept-Encoding for Connect
# unary, Connect-Content-Encoding and Connect-Accept-Encoding for streaming, Grpc-Encoding
# and Grpc-Accept-Encoding for gRPC-Web.
COMPRESSION_HEADERS = (
    "content-encoding",
    "accept-encoding",
    "connect-content-encoding",
    "connect-accept-encoding",
    "grpc-encoding",
    "grpc-accept-encoding",
)


def test_a_preflight_for_a_compressing_client_allows_its_headers(
    cors_server: ServerProcess,
) -> None:
    """A browser allows the request only when every header it asked for is allowed."""
    asked = ",".join(("content-type", "connect-protocol-version", *COMPRESSION_HEADERS))
    response = preflight(cors_server.url, PAGE, asked)
    assert response.status_code == 204
    assert listed(asked) <= listed(response.headers["access-control-allow-headers"])


def test_responses_to_an_allowed_origin_expose_the_protocol_headers(
    cors_server: ServerProcess,
) -> None:
    for content_type in ("application/json", "application/grpc-web+json"):
        response = issue(cors_server.url, "https://shop.example.com", content_type)
        assert response.headers["access-control-allow-origin"] == "https://shop.example.com"
        exposed = listed(response.headers["access-control-expose-headers"])
        assert {
            "grpc-status",
            "grpc-message",
            "grpc-status-details-bin",
            "grpc-encoding",
            "grpc-accept-encoding",
            "content-encoding",
            "connect-content-encoding",
            "accept-encoding",
            "connect-accept-encoding",
            "retry-after-ms",
        } <= exposed
        assert "origin" in response.headers["vary"].lower()


def test_other_origins_and_requests_without_origin_get_no_cors_headers(
    cors_server: ServerProcess,
) -> None:
    assert (
        "access-control-allow-origin"
        not in preflight(cors_server.url, "https://evil.example").headers
    )
    for origin in ("https://evil.example", None):
        response = issue(cors_server.url, origin)
        assert response.status_code == 400  # answered as usual
        assert not any(name.startswith("access-control-") for name in response.headers)


def test_no_origins_configured_means_no_cors_at_all(tmp_path: Path) -> None:
    proc = ServerProcess(env={}, in_memory=True, log_dir=tmp_path)
    try:
        proc.wait_ready()
        response = preflight(proc.url, PAGE)
        assert "access-control-allow-origin" not in response.headers
        assert "access-control-allow-origin" not in issue(proc.url, PAGE).headers
    finally:
        proc.stop()


def test_cors_origins_are_parsed_and_checked() -> None:
    settings = load_settings(
        {"COUPON_CORS_ORIGINS": " https://a.example ,http://127.0.0.1:8080,"}, dotenv=None
    )
    assert settings.cors_origins == ("https://a.example", "http://127.0.0.1:8080")
    assert load_settings({}, dotenv=None).cors_origins == ()
    for bad in ("a.example", "https://a.example/path", "*", "ftp://a.example", "https://A.example"):
        with pytest.raises(SettingsError, match="COUPON_CORS_ORIGINS"):
            load_settings({"COUPON_CORS_ORIGINS": bad}, dotenv=None)


def test_tls_settings_name_the_variable(tmp_path: Path) -> None:
    pem = tmp_path / "cert.pem"
    pem.write_text("not checked here")
    with pytest.raises(SettingsError, match="COUPON_TLS_KEY_FILE must be set too"):
        load_settings({"COUPON_TLS_CERT_FILE": str(pem)}, dotenv=None)
    with pytest.raises(SettingsError, match="COUPON_TLS_CERT_FILE must be set too"):
        load_settings({"COUPON_TLS_KEY_FILE": str(pem)}, dotenv=None)
    with pytest.raises(SettingsError, match="COUPON_TLS_CERT_FILE must name a readable"):
        load_settings(
            {
                "COUPON_TLS_CERT_FILE": str(tmp_path / "missing.pem"),
                "COUPON_TLS_KEY_FILE": str(pem),
            },
            dotenv=None,
        )
    both = load_settings(
        {"COUPON_TLS_CERT_FILE": str(pem), "COUPON_TLS_KEY_FILE": str(pem)}, dotenv=None
    )
    assert both.tls_cert_file == both.tls_key_file == str(pem)


def test_grpc_web_text_mode_from_an_allowed_origin(cors_server: ServerProcess) -> None:
    """What the grpc-web JavaScript client sends in its default text mode: the preflight
    allows its headers, and its call is answered, in text mode, with the CORS headers."""
    asked = "content-type,x-grpc-web,x-user-agent,grpc-timeout"
    allowed = preflight(cors_server.url, PAGE, asked)
    assert allowed.status_code == 204
    assert listed(asked) <= listed(allowed.headers["access-control-allow-headers"])
    message = b"\n\x04nope\x12\x03ana"  # IssueCouponRequest(campaign_id="nope", user_id="ana")
    body = base64.b64encode(struct.pack(">BI", 0, len(message)) + message)
    response = httpx.post(
        cors_server.url + ISSUE,
        headers={"Content-Type": "application/grpc-web-text", "Origin": PAGE, "X-Grpc-Web": "1"},
        content=body,
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/grpc-web-text"
    assert response.headers["access-control-allow-origin"] == PAGE
    assert "grpc-status" in listed(response.headers["access-control-expose-headers"])
    assert b"grpc-status: 3" in base64.b64decode(response.content)  # the trailer frame


OVER_LIMIT = 70 * 1024
SHOP = "https://shop.example.com"


def chunks(body: bytes) -> Iterator[bytes]:
    """A body sent without a Content-Length (chunked over HTTP/1.1)."""
    for at in range(0, len(body), 8192):
        yield body[at : at + 8192]


def refused_over_h2(
    url_port: int, headers: dict[str, str], body: bytes, declared: bool
) -> Response:
    """The answer to a POST of `body` over HTTP/2, sent in frames as the window allows until
    the server answers (`declared`: with its content-length)."""
    with H2Client(url_port) as client:
        stream_id = client.conn.get_next_available_stream_id()
        fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"localhost")]
        fields += [(b":path", ISSUE.encode())]
        fields += [(k.encode(), v.encode()) for k, v in headers.items()]
        if declared:
            fields.append((b"content-length", str(len(body)).encode()))
        client.conn.send_headers(stream_id, fields)
        response = client.responses[stream_id] = Response()
        client.flush()
        sent = 0
        while sent < len(body) and not response.ended and response.reset is None:
            frame = body[sent : sent + 16_384]
            if client.conn.local_flow_control_window(stream_id) < len(frame):
                client.read()
                continue
            client.conn.send_data(stream_id, frame, end_stream=sent + len(frame) == len(body))
            client.flush()
            sent += len(frame)
        [response] = client.wait(stream_id)
    return response


def over_the_limit(
    url: str, port: int, http2: bool, headers: dict[str, str], body: bytes, declared: bool
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of the answer to a POST to IssueCoupon."""
    if http2:
        answer = refused_over_h2(port, headers, body, declared)
        fields = {k.decode(): v.decode() for k, v in answer.headers.items()}
        return int(fields[":status"]), fields, answer.body
    content = body if declared else chunks(body)
    response = httpx.post(url + ISSUE, headers=headers, content=content)
    return response.status_code, dict(response.headers), response.content


@pytest.mark.parametrize("http2", [False, True], ids=["h1", "h2"])
@pytest.mark.parametrize("content_type", ["application/json", "application/grpc-web+proto"])
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "streamed"])
def test_a_body_over_the_limit_from_an_allowed_origin_is_readable_by_the_page(
    cors_server: ServerProcess, http2: bool, content_type: str, declared: bool
) -> None:
    """Refused by the HTTP layer before the app sees it, and still answered with the CORS
    headers: a browser shows the page resource_exhausted, not a network error."""
    body = b"x" * OVER_LIMIT
    if "grpc" in content_type:
        body = struct.pack(">BI", 0, len(body)) + body
    headers = {"content-type": content_type, "origin": SHOP}
    server = (cors_server.url, cors_server.port, http2)
    status, answer, payload = over_the_limit(*server, headers, body, declared)
    if content_type == "application/json":
        assert status == 429
        assert json.loads(payload)["code"] == "resource_exhausted"
    else:
        assert (status, answer["grpc-status"]) == (200, "8")
    assert answer["access-control-allow-origin"] == SHOP
    assert "grpc-status" in listed(answer["access-control-expose-headers"])
    assert "origin" in answer["vary"].lower()
    headers["origin"] = "https://evil.example"
    status, answer, _ = over_the_limit(*server, headers, body, declared)
    assert status in (200, 429)
    assert not any(name.startswith("access-control-") for name in answer)


@pytest.mark.parametrize("http2", [False, True], ids=["h1", "h2"])
def test_a_header_list_over_the_limit_from_an_allowed_origin_is_readable_by_the_page(
    cors_server: ServerProcess, http2: bool
) -> None:
    # Origin after the fields over the limit, where a browser puts it (after the page's).
    headers = {"content-type": "application/json"}
    headers |= {f"x-filler-{i}": "y" * 200 for i in range(120)}
    headers |= {"origin": "https://shop.example.com"}
    with httpx.Client(http1=not http2, http2=http2) as client:
        response = client.post(cors_server.url + ISSUE, headers=headers, content=b"{}")
    assert response.status_code == 429, response.text
    assert response.json()["code"] == "resource_exhausted"
    assert response.headers["access-control-allow-origin"] == "https://shop.example.com"
