"""`coupon loadtest --herd` against real server processes: a small crowd on the real
service, its accounting and its verification; a crowd that is shed at first and must
come back after the server's hint; and answers of unknown outcome (PostgreSQL failed while
recording the coupon), which a burst must not count against the server and a herd retries."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from coupon_loadtest import report
from coupon_loadtest.cli import main
from harness.server import ServerProcess
from tests.loadtest.test_end_to_end import create_campaign, failed_checks, loadtest

pytestmark = pytest.mark.e2e


def herd(url: str, tmp_path: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    report = tmp_path / "herd.json"
    creating = [] if "--campaign-id" in extra else ["--start-in", "1"]
    code = main(
        [
            "--url",
            url,
            "--herd",
            *creating,
            "--spread",
            "500ms",
            "--patience",
            "20s",
            "--processes",
            "2",
            "--connections",
            "64",
            "--report",
            str(report),
            "--chart",
            str(tmp_path / "herd.png"),
            "--quiet",
            *extra,
        ]
    )
    return code, json.loads(report.read_text())


def retries_sum(histogram: dict[str, int]) -> int:
    assert "10+" not in histogram  # none expected here; a sum would be a lower bound
    return sum(int(k) * n for k, n in histogram.items())


@pytest.mark.integration
def test_a_crowd_on_the_real_service_is_answered_and_every_invariant_holds(
    server_env: dict[str, str], database: str, tmp_path: Path
) -> None:
    with ServerProcess(env=server_env, workers=2, log_dir=tmp_path) as server:
        code, document = herd(
            server.url,
            tmp_path,
            "--users",
            "2000",
            "--coupons",
            "200",
            "--database-url",
            database,
        )

    assert code == 0, document["verdict"]
    checks = document["verification"]["checks"]
    assert {c["source"] for c in checks} == {"client", "api", "database", "api+database"}
    assert all(c["passed"] for c in checks)
    crowd = document["herd"]
    assert crowd["users"] == 2000
    # Every user ended exactly one way: 200 coupons, the rest told it is sold out.
    assert crowd["got_coupon"] == 200
    assert crowd["got_sold_out"] == 1800
    assert crowd["got_error"] == crowd["gave_up"] == crowd["unanswered"] == 0
    assert crowd["answered_within_patience"] == 1.0
    assert sum(crowd["retries_histogram"].values()) == 2000
    # Each request is one press: the first of every user, and their retries.
    retried = retries_sum(crowd["retries_histogram"])
    assert document["throughput"]["requests"] == 2000 + retried
    # The rate offered counts from the first press (at most the spread, 0.5 s, before the
    # start), not from the load's start a second earlier, which a herd spends waiting.
    timeline = document["timeline"]
    pressing_s = (
        datetime.fromisoformat(timeline["load_stopped_at"])
        - datetime.fromisoformat(timeline["starts_at"])
    ).total_seconds() + 0.5
    offered = document["throughput"]["offered_rps"]
    assert offered >= 0.99 * document["throughput"]["requests"] / pressing_s, (offered, timeline)
    assert document["outcomes"]["ok_new"] == 200
    assert document["timeline"]["sold_out"] is True
    assert crowd["sold_out"] is True and crowd["sell_out_s"] is not None
    assert sum(crowd["goodput_per_s"]) * crowd["goodput_bucket_s"] == pytest.approx(200)
    assert (tmp_path / "herd.png").read_bytes().startswith(b"\x89PNG")


def test_a_crowd_on_a_campaign_open_for_an_hour_presses_from_now_with_full_patience(
    memory_server: ServerProcess, tmp_path: Path
) -> None:
    campaign_id = create_campaign(memory_server, 40, datetime.now(UTC) - timedelta(hours=1))

    code, document = herd(
        memory_server.url, tmp_path, "--campaign-id", campaign_id, "--users", "100",
        "--patience", "5s",
    )  # fmt: skip

    assert code == 0, document["verdict"]
    crowd = document["herd"]
    assert (crowd["got_coupon"], crowd["got_sold_out"], crowd["gave_up"]) == (40, 60, 0)
    assert document["throughput"]["requests"] >= 100
    # Measured from when the crowd pressed, within the spread, not from an hour ago.
    assert crowd["answered_within_s"]["2"] == 1.0
    assert len(crowd["goodput_per_s"]) < 100


@pytest.fixture
def shedding_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """tests/loadtest/shedding_server.py's `app`, or another of its apps named by an indirect
    parameter."""
    app = getattr(request, "param", "app")
    server = ServerProcess(
        env={"COUPON_BACKEND": "memory"},
        argv=[
            sys.executable,
            "-m",
            "uvicorn",
            "--no-access-log",
            f"tests.loadtest.shedding_server:{app}",
        ],
        name="shedding",
        log_dir=tmp_path,
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_a_shed_crowd_comes_back_after_the_hint_and_gets_exactly_the_stock(
    shedding_server: ServerProcess, tmp_path: Path
) -> None:
    code, document = herd(
        shedding_server.url,
        tmp_path,
        "--users",
        "500",
        "--coupons",
        "50",
        "--retry-floor",
        "50ms",
    )

    assert code == 0, document["verdict"]
    crowd = document["herd"]
    # The first press of every user was shed; each came back once and was answered.
    assert document["outcomes"]["unavailable"] == 500
    assert crowd["retries_histogram"] == {"1": 500}
    assert document["throughput"]["requests"] == 1000
    assert (crowd["got_coupon"], crowd["got_sold_out"]) == (50, 450)
    assert crowd["gave_up"] == crowd["unanswered"] == 0
    # Nobody came back sooner than the server's hint (shedding_server's RETRY_AFTER_MS).
    assert crowd["time_to_final_ms"]["p50"] >= 1000
    assert document["verification"]["passed"] is True


# Every third user's first request is issued but answered `unavailable` (shedding_server's
# RecordedButUnanswered); a burst of first requests only, one per user, on a stock for all.
ONE_REQUEST_EACH = (
    "--users", "300", "--coupons", "1000", "--start-in", "0", "--rate", "300",
    "--duration", "0.9", "--repeat-fraction", "0",
)  # fmt: skip


@pytest.mark.parametrize("shedding_server", ["outcome_unknown_app"], indirect=True)
def test_a_coupon_whose_answer_said_outcome_unknown_is_no_violation(
    shedding_server: ServerProcess, tmp_path: Path
) -> None:
    code, document = loadtest(shedding_server.url, tmp_path, *ONE_REQUEST_EACH)

    assert code == 0, document["verification"]
    unknown = document["outcomes"]["outcome_unknown"]
    assert unknown > 0 and "unavailable" not in document["outcomes"]
    assert document["verification"]["facts"]["users_with_outcome_unknown"] == unknown
    phantom = next(
        c
        for c in document["verification"]["checks"]
        if c["name"] == "nothing listed that no client received"
    )
    assert phantom["passed"] and f"outcome unknown: {unknown}" in phantom["detail"]
    assert f"outcome_unknown {unknown}" in " ".join(report_text(tmp_path).split())


def report_text(tmp_path: Path) -> str:
    return report.summary_text(json.loads((tmp_path / "report.json").read_text()))


@pytest.mark.parametrize("shedding_server", ["unmarked_app"], indirect=True)
def test_a_listed_coupon_after_a_plain_refusal_is_still_a_violation(
    shedding_server: ServerProcess, tmp_path: Path
) -> None:
    code, document = loadtest(shedding_server.url, tmp_path, *ONE_REQUEST_EACH)

    assert code == 1
    assert "nothing listed that no client received" in failed_checks(document)
    assert "outcome_unknown" not in document["outcomes"]


@pytest.mark.parametrize("shedding_server", ["outcome_unknown_app"], indirect=True)
def test_a_herd_presses_again_after_an_outcome_unknown_and_gets_its_coupon(
    shedding_server: ServerProcess, tmp_path: Path
) -> None:
    code, document = herd(
        shedding_server.url, tmp_path, "--users", "90", "--coupons", "200", "--retry-floor",
        "50ms",
    )  # fmt: skip

    assert code == 0, document["verdict"]
    assert document["outcomes"]["outcome_unknown"] == 30
    assert document["outcomes"]["ok_already_issued"] == 30
    assert document["herd"]["got_coupon"] == 90
    assert document["herd"]["retries_histogram"] == {"0": 60, "1": 30}
    # Goodput counts every user's coupon once, those first answered `alreadyIssued` too.
    crowd = document["herd"]
    assert sum(crowd["goodput_per_s"]) * crowd["goodput_bucket_s"] == pytest.approx(90)


# A small burst, on a stock for all, with a short per-request time-out.
SMALL_BURST = (
    "--users", "100", "--coupons", "1000", "--start-in", "0", "--rate", "200",
    "--duration", "0.5", "--timeout", "1",
)  # fmt: skip


@pytest.mark.parametrize("shedding_server", ["slow_listing_app"], indirect=True)
def test_a_read_back_slower_than_a_request_time_out_still_verifies(
    shedding_server: ServerProcess, tmp_path: Path
) -> None:
    code, document = loadtest(shedding_server.url, tmp_path, *SMALL_BURST)

    assert code == 0, document["verdict"]
    assert document["verification"]["passed"] is True
    assert "api" in document["verification"]["sources"]


@pytest.mark.parametrize("shedding_server", ["failing_listing_app"], indirect=True)
def test_a_read_back_that_fails_keeps_the_clients_checks_and_exits_four(
    shedding_server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, document = loadtest(shedding_server.url, tmp_path, *SMALL_BURST)

    assert code == report.EXIT_UNVERIFIED == 4
    assert "cannot reach" not in capsys.readouterr().err
    checks = document["verification"]["checks"]
    assert all(c["passed"] for c in checks if c["source"] == "client")
    (unread,) = [c for c in checks if not c["done"]]
    assert unread["source"] == "api" and "listing is broken" in unread["detail"]
    assert document["verdict"] == {
        "passed": False,
        "exit_code": 4,
        "reasons": [f"api: {unread['detail']}"],
    }
    assert "SKIP api" in report_text(tmp_path)
