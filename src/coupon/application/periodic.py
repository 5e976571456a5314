"""Work a process repeats in the background while it serves (flushing tallies)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable


@contextlib.asynccontextmanager
async def periodically(
    seconds: float, action: Callable[[], Awaitable[None]]
) -> AsyncIterator[None]:
    """Await `action` every `seconds` while open, and once more when closed (so nothing
    tallied before the close is lost). `action` handles its own failures."""

    async def forever() -> None:
        while True:
            await asyncio.sleep(seconds)
            await action()

    task = asyncio.get_running_loop().create_task(forever())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await action()
