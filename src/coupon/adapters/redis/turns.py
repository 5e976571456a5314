"""Callers waiting for a connection, served in the order they came."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Turns(Generic[T]):
    """A queue of callers waiting for something handed back (a connection, or room for
    one): what is handed goes to the caller that has waited longest and is still waiting.
    A caller that leaves (cancelled, timed out) just as it is handed something passes it
    on, so nothing handed is ever lost."""

    def __init__(self) -> None:
        self._waiting: deque[asyncio.Future[T]] = deque()

    async def wait(self, pass_on: Callable[[T], None]) -> T:
        """What is handed to this caller; leaving with it in hand, `pass_on(it)`."""
        turn: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            return await turn
        except BaseException:
            if turn.done() and not turn.cancelled():
                pass_on(turn.result())
            else:
                turn.cancel()  # skipped by hand()
            raise

    def hand(self, value: T) -> bool:
        """Give `value` to the caller that has waited longest; False: nobody waits."""
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(value)
                return True
        return False
