"""Readiness: can this process serve? (PostgreSQL and Redis reachable, schema current)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping


class Readiness:
    def __init__(self, checks: Mapping[str, Callable[[], Awaitable[None]]]) -> None:
        self._checks = dict(checks)

    async def check(self, timeout: float = 2.0) -> tuple[bool, dict[str, str]]:
        async def one(check: Callable[[], Awaitable[None]]) -> str:
            try:
                await asyncio.wait_for(check(), timeout)
            except TimeoutError:
                return f"error: no answer within {timeout:g} s"
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
                return f"error: {type(exc).__name__}: {exc}"[:300]
            return "ok"

        names = list(self._checks)
        results = await asyncio.gather(*(one(self._checks[n]) for n in names))
        report = dict(zip(names, results, strict=True))
        return all(r == "ok" for r in results), report
