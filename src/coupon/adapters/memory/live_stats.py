"""Live counters in this process's memory (the memory backend serves from one process)."""

from __future__ import annotations

from collections.abc import Sequence

from coupon.application.ports import LiveCounts


class MemoryLiveStats:
    KEEP_SECONDS = 120

    def __init__(self) -> None:
        self._seconds: dict[tuple[str, int], dict[str, int]] = {}

    async def add(self, counts: LiveCounts) -> None:
        newest = 0
        for key, fields in counts.items():
            stored = self._seconds.setdefault(key, {})
            for name, count in fields.items():
                stored[name] = stored.get(name, 0) + count
            newest = max(newest, key[1])
        # Forget what Redis would have let expire.
        for key in [k for k in self._seconds if k[1] < newest - self.KEEP_SECONDS]:
            del self._seconds[key]

    async def read(self, campaign_id: str, seconds: Sequence[int]) -> dict[int, dict[str, int]]:
        found = {}
        for second in seconds:
            fields = self._seconds.get((campaign_id, second))
            if fields:
                found[second] = dict(fields)
        return found
