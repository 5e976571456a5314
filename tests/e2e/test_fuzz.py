"""Random and malformed requests against every RPC, over HTTP, at a real server process
(PostgreSQL/Redis backend, and the memory backend).

Properties, for every request:

* the answer is a success (200, a body of the request's codec) or a well-formed Connect
  error: a JSON object with a `code` of the Connect code set, a string `message`, and the
  HTTP status the Connect protocol gives that code; a content type the server does not
  speak may instead get the bare HTTP 415 the Connect protocol prescribes, and a Connect
  stream's content type (refused as too large before its method is known) its error as
  the stream's end, a 200 of one end-stream message;
* never a 5xx, except `unavailable` (503) and, only for a request that set
  `connect-timeout-ms`, `deadline_exceeded` (504); never `unknown` or `internal`;
* never a hang (every request has a timeout), and the server stays up;
* nothing changes unless the server said it did: campaigns are added exactly by
  successful CreateCampaign calls and coupons exactly by successful, non-repeat
  IssueCoupon calls (counted in PostgreSQL, and through GetCampaign on the memory
  backend).

Strategies mix valid values with wrong JSON types, huge strings, invalid UTF-8, lone
surrogates, NUL, absurd numbers, out-of-range and malformed timestamps, unknown and
oddly written campaign ids, hand-encoded protobuf (wrong wire types, unknown fields,
truncation, over-long varints), random bytes, oversized and gzip-compressed bodies, and
odd content types and Connect headers.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from coupon.domain.campaign import shows_nothing
from coupon.gen.coupon.v1 import coupon_pb
from harness.client import admin
from harness.server import ServerProcess

pytestmark = pytest.mark.e2e

TOKEN = "fuzz-admin-token"
AUTH = admin(TOKEN)
RPC_PATH = "/coupon.v1.CouponService/"
RPCS = ("CreateCampaign", "GetCampaign", "IssueCoupon")
MAX_BODY = 64 * 1024
# Generous: a request that takes this long is a hang.
TIMEOUT = httpx.Timeout(15.0)

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# The Connect protocol's code -> HTTP status mapping (connectrpc.com/docs/protocol).
CONNECT_STATUS = {
    "canceled": 499,
    "unknown": 500,
    "invalid_argument": 400,
    "deadline_exceeded": 504,
    "not_found": 404,
    "already_exists": 409,
    "permission_denied": 403,
    "resource_exhausted": 429,
    "failed_precondition": 400,
    "aborted": 409,
    "out_of_range": 400,
    "unimplemented": 501,
    "internal": 500,
    "unavailable": 503,
    "data_loss": 500,
    "unauthenticated": 401,
}
# What this API answers (DESIGN.md), plus resource_exhausted for an oversized body.
API_CODES = {
    "invalid_argument",
    "not_found",
    "failed_precondition",
    "resource_exhausted",
    "unauthenticated",
    "unavailable",
}
RESPONSES = {
    "CreateCampaign": coupon_pb.CreateCampaignResponse,
    "GetCampaign": coupon_pb.GetCampaignResponse,
    "IssueCoupon": coupon_pb.IssueCouponResponse,
}

# Campaigns the fixture sets up on the server under test, by role; strategies pick a role
# and the id is looked up when the example is built (after the fixture has run).
CAMPAIGNS: dict[str, str] = {}
ROLES = ("active", "scheduled", "sold_out")


# --- requests --------------------------------------------------------------------------


class Request:
    """One HTTP request; its repr is what a failing example prints (big bodies cut)."""

    __slots__ = ("body", "headers", "rpc")

    def __init__(self, rpc: str, body: bytes, headers: dict[str, str]) -> None:
        self.rpc = rpc
        self.body = body
        self.headers = headers

    @property
    def codec(self) -> str | None:
        """The codec the server must answer in, for the content types this API documents."""
        content_type = self.headers.get("content-type", "")
        if other_charset(content_type) is not None:
            return None
        return {"application/json": "json", "application/proto": "proto"}.get(
            content_type.partition(";")[0].strip().lower()
        )


def other_charset(content_type: str) -> str | None:
    """The charset, in lower case, a Connect JSON content type names other than UTF-8 (which
    the server refuses, 415, as connect-go does); None for any other content type."""
    media, _, parameters = content_type.partition(";")
    if media.strip(" \t").lower() not in ("application/json", "application/connect+json"):
        return None
    for parameter in parameters.split(";"):
        name, equals, value = parameter.partition("=")
        if equals and name.strip(" \t").lower() == "charset":
            value = value.strip(" \t")
            if len(value) >= 2 and value[0] == '"' == value[-1]:
                value = value[1:-1]
            return None if value.lower() == "utf-8" else value.lower()
    return None

    def __repr__(self) -> str:
        shown = self.body if len(self.body) <= 400 else self.body[:400] + b"..."
        return (
            f"<POST {RPC_PATH}{self.rpc} headers={self.headers!r} "
            f"body[{len(self.body)} bytes]={shown!r}>"
        )


# --- values ----------------------------------------------------------------------------
# Each field has valid values and invalid ones; a message gets a few invalid fields at
# most, so that the server has to look past the first problem, and about a third of the
# messages are entirely valid (and change the database: the property checks by how much).

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(),  # NaN and Infinity too: json.dumps writes them, and they are not JSON
    st.text(max_size=20),
)
junk = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)

# Text a name may hold: anything but lone surrogates, controls (C0, DEL, C1), line and
# paragraph separators and the characters that change the direction text is shown in.
plain_chars = st.characters(
    exclude_categories=["Cs", "Cc"],
    exclude_characters=(
        "\u061c\u200e\u200f\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
    ),
)
huge_text = st.builds(
    lambda c, n: c * n,
    st.sampled_from(["a", "가", "\U0001f600", " ", "\x00", "\\", '"']),
    st.integers(0, 70_000),
)
edge_text = st.sampled_from(
    [
        "",
        " ",
        "\t\n",
        "\x00",
        "a\x00b",
        "\u202e\ufeff",
        "null",
        "{}",
        "'; DROP TABLE coupons; --",
        "%s%n%x",
        "../../etc/passwd",
        "\ud800",
        "\udfff\ud800",
        "\U0010ffff" * 129,
        "x" * 129,
        "x" * 201,
    ]
)
# Lone surrogates: json.dumps escapes them (\ud800): valid JSON syntax, but no Unicode.
surrogate_text = st.text(st.characters(categories=["Cs", "Lu", "Nd"]), min_size=1, max_size=5)
bad_texts = st.one_of(st.text(max_size=40), edge_text, surrogate_text, huge_text)

json_bad_ints = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 10_000_001, 2**31, 2**63 - 1, 2**63, -(2**63), 2**64]),
    st.sampled_from(["", " 5", "1e3", "0x10", "1_000", "١٢", "+5", "5.0", "-0", "9" * 30]),
    st.floats(),
)


def json_int(values: st.SearchStrategy[int]) -> st.SearchStrategy[int | str]:
    """int64 in JSON: a number, or a string (its canonical form)."""
    return st.one_of(values, values.map(str))


UTC_MIN = datetime(1, 1, 1, tzinfo=UTC)
UTC_MAX = datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)


def between(low: datetime, high: datetime) -> st.SearchStrategy[datetime]:
    low, high = max(low, UTC_MIN), min(high, UTC_MAX)
    return st.datetimes(
        min_value=low.replace(tzinfo=None),
        max_value=high.replace(tzinfo=None),
        timezones=st.just(UTC),
    )


def around(moment: datetime, days: float) -> st.SearchStrategy[datetime]:
    return between(moment - timedelta(days=days), moment + timedelta(days=days))


NOW = datetime.now(UTC)
# Campaigns may start from 2000-01-01 and end before 9000-01-01 (domain/campaign.py).
good_moments = st.one_of(
    around(NOW, 2), between(datetime(2000, 1, 1, tzinfo=UTC), datetime(8999, 1, 1, tzinfo=UTC))
)
any_moments = st.one_of(
    between(UTC_MIN, UTC_MAX),
    around(datetime(2000, 1, 1, tzinfo=UTC), 2),
    around(datetime(9000, 1, 1, tzinfo=UTC), 2),
    around(NOW, 2),
)


@st.composite
def rfc3339(draw: st.DrawFn, moments: st.SearchStrategy[datetime]) -> str:
    moment = draw(moments)
    digits = draw(st.sampled_from([0, 3, 6, 9]))
    fraction = f".{moment.microsecond:06d}{draw(st.integers(0, 999)):03d}"[: digits + 1]
    offset = draw(st.sampled_from(["Z", "Z", "+00:00", "-00:00", "+09:00", "-14:00", "+14:00"]))
    if offset not in ("Z", "+00:00", "-00:00"):
        try:  # the same instant, in another zone
            moment += timedelta(hours=int(offset[:3]))
        except OverflowError:
            offset = "Z"
    return f"{moment:%Y-%m-%dT%H:%M:%S}{fraction if digits else ''}{offset}"


json_bad_timestamps = st.one_of(
    rfc3339(any_moments),
    st.sampled_from(
        [
            "",
            "now",
            "2026-13-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-01-01T24:00:00Z",
            "2026-12-31T23:59:60Z",
            "2026-01-01 00:00:00Z",
            "2026-01-01T00:00:00",
            "2026-01-01T00:00:00+25:00",
            "2026-01-01t00:00:00z",
            "2026-01-01T00:00:00.1234567891Z",
            "0000-01-01T00:00:00Z",
            "-0001-01-01T00:00:00Z",
            "10000-01-01T00:00:00Z",
            "+275760-09-13T00:00:00Z",
            "1e12",
        ]
    ),
    st.text(max_size=30),
    st.fixed_dictionaries(
        {},
        optional={
            "seconds": st.sampled_from([1e12, -1, 2**63, "1e12", 253_402_300_800]),
            "nanos": st.sampled_from([-1, 10**9, 0.5]),
        },
    ),
    st.integers(min_value=-(2**64), max_value=2**64),
)


def placeholder(role: str, form: int) -> str:
    return f"@{role}#{form}@"


def id_forms(value: str) -> list[str]:
    """Ways to write one campaign id: the first five name it, the last two do not."""
    return [
        value,
        value.upper(),
        f"{{{value}}}",
        f"urn:uuid:{value}",
        uuid.UUID(value).hex,
        value[:-1],
        value + "0",
    ]


def resolve(text: str) -> str:
    """The real ids of this server's campaigns in place of the placeholders."""
    for role, campaign_id in CAMPAIGNS.items():
        for form, written in enumerate(id_forms(campaign_id)):
            text = text.replace(placeholder(role, form), written)
    return text


