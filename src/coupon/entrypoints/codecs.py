"""The codecs the Connect application decodes and encodes with.

protobuf-py's JSON codec reads an enum value it does not know — a number outside the enum
or a name that is not one of its names — as the enum's zero, where the binary codec keeps
the number. For ListCampaigns' `status` filter, zero means "no filter": a misspelt filter
would list every campaign. The JSON codec here refuses such a value instead, with the same
message the binary path gives (translate.status_filter).

It also refuses a field given twice — the same key twice, or a field's JSON name beside
its proto name (`userId` and `user_id`) — as protojson and connect-go do, where the JSON
parser would keep the last. A body is read again, key by key, only when it could give a
field twice (see decode_json, and IssueJsonCodec for IssueCoupon's hot path).

A body that cannot be read is answered in the service's words, not the parser's: the
field and what it expects (`user_id: expected a string`), or what is wrong with the body
as a whole. Those are worked out only once a body has failed (json_error, binary_error).

A body that nests deeper than MAX_DEPTH is refused before any parser reads it: the JSON
parser underneath protobuf-py recurses natively and takes the process down at a depth of
about 14,000 (28 KB of `[[[…]]]`, within the body limit). This API's messages nest
a few levels, so a body deeper than that is hostile or broken; a body too short to nest
that deep (the IssueCoupon bodies clients send) is not looked at (too_deep).
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from operator import attrgetter
from typing import Any

from connectrpc.code import Code
from connectrpc.codec import Codec, proto_binary_codec, proto_json_codec
from connectrpc.compression import Compression
from connectrpc.compression.gzip import GzipCompression
from connectrpc.errors import ConnectError

from coupon.entrypoints.translate import STATUS_CHOICES
from coupon.gen.coupon.v1 import coupon_pb

# How deeply a request's JSON may nest (arrays and objects in one another).
MAX_DEPTH = 64
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1
# A body of at most this many bytes cannot nest deeper (each level takes two).
_SHALLOW_BYTES = 2 * MAX_DEPTH
_TOO_DEEP = f"request body: JSON nested more than {MAX_DEPTH} levels deep"


def too_deep(data: bytes | bytearray) -> bool:
    """Whether a JSON body nests arrays and objects more than MAX_DEPTH deep. A body of
    at most 2 * MAX_DEPTH bytes, or with no more than MAX_DEPTH opening brackets, cannot;
    any other is measured, its strings (whose brackets do not nest) left out."""
    if len(data) <= _SHALLOW_BYTES or data.count(b"[") + data.count(b"{") <= MAX_DEPTH:
        return False
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0) > MAX_DEPTH


# What a request may say for an enum left unset (its zero, as number or name, or null).
_UNSET_STATUS: tuple[object, ...] = (None, 0, "CAMPAIGN_STATUS_UNSPECIFIED")


class _Repeated(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _refuse_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Repeated(key)
            seen.add(key)
    return value


def _refuse_set_twice(data: bytes | bytearray, message_class: type[Any]) -> None:
    """Refuse a body that names a field twice (called only when it could)."""
    fields = message_class._desc._fields_by_json_name
    try:
        value = json.loads(data, object_pairs_hook=_refuse_repeats)
    except _Repeated as repeated:
        field = fields.get(repeated.key)
        raise _twice(field.name if field is not None else repeated.key) from None
    except (ValueError, RecursionError):
        return  # read by the library's parser, so only what it reads differently
    if not isinstance(value, dict):
        return
    named: set[object] = set()
    for key in value:
        field = fields.get(key)
        if field is not None:
            if field in named:
                raise _twice(field.name)
            named.add(field)


def _twice(name: str) -> ConnectError:
    return ConnectError(
        Code.INVALID_ARGUMENT, f"{name}: given more than once (by one name or by both)"
    )


_VALUES: dict[type[Any], Any] = {}


def _values(message_class: type[Any]) -> Any:
    """A function giving a message's field values, as a tuple."""
    names = [field.name for field in message_class._desc.fields]
    values = attrgetter(*names) if len(names) > 1 else lambda m: (getattr(m, names[0]),)
    _VALUES[message_class] = values
    return values


