"""Refusals the HTTP layers make themselves, before the Connect application sees the
request (a header list or a body over the limit), answered in the caller's protocol, the
same over HTTP/1.1 and HTTP/2.

A client of each protocol reads the code its protocol's way, and an HTTP status means
little to most of them: gRPC and gRPC-Web read the status from `grpc-status` (HTTP 431
is `unknown` to them, 429 is `unavailable`, which says "retry" to a request that can
never succeed), a Connect stream from its end-stream message. So on the service's paths
each gets `resource_exhausted` as its protocol carries it:

* gRPC and gRPC-Web: HTTP 200, trailers-only (grpc-status 8, grpc-message), no body;
* a Connect stream (application/connect+*): HTTP 200 and one end-stream message;
* a Connect unary call, and anything else there: the Connect unary error (HTTP 429).

Outside them (health, metrics, the example page) it is plain HTTP: 431 or 413.

A refusal to a page of an allowed origin (COUPON_CORS_ORIGINS) carries the CORS headers
the app's own answers carry (with_cors): without them the browser would hide the answer
and report a network error.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from coupon.entrypoints.cors import Cors
from coupon.entrypoints.fast_issue import Answer, error_answer

# The paths the Connect application, gRPC server reflection and health checking serve.
API_PREFIXES = (
    b"/coupon.v1.CouponService/",
    b"/grpc.reflection.v1.ServerReflection/",
    b"/grpc.reflection.v1alpha.ServerReflection/",
    b"/grpc.health.v1.Health/",
)
PLAIN = b"text/plain; charset=utf-8"
# A media type safe to echo in an answer's Content-Type.
_MEDIA = re.compile(rb"application/[a-z0-9.+-]+")
# gRPC's status for each code a refusal here carries.
_GRPC_STATUS = {Code.RESOURCE_EXHAUSTED: b"8", Code.INVALID_ARGUMENT: b"3"}
# The Connect protocol's flag of the end-stream message.
_END_STREAM = 0x02


def refusal(
    path: bytes,
    content_type: bytes,
    message: str,
    *,
    status: int,
    plain: str,
    code: Code = Code.RESOURCE_EXHAUSTED,
) -> Answer:
    """The answer refusing a request to `path` of `content_type` (b"": not known): on an API
    path, `code` with `message` as the caller's protocol sends it; elsewhere `status` with
    `plain` as text."""
    if not path.startswith(API_PREFIXES):
        return status, PLAIN, plain.encode(), []
    media = content_type.split(b";", 1)[0].strip().lower()
    if media.startswith(b"application/grpc-web"):
        family = b"application/grpc-web"
    elif media == b"application/grpc" or media.startswith(b"application/grpc+"):
        family = b"application/grpc"
    elif media.startswith(b"application/connect+") and _MEDIA.fullmatch(media):
        end = {"error": {"code": code.value, "message": message}}
        payload = json.dumps(end, ensure_ascii=False).encode()
        return 200, media, struct.pack(">BI", _END_STREAM, len(payload)) + payload, []
    else:
        return error_answer(ConnectError(code, message))
    trailers = [(b"grpc-status", _GRPC_STATUS[code]), (b"grpc-message", grpc_message(message))]
    return 200, media if _MEDIA.fullmatch(media) else family, b"", trailers


def with_cors(
    answer: Answer, path: bytes, request: Iterable[tuple[bytes, bytes]], cors: Cors | None
) -> Answer:
    """`answer` to a request with its header list `request` (names in lower case), with the
    CORS headers when it came from an allowed origin to the service (as app.py adds them)."""
    if cors is None or not path.startswith(API_PREFIXES[0]):
        return answer
    added = cors.refusal_headers(request)
    if not added:
        return answer
    status, media, payload, extra = answer
    return status, media, payload, [*extra, *added]


def body_refusal(
    path: bytes, content_type: bytes, size: int, limit: int, *, declared: bool
) -> Answer:
    """The answer refusing a request body over `limit`, whichever HTTP version carried it:
    of `size` bytes when its Content-Length `declared` so, else (sent chunked, or over
    HTTP/2 without a content-length) of at least `size` bytes, what has arrived of it or
    what its first message's prefix says, as the rest of it is never read."""
    of = f"{size}" if declared else f"at least {size}"
    return refusal(
        path,
        content_type,
        f"request body of {of} bytes is over the limit of {limit} bytes",
        status=413,
        plain=f"request body is limited to {limit} bytes",
    )


def grpc_message(message: str) -> bytes:
    """`message` as grpc-message carries it: UTF-8, percent-encoded but for the printable
    ASCII characters other than "%" (the gRPC over HTTP/2 spec)."""
    return b"".join(
        bytes((byte,)) if 0x20 <= byte <= 0x7E and byte != 0x25 else b"%%%02X" % byte
        for byte in message.encode()
    )


# An enveloped message's prefix: a flags byte, then the message's length (4 bytes).
PREFIX_BYTES = 5
# Content-Type header values seen, and whether their bodies are enveloped.
_ENVELOPED: dict[bytes, bool] = {}


def enveloped(content_type: bytes) -> bool:
    """A body of enveloped messages, each after its prefix: gRPC, gRPC-Web (not its text
    form, in base64) and the Connect protocol's streams. (Remembered per header value:
    clients send one.)"""
    known = _ENVELOPED.get(content_type)
    if known is None:
        media = content_type.split(b";", 1)[0].strip().lower()
        known = media.startswith((b"application/grpc", b"application/connect+")) and not (
            media.startswith(b"application/grpc-web-text")
        )
        if len(_ENVELOPED) < 64:
            _ENVELOPED[content_type] = known
    return known


def declared_size(prefix: bytes, data: bytes) -> tuple[bytes | None, int]:
    """An enveloped body's first bytes so far (`prefix`) and the next (`data`): the prefix
    still to complete (None once whole), and the size of body its first message declares
    (0 before the prefix is whole). A body of no declared length over the limit by this is
    refused before the rest of it arrives."""
    prefix += data[: PREFIX_BYTES - len(prefix)]
    if len(prefix) < PREFIX_BYTES:
        return prefix, 0
    return None, PREFIX_BYTES + int.from_bytes(prefix[1:], "big")