good_campaign_refs = st.builds(placeholder, st.sampled_from(ROLES), st.integers(0, 4))
bad_campaign_refs = st.one_of(
    st.builds(placeholder, st.sampled_from(ROLES), st.integers(5, 6)),
    st.uuids().map(str),  # no such campaign
    bad_texts,
)
good_names = st.text(plain_chars, max_size=190).map(lambda t: f"fuzz {t}")
good_user_ids = st.one_of(
    st.sampled_from(["alice", "bob", "카카오"]),  # repeats: already_issued
    st.uuids().map(str),
    # Not blank (nor only characters that show nothing), no control characters (C0, DEL, C1).
    st.text(st.characters(exclude_categories=["Cs", "Cc"]), min_size=1, max_size=128).filter(
        lambda t: not shows_nothing(t)
    ),
)


def page_token(owner: str, position: object) -> str:
    """Shaped like the server's own tokens: base64url of "campaign_id:position"."""
    raw = resolve(f"{owner}:{position}").encode("utf-8", "surrogatepass")
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


good_page_tokens = st.one_of(
    st.just(""), st.builds(page_token, good_campaign_refs, st.integers(0, 100))
)
bad_page_tokens = st.one_of(
    bad_texts,
    st.builds(
        page_token,
        st.one_of(good_campaign_refs, bad_campaign_refs),
        st.one_of(st.integers(-(2**70), 2**70), st.text(max_size=5)),
    ),
)