def decode_json(data: bytes | bytearray, message_class: type[Any]) -> Any:
    """A request message from its JSON, a field given twice refused.

    Every key and value pair has a colon of its own, outside strings. A body with no more
    colons than fields set (not left at their zero: "", 0, unset) therefore has one pair
    per field set and no other: no field is given twice, and nothing more is looked at
    (the common case). Any other body is read again, its keys seen one by one."""
    if too_deep(data):
        raise _invalid(_TOO_DEEP)
    try:
        message = message_class.from_json(data, ignore_unknown_fields=True)
    except Exception:  # noqa: BLE001 - said plainly
        raise json_error(data, message_class) from None
    values = (_VALUES.get(message_class) or _values(message_class))(message)
    if data.count(b":") > len(values) - values.count("") - values.count(0) - values.count(None):
        _refuse_set_twice(data, message_class)
    return message


class JsonCodec:
    """protobuf-py's JSON codec, refusing a field given twice and unknown values of
    ListCampaigns' status filter."""

    def __init__(self) -> None:
        inner: Codec = proto_json_codec()
        self._name = inner.name()
        # The library's, called directly (IssueCoupon's JSON answers are encoded by it).
        self.encode = inner.encode

    def name(self) -> str:
        return self._name

    def decode(self, data: bytes | bytearray, message_class: type[Any]) -> Any:
        message = decode_json(data, message_class)
        if message_class is coupon_pb.ListCampaignsRequest and message.status == 0:
            # Read as zero: it was unset, or a value the codec did not know.
            value = json.loads(data).get("status")
            if value not in _UNSET_STATUS:
                raise ConnectError(
                    Code.INVALID_ARGUMENT, f"status: {STATUS_CHOICES} (got {value!r})"
                )
        return message


class IssueJsonCodec(JsonCodec):
    """IssueCoupon's JSON, read on its hot path: the check for a field given twice by the
    body's length alone. A body that gives a field twice holds, beside the pairs of the
    values read, one pair more, of a known key (at least `,"userId":0`); a pair is at
    least its key, a colon and its value, and a string value at least its quotes and one
    byte per character. A body shorter than all that gives no field twice: such are the
    bodies clients send (40 bytes of room: any whitespace short of a 4-space indent)."""

    def decode(self, data: bytes | bytearray, message_class: type[Any]) -> Any:
        if len(data) > _SHALLOW_BYTES and too_deep(data):
            raise _invalid(_TOO_DEEP)
        try:
            message = coupon_pb.IssueCouponRequest.from_json(data, ignore_unknown_fields=True)
        except Exception:  # noqa: BLE001 - said plainly
            raise json_error(data, coupon_pb.IssueCouponRequest) from None
        campaign, user = len(message.campaign_id), len(message.user_id)
        # {"campaignId":"…","userId":"…"} and the extra pair, whichever fields are set.
        if campaign and user:
            least = 40 + campaign + user
        elif campaign:
            least = 28 + campaign
        else:
            least = 24 + user
        if len(data) >= least:
            _refuse_set_twice(data, coupon_pb.IssueCouponRequest)
        return message


class BinaryCodec:
    """protobuf-py's binary codec, its failures said plainly."""

    def __init__(self) -> None:
        inner: Codec = proto_binary_codec()
        self._name = inner.name()
        self._decode = inner.decode
        self.encode = inner.encode

    def name(self) -> str:
        return self._name

    def decode(self, data: bytes | bytearray, message_class: type[Any]) -> Any:
        try:
            return self._decode(data, message_class)
        except Exception:  # noqa: BLE001 - said plainly
            raise binary_error(data, message_class) from None


def codecs() -> list[Codec]:
    return [BinaryCodec(), JsonCodec()]


# The Connect protocol's JSON media types, unary and streaming.
JSON_MEDIA_TYPES = frozenset({b"application/json", b"application/connect+json"})


