"""The client's estimate of the server's clock, with how far off it can be."""

from __future__ import annotations

from dataclasses import dataclass

NS_PER_S = 1_000_000_000


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


def from_round_trip(sent_ns: int, received_ns: int, server_ns: int, source: str) -> ClockOffset:
    """NTP-style: the server read its clock somewhere between our send and our receipt.

    Taking the midpoint leaves at most half the round trip of error either way.
    """
    if received_ns < sent_ns:
        raise ValueError("received before sent")
    midpoint = (sent_ns + received_ns) // 2
    return ClockOffset(server_ns - midpoint, (received_ns - sent_ns + 1) // 2, source)


def from_http_date(sent_ns: int, received_ns: int, date_s: int, source: str) -> ClockOffset:
    """From an HTTP Date header, which truncates the server's clock to whole seconds.

    The server's clock read somewhere in [date_s, date_s + 1) while our request was in flight:
    a much coarser estimate, used only when no timestamp the server just stamped is at hand.
    """
    rough = from_round_trip(sent_ns, received_ns, date_s * NS_PER_S + NS_PER_S // 2, source)
    return ClockOffset(rough.offset_ns, rough.uncertainty_ns + NS_PER_S // 2, source)
