"""The Host field's value must be an authority (RFC 9112 §3.2): a host and an optional
port of at most 65535."""

from __future__ import annotations

import pytest

from coupon.entrypoints.http.host import valid_host


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"a",
        b"a:80",
        b"a:",
        b"127.0.0.1:8000",
        b"[::1]:8000",
        b"[::1]",
        b"coupon.example.com",
        b"xn--bcher-kva.example:65535",
        b"a%2Db",
        b"a:80 \t",
    ],
)
def test_an_authority_is_a_valid_host(value: bytes) -> None:
    assert valid_host(value)


@pytest.mark.parametrize(
    "value",
    [
        b"a:99999",
        b"a:65536",
        b"a:000080000",
        b"a:b",
        b"http://a/",
        b"a b",
        b"a, b",
        b"a/b",
        b"[::1",
        b"a@b",
        b"a\x00",
        "비밀".encode(),
    ],
)
def test_anything_else_is_not(value: bytes) -> None:
    assert not valid_host(value)
