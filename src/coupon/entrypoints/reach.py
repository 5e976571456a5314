"""Why a client's call never reached the service, in a few plain words, and the private
CA a client may be told to trust.

The generated Connect client turns a failure of the HTTP client (pyqwest) into a
ConnectError `unavailable` (`deadline_exceeded` for a time-out) whose message is the HTTP
client's debug text: the request's URL, the layers it went through, the resolver's query.
The operators' command line and the load tool say instead, in one line, `cannot reach the
service at URL: connection refused` (or `name not resolved`, `timed out`, why TLS failed,
...). An `unavailable` the service answered itself (at capacity, PostgreSQL down) is not
such a failure: it has no HTTP client error behind it, and keeps its code and message.

TLS failures say why, as curl does: the certificate's issuer is not trusted, it is not
valid for the URL's host, it has expired, it is a CA's; an https:// URL to a port that does
not speak TLS, or an http:// URL to one that does, says so and which scheme to use.

A URL where something else answers (another web server, or the service under a path it
does not have: `http://host:8000/api`) says so too, and asks for the service's base URL.

A URL is never printed with its password (`http://admin:***@host`), as the server prints
neither DATABASE_URL's nor REDIS_URL's.
"""

from __future__ import annotations

import argparse
import http
import re
import socket
import ssl
from pathlib import Path
from urllib.parse import urlsplit

import pyqwest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from coupon.entrypoints.settings import redacted, without_password

# How a client is told to trust a private CA: the option, else the variable.
TRUST_HINT = "--cacert FILE or COUPON_CA_FILE trusts a private CA"

# (words in the HTTP client's text, the plain reason), the first match wins.
_REASONS = (
    (("connection refused",), "connection refused"),
    (("dns error", "failed to lookup", "name or service not known", "no address"),
     "name not resolved"),
    (("timed out", "timeout"), "timed out"),
    (("corrupt message", "invalidcontenttype"),
     "the port does not speak TLS (use http:// in --url or COUPON_URL)"),
    (("unknownissuer",),
     f"TLS: the service's certificate is not signed by a trusted CA ({TRUST_HINT})"),
    (("causedasendentity",),
     "TLS: the service's certificate is a CA's (CA:TRUE), which is refused as a server's: "
     "make one with CA:FALSE (docs/clients.md#tls)"),
    (("certificate: expired",), "TLS: the service's certificate has expired"),
    (("certificate: notvalidyet",), "TLS: the service's certificate is not valid yet"),
    (("certificate", "tls", "ssl", "handshake"), "TLS failure"),
    (("connection reset",), "connection reset"),
    (("network is unreachable", "no route to host"), "network unreachable"),
)  # fmt: skip
# What the HTTP client raises when the exchange itself failed.
_TRANSPORT_ERRORS = (
    OSError,  # ConnectionError, TimeoutError, pyqwest.ConnectTimeout
    pyqwest.RemoteProtocolError,
    pyqwest.ReadError,
    pyqwest.WriteError,
)
# rustls's words for a certificate not valid for the host asked for, and the names it is for.
_WRONG_NAME = re.compile(r'not valid for name "([^"]*)"')
_NAMES = re.compile(r'DnsName\("([^"]*)"\)')
# How long a plain connection that failed waits to learn whether its port speaks TLS.
_PROBE_SECONDS = 2.0
# The Connect client's message for an HTTP error without a Connect body: its reason phrase.
_HTTP_PHRASES = frozenset(status.phrase for status in http.HTTPStatus)


