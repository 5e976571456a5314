"""`coupon loadtest` against real servers: it passes the real one, with and without reading
PostgreSQL directly, on a campaign it creates or one that exists already, and fails one that
breaks the invariants."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from coupon_loadtest.cli import main
from harness.server import ServerProcess, free_port, web_server
from harness.services import TestServices, drop_database

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def loadtest(url: str, tmp_path: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    report = tmp_path / "report.json"
    # The stock and the start are those of the campaign created, not of one targeted.
    creating = [] if "--campaign-id" in extra else ["--coupons", "200", "--start-in", "1"]
    code = main(
        [
            "--url",
            url,
            *creating,
            "--users",
            "600",
            "--rate",
            "1000",
            "--processes",
            "2",
            "--tail",
            "0.5",
            # Invariants are the point here, not how punctual a busy test machine is.
            "--max-lag",
            "1000",
            "--report",
            str(report),
            "--chart",
            str(tmp_path / "chart.png"),
            "--quiet",
            *extra,
        ]
    )
    return code, json.loads(report.read_text())


# `coupon loadtest`, and the tool's own command, `coupon-loadtest`.
COMMANDS = {
    "coupon loadtest": [sys.executable, "-m", "coupon", "loadtest"],
    "coupon-loadtest": [sys.executable, "-m", "coupon_loadtest"],
}
SMALL_RUN = [
    "--coupons", "5", "--users", "10", "--rate", "20", "--start-in", "0.5", "--tail", "0.2",
    "--processes", "1", "--max-lag", "1000", "--no-chart", "--quiet",
]  # fmt: skip


def run_command(
    command: str, env: dict[str, str], cwd: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMANDS[command], *SMALL_RUN, *extra],
        env=env,
        cwd=cwd,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("where", ["environment", ".env", "environment over .env"])
def test_the_url_comes_from_coupon_url_in_the_environment_or_dotenv(
    memory_server: ServerProcess, tmp_path: Path, where: str, command: str
) -> None:
    """Without --url, `coupon loadtest` and `coupon-loadtest` call $COUPON_URL, from the
    environment or ./.env (the environment wins), as the operators' command line does."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    if where != "environment":
        elsewhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        dotenv = memory_server.url if where == ".env" else elsewhere
        (tmp_path / ".env").write_text(f"COUPON_URL={dotenv}  # the local server\n")
    if where != ".env":
        env["COUPON_URL"] = memory_server.url
    run = run_command(command, env, tmp_path)
    assert run.returncode == 0, run.stderr
    document = json.loads((tmp_path / "loadtest-report.json").read_text())
    assert document["target"]["url"] == memory_server.url
    assert document["throughput"]["issued"] == 5


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_admin_token_comes_from_the_environment_or_dotenv(tmp_path: Path, command: str) -> None:
    """A service that requires a token: ./.env's COUPON_ADMIN_TOKEN is sent, and one in the
    environment wins over it (a wrong one is said to be wrong, not missing); a bad .env is
    one line and exit 2."""
    token = "loadtest-token"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    with ServerProcess(
        env={"COUPON_ADMIN_TOKEN": token}, in_memory=True, log_dir=tmp_path
    ) as server:
        (tmp_path / ".env").write_text(
            f"COUPON_URL={server.url}\nCOUPON_ADMIN_TOKEN={token} # rotate monthly\n"
        )
        passed = run_command(command, env, tmp_path)
        assert passed.returncode == 0, passed.stderr
        refused = run_command(command, {**env, "COUPON_ADMIN_TOKEN": "wrong"}, tmp_path)
        assert (refused.returncode, refused.stderr) == (
            2,
            "loadtest: cannot use the admin API: the server does not take the admin token "
            "given: check --admin-token or COUPON_ADMIN_TOKEN\n",
        )
        (tmp_path / ".env").write_text(f"COUPON_URL={server.url}\n")
        missing = run_command(command, env, tmp_path)
        assert (missing.returncode, missing.stderr) == (
            2,
            "loadtest: cannot use the admin API: the server wants an admin token: pass "
            "--admin-token or set COUPON_ADMIN_TOKEN\n",
        )
    (tmp_path / ".env").write_text("this line is bad\n")
    broken = run_command(command, env, tmp_path)
    assert broken.returncode == 2 and len(broken.stderr.splitlines()) == 1, broken.stderr
    # In the tool's own words, whichever command ran it.
    assert broken.stderr.startswith("loadtest: "), broken.stderr
    assert ".env:1: expected KEY=VALUE" in broken.stderr