@dataclass(frozen=True)
class Field:
    json_name: str
    proto_name: str
    number: int
    required: bool
    good: st.SearchStrategy[Any]  # JSON values
    bad: st.SearchStrategy[Any]  # JSON values
    good_proto: st.SearchStrategy[bytes]  # encoded field, tag included
    bad_proto: st.SearchStrategy[bytes]


# --- hand-encoded protobuf, so that anything can be written ----------------------------


def varint(value: int) -> bytes:
    if value < 0:
        value &= (1 << 64) - 1  # two's complement, as int64 is written
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def key(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def length_delimited(number: int, payload: bytes) -> bytes:
    return key(number, 2) + varint(len(payload)) + payload


def utf8(text: str) -> bytes:
    return resolve(text).encode("utf-8", "surrogatepass")


def proto_string(number: int, texts: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    return texts.map(lambda t: length_delimited(number, utf8(t)))


def proto_int(number: int, values: st.SearchStrategy[int]) -> st.SearchStrategy[bytes]:
    return values.map(lambda v: key(number, 0) + varint(v))


@st.composite
def wrong_wire(draw: st.DrawFn, number: int) -> bytes:
    """The field's number with a payload of another (or no valid) wire type."""
    wire = draw(st.integers(0, 7))
    payload = {
        0: varint(draw(st.integers(0, 2**80))),  # over-long past 2**64
        1: draw(st.binary(min_size=8, max_size=8)),
        2: varint(len(b := draw(st.binary(max_size=16)))) + b,
        5: draw(st.binary(min_size=4, max_size=4)),
    }.get(wire, draw(st.binary(max_size=4)))
    return key(number, wire) + payload


def bad_proto_string(number: int, texts: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        proto_string(number, texts),
        st.binary(max_size=32).map(lambda b: length_delimited(number, b)),  # not UTF-8
        wrong_wire(number),
    )


@st.composite
def timestamp(draw: st.DrawFn, moments: st.SearchStrategy[datetime], good: bool) -> bytes:
    moment = draw(moments)
    seconds = int(moment.replace(microsecond=0).timestamp())
    nanos = moment.microsecond * 1000 + draw(st.integers(0, 999))
    if not good:
        seconds = draw(
            st.one_of(
                st.just(seconds),
                st.integers(-(2**63), 2**63 - 1),
                st.sampled_from([10**12, -62_135_596_801, 253_402_300_800]),
            )
        )
        nanos = draw(st.one_of(st.just(nanos), st.sampled_from([-1, 10**9, -(2**31)])))
    body = key(1, 0) + varint(seconds) + key(2, 0) + varint(nanos)
    if not good and draw(st.booleans()):
        body = body[: draw(st.integers(0, len(body)))] + draw(st.binary(max_size=4))
    return body


def proto_timestamp(number: int, good: bool) -> st.SearchStrategy[bytes]:
    moments = good_moments if good else any_moments
    inner = timestamp(moments, good)
    if good:
        return inner.map(lambda b: length_delimited(number, b))
    return st.one_of(inner.map(lambda b: length_delimited(number, b)), wrong_wire(number))


def proto_int_field(number: int, good: st.SearchStrategy[int]) -> tuple[Any, Any]:
    bad = st.one_of(
        proto_int(number, st.integers(-(2**64), 2**64)),
        proto_int(number, st.integers(2**64, 2**80)),  # varints longer than 10 bytes
        wrong_wire(number),
    )
    return proto_int(number, good), bad


# campaign_id is field 1 of GetCampaignRequest and of IssueCouponRequest alike.
CAMPAIGN_ID = Field(
    "campaignId",
    "campaign_id",
    1,
    True,
    good_campaign_refs,
    st.one_of(bad_campaign_refs, junk),
    proto_string(1, good_campaign_refs),
    bad_proto_string(1, bad_campaign_refs),
)
RPC_FIELDS: dict[str, list[Field]] = {
    "CreateCampaign": [
        Field(
            "name",
            "name",
            1,
            True,
            good_names,
            st.one_of(bad_texts, junk),
            proto_string(1, good_names),
            bad_proto_string(1, bad_texts),
        ),
        Field(
            "totalCoupons",
            "total_coupons",
            2,
            True,
            json_int(st.integers(1, 10_000_000)),
            st.one_of(json_bad_ints, junk),
            *proto_int_field(2, st.integers(1, 10_000_000)),
        ),
        Field(
            "startsAt",
            "starts_at",
            3,
            True,
            rfc3339(good_moments),
            st.one_of(json_bad_timestamps, junk),
            proto_timestamp(3, good=True),
            proto_timestamp(3, good=False),
        ),
        Field(
            "endsAt",
            "ends_at",
            4,
            False,
            rfc3339(good_moments),
            st.one_of(json_bad_timestamps, junk),
            proto_timestamp(4, good=True),
            proto_timestamp(4, good=False),
        ),
    ],
    "GetCampaign": [
        CAMPAIGN_ID,
        Field(
            "pageSize",
            "page_size",
            2,
            False,
            json_int(st.integers(0, 10_000)),
            st.one_of(json_bad_ints, junk),
            *proto_int_field(2, st.integers(0, 10_000)),
        ),
        Field(
            "pageToken",
            "page_token",
            3,
            False,
            good_page_tokens,
            st.one_of(bad_page_tokens, junk),
            proto_string(3, good_page_tokens),
            bad_proto_string(3, bad_page_tokens),
        ),
    ],
    "IssueCoupon": [
        CAMPAIGN_ID,
        Field(
            "userId",
            "user_id",
            2,
            True,
            good_user_ids,
            st.one_of(bad_texts, junk),
            proto_string(2, good_user_ids),
            bad_proto_string(2, bad_texts),
        ),
    ],
}


@st.composite
def chosen_fields(draw: st.DrawFn, rpc: str) -> list[tuple[Field, bool]]:
    """The fields a message carries, each with whether its value is a good one."""
    chosen = []
    for spec in RPC_FIELDS[rpc]:
        present = draw(st.integers(0, 9)) > (0 if spec.required else 5)
        if present:
            chosen.append((spec, draw(st.integers(0, 4)) > 0))
    return chosen


def auth_headers(rpc: str) -> st.SearchStrategy[dict[str, str]]:
    if rpc == "IssueCoupon":  # public: a token, right or wrong, changes nothing
        return st.sampled_from([{}] * 8 + [AUTH, {"authorization": "Bearer nope"}])
    return st.sampled_from([AUTH] * 8 + [{}, {"authorization": "Bearer nope"}])


@st.composite
def json_requests(draw: st.DrawFn) -> Request:
    rpc = draw(st.sampled_from(RPCS))
    message: Any
    if draw(st.integers(0, 19)) == 0:
        message = draw(junk)  # any JSON at all
    else:
        message = {}
        for spec, good in draw(chosen_fields(rpc)):
            name = draw(st.sampled_from([spec.json_name, spec.proto_name]))
            message[name] = draw(spec.good if good else spec.bad)
        if draw(st.integers(0, 9)) == 0:
            message[draw(st.text(max_size=10))] = draw(junk)  # unknown field
    text = resolve(json.dumps(message, ensure_ascii=draw(st.booleans())))
    damage = draw(st.sampled_from([None] * 8 + ["surrogates", "byte", "cut"]))
    if damage == "surrogates":
        # Lone surrogates written raw, not escaped: bytes that are not UTF-8.
        body = text.encode("utf-8", "surrogatepass")
    elif damage == "byte":
        raw = text.encode("utf-8", "surrogatepass")
        at = draw(st.integers(0, len(raw)))
        spliced = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"}"]))
        body = raw[:at] + spliced + raw[at:]
    elif damage == "cut":
        raw = text.encode("utf-8", "surrogatepass")
        body = raw[: draw(st.integers(0, len(raw)))]
    else:
        try:
            body = text.encode()
        except UnicodeEncodeError:  # lone surrogates: escaped (\ud800), as JSON can
            body = resolve(json.dumps(message)).encode()
    content_type = draw(
        st.sampled_from(["application/json"] * 3 + ["application/json; charset=utf-8"])
    )
    return Request(rpc, body, {"content-type": content_type, **draw(auth_headers(rpc))})


