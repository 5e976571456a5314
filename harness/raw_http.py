"""HTTP/1.1 by hand, for what no client library sends: hostile requests, and a connection
kept idle on purpose."""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

ISSUE = "/coupon.v1.CouponService/IssueCoupon"


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, object]:
        loaded = json.loads(self.body)
        assert isinstance(loaded, dict)
        return loaded


async def open_connection(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return await asyncio.open_connection(parts.hostname, parts.port, limit=1 << 20)


def issue_request(campaign_id: str, user_id: str, *, close: bool = False) -> bytes:
    body = json.dumps({"campaignId": campaign_id, "userId": user_id}).encode()
    head = (
        f"POST {ISSUE} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
    )
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + body


async def read_response(reader: asyncio.StreamReader) -> Response:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("closed before an answer")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while size := int((await reader.readline()).split(b";")[0], 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        while (await reader.readline()) not in (b"\r\n", b""):
            pass  # trailer fields
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Response(status, headers, body)


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float) -> bool:
    """True when the server ends the connection cleanly (EOF, not a reset) in time, having
    sent nothing more."""
    return await last_words(reader, timeout) == b""


async def last_words(reader: asyncio.StreamReader, timeout: float) -> bytes | None:
    """What the server sends before it ends the connection cleanly; None when it does not
    end it in time."""
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    except TimeoutError:
        return None


# gRPC's status codes by number, as the Connect protocol spells them.
GRPC_CODES = dict(
    enumerate(
        (
            "ok",
            "canceled",
            "unknown",
            "invalid_argument",
            "deadline_exceeded",
            "not_found",
            "already_exists",
            "permission_denied",
            "resource_exhausted",
            "failed_precondition",
            "aborted",
            "out_of_range",
            "unimplemented",
            "internal",
            "unavailable",
            "data_loss",
            "unauthenticated",
        )
    )
)
# The code a gRPC, gRPC-Web or Connect streaming client reads from an HTTP status other
# than 200 (the same table in the gRPC and Connect specs).
CODE_OF_HTTP_STATUS = {
    400: "internal",
    401: "unauthenticated",
    403: "permission_denied",
    404: "unimplemented",
    429: "unavailable",
    502: "unavailable",
    503: "unavailable",
    504: "unavailable",
}


def rpc_error(
    status: int, headers: dict[str, str], body: bytes, content_type: str
) -> tuple[str, str]:
    """The error code and message a client that sent `content_type` reads from an answer,
    as its protocol says: gRPC and gRPC-Web from grpc-status (a trailers-only answer here:
    headers, no body), a Connect stream from its end-stream message, a Connect unary call
    from the JSON body; an HTTP status other than 200 by the specs' table, but for a Connect
    unary call's JSON error body."""
    if content_type.startswith(("application/grpc", "application/connect+")):
        if status != 200:
            return CODE_OF_HTTP_STATUS.get(status, "unknown"), f"HTTP {status}"
        family = content_type.split("+", 1)[0].removesuffix("-text")
        assert headers["content-type"].startswith(family), headers
    if content_type.startswith("application/grpc"):
        assert body == b"", "trailers-only: no body"
        return GRPC_CODES[int(headers["grpc-status"])], unquote(headers.get("grpc-message", ""))
    if content_type.startswith("application/connect+"):
        assert headers["content-type"] == content_type, headers
        flags, length = struct.unpack(">BI", body[:5])
        assert flags == 0x02 and len(body) == 5 + length, "one end-stream message"
        error = json.loads(body[5:])["error"]
        return error["code"], error["message"]
    if status == 200 or not headers.get("content-type", "").startswith("application/json"):
        return CODE_OF_HTTP_STATUS.get(status, "unknown"), f"HTTP {status}"
    error = json.loads(body)
    return error["code"], error["message"]


async def head(url: str, path: str) -> tuple[bytes, dict[str, str], bytes]:
    """HEAD over HTTP/1.1 by hand (no client library shows what follows the fields): the
    status line, the fields (names lowered) and whatever came before the server closed the
    connection (nothing, for HEAD)."""
    reader, writer = await open_connection(url)
    writer.write(f"HEAD {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    fields_part, _, rest = answer.partition(b"\r\n\r\n")
    status, *lines = fields_part.split(b"\r\n")
    fields = {
        name.strip().lower().decode(): value.strip().decode()
        for name, _, value in (line.partition(b":") for line in lines)
    }
    return status, fields, rest
