"""Work a process repeats in the background while it serves (flushing tallies)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

log = logging.getLogger("coupon")


@contextlib.asynccontextmanager
async def periodically(
    seconds: float,
    action: Callable[[], Awaitable[None]],
    last: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[None]:
    """Await `action` every `seconds` while open, and once more when closed (so nothing
    tallied before the close is lost), or `last` instead if given. `action` handles the
    failures it expects; one it does not is logged, and the next round runs all the same."""

    async def forever() -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await action()
            except Exception:
                log.exception("a periodic task failed; it runs again")

    task = asyncio.get_running_loop().create_task(forever())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await (last or action)()
