"""A TCP proxy the tests can cut: the server under test reaches PostgreSQL or Redis
through it, so an outage can be staged without touching the shared services."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from urllib.parse import urlsplit, urlunsplit

from harness.server import free_port


class LoopProxy:
    """A TCP server on a free loopback port, on an event loop of its own in a thread, that
    hands each connection to `_handle` (the proxies' common part)."""

    def __init__(self) -> None:
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port)
        )
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def close(self) -> None:
        async def finish() -> None:
            # What still carries a connection ends here, not with the loop's garbage (a
            # task destroyed pending is a warning at any later moment of the test run).
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(finish(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


class CuttableProxy(LoopProxy):
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._blocked = False
        self._writers: set[asyncio.StreamWriter] = set()
        # Connections that carry nothing more, either way, though they stay open (freeze).
        self._frozen: set[asyncio.StreamWriter] = set()
        super().__init__()

    @classmethod
    def for_url(cls, url: str) -> tuple[CuttableProxy, str]:
        """A proxy in front of the server of `url`, and the same URL through the proxy."""
        parts = urlsplit(url)
        assert parts.hostname and parts.port
        proxy = cls(parts.hostname, parts.port)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{proxy.port}" if userinfo else f"127.0.0.1:{proxy.port}"
        return proxy, urlunsplit(parts._replace(netloc=netloc))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._blocked:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    if writer in self._frozen:
                        continue  # dropped on the way
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))
        self._frozen.discard(writer)

    def _cut_all(self) -> None:
        for w in list(self._writers):
            transport = w.transport
            transport.abort()
        self._writers.clear()

    def block(self) -> None:
        """Refuse new connections and cut the open ones, as a crashed server would."""
        self._blocked = True
        self._loop.call_soon_threadsafe(self._cut_all)

    def freeze(self) -> None:
        """The open connections carry nothing more, either way, and stay open (a NAT or
        firewall that lost their state); new ones go through."""

        async def freeze_all() -> None:
            self._frozen.update(self._writers)

        asyncio.run_coroutine_threadsafe(freeze_all(), self._loop).result(5)

    def unblock(self) -> None:
        self._blocked = False

    def close(self) -> None:
        self.block()
        super().close()