@st.composite
def unknown_field(draw: st.DrawFn) -> bytes:
    return draw(wrong_wire(draw(st.integers(5, 2**29 - 1))))


@st.composite
def proto_requests(draw: st.DrawFn) -> Request:
    rpc = draw(st.sampled_from(RPCS))
    if draw(st.integers(0, 9)) == 0:
        body = draw(st.binary(max_size=512))
    else:
        parts = [
            draw(spec.good_proto if good else spec.bad_proto)
            for spec, good in draw(chosen_fields(rpc))
        ]
        if draw(st.integers(0, 4)) == 0:
            parts += draw(st.lists(unknown_field(), min_size=1, max_size=2))
        if draw(st.integers(0, 9)) == 0 and parts:
            parts.append(parts[0])  # a field twice: the last one counts
        body = b"".join(draw(st.permutations(parts)))
        if draw(st.integers(0, 9)) == 0:
            body = body[: draw(st.integers(0, len(body)))]  # truncated
    return Request(rpc, body, {"content-type": "application/proto", **draw(auth_headers(rpc))})


# --- bodies, content types and headers -------------------------------------------------

content_types = st.one_of(
    st.sampled_from(
        [
            "application/json",
            "application/proto",
            "application/json; charset=utf-16",
            "Application/JSON",
            "application/x-protobuf",
            "application/connect+json",
            "application/xml",
            "text/plain",
            "multipart/form-data; boundary=x",
            "json",
            "",
        ]
    ),
    st.from_regex(r"[!-~]([ -~]{0,30}[!-~])?", fullmatch=True),
).filter(lambda ct: "grpc" not in ct.lower())  # gRPC and gRPC-web: other protocols


