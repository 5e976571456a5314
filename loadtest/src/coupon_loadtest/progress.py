"""Live progress on a terminal; silence in CI, where a redrawn line is only noise."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TextIO


@dataclass(frozen=True)
class Snapshot:
    elapsed_s: float  # since the load started
    to_start_s: float  # until starts_at; negative once the campaign is open
    sent: int
    issued: int  # new coupons the clients received
    repeats: int  # already_issued answers
    sold_out: int
    not_open: int
    errors: int
    lost: int
    inflight: int
    rate: float  # requests sent per second, recently
    stock_left: int | None  # per the server, when known


def render(s: Snapshot) -> str:
    clock = f"T-{s.to_start_s:.1f}s" if s.to_start_s > 0 else f"T+{-s.to_start_s:.1f}s"
    parts = [
        f"{clock} ({s.elapsed_s:.1f}s)",
        f"sent {s.sent} ({s.rate:.0f}/s)",
        f"issued {s.issued}",
        f"repeat {s.repeats}",
        f"sold out {s.sold_out}",
        f"not open {s.not_open}",
        f"errors {s.errors}",
        f"lost {s.lost}",
        f"in flight {s.inflight}",
    ]
    if s.stock_left is not None:
        parts.append(f"stock left {s.stock_left}")
    return " | ".join(parts)


class Progress:
    """Redraws one status line on a TTY; prints nothing otherwise."""

    def __init__(self, stream: TextIO | None = None, *, quiet: bool = False) -> None:
        self._stream = stream or sys.stderr
        self.live = not quiet and self._stream.isatty()
        self._drawn = False

    def update(self, snapshot: Snapshot) -> None:
        if not self.live:
            return
        self._stream.write("\r\x1b[2K" + render(snapshot))
        self._stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False