def refused_charset(content_type: bytes) -> bytes | None:
    """For a Connect JSON Content-Type that names a charset other than UTF-8, that charset
    (unquoted); else None. JSON is UTF-8 (RFC 8259), and connect-go takes only
    `application/json` or `application/json; charset=utf-8`, in any case: a body declared
    Latin-1 would be read as something it does not say. Other parameters are ignored."""
    media, semicolon, parameters = content_type.partition(b";")
    if not semicolon or media.strip(b" \t").lower() not in JSON_MEDIA_TYPES:
        return None
    for parameter in parameters.split(b";"):
        name, equals, value = parameter.partition(b"=")
        if equals and name.strip(b" \t").lower() == b"charset":
            value = value.strip(b" \t")
            if len(value) >= 2 and value[:1] == b'"' == value[-1:]:
                value = value[1:-1]
            return None if value.lower() == b"utf-8" else value
    return None


def charset_message(content_type: bytes, charset: bytes) -> str:
    """What a request whose JSON Content-Type names `charset` (refused_charset) is told."""
    media = content_type.partition(b";")[0].strip(b" \t").lower().decode("latin-1")
    shown = charset.decode("latin-1")
    shown = shown if len(shown) <= 64 else shown[:64] + "…"
    return (
        f"content-type: charset {shown!r} is not served: JSON is read as UTF-8"
        f" ({media}, or {media}; charset=utf-8)"
    )


class PlainGzip(GzipCompression):
    """gzip, a body that is not gzip said plainly (the library passes zlib's words on:
    `decompress: Error -3 while decompressing data: incorrect header check`), and one that
    decompresses past the limit as the HTTP layers say a body over it is."""

    def decompress(
        self, data: bytes | bytearray | memoryview, read_max_bytes: int | None = None
    ) -> bytes:
        try:
            return super().decompress(data, read_max_bytes)
        except ConnectError as exc:  # over the size limit, said in the service's words
            raise ConnectError(
                exc.code,
                f"request body is over the limit of {read_max_bytes} bytes once decompressed",
            ) from None
        except Exception:  # noqa: BLE001 - zlib's, gzip's and EOFError: said plainly
            raise _invalid("request body: not valid gzip") from None


def compressions() -> list[Compression]:
    return [PlainGzip()]


# --- what a body that cannot be read is told ---------------------------------------------

_SCALARS = {
    "STRING": "a string",
    "BOOL": "true or false",
    "BYTES": "base64 text",
    "DOUBLE": "a number",
    "FLOAT": "a number",
    "INT32": "an integer of 32 bits",
    "SINT32": "an integer of 32 bits",
    "SFIXED32": "an integer of 32 bits",
    "UINT32": "an unsigned integer of 32 bits",
    "FIXED32": "an unsigned integer of 32 bits",
    "INT64": "an integer of 64 bits",
    "SINT64": "an integer of 64 bits",
    "SFIXED64": "an integer of 64 bits",
    "UINT64": "an unsigned integer of 64 bits",
    "FIXED64": "an unsigned integer of 64 bits",
}


def _invalid(message: str) -> ConnectError:
    return ConnectError(Code.INVALID_ARGUMENT, message)


def _expected(field: Any) -> str:
    """What a field takes, in words."""
    value = field.value
    if hasattr(value, "scalar"):
        return "expected " + _SCALARS.get(value.scalar.name, "a number")
    if hasattr(value, "enum"):
        if field.parent is coupon_pb.ListCampaignsRequest._desc:
            return STATUS_CHOICES
        names = ", ".join(v.name for v in value.enum.values)
        return f"expected one of {names}"
    if hasattr(value, "message"):
        if value.message.type_name == "google.protobuf.Timestamp":
            return "expected a timestamp such as 2026-01-01T00:00:00Z"
        return "expected an object"
    return "expected a list" if hasattr(value, "element") else "expected an object"