def unreachable(exc: BaseException, url: str) -> str | None:
    """The plain reason when `exc` (a ConnectError from the generated client, or the HTTP
    client's own error) is a failure to reach the service at `url`; None when the service
    answered."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, _TRANSPORT_ERRORS):
        cause = cause.__cause__
    if cause is None:
        return None
    if isinstance(cause, TimeoutError):
        return "timed out"
    text = str(cause)
    wrong_name = _WRONG_NAME.search(text)
    if wrong_name is not None:
        names = _NAMES.findall(text[wrong_name.end() :])
        valid_for = f" (only for {', '.join(names)})" if names else ""
        return f"TLS: the service's certificate is not valid for {wrong_name[1]}{valid_for}"
    lowered = text.lower()
    reason = next(
        (reason for words, reason in _REASONS if any(word in lowered for word in words)),
        "the connection failed",
    )
    if reason in ("the connection failed", "connection reset") and _speaks_tls(url):
        return "the port speaks TLS (use https:// in --url or COUPON_URL)"
    return reason


def _speaks_tls(url: str) -> bool:
    """Whether the host and port of an http:// `url` complete a TLS handshake (whatever the
    certificate): a plain HTTP request to a TLS port is dropped without a word."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return False
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((parts.hostname, parts.port or 80), _PROBE_SECONDS) as raw,
            context.wrap_socket(raw, server_hostname=parts.hostname),
        ):
            return True
    except (OSError, ValueError):  # ssl.SSLError is an OSError
        return False


def url_problem(url: str, name: str) -> str | None:
    """Why the service's clients cannot call `url`, before any call; None if they can.
    `name`: where the URL came from (--url, COUPON_URL), as the message names it; the
    message shows the URL without its password."""
    shown = redacted(url)
    if not url.startswith(("http://", "https://")):
        return f"{name} must start with http:// or https:// (got {shown!r})"
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unclosed IPv6 bracket; it may quote the password
        return f"{name} must be a URL ({without_password(str(exc), url)}; got {shown!r})"
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        return f"{name} has no valid port: 1 to 65535 (got {shown!r})"
    if not parts.hostname:
        return f"{name} names no host (got {shown!r})"
    try:
        pyqwest.SyncRequest("POST", url)  # as the clients' HTTP client reads it
    except ValueError as exc:  # a host it cannot encode, say ("Invalid URL: ...")
        why = without_password(str(exc).removeprefix("Invalid URL: "), url)
        return f"{name} must be a URL ({why}; got {shown!r})"
    return None


def cannot_reach(url: str, reason: str) -> str:
    return f"cannot reach the service at {redacted(url)}: {reason}"


def serves_something_else(exc: BaseException) -> bool:
    """Whether `exc` says something other than the service answers at the URL: a 404
    (`unimplemented`), or a bare HTTP error (a 405 or 501 to a POST, `unknown` with the
    status's reason phrase): a web server's page, or the service under a wrong prefix. The
    clients call none of the service's methods that it does not implement."""
    return isinstance(exc, ConnectError) and (
        exc.code is Code.UNIMPLEMENTED
        or (exc.code is Code.UNKNOWN and exc.message in _HTTP_PHRASES)
        # A 200 that is no Connect answer: a catch-all page, some other JSON API.
        or (
            exc.code in (Code.UNKNOWN, Code.INTERNAL)
            and exc.message.startswith("invalid content-type")
        )
    )


def not_the_service(url: str) -> str:
    return (
        f"{redacted(url)} does not serve the coupon API (its paths are not found there); "
        "give the service's base URL, such as http://127.0.0.1:8000"
    )


def read_ca_file(path: str, name: str) -> bytes:
    """The PEM certificates of the file a client is told to trust (`name`: the option or
    variable that named it, as the message says); ValueError with a one-line message when
    it cannot be read or holds no certificate."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{name}: cannot read {path!r}: {exc.strerror or exc}") from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ValueError(f"{name} must name a PEM file of CA certificates (got {path!r})")
    return data


def add_cacert_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--cacert FILE`, as the operators' command line and the load tool both take it."""
    parser.add_argument(
        "--cacert",
        default=None,
        metavar="FILE",
        help="trust the CA certificates in this PEM file instead of the system's, for an "
        "https:// URL served with a private CA's or a self-signed certificate (default: "
        "$COUPON_CA_FILE; $SSL_CERT_FILE replaces the system's too)",
    )
