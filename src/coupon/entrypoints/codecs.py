"""The codecs the Connect application decodes and encodes with.

protobuf-py's JSON codec reads an enum value it does not know — a number outside the enum
or a name that is not one of its names — as the enum's zero, where the binary codec keeps
the number. For ListCampaigns' `status` filter, zero means "no filter": a misspelt filter
would list every campaign. The JSON codec here refuses such a value instead, with the same
message the binary path gives (translate.status_filter).
"""

from __future__ import annotations

import json
from typing import Any

from connectrpc.code import Code
from connectrpc.codec import Codec, proto_binary_codec, proto_json_codec
from connectrpc.errors import ConnectError

from coupon.entrypoints.translate import STATUS_CHOICES
from coupon.gen.coupon.v1 import coupon_pb

# What a request may say for an enum left unset (its zero, as number or name, or null).
_UNSET_STATUS: tuple[object, ...] = (None, 0, "CAMPAIGN_STATUS_UNSPECIFIED")


class JsonCodec:
    """protobuf-py's JSON codec, refusing unknown values of ListCampaigns' status filter."""

    def __init__(self) -> None:
        self._inner: Codec = proto_json_codec()

    def name(self) -> str:
        return self._inner.name()

    def encode(self, message: Any) -> bytes:
        return self._inner.encode(message)

    def decode(self, data: bytes | bytearray, message_class: type[Any]) -> Any:
        message = self._inner.decode(data, message_class)
        if message_class is coupon_pb.ListCampaignsRequest and message.status == 0:
            # Read as zero: it was unset, or a value the codec did not know.
            value = json.loads(data).get("status")
            if value not in _UNSET_STATUS:
                raise ConnectError(
                    Code.INVALID_ARGUMENT, f"status: {STATUS_CHOICES} (got {value!r})"
                )
        return message


def codecs() -> list[Codec]:
    return [proto_binary_codec(), JsonCodec()]
