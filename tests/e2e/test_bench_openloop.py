"""bench/openloop.c, built with the machine's gcc, against a real server: it counts every
answer by kind, in its histograms and its timeline alike, open loop and closed."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from bench.generators import bench_result, openloop_argv
from bench.state import post_campaign
from harness.server import ServerProcess, free_port

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc to build the generator"),
]
TOKEN = "openloop-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log_dir = tmp_path_factory.mktemp("openloop")
    with ServerProcess(env={"COUPON_ADMIN_TOKEN": TOKEN}, in_memory=True, log_dir=log_dir) as proc:
        yield proc


def run(argv: list[str]) -> dict[str, Any]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    result = bench_result(done.stdout)
    assert result is not None, done.stdout + done.stderr
    return result


def counted(result: dict[str, Any], kind: str) -> int:
    return sum(n for _, n in result["latency_ms"][kind].get("buckets_us", []))


def test_open_loop_sends_the_schedule_and_sorts_every_answer(server: ServerProcess) -> None:
    campaign, _ = post_campaign(server.url, TOKEN, "openloop", 50)

    result = run(
        openloop_argv(server.port, campaign, "open", rate=200, seconds=1, connections=8, drain=5)
    )

    assert result["model"] == "open"
    assert result["due"] == result["sent"] == result["answered"] == 200
    assert result["answers"] == {"ok": 50, "sold_out": 150, "unavailable": 0, "other": 0}
    assert result["statuses"] == {"200": 50, "429": 150}
    assert result["timeouts"] == result["connection_errors"] == result["unfinished"] == 0
    for kind in ("ok", "sold_out"):
        assert counted(result, kind) == result["latency_ms"][kind]["count"]
        assert sum(result["timeline"][kind]) == result["answers"][kind]
    assert result["dispatch_lag_ms"]["count"] == 200


def test_closed_loop_keeps_every_connection_busy_until_the_end(server: ServerProcess) -> None:
    campaign, _ = post_campaign(server.url, TOKEN, "closed", 20)

    result = run(openloop_argv(server.port, campaign, "closed", rate=0, seconds=0.5, connections=4))

    assert result["model"] == "closed"
    assert result["answers"]["ok"] == 20
    assert result["answered"] == result["sent"] > 20
    assert result["answers"]["sold_out"] == result["answered"] - 20
    assert result["kept_up"] is True  # nothing to keep up with in closed loop


def test_a_server_that_is_gone_is_counted_not_waited_for() -> None:
    port = free_port()  # nothing listens there

    result = run(
        openloop_argv(port, "c", "gone", rate=100, seconds=0.5, connections=2, timeout=1, drain=1)
    )

    assert result["answered"] == result["sent"] == 0
    assert result["unfinished"] == result["due"] == 50
    # Retried every few milliseconds, not in a tight loop.
    assert 0 < result["connect_failures"] < 2_000