@st.composite
def oversized(draw: st.DrawFn) -> bytes:
    size = draw(st.integers(MAX_BODY + 1, 3 * MAX_BODY))
    if draw(st.booleans()):
        # A well-formed message, just too big.
        return b'{"userId": "' + b"a" * size + b'", "campaignId": "x"}'
    filler = draw(st.sampled_from([b"a", b"\x00", b"\xff", "가".encode()]))
    return (filler * size)[:size]


@st.composite
def envelope_requests(draw: st.DrawFn) -> Request:
    inner = draw(st.one_of(json_requests(), proto_requests()))
    body = draw(
        st.one_of(
            st.just(inner.body),
            st.just(inner.body),
            st.binary(max_size=256),
            st.text(max_size=64).map(str.encode),
            oversized(),
        )
    )
    headers: dict[str, str] = {}
    content_type = draw(st.one_of(st.just(inner.headers["content-type"]), content_types))
    if content_type:
        headers["content-type"] = content_type
    compression = draw(st.sampled_from([None, None, "gzip", "gzip", "not gzip", "identity"]))
    if compression == "gzip":
        body = gzip.compress(body)
    if compression:
        headers["content-encoding"] = "gzip" if compression == "not gzip" else compression
    if draw(st.integers(0, 3)) == 0:
        headers["connect-timeout-ms"] = draw(
            st.one_of(
                st.integers(0, 10**12).map(str),
                st.sampled_from(["-1", "abc", "1.5", "", "99999999999", "+10", "0010"]),
            )
        )
    if draw(st.integers(0, 3)) == 0:
        headers["connect-protocol-version"] = draw(st.sampled_from(["1", "2", "", "one"]))
    if draw(st.integers(0, 3)) == 0:
        headers["accept-encoding"] = draw(st.sampled_from(["gzip", "br", "*", "identity;q=0"]))
    headers.update(draw(auth_headers(inner.rpc)))
    return Request(inner.rpc, body, headers)


# --- the server under test -------------------------------------------------------------


