"""gRPC-Web's text mode (`application/grpc-web-text`, `+proto`), the default of the grpc-web
JavaScript client (`mode=grpcwebtext`): the body of each way is gRPC-Web's binary framing
in base64. Served as a translation in front of the binary gRPC-Web path: the request body
is decoded as it arrives and handed on as `application/grpc-web+proto`, and each chunk of
the answer's body is encoded on its own (padded: the gRPC-Web specification lets a client
concatenate padded chunks), under the content type the client sent.

Only protobuf: the specification defines no JSON text mode, so `grpc-web-text+json` (like
any other codec) is refused as an unsupported content type, as before."""

from __future__ import annotations

import binascii

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from litestar.types import ASGIApp, Message, Receive, ReceiveMessage, Scope, Send

# The text types served (the bare one means protobuf), as a lowercased Content-Type's
# media type names them.
TEXT_TYPES = frozenset({b"application/grpc-web-text", b"application/grpc-web-text+proto"})
BINARY = b"application/grpc-web+proto"
INVALID = "request body: not valid base64 (gRPC-Web text)"


def text_media(content_type: bytes) -> bytes | None:
    """The text type a (lowercased) Content-Type names, or None for any other."""
    if not content_type.startswith(b"application/grpc-web-text"):
        return None
    media = content_type.split(b";", 1)[0].strip()
    return media if media in TEXT_TYPES else None


class Base64Body:
    """Decodes a base64 body as its chunks arrive, split anywhere: whole 4-character
    quanta are decoded at once, the rest waits for the next chunk. A quantum with padding
    ends one encoded chunk of the client's; another may follow it. Anything else that is
    not base64 raises ConnectError `invalid_argument`."""

    __slots__ = ("_rest",)

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> bytes:
        text = self._rest + data
        whole = len(text) - len(text) % 4
        self._rest = text[whole:]
        return _decode(text[:whole])

    def end(self) -> bytes:
        """What the last, unpadded, quantum holds (a client may leave the padding out)."""
        rest, self._rest = self._rest, b""
        if not rest:
            return b""
        return _decode(rest + b"=" * (-len(rest) % 4))


def _decode(text: bytes) -> bytes:
    decoded = bytearray()
    start = 0
    try:
        while (pad := text.find(b"=", start)) >= 0:
            end = (pad // 4 + 1) * 4  # the end of the padded quantum
            decoded += binascii.a2b_base64(text[start:end], strict_mode=True)
            start = end
        decoded += binascii.a2b_base64(text[start:], strict_mode=True)
    except binascii.Error:
        raise ConnectError(Code.INVALID_ARGUMENT, INVALID) from None
    return bytes(decoded)


async def serve_text(
    app: ASGIApp, scope: Scope, receive: Receive, send: Send, media: bytes
) -> None:
    """Serve a text-mode request of type `media` with `app`, which serves the binary form."""
    headers = [
        (name, BINARY if name == b"content-type" else value)
        for name, value in scope["headers"]
        if name != b"content-length"  # the decoded body is shorter
    ]
    body = Base64Body()
    ended = False

    async def receive_decoding() -> ReceiveMessage:
        nonlocal ended
        message = await receive()
        if message["type"] != "http.request" or ended:
            return message
        decoded = body.feed(message.get("body", b""))
        if not message.get("more_body", False):
            ended = True
            decoded += body.end()
        return {**message, "body": decoded}

    encoding = False

    async def send_encoding(message: Message) -> None:
        nonlocal encoding
        if message["type"] == "http.response.start":
            # The binary framing (a gRPC-Web answer, trailers-only included) is encoded;
            # an HTTP error of the Connect application (a JSON body) goes as it is.
            answer = message.get("headers", ())
            encoding = any(
                name.lower() == b"content-type" and value.startswith(b"application/grpc-web")
                for name, value in answer
            )
            if encoding:
                message = {
                    **message,
                    "headers": [
                        (name, media if name.lower() == b"content-type" else value)
                        for name, value in answer
                        if name.lower() != b"content-length"
                    ],
                }
        elif message["type"] == "http.response.body" and encoding:
            data = message.get("body", b"")
            if data:
                message = {**message, "body": binascii.b2a_base64(data, newline=False)}
        await send(message)

    await app({**scope, "headers": headers}, receive_decoding, send_encoding)  # type: ignore[arg-type]
