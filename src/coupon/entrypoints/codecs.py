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
"""

from __future__ import annotations

import json
from operator import attrgetter
from typing import Any

from connectrpc.code import Code
from connectrpc.codec import Codec, proto_binary_codec, proto_json_codec
from connectrpc.errors import ConnectError

from coupon.entrypoints.translate import STATUS_CHOICES
from coupon.gen.coupon.v1 import coupon_pb

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
    message = message_class.from_json(data, ignore_unknown_fields=True)
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
        message = coupon_pb.IssueCouponRequest.from_json(data, ignore_unknown_fields=True)
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


def codecs() -> list[Codec]:
    return [proto_binary_codec(), JsonCodec()]