class Target:
    """The server under test, an HTTP client for it, and a way to count what it stored."""

    def __init__(self, server: ServerProcess, database: str | None) -> None:
        self.server = server
        # Set-up and counting on a keep-alive connection of their own; each fuzzed request
        # on a new connection: after a refusal sent before the body was read (415, 429) the
        # server may drop the connection it kept alive, and the next request on it would
        # fail in transport ("Server disconnected"), which is not what is tested here.
        self.http = httpx.Client(base_url=server.url, timeout=TIMEOUT)
        self.fuzz = httpx.Client(
            base_url=server.url,
            timeout=TIMEOUT,
            limits=httpx.Limits(max_keepalive_connections=0),
        )
        self.database = database
        # PostgreSQL is counted through a connection on a loop of our own: the tests are
        # synchronous (hypothesis drives them), and the session's loop is not running.
        self._conn: asyncpg.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        if database is not None:
            self._loop = asyncio.new_event_loop()
            self._conn = self._loop.run_until_complete(asyncpg.connect(database))

    def close(self) -> None:
        self.http.close()
        self.fuzz.close()
        if self._loop is not None and self._conn is not None:
            self._loop.run_until_complete(self._conn.close())
            self._loop.close()

    def call(self, rpc: str, message: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
        response = self.http.post(f"{RPC_PATH}{rpc}", json=message, headers=headers)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def send(self, request: Request) -> httpx.Response:
        try:
            return self.fuzz.post(
                f"{RPC_PATH}{request.rpc}", content=request.body, headers=request.headers
            )
        except httpx.TimeoutException:
            pytest.fail(f"no answer within {TIMEOUT.read}s (a hang) to {request!r}")

    def counts(self) -> tuple[int, int, int]:
        """(campaigns, coupons, issued coupons of the active campaign)."""
        if self._conn is not None and self._loop is not None:
            row = self._loop.run_until_complete(
                self._conn.fetchrow(
                    "SELECT (SELECT count(*) FROM campaigns) AS campaigns,"
                    " (SELECT count(*) FROM coupons) AS coupons,"
                    " (SELECT count(*) FROM coupons WHERE campaign_id = $1) AS active",
                    uuid.UUID(CAMPAIGNS["active"]),
                )
            )
            assert row is not None
            return row["campaigns"], row["coupons"], row["active"]
        view = self.call("GetCampaign", {"campaignId": CAMPAIGNS["active"], "pageSize": 1}, AUTH)
        return -1, -1, int(view["campaign"].get("issuedCount", "0"))


@pytest.fixture(scope="module", params=["postgres", "memory"])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    env = {"COUPON_ADMIN_TOKEN": TOKEN}
    database = None
    if request.param == "postgres":
        env.update(request.getfixturevalue("server_env"))
        database = env["DATABASE_URL"]
    server = ServerProcess(env=env, in_memory=request.param == "memory")
    target = None
    try:
        server.wait_ready()
        target = Target(server, database)
        now = datetime.now(UTC)

        def create(total: int, starts: datetime) -> str:
            message = {
                "name": "fuzz fixture",
                "totalCoupons": total,
                "startsAt": starts.isoformat().replace("+00:00", "Z"),
            }
            created = target.call("CreateCampaign", message, AUTH)
            campaign_id: str = created["campaign"]["id"]
            return campaign_id

        CAMPAIGNS["active"] = create(10_000_000, now - timedelta(days=1))
        CAMPAIGNS["scheduled"] = create(10, now + timedelta(days=365))
        CAMPAIGNS["sold_out"] = create(1, now - timedelta(days=1))
        target.call("IssueCoupon", {"campaignId": CAMPAIGNS["sold_out"], "userId": "first"}, {})
        yield target
    finally:
        if target is not None:
            target.close()
        code = server.stop()
        CAMPAIGNS.clear()
    # The server survived every request and shut down cleanly.
    assert code == 0, server.log()


# --- the properties --------------------------------------------------------------------


def check_answer(request: Request, response: httpx.Response) -> str:
    """'ok', 'unsupported' (415) or the Connect error code; fails on anything else."""
    status = response.status_code
    where = f"{status} {response.content[:300]!r} for {request!r}"
    served = response.headers.get("content-type", "")
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if status == 200 and media.startswith("application/connect+") and served == media:
        # A Connect stream's error, the end of the stream: a body over the limit is refused
        # as such by the HTTP layer, which does not know which methods stream.
        flags, length = struct.unpack(">BI", response.content[:5])
        assert flags == 0x02 and len(response.content) == 5 + length, where
        error = json.loads(response.content[5:])["error"]
        assert error["code"] == "resource_exhausted", where
        assert str(error["message"]).startswith("request body of "), where
        return "resource_exhausted"
    if status == 200:
        if request.codec == "json" or (request.codec is None and "json" in served):
            assert served == "application/json", where
            assert isinstance(response.json(), dict), where
        else:
            assert served == "application/proto", where
            RESPONSES[request.rpc].from_binary(response.content)
        return "ok"
    if status == 415 and request.codec is None:
        charset = other_charset(request.headers.get("content-type", ""))
        if charset is None:
            # Connect: a content type the server does not speak gets a bare 415.
            assert response.content == b"", where
        else:
            # JSON in another charset: told which, as a Connect error.
            error = response.json()
            assert error["code"] == "invalid_argument", where
            assert error["message"].startswith(f"content-type: charset {charset!r}"), where
        return "unsupported"
    assert response.headers.get("content-type") == "application/json", where
    try:
        error = response.json()
    except ValueError:
        pytest.fail(f"not a Connect error body: {where}")
    assert isinstance(error, dict), where
    code, message = error.get("code"), error.get("message")
    assert code in CONNECT_STATUS and isinstance(message, str), where
    assert status == CONNECT_STATUS[code], where
    allowed = set(API_CODES)
    if "connect-timeout-ms" in request.headers:
        allowed.add("deadline_exceeded")
    assert code in allowed, f"unexpected code {code}: {where}"
    assert status < 500 or code in ("unavailable", "deadline_exceeded"), where
    return str(code)


def new_coupon(request: Request, response: httpx.Response) -> tuple[bool, str]:
    """Whether a successful IssueCoupon issued a new coupon, and for which campaign."""
    if response.headers.get("content-type") == "application/json":
        body = response.json()
        return not body.get("alreadyIssued", False), body["coupon"]["campaignId"]
    message = coupon_pb.IssueCouponResponse.from_binary(response.content)
    assert message.coupon is not None
    return not message.already_issued, message.coupon.campaign_id


def exercise(target: Target, request: Request) -> None:
    before = target.counts()
    response = target.send(request)
    outcome = check_answer(request, response)
    event(f"{request.rpc}: {outcome}")  # the mix, shown by --hypothesis-show-statistics
    after = target.counts()
    campaigns = coupons = active = 0
    if outcome == "ok" and request.rpc == "CreateCampaign":
        campaigns = 1
    if outcome == "ok" and request.rpc == "IssueCoupon":
        issued, campaign_id = new_coupon(request, response)
        coupons = int(issued)
        active = int(issued and campaign_id == CAMPAIGNS["active"])
    delta = tuple(b - a for a, b in zip(before, after, strict=True))
    if outcome == "deadline_exceeded":
        # The deadline may pass after the work is done (an admitted issue runs to its end
        # by design, and the user's retry returns the coupon): at most what a success
        # would have changed.
        assert all(0 <= d <= 1 for d in delta), (delta, request)
        return
    expected = (campaigns, coupons, active)
    if target.database is None:
        # The memory backend is only observed through the active campaign.
        expected, delta = (0, 0, active), (0, 0, delta[2])
    assert delta == expected, (
        f"database changed by {delta} (campaigns, coupons, coupons of the active campaign)"
        f" where {expected} was expected, after {outcome} to {request!r}"
    )


@FUZZ
@given(request=json_requests())
def test_random_json_messages(target: Target, request: Request) -> None:
    exercise(target, request)


@FUZZ
@given(request=proto_requests())
def test_random_binary_messages(target: Target, request: Request) -> None:
    exercise(target, request)


@FUZZ
@given(request=envelope_requests())
def test_random_bodies_content_types_and_headers(target: Target, request: Request) -> None:
    exercise(target, request)


# --- a few exact cases -------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["json", "proto"])
@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
def test_bodies_above_64_kib_are_refused(target: Target, codec: str, compressed: bool) -> None:
    """The limit is on the message: exactly 64 KiB is read (and judged on its fields),
    one byte more is resource_exhausted, however small it is on the wire."""

    def message(size: int) -> bytes:
        if codec == "json":
            head, tail = (
                b'{"campaignId": "' + CAMPAIGNS["active"].encode() + b'", "userId": "',
                b'"}',
            )
            return head + b"u" * (size - len(head) - len(tail)) + tail
        campaign = length_delimited(1, CAMPAIGNS["active"].encode())
        user_size = size - len(campaign) - 1 - 3  # key and a 3-byte length
        return campaign + length_delimited(2, b"u" * user_size)

    for size, expected in ((MAX_BODY, "invalid_argument"), (MAX_BODY + 1, "resource_exhausted")):
        body = message(size)
        assert len(body) == size
        headers = {"content-type": f"application/{codec}"}
        if compressed:
            body = gzip.compress(body)
            headers["content-encoding"] = "gzip"
        request = Request("IssueCoupon", body, headers)
        before = target.counts()
        response = target.send(request)
        assert check_answer(request, response) == expected, response.text
        if expected == "invalid_argument":
            assert "user_id" in response.json()["message"]
        assert target.counts() == before


def test_unsupported_compression_is_unimplemented(target: Target) -> None:
    """Connect prescribes `unimplemented` (HTTP 501) for a Content-Encoding the server does
    not support: the one 5xx besides unavailable, and a well-formed Connect error."""
    for encoding in ("br", "zstd", "deflate", "gzip, gzip"):
        request = Request(
            "IssueCoupon",
            b"{}",
            {"content-type": "application/json", "content-encoding": encoding},
        )
        response = target.send(request)
        assert response.status_code == 501, response.text
        assert response.json()["code"] == "unimplemented"
        assert "gzip" in response.json()["message"]


def test_page_token_past_int64_is_invalid_argument(target: Target) -> None:
    campaign_id = CAMPAIGNS["active"]
    token = base64.urlsafe_b64encode(f"{campaign_id}:{2**63}".encode()).decode().rstrip("=")
    request = Request(
        "GetCampaign",
        json.dumps({"campaignId": campaign_id, "pageToken": token}).encode(),
        {"content-type": "application/json", **AUTH},
    )
    response = target.send(request)
    assert check_answer(request, response) == "invalid_argument"
    assert response.json()["message"].startswith("page_token: ")


UNKNOWN_ID = "0192f5e0-7c1a-7b3e-9d2a-5b1c2d3e4f50"
STARTS = '"startsAt": "2026-01-01T00:00:00Z"'
# For every RPC, a field given twice: the same key twice, or its JSON and proto names
# (`{campaign}` is the active campaign, the ended one is unknown: nothing ends if the
# body were read).
GIVEN_TWICE = [
    ("IssueCoupon", '{"campaignId": "{campaign}", "campaignId": "{campaign}", "userId": "u"}'),
    ("IssueCoupon", '{"campaignId": "{campaign}", "userId": "x", "user_id": "y"}'),
    ("CreateCampaign", '{"name": "a", "name": "b", "totalCoupons": 1, ' + STARTS + "}"),
    ("CreateCampaign", '{"name": "a", "totalCoupons": 1, "total_coupons": 2, ' + STARTS + "}"),
    ("CreateCampaign", '{"name": "a", "totalCoupons": 1, ' + STARTS + ", " + STARTS + "}"),
    ("GetCampaign", '{"campaignId": "{campaign}", "pageSize": 1, "page_size": 2}'),
    ("ListCampaigns", '{"status": "CAMPAIGN_STATUS_ACTIVE", "status": "CAMPAIGN_STATUS_ENDED"}'),
    ("EndCampaign", '{"campaign_id": "' + UNKNOWN_ID + '", "campaignId": "' + UNKNOWN_ID + '"}'),
    ("ListUserCoupons", '{"userId": "first", "userId": "second"}'),
    ("ExportCoupons", '{"campaignId": "{campaign}", "campaign_id": "{campaign}"}'),
]
TWICE_FIELDS = ["campaign_id", "user_id", "name", "total_coupons", "starts_at", "page_size"]
TWICE_FIELDS += ["status", "campaign_id", "user_id", "campaign_id"]


def connect_error(target: Target, rpc: str, body: bytes) -> dict[str, Any]:
    """The Connect error a JSON request is answered with (ExportCoupons streams: its error
    is the end of the stream)."""
    if rpc != "ExportCoupons":
        request = Request(rpc, body, {"content-type": "application/json", **AUTH})
        response = target.send(request)
        check_answer(request, response)
        error: dict[str, Any] = response.json()
        return error
    envelope = b"\x00" + len(body).to_bytes(4, "big") + body
    headers = {"content-type": "application/connect+json", **AUTH}
    response = target.send(Request(rpc, envelope, headers))
    assert response.status_code == 200 and response.content[:1] == b"\x02", response.content
    end: dict[str, Any] = json.loads(response.content[5:])["error"]
    return end


@pytest.mark.parametrize(("case", "field"), list(zip(GIVEN_TWICE, TWICE_FIELDS, strict=True)))
def test_a_field_given_twice_is_invalid_argument(
    target: Target, case: tuple[str, str], field: str
) -> None:
    """As protojson and connect-go: a body that sets a field twice is refused, not read
    as its last value."""
    rpc, text = case
    body = text.replace("{campaign}", CAMPAIGNS["active"]).encode()
    before = target.counts()
    error = connect_error(target, rpc, body)
    assert error["code"] == "invalid_argument", error
    assert error["message"].startswith(f"{field}: "), error
    assert target.counts() == before


# Every field of every RPC's request, by JSON name: its proto name and what it takes.
REQUEST_FIELDS = {
    "CreateCampaign": {
        "name": ("name", "string"),
        "totalCoupons": ("total_coupons", "integer"),
        "startsAt": ("starts_at", "timestamp"),
        "endsAt": ("ends_at", "timestamp"),
    },
    "GetCampaign": {
        "campaignId": ("campaign_id", "string"),
        "pageSize": ("page_size", "integer"),
        "pageToken": ("page_token", "string"),
    },
    "IssueCoupon": {"campaignId": ("campaign_id", "string"), "userId": ("user_id", "string")},
    "ListCampaigns": {
        "pageSize": ("page_size", "integer"),
        "pageToken": ("page_token", "string"),
        "status": ("status", "enum"),
    },
    "EndCampaign": {"campaignId": ("campaign_id", "string")},
    "ListUserCoupons": {
        "userId": ("user_id", "string"),
        "pageSize": ("page_size", "integer"),
        "pageToken": ("page_token", "string"),
    },
    "ExportCoupons": {"campaignId": ("campaign_id", "string")},
}
# JSON values of the wrong type for each kind of field.
WRONG_VALUES: dict[str, list[Any]] = {
    "string": [7, 1.5, True, {}, [], {"a": 1}, ["x"]],
    "integer": ["seven", 1.5, True, {}, [], "1e3x", 2**70],
    "enum": [1.5, True, {}, [], ["CAMPAIGN_STATUS_ACTIVE"]],
    "timestamp": [7, "yesterday", True, {}, [], "2026-13-45T00:00:00Z"],
}
WRONG_TYPES = [
    (rpc, key, proto_name, value)
    for rpc, fields in REQUEST_FIELDS.items()
    for key, (proto_name, kind) in fields.items()
    for value in WRONG_VALUES[kind]
]
# Python's and the libraries' words, which a client must never read.
NOT_FOR_CLIENTS = (
    "<class",
    "Traceback",
    "msgspec",
    "protobuf",
    "NoneType",
    "line 1 column",
    "Error -",  # zlib's
    "end-of-stream marker",  # gzip's
)


def plain(message: str) -> None:
    assert not any(words in message for words in NOT_FOR_CLIENTS), message


@pytest.mark.parametrize(("rpc", "key", "field", "value"), WRONG_TYPES)
def test_a_field_of_the_wrong_type_is_named_plainly(
    target: Target, rpc: str, key: str, field: str, value: Any
) -> None:
    body = json.dumps({key: value}).encode()
    error = connect_error(target, rpc, body)
    assert error["code"] == "invalid_argument", error
    assert error["message"].startswith(f"{field}: "), error
    plain(error["message"])


# Bodies that are not a request at all, as JSON and as binary protobuf.
BAD_BODIES = [
    ("json", b"{"),
    ("json", b"\xff\xfe{}"),
    ("json", b'{"userId": "\xff"}'),
    ("json", b'{"userId": "\\ud800"}'),
    ("json", b"[]"),
    ("json", b'"x"'),
    ("json", b"null"),
    ("json", b"[" * 5000 + b"]" * 5000),
    ("json", b'{"campaignId": NaN}'),
    ("proto", b"\x0a\x05ab"),  # a string cut short
    ("proto", b"\x12\x02\xff\xfe"),  # a string not in UTF-8
    ("proto", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"),  # an endless varint
    ("proto", b"\x0b\x0c"),  # a group
    ("proto", b"\x1a\x03\x08\xff\x01"),  # a field 3 (a timestamp for CreateCampaign) cut
]


@pytest.mark.parametrize("rpc", list(REQUEST_FIELDS))
@pytest.mark.parametrize(("codec", "body"), BAD_BODIES)
def test_a_body_that_cannot_be_read_is_refused_plainly(
    target: Target, rpc: str, codec: str, body: bytes
) -> None:
    if rpc == "ExportCoupons":
        kind = "connect+json" if codec == "json" else "connect+proto"
        envelope = b"\x00" + len(body).to_bytes(4, "big") + body
        response = target.send(
            Request(rpc, envelope, {"content-type": f"application/{kind}", **AUTH})
        )
        assert response.status_code == 200 and response.content[:1] == b"\x02"
        error = json.loads(response.content[5:])["error"]
    else:
        request = Request(rpc, body, {"content-type": f"application/{codec}", **AUTH})
        response = target.send(request)
        if response.status_code == 200:
            return  # read as a request after all (a group is skipped as unknown)
        check_answer(request, response)
        error = response.json()
    assert error["code"] == "invalid_argument", error
    plain(error["message"])


# Bodies said to be gzip that are not, or not whole.
BAD_GZIP = {
    "not gzip": b'{"campaignId": "x"}',
    "cut short": gzip.compress(b'{"campaignId": "x", "userId": "y"}')[:-6],
    "bad header": b"\x1f\x8b\x08\x00" + b"\x00" * 12,
}


@pytest.mark.parametrize("rpc", [rpc for rpc in REQUEST_FIELDS if rpc != "ExportCoupons"])
@pytest.mark.parametrize("body", list(BAD_GZIP.values()), ids=list(BAD_GZIP))
def test_a_body_that_is_not_the_gzip_it_says_is_refused_plainly(
    target: Target, rpc: str, body: bytes
) -> None:
    headers = {"content-type": "application/json", "content-encoding": "gzip", **AUTH}
    request = Request(rpc, body, headers)
    response = target.send(request)
    check_answer(request, response)
    error = response.json()
    assert error == {"code": "invalid_argument", "message": "request body: not valid gzip"}
