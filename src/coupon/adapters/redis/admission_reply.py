"""The admission script's reply (lua/admit.lua), decoded in one place, with every tag named.

Pure: no I/O, so every shape of reply is unit-tested on its own.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from coupon.domain.coupon import Coupon


class ReplyKind(enum.IntEnum):
    """The first element of every reply, as admit.lua declares them."""

    DECIDED = 1
    NOT_LOADED = 2
    NOT_STARTED = 3
    TOO_LATE = 4


# A decided reply's result for one user, besides a slot (1 or more) or a holding (a list).
RESULT_SOLD_OUT = 0
RESULT_ENDED = -1
NO_END = -1


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def micros(value: datetime) -> int:
    """Microseconds since the epoch, exactly: a float timestamp rounds x.999999 up to the
    next second past about 2242, and a campaign's window then moved by a second."""
    return (value - _EPOCH) // _MICROSECOND


def from_micros(value: int) -> datetime:
    return datetime.fromtimestamp(value // 1_000_000, UTC).replace(microsecond=value % 1_000_000)


# The last issue time written by `holding` and its microseconds: the coupons of one
# admission batch share their issue time, the same datetime object. Kept by identity (the
# reference held here means no other object can take its id).
_last_issued: tuple[datetime | None, str] = (None, "")


def holding(coupon: Coupon) -> str:
    """The users-hash value of a committed coupon: 'slot|code|issued_at in microseconds'."""
    global _last_issued  # noqa: PLW0603 - one entry, replaced whole
    issued_at = coupon.issued_at
    last, text = _last_issued
    if last is not issued_at:
        text = str(micros(issued_at))
        _last_issued = (issued_at, text)
    return f"{coupon.slot}|{coupon.code}|{text}"


def held_coupon(campaign_id: str, user_id: str, value: bytes) -> Coupon | None:
    """The coupon a users-hash value names, or None while the admission is pending."""
    parts = value.decode().split("|")
    if len(parts) != 3:
        return None
    return Coupon(parts[1], campaign_id, user_id, from_micros(int(parts[2])), int(parts[0]))


@dataclass(frozen=True, slots=True)
class Held:
    """A user the gate already knows: their slot, and their coupon once committed."""

    slot: int
    pending: bool
    # Pending for longer than the lease: the caller settles it against the ledger.
    stale: bool
    value: bytes


@dataclass(frozen=True, slots=True)
class Reply:
    kind: ReplyKind
    now_us: int
    version: tuple[str, int] = ("", 0)
    starts_us: int = 0
    ends_us: int = NO_END
    # When the earliest given-back slot becomes issuable; 0 when none waits.
    reopens_us: int = 0
    # Per user: a slot (admitted), RESULT_SOLD_OUT, RESULT_ENDED, or Held.
    results: Sequence[int | Held] = ()
    stale: tuple[tuple[str, int], ...] = ()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _result(raw: Any) -> int | Held:
    if type(raw) is int:
        return raw
    slot, pending, stale, value = raw
    return Held(int(slot), bool(pending), bool(stale), value)


def decode(raw: Sequence[Any]) -> Reply:
    """One reply of admit.lua; ValueError for anything else."""
    try:
        kind = ReplyKind(int(raw[0]))
        now = int(raw[1])
        if kind is ReplyKind.NOT_LOADED or kind is ReplyKind.TOO_LATE:
            return Reply(kind, now)
        version = (_text(raw[2]), int(raw[3]))
        if kind is ReplyKind.NOT_STARTED:
            return Reply(kind, now, version, starts_us=int(raw[4]))
        flat = raw[8]
        stale = tuple((_text(flat[i]), int(flat[i + 1])) for i in range(0, len(flat) - 1, 2))
        return Reply(
            kind,
            now,
            version,
            starts_us=int(raw[4]),
            ends_us=int(raw[5]),
            reopens_us=int(raw[6]),
            results=[_result(r) for r in raw[7]],
            stale=stale,
        )
    except (IndexError, TypeError, ValueError) as exc:
        raise ValueError(f"not a reply of the admission script: {raw!r}") from exc
