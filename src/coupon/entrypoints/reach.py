"""Why a client's call never reached the service, in a few plain words.

The generated Connect client turns a failure of the HTTP client (pyqwest) into a
ConnectError `unavailable` (`deadline_exceeded` for a time-out) whose message is the HTTP
client's debug text: the request's URL, the layers it went through, the resolver's query.
The operators' command line and the load tool say instead, in one line, `cannot reach the
service at URL: connection refused` (or `name not resolved`, `timed out`, `TLS failure`,
...). An `unavailable` the service answered itself (at capacity, PostgreSQL down) is not
such a failure: it has no HTTP client error behind it, and keeps its code and message.
"""

from __future__ import annotations

import pyqwest

# (words in the HTTP client's text, the plain reason), the first match wins.
_REASONS = (
    (("connection refused",), "connection refused"),
    (("dns error", "failed to lookup", "name or service not known", "no address"),
     "name not resolved"),
    (("timed out", "timeout"), "timed out"),
    (("certificate", "tls", "ssl", "handshake", "corrupt message", "invalidcontenttype"),
     "TLS failure"),
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


def unreachable(exc: BaseException) -> str | None:
    """The plain reason when `exc` (a ConnectError from the generated client, or the HTTP
    client's own error) is a failure to reach the service; None when the service answered."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, _TRANSPORT_ERRORS):
        cause = cause.__cause__
    if cause is None:
        return None
    if isinstance(cause, TimeoutError):
        return "timed out"
    text = str(cause).lower()
    for words, reason in _REASONS:
        if any(word in text for word in words):
            return reason
    return "the connection failed"


def cannot_reach(url: str, reason: str) -> str:
    return f"cannot reach the service at {url}: {reason}"
