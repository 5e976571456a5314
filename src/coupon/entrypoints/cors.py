"""CORS for the Connect and gRPC-Web paths, so that a web page on another origin can call
the API (connect-web). Only the origins in COUPON_CORS_ORIGINS get CORS headers; with none
configured nothing here runs, and a request without an `Origin` header costs one scan of
its headers (the IssueCoupon hot path)."""

from __future__ import annotations

from collections.abc import Iterable

from litestar.types import Message, Receive, Scope, Send

# What the Connect and gRPC-Web protocols send (connect-web, grpc-web clients), beside the
# admin token: a client that compresses names its coding in Content-Encoding (Connect
# unary), Connect-Content-Encoding (Connect streaming) or Grpc-Encoding (gRPC-Web), and
# what it accepts in the matching *-Accept-Encoding; none of these is safelisted, so a
# preflight that did not allow them would keep a compressing client from calling at all.
ALLOWED_HEADERS = (
    b"Content-Type, Connect-Protocol-Version, Connect-Timeout-Ms, Connect-Accept-Encoding, "
    b"Connect-Content-Encoding, Content-Encoding, Accept-Encoding, Grpc-Timeout, "
    b"Grpc-Encoding, Grpc-Accept-Encoding, X-Grpc-Web, X-User-Agent, Authorization"
)
# What a client must be able to read: the gRPC(-Web) status and error details, the Connect
# protocol's headers and trailers, the codings the service accepts (sent with an
# `unimplemented` for a coding it does not), and the retry hint of overload answers.
EXPOSED_HEADERS = (
    b"Grpc-Status, Grpc-Message, Grpc-Status-Details-Bin, Grpc-Encoding, "
    b"Grpc-Accept-Encoding, Content-Encoding, Connect-Content-Encoding, Accept-Encoding, "
    b"Connect-Accept-Encoding, Retry-After-Ms"
)
# POST only: no RPC of the API is marked free of side effects, so none is served by GET
# (which answers 405), and a preflight must not promise it.
ALLOWED_METHODS = b"POST"
# Browsers cap it (Chromium at 2 hours); one preflight per origin and path per cap.
MAX_AGE = b"7200"


class Cors:
    def __init__(self, origins: Iterable[str]) -> None:
        self._origins = frozenset(origin.encode() for origin in origins)

    def allowed_origin(self, scope: Scope) -> bytes | None:
        """The request's Origin when it is one of ours; one pass over the headers."""
        for name, value in scope["headers"]:
            if name == b"origin":
                return value if value in self._origins else None
        return None

    async def answer(self, scope: Scope, receive: Receive, send: Send, origin: bytes) -> bool:
        """Answer a preflight (OPTIONS with Access-Control-Request-Method); False for any
        other request, which then goes on with `sending` around its `send`."""
        if scope.get("method") != "OPTIONS" or not any(
            name == b"access-control-request-method" for name, _ in scope["headers"]
        ):
            return False
        await send(
            {
                "type": "http.response.start",
                "status": 204,
                "headers": [
                    (b"access-control-allow-origin", origin),
                    (b"access-control-allow-methods", ALLOWED_METHODS),
                    (b"access-control-allow-headers", ALLOWED_HEADERS),
                    (b"access-control-max-age", MAX_AGE),
                    (
                        b"vary",
                        b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
                    ),
                    (b"content-length", b"0"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return True

    def refusal_headers(self, request: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The CORS response headers for a request the HTTP layer answers itself (a header
        list or a body over the limit, http/refusal.py), from its header list (names in
        lower case): none unless its Origin is one of ours. Without them a browser would
        see a network error where the service said `resource_exhausted`."""
        for name, value in request:
            if name == b"origin":
                return response_headers(value) if value in self._origins else []
        return []

    @staticmethod
    def sending(send: Send, origin: bytes) -> Send:
        """`send` with the CORS response headers added to the response's start."""
        added = response_headers(origin)

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *added]}
            await send(message)

        return send_with_cors


def response_headers(origin: bytes) -> list[tuple[bytes, bytes]]:
    """What an answer to an allowed origin carries."""
    return [
        (b"access-control-allow-origin", origin),
        (b"access-control-expose-headers", EXPOSED_HEADERS),
        (b"vary", b"Origin"),
    ]
