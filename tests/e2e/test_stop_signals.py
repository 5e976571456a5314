"""Stopping and restarting a real `coupon serve`: what clients meet while it drains.

Once SIGTERM is handled nothing listens any more, with several workers as with one: a new
connection is refused at once rather than queued for no one and reset at the end of the
drain. SIGHUP stops a one-worker server as SIGTERM does (in-flight requests answered, exit
0); with several workers it restarts them one at a time, and a hang-up of the whole process
group (a terminal or ssh session closed) cuts no request in flight.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from harness.client import connect_client, create_campaign
from harness.raw_http import Response, issue_request, open_connection, read_response
from harness.server import ServerProcess

pytestmark = pytest.mark.e2e


async def logged(server: ServerProcess, text: str, times: int = 1) -> None:
    """Until the server has logged `text` `times` times; fails if the process ends first."""
    deadline = time.monotonic() + 60  # a safety net: the condition is what is awaited
    while server.log().count(text) < times:
        code = server.process.poll()
        assert code is None, f"exited ({code}) before {text!r}:\n{server.log()}"
        assert time.monotonic() < deadline, f"never logged {text!r}:\n{server.log()}"
        await asyncio.sleep(0.05)


class HeldRequest:
    """An IssueCoupon on a connection a worker has accepted (a first request answered on
    it), the second one sent but for its last bytes: a request in flight until `finish`."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes
    ) -> None:
        self.reader, self.writer, self.rest = reader, writer, raw

    @classmethod
    async def open(cls, url: str, campaign_id: str, user: str) -> HeldRequest:
        reader, writer = await open_connection(url)
        writer.write(issue_request(campaign_id, f"{user}-first"))
        first = await read_response(reader)
        assert first.status == 200, first.body
        raw = issue_request(campaign_id, user)
        writer.write(raw[:-5])
        await writer.drain()
        return cls(reader, writer, raw[-5:])

    async def finish(self) -> Response:
        self.writer.write(self.rest)
        await self.writer.drain()
        try:
            return await asyncio.wait_for(read_response(self.reader), 30)
        finally:
            self.writer.close()


async def new_campaign(server: ServerProcess, total: int) -> str:
    async with connect_client(server.url) as client:
        return (await create_campaign(client, total=total)).id


async def test_a_connection_made_during_a_multi_worker_drain_is_refused_at_once(
    server_env: dict[str, str],
) -> None:
    """The supervisor closes its copy of the listening socket before it waits for its
    workers: otherwise the kernel kept completing handshakes into a queue no process read,
    and those clients waited through the drain (up to 30 s) for a reset."""
    server = ServerProcess(env=server_env, workers=2)
    try:
        server.wait_ready()
        held = await HeldRequest.open(server.url, await new_campaign(server, 10), "held")
        server.signal(signal.SIGTERM)
        # One worker drains the held request, its listener closed; the other has exited.
        await logged(server, "Waiting for connections to close")
        await logged(server, "Finished server process")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
        answer = await held.finish()
        assert answer.status == 200, answer.body
        assert server.process.wait(30) == 0, server.log()
    finally:
        server.stop()


async def test_sighup_stops_a_one_worker_server_as_sigterm_does(tmp_path: Path) -> None:
    """No other process takes over: the hang-up of a terminal means stop, gracefully. The
    request in flight is answered, the process exits 0 and removes its metrics directory."""
    server = ServerProcess(env={"TMPDIR": str(tmp_path)}, in_memory=True, log_dir=tmp_path)
    try:
        server.wait_ready()
        held = await HeldRequest.open(server.url, await new_campaign(server, 10), "held")
        server.signal(signal.SIGHUP)
        await logged(server, "Waiting for connections to close")
        answer = await held.finish()
        assert answer.status == 200, answer.body
        assert answer.headers.get("connection") == "close", answer.headers
        assert server.process.wait(30) == 0, server.log()
        assert "SIGHUP: stopping gracefully" in server.log(), server.log()
    finally:
        server.stop()
    assert sorted(tmp_path.glob("coupon-metrics-*")) == [], server.log()


async def test_sighup_to_the_process_group_of_workers_cuts_no_request_in_flight(
    server_env: dict[str, str],
) -> None:
    """A terminal or ssh hang-up reaches every process of the group: the workers leave it to
    the supervisor, which replaces them one at a time, each drained."""
    server = ServerProcess(env=server_env, workers=2)
    try:
        server.wait_ready()
        campaign_id = await new_campaign(server, 20)
        held = [await HeldRequest.open(server.url, campaign_id, f"held-{i}") for i in range(4)]
        before = set(server.worker_pids())
        os.killpg(server.process.pid, signal.SIGHUP)
        await logged(server, "Received SIGHUP")
        answers = [await request.finish() for request in held]
        assert [a.status for a in answers] == [200] * 4, [a.body for a in answers]
        # Both workers replaced, each once drained, and the server serves on.
        for pid in before:
            await logged(server, f"Finished server process [{pid}]")
        await logged(server, '"message": "serving"', times=4)
        server.wait_ready()
        assert len(server.worker_pids()) == 2 and not before & set(server.worker_pids())
        assert "Traceback" not in server.log() and "Warning" not in server.log(), server.log()
        server.signal(signal.SIGTERM)
        assert server.process.wait(30) == 0, server.log()
    finally:
        server.stop()


async def test_sigterm_during_a_rolling_restart_stops_it_there(
    server_env: dict[str, str],
) -> None:
    """A stop asked while SIGHUP's restart replaces the workers is not held up by the rest
    of the restart (each new worker's start, each old one's drain): the restart goes no
    further, every worker drains, the request in flight is answered, and the exit is 0."""
    server = ServerProcess(env=server_env, workers=2)
    try:
        server.wait_ready()
        campaign_id = await new_campaign(server, 20)
        held = await HeldRequest.open(server.url, campaign_id, "held")
        server.signal(signal.SIGHUP)
        await logged(server, "Received SIGHUP")
        server.signal(signal.SIGTERM)
        answer = await held.finish()
        assert answer.status == 200, answer.body
        assert server.process.wait(60) == 0, server.log()
        log = server.log(tail=1_000_000)
        # Two workers at the start, and at most the one new worker whose start was under
        # way when the stop came; none killed.
        assert log.count("Started server process") <= 3, log
        assert "SIGKILL" not in log and "not ready in time" not in log, log
    finally:
        server.stop()