def json_error(data: bytes | bytearray, message_class: type[Any]) -> ConnectError:
    """What a JSON body that could not be read is told: the first field that cannot be
    read alone, else what is wrong with the body. A UTF-8 byte order mark, which RFC 8259
    forbids a sender to add, is refused as such (Python's parser would skip it)."""
    if data.startswith(b"\xef\xbb\xbf"):
        return _invalid("request body: JSON must not begin with a byte order mark (U+FEFF)")
    if b"\x00" in data[:4] or data.startswith((b"\xff\xfe", b"\xfe\xff")):
        # UTF-16 or UTF-32, which Python's parser would read (RFC 8259: UTF-8 only).
        return _invalid("request body: JSON must be UTF-8 (this is UTF-16 or UTF-32)")
    try:
        value = json.loads(data, parse_int=_integer)
    except (ValueError, RecursionError):
        return _invalid("request body: not valid JSON")
    if not isinstance(value, dict):
        return _invalid("request body: expected a JSON object")
    fields = message_class._desc._fields_by_json_name
    for key, item in value.items():
        field = fields.get(key)
        if (huge := _huge(item)) is not None:
            # Valid JSON, but no field holds it (the parsers refuse the whole body).
            name = field.name if field is not None else _unknown_name(key)
            return _invalid(f"{name}: number out of range ({huge.digits} digits)")
        if _lone_surrogate(key) or _lone_surrogate(item):
            # Read by Python's parser, not by the native one (nor by any UTF-8 encoder),
            # which refuses the whole body whatever field holds it, known or not.
            name = field.name if field is not None else _unknown_name(key)
            return _invalid(
                f"{name}: expected a string of Unicode characters (got a lone surrogate)"
            )
        if field is None:
            continue
        try:
            message_class._from_json_value({key: item}, ignore_unknown_fields=True)
        except Exception:  # noqa: BLE001 - this field is the one
            return _invalid(f"{field.name}: {_expected(field)}")
    return _invalid(f"request body: not a valid {message_class.__name__}")


class _Huge:
    """A JSON integer of more digits than Python reads (sys.get_int_max_str_digits)."""

    def __init__(self, digits: int) -> None:
        self.digits = digits


def _integer(text: str) -> int | _Huge:
    try:
        return int(text)
    except ValueError:
        return _Huge(len(text.lstrip("-")))


def _huge(value: object) -> _Huge | None:
    """The first integer too long to read in a JSON value, if any."""
    if isinstance(value, _Huge):
        return value
    items = value if isinstance(value, list) else value.values() if isinstance(value, dict) else ()
    for item in items:
        if (huge := _huge(item)) is not None:
            return huge
    return None


def _unknown_name(key: str) -> str:
    """A field name the message does not have, as an error names it: its surrogates
    escaped, cut short if long."""
    name = key.encode("utf-8", "backslashreplace").decode()
    return name if len(name) <= 64 else name[:64] + "…"


def _lone_surrogate(value: object) -> bool:
    """Whether a JSON value holds a string with a surrogate not paired (`"\\ud800"`)."""
    if isinstance(value, str):
        return not value.isascii() and any("\ud800" <= c <= "\udfff" for c in value)
    if isinstance(value, list):
        return any(_lone_surrogate(item) for item in value)
    if isinstance(value, dict):
        return any(_lone_surrogate(k) or _lone_surrogate(v) for k, v in value.items())
    return False


def _varint(data: bytes | bytearray, at: int) -> tuple[int, int]:
    value = shift = 0
    while shift < 70:
        if at >= len(data):
            raise IndexError(at)
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
    raise IndexError(at)


def binary_error(data: bytes | bytearray, message_class: type[Any]) -> ConnectError:
    """What a binary body that could not be read is told: the first field that cannot be
    read alone, else where the body stops making sense."""
    fields = {field.number: field for field in message_class._desc.fields}
    at = 0
    name = message_class.__name__
    while at < len(data):
        start = at
        try:
            key, at = _varint(data, at)
            wire = key & 7
            if wire == 0:
                _, at = _varint(data, at)
            elif wire == 1:
                at += 8
            elif wire == 2:
                size, at = _varint(data, at)
                at += size
            elif wire == 5:
                at += 4
            else:
                raise IndexError(at)
            if at > len(data):
                raise IndexError(at)
        except IndexError:
            field = fields.get(key >> 3) if at > start else None
            if field is not None:
                return _invalid(f"{field.name}: cut short or malformed")
            return _invalid(f"request body: not a valid binary {name}")
        field = fields.get(key >> 3)
        if field is not None:
            try:
                message_class.from_binary(bytes(data[start:at]))
            except Exception:  # noqa: BLE001 - this field is the one
                value = field.value
                if getattr(getattr(value, "scalar", None), "name", "") == "STRING":
                    return _invalid(f"{field.name}: expected a string in UTF-8")
                return _invalid(f"{field.name}: {_expected(field)}")
    return _invalid(f"request body: not a valid binary {name}")
