"""IssueCoupon as a raw Connect unary call: encode the request, classify the response.

The hot loop posts these bytes itself instead of going through the generated client: the
client's per-call context, header and interceptor machinery cost about a third more CPU per
request (measured with both against the same server), and the generator must not be what
limits the rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from coupon.gen.coupon.v1 import coupon_pb
from coupon_loadtest.records import LOST, OK, OUTCOME_INDEX, OUTCOME_UNKNOWN

ISSUE_PATH = "/coupon.v1.CouponService/IssueCoupon"
# The service begins the message of an `unavailable` whose coupon may have been issued all
# the same with these words (docs/clients.md).
OUTCOME_UNKNOWN_PREFIX = "outcome unknown: "
# Outcomes of ours, not Connect codes a server may send.
_NOT_CODES = frozenset({"ok", "lost", "outcome_unknown"})


class _ErrorBody(msgspec.Struct):
    code: str = ""
    message: str = ""


_decode_error_body = msgspec.json.Decoder(_ErrorBody).decode


@dataclass(frozen=True, slots=True)
class IssueReply:
    """What one IssueCoupon response meant."""

    outcome: int
    code: str = ""
    issued_at_ns: int = 0
    already_issued: bool = False
    user_id: str = ""
    campaign_id: str = ""
    message: str = ""


class IssueCodec:
    """Binary protobuf (application/proto) or Connect JSON (application/json)."""

    def __init__(self, *, json: bool) -> None:
        self.json = json
        self.content_type = "application/json" if json else "application/proto"
        self.headers = {"content-type": self.content_type, "connect-protocol-version": "1"}
        self._campaign = ""
        self._campaign_field = b""

    def encode(self, campaign_id: str, user_id: str) -> bytes:
        if self.json:
            message = coupon_pb.IssueCouponRequest(campaign_id=campaign_id, user_id=user_id)
            body: bytes = message.to_json().encode()
            return body
        # Binary by hand: building a message object costs several times the bytes' worth
        # per request; a run asks for one campaign, so its field is encoded once.
        if campaign_id != self._campaign:
            self._campaign, self._campaign_field = campaign_id, _field(0x0A, campaign_id)
        return self._campaign_field + _field(0x12, user_id)

    def decode(self, status: int, body: bytes) -> IssueReply:
        if status != 200:
            return decode_error(status, body)
        try:
            if self.json:
                response = coupon_pb.IssueCouponResponse.from_json(body, ignore_unknown_fields=True)
            else:
                response = coupon_pb.IssueCouponResponse.from_binary(
                    body, ignore_unknown_fields=True
                )
        except Exception as exc:  # noqa: BLE001 - any undecodable body means the same thing
            return IssueReply(LOST, message=f"undecodable success response: {exc}")
        coupon = response.coupon
        if coupon is None or not coupon.code:
            return IssueReply(LOST, message="success response without a coupon")
        issued_at = coupon.issued_at
        issued_at_ns = 0 if issued_at is None else issued_at.seconds * 10**9 + issued_at.nanos
        return IssueReply(
            OK,
            code=coupon.code,
            issued_at_ns=issued_at_ns,
            already_issued=response.already_issued,
            user_id=coupon.user_id,
            campaign_id=coupon.campaign_id,
        )


def _field(tag: int, value: str) -> bytes:
    """A protobuf length-delimited field: tag, varint length, UTF-8 bytes."""
    data = value.encode()
    n = len(data)
    length = bytearray()
    while n >= 0x80:
        length.append(n & 0x7F | 0x80)
        n >>= 7
    length.append(n)
    return bytes((tag,)) + bytes(length) + data


# Errors come back the same again and again (sold out, turned away with a hint): each
# body is decoded once. Bounded; emptied when full.
_KNOWN_ERRORS: dict[tuple[int, bytes], IssueReply] = {}
_KNOWN_ERRORS_MAX = 64
_KNOWN_ERROR_BYTES = 1024


def decode_error(status: int, body: bytes) -> IssueReply:
    """A Connect unary error is a JSON body with a code, whatever the request's encoding.

    A non-200 response without one (a proxy's 502, a load balancer's 503) did not come from
    the service, which may or may not have processed the request: it counts as lost.
    """
    key = (status, body)
    known = _KNOWN_ERRORS.get(key)
    if known is None:
        known = _decode_error(status, body)
        if len(body) <= _KNOWN_ERROR_BYTES:
            if len(_KNOWN_ERRORS) >= _KNOWN_ERRORS_MAX:
                _KNOWN_ERRORS.clear()
            _KNOWN_ERRORS[key] = known
    return known


def _decode_error(status: int, body: bytes) -> IssueReply:
    try:
        error = _decode_error_body(body)
    except msgspec.DecodeError:
        error = None
    if error is not None and error.code in OUTCOME_INDEX and error.code not in _NOT_CODES:
        # An `unavailable` whose coupon may have been issued all the same is no refusal.
        unknown = error.code == "unavailable" and error.message.startswith(OUTCOME_UNKNOWN_PREFIX)
        outcome = OUTCOME_UNKNOWN if unknown else OUTCOME_INDEX[error.code]
        return IssueReply(outcome, message=error.message)
    snippet = body[:120].decode("utf-8", "replace").strip()
    return IssueReply(LOST, message=f"HTTP {status} without a Connect error: {snippet!r}")