@pytest.mark.skipif(shutil.which("faketime") is None, reason="faketime (just test-deps)")
def test_start_in_counts_from_the_services_clock_not_this_machines(
    memory_server: ServerProcess, tmp_path: Path
) -> None:
    """A load machine whose clock is 10 s slow: --start-in 2 still opens the campaign 2 s
    after the service's now, so the early probe reaches it before the start, and the run
    says how long until the start really is."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    run = subprocess.run(
        ["faketime", "-f", "-10s", *COMMANDS["coupon-loadtest"], "--url", memory_server.url,
         "--coupons", "5", "--users", "10", "--rate", "20", "--start-in", "2", "--tail", "0.2",
         "--processes", "1", "--max-lag", "1000", "--no-chart"],
        env=env, cwd=tmp_path, check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    document = json.loads((tmp_path / "loadtest-report.json").read_text())
    campaign = httpx.post(
        f"{memory_server.url}/coupon.v1.CouponService/GetCampaign",
        json={"campaignId": document["target"]["campaign_id"], "pageSize": 1},
        timeout=30,
    ).json()["campaign"]
    created = datetime.fromisoformat(campaign["createdAt"].replace("Z", "+00:00"))
    starts = datetime.fromisoformat(campaign["startsAt"].replace("Z", "+00:00"))
    assert timedelta(seconds=1) < starts - created <= timedelta(seconds=2), (created, starts)
    assert document["outcomes"]["failed_precondition (not started)"] > 0, document["outcomes"]
    assert re.search(r"starts in [12]\.\d s", run.stderr), run.stderr


def failed_checks(document: dict[str, Any]) -> set[str]:
    return {c["name"] for c in document["verification"]["checks"] if not c["passed"]}


def test_real_server_passes_every_check(memory_server: ServerProcess, tmp_path: Path) -> None:
    code, document = loadtest(memory_server.url, tmp_path)

    assert code == 0, document["verdict"]
    assert failed_checks(document) == set()
    assert document["throughput"]["issued"] == 200
    assert document["timeline"]["sold_out"] is True
    outcomes = document["outcomes"]
    assert outcomes["ok_new"] == 200
    assert outcomes["failed_precondition (not started)"] > 0  # the early probe reached it
    assert outcomes["resource_exhausted"] > 0  # and so did the demand beyond the stock
    assert document["generator"]["kept_up"] is True
    assert (tmp_path / "chart.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.integration
def test_real_server_passes_when_checked_in_postgresql_too(
    server_env: dict[str, str], database: str, tmp_path: Path
) -> None:
    with ServerProcess(env=server_env, workers=2, log_dir=tmp_path) as server:
        code, document = loadtest(server.url, tmp_path, "--database-url", database, "--json")

    assert code == 0, document["verdict"]
    sources = {c["source"] for c in document["verification"]["checks"]}
    assert sources == {"client", "api", "database", "api+database"}
    assert document["throughput"]["issued"] == 200


@pytest.mark.integration
def test_an_existing_campaign_opening_mid_burst_has_no_success_before_its_start(
    server_env: dict[str, str], database: str, tmp_path: Path
) -> None:
    # The tool targets a campaign it did not create, so it learns the server's clock from
    # GetCampaign alone; the burst begins before the start and sells out just after it,
    # where a clock estimate that is off by more than it admits condemns good successes.
    with ServerProcess(env=server_env, workers=2, log_dir=tmp_path) as server:
        starts_at = datetime.now(UTC) + timedelta(seconds=4)
        created = httpx.post(
            f"{server.url}/coupon.v1.CouponService/CreateCampaign",
            json={
                "name": "existing, opening mid-burst",
                "totalCoupons": 200,
                "startsAt": starts_at.isoformat().replace("+00:00", "Z"),
            },
            timeout=30,
        )
        assert created.status_code == 200, created.text
        campaign_id = created.json()["campaign"]["id"]
        code, document = loadtest(
            server.url, tmp_path, "--campaign-id", campaign_id, "--database-url", database
        )

    assert code == 0, document["verdict"]
    assert failed_checks(document) == set()
    # The burst began before the start.
    assert document["outcomes"]["failed_precondition (not started)"] > 0
    assert document["outcomes"]["ok_new"] == 200  # and sold out after it
    clock = document["clock"]
    assert clock["source"].startswith("GetCampaign.server_time")
    if urlsplit(server_env["REDIS_URL"]).hostname in ("127.0.0.1", "localhost", "::1"):
        # Redis, whose clock the server stamps, shares this machine's clock: the true
        # offset is zero, and must lie within the bound the tool claims (both rounded to
        # the microsecond in the report).
        assert abs(clock["offset_ms"]) <= clock["uncertainty_ms"] + 0.001, clock


async def insert_early_coupon(database: str, campaign_id: str) -> None:
    """A coupon of the campaign stamped an hour before its start, as a tampered or broken
    writer would leave it: the guard is lifted for the one insert and put back (NOT VALID,
    so that it keeps every later row, but lets this one be)."""
    connection = await asyncpg.connect(database)
    try:
        async with connection.transaction():
            await connection.execute("ALTER TABLE coupons DROP CONSTRAINT coupons_issued_in_window")
            await connection.execute(
                "INSERT INTO coupons (campaign_id, total_coupons, starts_at, ends_at, slot,"
                " code, user_id, issued_at)"
                " SELECT id, total_coupons, starts_at, ends_at, total_coupons, 'EARLY1',"
                " 'eve', starts_at - interval '1 hour' FROM campaigns WHERE id = $1",
                uuid.UUID(campaign_id),
            )
            await connection.execute(
                "ALTER TABLE coupons ADD CONSTRAINT coupons_issued_in_window"
                " CHECK (issued_at >= starts_at AND issued_at < ends_at) NOT VALID"
            )
    finally:
        await connection.close()


@pytest.mark.integration
def test_a_coupon_issued_before_the_run_outside_the_window_fails_i3(
    server_env: dict[str, str], database: str, tmp_path: Path
) -> None:
    # A campaign that holds coupons already is checked whole, as I1, I2 and I4 count every
    # row: a coupon stamped before the start is a violation whoever issued it.
    with ServerProcess(env=server_env, workers=1, log_dir=tmp_path) as server:
        campaign_id = create_campaign(server, 200, datetime.now(UTC) + timedelta(seconds=1))
        asyncio.run(insert_early_coupon(database, campaign_id))
        # Fewer users than the stock: the run never reaches the slot the tampered row holds.
        code, document = loadtest(
            server.url, tmp_path, "--campaign-id", campaign_id, "--database-url", database,
            "--users", "50", "--rate", "200", "--processes", "1",
        )  # fmt: skip

    outside = [
        check
        for check in document["verification"]["checks"]
        if check["name"] == "no coupon issued outside the window"
    ]
    assert {check["source"] for check in outside} == {"api", "database"}
    for check in outside:
        assert check["passed"] is False, check
        assert any("EARLY1 (user eve)" in example for example in check["examples"]), check
    assert failed_checks(document) == {"no coupon issued outside the window"}
    assert code == 1


def campaigns(server: ServerProcess) -> list[dict[str, Any]]:
    listed = httpx.post(
        f"{server.url}/coupon.v1.CouponService/ListCampaigns", json={}, timeout=30
    ).json()
    found: list[dict[str, Any]] = listed.get("campaigns", [])
    return found


def rfc3339(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def create_campaign(
    server: ServerProcess, total: int, starts_at: datetime, ends_at: datetime | None = None
) -> str:
    body = {"name": "existing", "totalCoupons": total, "startsAt": rfc3339(starts_at)}
    if ends_at is not None:
        body["endsAt"] = rfc3339(ends_at)
    created = httpx.post(
        f"{server.url}/coupon.v1.CouponService/CreateCampaign", json=body, timeout=30
    )
    assert created.status_code == 200, created.text
    campaign_id: str = created.json()["campaign"]["id"]
    return campaign_id


def call(server: ServerProcess, method: str, body: dict[str, str]) -> None:
    answer = httpx.post(f"{server.url}/coupon.v1.CouponService/{method}", json=body, timeout=30)
    assert answer.status_code == 200, answer.text


def run_tool(*argv: str) -> int:
    return main([*argv, "--no-chart", "--quiet", "--max-lag", "1000"])


def test_a_burst_stops_a_tail_after_its_campaign_ends(
    memory_server: ServerProcess, tmp_path: Path
) -> None:
    # Far more stock than the users can take: only the campaign's end can settle the run,
    # which must stop then (plus the tail), not at --max-duration.
    now = datetime.now(UTC)
    campaign_id = create_campaign(
        memory_server, 5000, now + timedelta(seconds=2), now + timedelta(seconds=3)
    )
    report = tmp_path / "report.json"
    code = run_tool(
        "--url", memory_server.url, "--campaign-id", campaign_id, "--users", "3000",
        "--rate", "100", "--processes", "1", "--tail", "0.5", "--max-duration", "15",
        "--report", str(report),
    )  # fmt: skip
    document = json.loads(report.read_text())

    assert code == 0, document["verdict"]
    stopped = datetime.fromisoformat(document["timeline"]["load_stopped_at"])
    ends_at = datetime.fromisoformat(document["target"]["ends_at"])
    assert stopped - ends_at < timedelta(seconds=2.5), (stopped, ends_at)
    # Refusals before the start and after the end are counted apart, each with its words.
    outcomes, messages = document["outcomes"], document["messages"]
    assert outcomes["failed_precondition (not started)"] > 0, outcomes
    assert outcomes["failed_precondition (ended)"] > 0, outcomes
    assert "failed_precondition" not in outcomes
    assert messages["failed_precondition (not started)"].startswith("campaign has not started")
    assert messages["failed_precondition (ended)"].startswith("campaign has ended")


def test_a_burst_stops_a_tail_after_its_campaign_is_ended_by_hand(
    memory_server: ServerProcess, tmp_path: Path
) -> None:
    # No end time to watch: the refusal that says the campaign has ended settles the run.
    campaign_id = create_campaign(memory_server, 5000, datetime.now(UTC))
    ender = threading.Timer(1.5, call, (memory_server, "EndCampaign", {"campaignId": campaign_id}))
    ender.start()
    started = time.monotonic()
    report = tmp_path / "report.json"
    try:
        code = run_tool(
            "--url", memory_server.url, "--campaign-id", campaign_id, "--users", "3000",
            "--rate", "100", "--processes", "1", "--tail", "0.5", "--max-duration", "15",
            "--report", str(report),
        )  # fmt: skip
    finally:
        ender.join()
    elapsed = time.monotonic() - started
    document = json.loads(report.read_text())

    assert elapsed < 10, elapsed
    assert document["outcomes"]["failed_precondition (ended)"] > 0, document["outcomes"]
    # The refusals after the kill switch are right: the campaign was not open any more.
    assert code == 0, document["verdict"]
    assert failed_checks(document) == set()


@pytest.mark.parametrize(
    "database_url",
    ["closed port", "postgresql://[not-a-url", "mysql://127.0.0.1/coupon"],
)
def test_an_unusable_database_url_stops_the_run_before_any_load(
    memory_server: ServerProcess,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    database_url: str,
) -> None:
    free = f"127.0.0.1:{free_port()}"
    if database_url == "closed port":
        database_url = f"postgresql://postgres@{free}/coupon"
    report = tmp_path / "report.json"
    code = run_tool(
        "--url", memory_server.url, "--coupons", "20", "--users", "40", "--rate", "100",
        "--database-url", database_url, "--report", str(report),
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("loadtest: ") and "--database-url" in err
    if database_url.endswith(f"{free}/coupon"):
        assert err == f"loadtest: cannot connect to --database-url: connection refused by {free}\n"
    # Refused at set-up: no campaign was created, nothing was sent, no report written.
    assert campaigns(memory_server) == []
    assert not report.exists()


@pytest.fixture
def empty_database(services: TestServices) -> Iterator[str]:
    """A database of this run's with no tables at all; dropped afterwards."""
    url = f"{services.database_url}_empty"
    name = urlsplit(url).path.lstrip("/")
    admin = urlunsplit(urlsplit(url)._replace(path="/postgres"))

    async def create() -> None:
        connection = await asyncpg.connect(admin)
        try:
            await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()

    asyncio.run(create())
    try:
        yield url
    finally:
        asyncio.run(drop_database(url))


