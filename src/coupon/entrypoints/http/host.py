"""The Host field's value (RFC 9112 §3.2, RFC 3986 §3.2.2): `uri-host [":" port]`.

A server must answer 400 to a request whose Host is not one (RFC 9112 §3.2). The web
framework behind the service's own pages builds each request's URL from it, and a value
that is no URL authority (`a:b`, `http://a/`, a port past 65535) would fail there as a
server error."""

from __future__ import annotations

import re

# An IP literal in brackets, or a registered name / IPv4 address (unreserved, sub-delims
# and percent-encoded bytes, possibly empty), then an optional port of digits.
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::([0-9]*))?")
_MAX_PORT = 65_535


def valid_host(value: bytes) -> bool:
    """Whether a Host field's value (spaces and tabs around it left out) is an authority."""
    match = _HOST.fullmatch(value.strip(b" \t"))
    if match is None:
        return False
    port = match.group(1)
    return not port or (len(port) <= 5 and int(port) <= _MAX_PORT)
