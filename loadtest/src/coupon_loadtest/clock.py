"""The client's estimate of the server's clock, with how far off it can be."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

NS_PER_S = 1_000_000_000
# The service stamps its Timestamps from Redis's TIME, in whole microseconds.
MICROSECOND_NS = 1_000
# uvicorn writes the Date header from a string it remakes once a second, and the header
# itself drops the fraction: the server's clock was somewhere in [Date, Date + 2 s).
HTTP_DATE_RESOLUTION_NS = 2 * NS_PER_S


@dataclass(frozen=True)
class ClockOffset:
    """server clock = client clock + offset_ns, give or take uncertainty_ns."""

    offset_ns: int
    uncertainty_ns: int
    source: str

    def to_server(self, client_ns: int) -> int:
        return client_ns + self.offset_ns

    def as_dict(self) -> dict[str, object]:
        return {
            "offset_ms": round(self.offset_ns / 1e6, 3),
            "uncertainty_ms": round(self.uncertainty_ns / 1e6, 3),
            "source": self.source,
        }


@dataclass(frozen=True)
class ClockSample:
    """One exchange: our clock as the request left, the server's stamp of its own clock
    while it answered (truncated to `resolution_ns`), our clock once the answer was in."""

    sent_ns: int
    server_ns: int
    received_ns: int
    source: str
    resolution_ns: int = MICROSECOND_NS

    @property
    def round_trip_ns(self) -> int:
        return self.received_ns - self.sent_ns

    def offset(self) -> ClockOffset:
        return from_round_trip(
            self.sent_ns, self.received_ns, self.server_ns, self.source, self.resolution_ns
        )


def from_round_trip(
    sent_ns: int, received_ns: int, server_ns: int, source: str, resolution_ns: int = 0
) -> ClockOffset:
    """NTP-style: the server read its clock somewhere between our send and our receipt.

    Taking the midpoint leaves at most half the round trip of error either way; a stamp
    truncated to `resolution_ns` was read somewhere in [server_ns, server_ns + resolution).
    """
    if received_ns < sent_ns:
        raise ValueError("received before sent")
    midpoint = (sent_ns + received_ns) // 2
    return ClockOffset(
        server_ns + resolution_ns // 2 - midpoint,
        (received_ns - sent_ns + 1) // 2 + (resolution_ns + 1) // 2,
        source,
    )


def shortest_round_trip(samples: Sequence[ClockSample]) -> ClockOffset:
    """The offset from the sample with the shortest round trip (NTP's clock filter).

    Every sample bounds the offset by its own round trip; queueing on the way there or back
    only widens a sample's bound, so the shortest exchange is the tightest honest one.
    """
    if not samples:
        raise ValueError("no clock samples")
    estimate, best = min(((s.offset(), s) for s in samples), key=lambda e: e[0].uncertainty_ns)
    if len(samples) == 1:
        return estimate
    return ClockOffset(
        estimate.offset_ns,
        estimate.uncertainty_ns,
        f"{best.source}, shortest of {len(samples)} round trips",
    )


def from_http_date(sent_ns: int, received_ns: int, date_s: int, source: str) -> ClockOffset:
    """From an HTTP Date header: whole seconds, and possibly a second old.

    A much coarser estimate, used only when the server stamps no timestamp of its own
    clock in its answers (one older than GetCampaignResponse.server_time).
    """
    return from_round_trip(
        sent_ns, received_ns, date_s * NS_PER_S, source, resolution_ns=HTTP_DATE_RESOLUTION_NS
    )


def iso_ms(ns: int) -> str:
    """A wall-clock time (ns since the epoch) as the report writes times: ISO 8601, UTC,
    to the millisecond, with `Z` (RFC 3339), as the service writes times."""
    text = datetime.fromtimestamp(ns / NS_PER_S, UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")