@pytest.mark.integration
def test_a_database_without_the_schema_stops_the_run_before_any_load(
    memory_server: ServerProcess,
    empty_database: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = tmp_path / "report.json"
    code = run_tool(
        "--url", memory_server.url, "--coupons", "20", "--users", "40", "--rate", "100",
        "--database-url", empty_database, "--report", str(report),
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("loadtest: --database-url holds no coupon schema"), err
    assert err.count("\n") == 1
    assert campaigns(memory_server) == []
    assert not report.exists()


def test_a_campaign_that_can_issue_nothing_more_is_refused_at_set_up(
    memory_server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    now = datetime.now(UTC)
    ended = create_campaign(memory_server, 10, now)
    call(memory_server, "EndCampaign", {"campaignId": ended})
    sold_out = create_campaign(memory_server, 1, now)
    call(memory_server, "IssueCoupon", {"campaignId": sold_out, "userId": "first"})
    later = create_campaign(memory_server, 10, now + timedelta(hours=1))
    report = tmp_path / "report.json"
    for campaign_id, why in (
        (ended, "has ended at "),
        (sold_out, "is sold out (1 of 1 issued)"),
        (later, "opens in "),
    ):
        code = run_tool(
            "--url", memory_server.url, "--campaign-id", campaign_id, "--users", "20",
            "--rate", "100", "--max-duration", "3", "--report", str(report),
        )  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2, err
        assert err.startswith(f"loadtest: campaign {campaign_id} {why}"), err
        assert err.count("\n") == 1
        assert not report.exists()


@pytest.mark.parametrize(
    ("where", "reason"),
    [
        ("http://127.0.0.1:{closed}", "connection refused"),
        ("http://no-such-host.invalid:8000", "name not resolved"),
        (
            "https://127.0.0.1:{port}",
            "the port does not speak TLS (use http:// in --url or COUPON_URL)",
        ),
        ("http://127.0.0.1:{silent}", "timed out"),  # accepts, never answers
    ],
)
def test_an_unreachable_service_is_one_plain_line_at_set_up(
    memory_server: ServerProcess,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    where: str,
    reason: str,
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = where.format(
            closed=free_port(),
            port=urlsplit(memory_server.url).port,
            silent=silent.getsockname()[1],
        )
        report = tmp_path / "report.json"
        code = run_tool("--url", url, "--timeout", "1", "--report", str(report))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err == f"loadtest: cannot reach the service at {url}: {reason}\n"
    assert not report.exists()


@pytest.fixture
def other_web_server(tmp_path: Path) -> Iterator[str]:
    """A plain web server: a 501 to a POST."""
    port = free_port()
    (tmp_path / "index.html").write_text("a site")
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    with web_server(argv, port, cwd=tmp_path) as url:
        yield url


CATCH_ALL = """
import http.server, sys
class Page(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = b"<html>a shop</html>"
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Page).serve_forever()
"""


@pytest.fixture
def catch_all_web_server() -> Iterator[str]:
    """A web server that answers every path with a page of its own (200, text/html)."""
    port = free_port()
    with web_server([sys.executable, "-c", CATCH_ALL, str(port)], port) as url:
        yield url


@pytest.mark.parametrize(
    "where", ["the service under a path", "another web server", "a catch-all page"]
)
def test_a_url_that_is_not_the_service_is_said_plainly_at_set_up(
    memory_server: ServerProcess,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
    where: str,
) -> None:
    if where == "the service under a path":
        url = memory_server.url + "/api"
    elif where == "another web server":
        url = request.getfixturevalue("other_web_server")
    else:
        url = request.getfixturevalue("catch_all_web_server")
    report = tmp_path / "report.json"
    code = run_tool("--url", url, "--report", str(report))
    err = capsys.readouterr().err
    assert code == 2, err
    # As `coupon campaigns` says it.
    assert err == (
        f"loadtest: {url} does not serve the coupon API (its paths are not found there); "
        "give the service's base URL, such as http://127.0.0.1:8000\n"
    )
    assert campaigns(memory_server) == []
    assert not report.exists()


def test_a_password_in_the_url_is_never_printed(
    memory_server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # As the server prints DATABASE_URL and REDIS_URL: the user, never the password.
    port = urlsplit(memory_server.url).port
    closed = free_port()
    report = tmp_path / "report.json"
    for url, said in (
        (
            f"http://admin:hunter2@127.0.0.1:{closed}",
            f"cannot reach the service at http://admin:***@127.0.0.1:{closed}: connection refused",
        ),
        (
            f"http://admin:hunter2@127.0.0.1:{port}/api",
            f"http://admin:***@127.0.0.1:{port}/api does not serve the coupon API",
        ),
        ("ftp://admin:hunter2@host", "--url must start with http:// or https://"),
    ):
        code = run_tool("--url", url, "--report", str(report))
        err = capsys.readouterr().err
        assert code == 2, err
        assert err.startswith(f"loadtest: {said}"), err
        assert "hunter2" not in err
    code = run_tool(
        "--url", "http://127.0.0.1:1", "--database-url", "mysql://admin:hunter2@host/coupon",
        "--report", str(report),
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "mysql://admin:***@host/coupon" in err and "hunter2" not in err, err
    # A run through such a URL keeps the password out of its report, which may be shared.
    code = run_tool(
        "--url", f"http://admin:hunter2@127.0.0.1:{port}", *SMALL_RUN, "--report", str(report)
    )
    assert code == 0, capsys.readouterr().err
    assert json.loads(report.read_text())["target"]["url"] == f"http://admin:***@127.0.0.1:{port}"
    assert "hunter2" not in report.read_text()


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("http://127.0.0.1:99999", "--url has no valid port: 1 to 65535"),
        ("http://127.0.0.1:0", "--url has no valid port: 1 to 65535"),
        ("http://:8000", "--url names no host"),
        ("http://[::1:8000", "--url must be a URL (Invalid IPv6 URL"),
        ("http://a b:80", "--url must be a URL (invalid international domain name"),
    ],
)
def test_a_url_no_call_can_use_is_refused_as_the_operators_command_refuses_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str, said: str
) -> None:
    report = tmp_path / "report.json"
    code = run_tool("--url", url, "--report", str(report))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"loadtest: {said}") and err.count("\n") == 1, err
    assert not report.exists()


@pytest.mark.parametrize("option", ["--report", "--chart"])
def test_an_output_in_a_missing_folder_is_refused_before_any_load(
    memory_server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str
) -> None:
    """As `campaigns export -o`: the folder is not created, the run is refused at set-up."""
    out = tmp_path / "out"
    out.mkdir()
    outputs = {"--report": out / "report.json", "--chart": out / "chart.png"}
    missing = out / "no" / "such" / outputs[option].name
    outputs[option] = missing
    code = main(
        [
            "--url", memory_server.url, "--coupons", "20", "--users", "40", "--rate", "100",
            "--report", str(outputs["--report"]), "--chart", str(outputs["--chart"]),
            "--quiet",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert err == (
        f"loadtest: {option}: cannot write {missing}: its directory {missing.parent} "
        "does not exist\n"
    )
    assert campaigns(memory_server) == []  # nothing created, nothing sent
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--spread", "2s"], "--spread is only for --herd"),
        (["--rate", "10", "--patience", "5s"], "--patience is only for --herd"),
        (["--retry-floor", "10ms"], "--retry-floor is only for --herd"),
        (["--retry-cap", "1s"], "--retry-cap is only for --herd"),
        (["--connections", "8"], "--connections is only for --herd"),
        (["--campaign-id", "x", "--coupons", "5"], "--coupons is for a campaign the tool"),
        (["--campaign-id", "x", "--start-in", "1"], "--start-in is for a campaign the tool"),
        (["--campaign-id", "x", "--name", "n"], "--name is for a campaign the tool"),
        (["--herd", "--tail", "1"], "--tail is for a burst"),
        (["--herd", "--duration", "5"], "--duration is for a burst"),
        (["--herd", "--max-duration", "5"], "--max-duration is for a burst"),
        (["--herd", "--repeat-fraction", "0.5"], "--repeat-fraction is for a burst"),
        (["--herd", "--max-lag", "10"], "--max-lag is for the open loop"),
        (["--concurrency", "4", "--max-inflight", "10"], "--max-inflight is for the open loop"),
    ],
)
def test_an_option_the_run_would_ignore_is_a_usage_error_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], named: str
) -> None:
    # Nothing listens at this URL: a run that got past its options could not succeed.
    url = f"http://127.0.0.1:{free_port()}"
    code = main(["--url", url, "--report", str(tmp_path / "r.json"), "--quiet", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("loadtest: ") and named in err and err.count("\n") == 1, err


HERD = ("--herd",)
BURST = ("--rate", "100")


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        ((*HERD, "--spread", "inf"), "--spread"),
        ((*HERD, "--spread", "1e400"), "--spread"),
        ((*HERD, "--spread=-1s"), "--spread"),
        ((*HERD, "--spread", "1e300"), "--spread"),
        ((*HERD, "--patience", "inf"), "--patience"),
        ((*HERD, "--patience", "1e-12"), "--patience"),
        ((*HERD, "--patience", "nan"), "--patience"),
        ((*HERD, "--retry-cap", "inf"), "--retry-cap"),
        ((*HERD, "--retry-floor", "1e-12"), "--retry-floor"),
        ((*HERD, "--retry-floor", "3s", "--retry-cap", "2s"), "--retry-floor"),
        ((*BURST, "--start-in", "nan"), "--start-in"),
        ((*BURST, "--start-in", "inf"), "--start-in"),
        ((*BURST, "--start-in=-1"), "--start-in"),
        ((*BURST, "--tail", "nan"), "--tail"),
        ((*BURST, "--max-lag", "nan"), "--max-lag"),
        ((*BURST, "--max-lag=-5"), "--max-lag"),
        ((*BURST, "--duration", "inf"), "--duration"),
        ((*BURST, "--duration", "1e-12"), "--duration"),
        ((*BURST, "--max-duration", "inf"), "--max-duration"),
        (("--rate", "inf"), "--rate"),
        (("--rate", "nan"), "--rate"),
        (("--rate", "0"), "--rate"),
        ((*BURST, "--timeout", "nan"), "--timeout"),
        ((*BURST, "--timeout", "1e-12"), "--timeout"),
        ((*BURST, "--repeat-fraction", "nan"), "--repeat-fraction"),
        ((*BURST, "--users", "0"), "--users"),
        ((*BURST, "--coupons", "0"), "--coupons"),
        ((*BURST, "--processes", "0"), "--processes"),
        ((*BURST, "--max-inflight", "0"), "--max-inflight"),
        (("--concurrency", "0"), "--concurrency"),
        ((*HERD, "--connections", "0"), "--connections"),
    ],
)
def test_a_number_out_of_range_is_one_line_at_set_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], option: str
) -> None:
    # Nothing listens at this URL: a run that got past its options would say it cannot
    # reach the service instead, after creating nothing either.
    url = f"http://127.0.0.1:{free_port()}"
    report = tmp_path / "r.json"
    code = main(["--url", url, "--report", str(report), "--no-chart", "--quiet", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"loadtest: {option} must") and err.count("\n") == 1, err
    assert not report.exists()


@pytest.mark.parametrize(
    ("outputs", "named"),
    [
        (
            ("--report", "{d}/run.png", "--chart", "{d}/run.png"),
            "--report and --chart are the same",
        ),
        (("--report", "{d}/r.png", "--chart", "{d}/./r.png"), "the same file"),
        (("--chart", "{d}/noext"), "--chart must name a .png file"),
        (("--chart", "{d}/x.txt"), "--chart must name a .png file"),
        (("--chart", "{d}/x.pdf"), "--chart must name a .png file"),
    ],
)
def test_outputs_that_would_clash_or_change_name_are_refused_at_set_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], outputs: tuple[str, ...], named: str
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    argv = [part.format(d=tmp_path) for part in outputs]
    if "--report" not in argv:
        argv += ["--report", str(tmp_path / "r.json")]
    code = main(["--url", url, "--quiet", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("loadtest: ") and named in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def broken_server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = (tmp_path / "broken.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--no-access-log",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "tests.loadtest.broken_server:app",
        ],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("UVICORN_")},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (tmp_path / "broken.log").read_text()
            try:
                httpx.get(url, timeout=1)  # any answer means it is serving
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "broken server did not start"
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def test_server_that_over_issues_repeats_codes_and_opens_early_fails(
    broken_server: str, tmp_path: Path
) -> None:
    code, document = loadtest(broken_server, tmp_path)

    assert code == 1
    assert document["verdict"]["passed"] is False
    assert {
        "no over-issue",
        "no duplicate code",
        "no coupon issued outside the window",
        "no success received before starts_at",
    } <= failed_checks(document)
    # It stamps no server_time in GetCampaign: the clock comes from created_at alone.
    assert document["clock"]["source"] == "CreateCampaign.created_at"
