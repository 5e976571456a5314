"""Start-up and configuration, with real `coupon serve` and `coupon migrate` processes.

A bad setting stops either command in one line naming the variable (exit 2), a URL
without its password. `coupon migrate` without a usable PostgreSQL says why in one line
naming DATABASE_URL (exit 1).
`coupon serve` without one starts anyway, answers /readyz 503 naming the failing check,
and creates the schema once PostgreSQL answers (a private server started on the port it
was pointed at). The metrics directory a server makes is gone after it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from coupon.adapters.postgres.migrate import latest_version, migrations
from coupon.entrypoints.metrics import metrics_files
from harness.client import connect_client, create_campaign
from harness.private_postgres import PrivatePostgres, postgres_bindir
from harness.server import ServerProcess, free_port
from harness.services import TestServices, drop_database, with_database

pytestmark = pytest.mark.e2e

# Variables that would otherwise reach the processes from the test runner's environment.
_SETTINGS = ("COUPON_", "REDIS_", "DATABASE_URL", "APP_ENV", "LOG_LEVEL", "DB_DRIVER", "PROMETHEUS")


def clean_env(tmp_path: Path, **values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SETTINGS)}
    return {**env, "TMPDIR": str(tmp_path), **values}


def run_coupon(
    args: list[str], env: Mapping[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    """`coupon ...` in `cwd` (no .env there), its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "coupon", *args],
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def closed_port_url() -> str:
    return f"postgresql://postgres@127.0.0.1:{free_port()}/coupon"


def unknown_role_url(services: TestServices) -> str:
    """The test server, as a role it does not have (with a password that must not show)."""
    parts = urlsplit(services.database_url)
    where = f"{parts.hostname}:{parts.port or 5432}"
    return urlunsplit(parts._replace(netloc=f"coupon_no_such_role:hunter2@{where}"))


# -- settings ----------------------------------------------------------------------------

BAD_SETTINGS = [
    ({"APP_ENV": "prod"}, "APP_ENV"),
    ({"APP_ENV": "Production"}, "APP_ENV"),
    ({"APP_ENV": "staging"}, "APP_ENV"),
    ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
    ({"DB_DRIVER": "mysql"}, "DB_DRIVER"),
    ({"PORT": "http"}, "PORT"),
    # Numbers a real deployment cannot mean: never a claim to serve, then a traceback.
    ({"COUPON_PENDING_LEASE_SECONDS": "nan"}, "COUPON_PENDING_LEASE_SECONDS"),
    ({"COUPON_PENDING_LEASE_SECONDS": "inf"}, "COUPON_PENDING_LEASE_SECONDS"),
    ({"COUPON_KEEPALIVE_SECONDS": "inf"}, "COUPON_KEEPALIVE_SECONDS"),
    ({"COUPON_KEEPALIVE_SECONDS": "nan"}, "COUPON_KEEPALIVE_SECONDS"),
    ({"COUPON_REQUEST_TIMEOUT_SECONDS": "nan"}, "COUPON_REQUEST_TIMEOUT_SECONDS"),
    ({"COUPON_DB_POOL_SIZE": "100000"}, "COUPON_DB_POOL_SIZE"),
    ({"COUPON_MAX_BATCH": "100000000"}, "COUPON_MAX_BATCH"),
    ({"REDIS_ADDRESS": "127.0.0.1:99999"}, "REDIS_ADDRESS"),
    ({"DATABASE_URL": "postgresql://postgres@127.0.0.1:99999/coupon"}, "DATABASE_URL"),
    ({"DATABASE_URL": "postgresql://shop:hunter2@[::1/coupon"}, "DATABASE_URL"),
    # A token of spaces would let `Authorization: Bearer ` and spaces through.
    ({"COUPON_ADMIN_TOKEN": "   "}, "COUPON_ADMIN_TOKEN"),
    ({"APP_ENV": "production", "COUPON_ADMIN_TOKEN": " \t "}, "COUPON_ADMIN_TOKEN"),
    # Refused URLs are shown without their password.
    ({"DATABASE_URL": "mysql://shop:hunter2@db.example/coupon"}, "DATABASE_URL"),
    ({"REDIS_URL": "http://:hunter2@cache.example:6379/0"}, "REDIS_URL"),
    ({"REDIS_URL": "redis+cluster://:hunter2@cache.example:99999"}, "REDIS_URL"),
    # redis-py would take a database that is no number for database 0, silently.
    ({"REDIS_URL": "redis://:hunter2@127.0.0.1:6379/1x"}, "REDIS_URL"),
]


@pytest.mark.parametrize("command", ["serve", "migrate"])
@pytest.mark.parametrize(("values", "variable"), BAD_SETTINGS)
def test_a_bad_setting_stops_start_up_in_one_line_naming_the_variable(
    tmp_path: Path, command: str, values: dict[str, str], variable: str
) -> None:
    args = [command] if command == "migrate" else [command, "--port", str(free_port())]
    # Nothing listens there: were the setting let through, neither command could succeed
    # (and a server let through keeps to Redis keys of its own).
    env = clean_env(
        tmp_path,
        **{"DATABASE_URL": closed_port_url(), "COUPON_REDIS_PREFIX": "coupon-refused", **values},
    )
    try:
        done = run_coupon(args, env, tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`coupon {command}` started with {values}")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and variable in lines[0], done.stderr
    assert "serving" not in done.stderr
    assert "hunter2" not in done.stderr
    if "hunter2" in values.get(variable, ""):
        assert ":***@" in lines[0], lines[0]
    if variable == "APP_ENV":
        assert "development" in lines[0] and "production" in lines[0]


def unreadable_dotenv(where: Path, kind: str) -> None:
    """A `.env` in `where` that is there but cannot be read as settings."""
    dotenv = where / ".env"
    if kind == "latin-1":
        dotenv.write_bytes("# réglages\nPORT=9000\n".encode("latin-1"))
    elif kind == "directory":
        dotenv.mkdir()
    else:
        dotenv.symlink_to(where / "settings.env")


@pytest.mark.parametrize("kind", ["latin-1", "directory", "link to nothing"])
@pytest.mark.parametrize("command", ["serve", "migrate", "campaigns", "loadtest"])
def test_a_dotenv_that_cannot_be_read_stops_every_command_in_one_line(
    tmp_path: Path, command: str, kind: str
) -> None:
    """Never a traceback, and never silently without the settings written there."""
    unreadable_dotenv(tmp_path, kind)
    args = {
        "serve": ["serve", "--port", str(free_port())],
        "migrate": ["migrate"],
        "campaigns": ["campaigns", "list"],
        "loadtest": ["loadtest", "--help"],
    }[command]
    env = clean_env(tmp_path, DATABASE_URL=closed_port_url(), COUPON_REDIS_PREFIX="coupon-refused")
    done = run_coupon(args, env, tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    # The load tool speaks in its own name, as it does run as `coupon-loadtest`.
    who = "loadtest" if command == "loadtest" else "coupon"
    assert len(lines) == 1 and lines[0].startswith(f"{who}: .env"), done.stderr
    assert "serving" not in done.stdout


def test_documented_values_pass_the_settings_check(tmp_path: Path) -> None:
    env = clean_env(
        tmp_path,
        DATABASE_URL=closed_port_url(),
        APP_ENV="production",
        COUPON_ADMIN_TOKEN="t" * 16,
        LOG_LEVEL="warning",
        DB_DRIVER="postgres",
    )
    done = run_coupon(["migrate"], env, tmp_path)
    # The settings passed: what stops it now is the database, as exit status 1 says.
    assert done.returncode == 1, done.stderr
    assert "DATABASE_URL" in done.stderr


# -- coupon migrate without PostgreSQL ---------------------------------------------------


@pytest.mark.parametrize("case", ["closed port", "unknown host", "unknown role"])
def test_migrate_without_a_usable_postgres_says_why_in_one_line(
    tmp_path: Path, services: TestServices, case: str
) -> None:
    url, says = {
        "closed port": (closed_port_url(), "connection refused"),
        "unknown host": ("postgresql://postgres@no-such-host.invalid/coupon", "unknown host"),
        "unknown role": (unknown_role_url(services), "authentication failed"),
    }[case]
    done = run_coupon(["migrate"], clean_env(tmp_path, DATABASE_URL=url), tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1, done.stderr
    assert "DATABASE_URL=" in lines[0] and says in lines[0], lines[0]
    assert "hunter2" not in done.stderr


# -- coupon serve without PostgreSQL -----------------------------------------------------


def wait_answering(server: ServerProcess, timeout: float = 60.0) -> httpx.Response:
    """The first /readyz answer, whatever its status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"server exited ({server.process.returncode}):\n{server.log()}")
        try:
            return httpx.get(f"{server.url}/readyz", timeout=5)
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError(f"no answer from /readyz after {timeout}s:\n{server.log()}")


def wait_ready(server: ServerProcess, timeout: float = 60.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    answer = wait_answering(server, timeout)
    while answer.status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
        answer = wait_answering(server, timeout)
    assert answer.status_code == 200, (answer.text, server.log())
    return answer


def stop(server: ServerProcess) -> tuple[int, str]:
    """SIGTERM, as an orchestrator stops it; the exit status and everything it logged."""
    server.signal(signal.SIGTERM)
    return server.process.wait(60), server.log()


def warnings_about(name: str, log: str) -> list[str]:
    return [line for line in log.splitlines() if '"level": "warning"' in line and name in line]


def warnings_about_postgres(log: str) -> list[str]:
    return warnings_about("PostgreSQL", log)


@pytest.fixture
def unreachable_server(
    request: pytest.FixtureRequest, tmp_path: Path, services: TestServices, redis_prefix: str
) -> Iterator[ServerProcess]:
    url = {
        "unknown host": "postgresql://postgres@no-such-host.invalid/coupon",
        "unknown role": unknown_role_url(services),
        "closed port": f"postgresql://postgres:s3cret-pw@127.0.0.1:{closed_port()}/coupon",
    }[request.param]
    env = clean_env(
        tmp_path,
        DATABASE_URL=url,
        REDIS_URL=services.redis_url,
        COUPON_REDIS_PREFIX=redis_prefix,
    )
    server = ServerProcess(env=env, log_dir=tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("unreachable_server", ["unknown host", "unknown role"], indirect=True)
def test_serve_without_postgres_starts_and_is_not_ready_naming_postgres(
    unreachable_server: ServerProcess,
) -> None:
    server = unreachable_server
    answer = wait_answering(server)
    assert answer.status_code == 503
    body = answer.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["postgres"].startswith("error"), body
    assert body["checks"]["redis"] == "ok", body
    # Why, in words; not where it looked nor as whom (anyone may ask /readyz).
    assert body["checks"]["postgres"] in (
        "error: gaierror: name or service not known",
        "error: InvalidAuthorizationSpecificationError: invalid authorization specification"
        " (SQLSTATE 28000)",
    ), body
    assert "no-such-host" not in answer.text and "coupon_no_such_role" not in answer.text
    assert "hunter2" not in answer.text
    assert len(warnings_about_postgres(server.log())) == 1, server.log()
    assert "hunter2" not in server.log()
    status, log = stop(server)
    assert status == 0 and "Traceback" not in log, log


def test_a_redis_db_beyond_its_databases_is_named_by_readyz(
    tmp_path: Path, services: TestServices, redis_prefix: str
) -> None:
    """Redis's own refusal says what to fix (unlike a driver's message, it names no
    address), so /readyz shows it."""
    parts = urlsplit(services.redis_url)
    env = clean_env(
        tmp_path,
        DATABASE_URL=closed_port_url(),
        REDIS_URL=urlunsplit(parts._replace(path="/99")),
        COUPON_REDIS_PREFIX=redis_prefix,
    )
    server = ServerProcess(env=env, log_dir=tmp_path)
    try:
        answer = wait_answering(server)
        assert answer.status_code == 503
        assert answer.json()["checks"]["redis"] == (
            "error: ResponseError: DB index is out of range"
        ), answer.text
    finally:
        server.stop()


def test_serve_without_redis_starts_and_says_so_in_one_warning_naming_redis(
    tmp_path: Path,
) -> None:
    redis_port = free_port()
    env = clean_env(
        tmp_path,
        DATABASE_URL=closed_port_url(),
        REDIS_URL=f"redis://:hunter2@127.0.0.1:{redis_port}/0",
    )
    server = ServerProcess(env=env, log_dir=tmp_path)
    try:
        answer = wait_answering(server)
        assert answer.status_code == 503
        checks = answer.json()["checks"]
        assert checks["redis"] == "error: ConnectionError: connection refused", answer.text
        assert checks["postgres"] == "error: ConnectionRefusedError: connection refused"
        assert "127.0.0.1" not in answer.text and str(redis_port) not in answer.text
        log = server.log()
        about_redis = warnings_about("Redis", log)
        assert len(about_redis) == 1, log
        assert "Connection" in about_redis[0] and "hunter2" not in log, log
        status, log = stop(server)
        assert status == 0 and "Traceback" not in log, log
    finally:
        server.stop()


def test_serve_in_memory_on_several_workers_says_it_serves_one_in_a_json_line(
    tmp_path: Path,
) -> None:
    """Apart from the banner on stdout, everything `coupon serve` writes is a JSON line."""
    server = ServerProcess(env=clean_env(tmp_path), in_memory=True, workers=2, log_dir=tmp_path)
    try:
        assert wait_answering(server).status_code == 200
        status, log = stop(server)
    finally:
        server.stop()
    assert status == 0, log
    lines = log.splitlines()
    banner = [line for line in lines if line.startswith("coupon: serving on ")]
    assert banner == [f"coupon: serving on {server.url} (memory, 1 worker(s))"], log
    records = [json.loads(line) for line in lines if line not in banner]
    warnings = [r for r in records if r["level"] == "warning"]
    assert [(w["message"], w["workers"]) for w in warnings] == [
        ("--in-memory keeps state in one process: serving with 1 worker", 2)
    ], log


needs_postgres_binaries = pytest.mark.skipif(
    postgres_bindir() is None,
    reason="PostgreSQL's initdb is not installed: this test starts a PostgreSQL of its own",
)


@needs_postgres_binaries
async def test_serve_before_postgres_is_up_creates_the_schema_once_it_answers(
    tmp_path: Path, services: TestServices, redis_prefix: str
) -> None:
    port = free_port()
    postgres = PrivatePostgres(port)  # initialised, not started: the port is closed
    database_url = f"postgresql://postgres@127.0.0.1:{port}/coupon_startup"
    env = clean_env(
        tmp_path,
        DATABASE_URL=database_url,
        REDIS_URL=services.redis_url,
        COUPON_REDIS_PREFIX=redis_prefix,
    )
    server = ServerProcess(env=env, workers=2, log_dir=tmp_path)
    try:
        answer = wait_answering(server)
        assert answer.status_code == 503
        assert answer.json()["checks"]["postgres"].startswith("error"), answer.text
        assert len(warnings_about_postgres(server.log())) == 1, server.log()

        postgres.start()
        wait_ready(server)
        # Created and migrated once, by one process of the server's two.
        conn = await asyncpg.connect(database_url)
        try:
            versions = await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")
        finally:
            await conn.close()
        assert [r["version"] for r in versions] == [v for v, _, _ in migrations()]
        assert versions[-1]["version"] == latest_version()
        assert server.log().count("schema in place") == 1, server.log()
        # And it serves.
        async with connect_client(server.url) as client:
            campaign = await create_campaign(client, total=1)
            assert campaign.total_coupons == 1
        status, log = stop(server)
        assert status == 0 and "Traceback" not in log, log
    finally:
        server.stop()
        postgres.close()


async def test_a_schema_newer_than_the_release_is_served_and_said(
    tmp_path: Path, services: TestServices, redis_prefix: str
) -> None:
    """A rollback after a newer release migrated: the schema is left as it is and served
    (expand/contract deploys count on it), but `coupon migrate` says so, and the server
    logs one warning at start."""
    name = urlsplit(services.database_url).path.lstrip("/")
    database_url = with_database(services.database_url, f"{name}_newer")
    newer, latest = latest_version() + 1, latest_version()
    env = clean_env(
        tmp_path,
        DATABASE_URL=database_url,
        REDIS_URL=services.redis_url,
        COUPON_REDIS_PREFIX=redis_prefix,
    )
    try:
        assert run_coupon(["migrate"], env, tmp_path).returncode == 0
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, 'next')", newer
            )
        finally:
            await conn.close()

        done = run_coupon(["migrate"], env, tmp_path)
        assert done.returncode == 0, done.stderr
        said = f"schema is at {newer}, newer than this release's {latest}"
        assert said in done.stdout, (done.stdout, done.stderr)
        assert "up to date" not in done.stdout

        with ServerProcess(env=env, workers=2, log_dir=tmp_path) as server:
            assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200
            warned = warnings_about(said, server.log())
            assert len(warned) == 1, server.log()
    finally:
        await drop_database(database_url)


# -- the metrics directory ---------------------------------------------------------------


def metrics_dirs(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob("coupon-metrics-*"))


@pytest.mark.parametrize("signal_", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_removes_the_metrics_directory_it_made_when_it_stops(
    tmp_path: Path, signal_: signal.Signals
) -> None:
    server = ServerProcess(env=clean_env(tmp_path), in_memory=True, log_dir=tmp_path)
    try:
        server.wait_ready()
        assert len(metrics_dirs(tmp_path)) == 1
        server.signal(signal_)
        assert server.process.wait(60) == 0
    finally:
        server.stop()
    assert metrics_dirs(tmp_path) == [], server.log()


def test_serve_removes_its_metrics_directory_when_it_cannot_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        server = ServerProcess(env=clean_env(tmp_path), in_memory=True, port=port, log_dir=tmp_path)
        try:
            assert server.process.wait(60) != 0
        finally:
            server.stop()
    assert metrics_dirs(tmp_path) == [], server.log()


def test_serve_on_a_taken_port_says_so_in_one_line_without_claiming_to_serve(
    tmp_path: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        # Nothing listens at DATABASE_URL: the port is checked before PostgreSQL is tried.
        env = clean_env(tmp_path, DATABASE_URL=closed_port_url())
        done = run_coupon(["serve", "--port", str(port), "--workers", "2"], env, tmp_path)
    assert done.returncode == 3, done.stderr
    assert done.stderr == f"coupon: cannot listen on 127.0.0.1:{port}: address already in use\n"


def test_a_server_started_while_another_starts_on_its_port_says_so_in_one_line(
    tmp_path: Path,
) -> None:
    """The first server holds its port from its check on: a second one started while the
    first still starts up (here: waiting for a Redis that accepted and says nothing) is the
    one refused, in the documented line, never a claim to serve followed by a bind error."""
    port = free_port()
    with socket.socket() as silent_redis:
        silent_redis.bind(("127.0.0.1", 0))
        silent_redis.listen()
        silent_redis.settimeout(60)
        env = clean_env(
            tmp_path,
            DATABASE_URL=closed_port_url(),
            REDIS_URL=f"redis://127.0.0.1:{silent_redis.getsockname()[1]}/0",
        )
        first = subprocess.Popen(
            [sys.executable, "-m", "coupon", "serve", "--port", str(port)],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        second: subprocess.Popen[str] | None = None
        try:
            # Past its port check, waiting for Redis's answer (3 s).
            probe, _ = silent_redis.accept()
            second = subprocess.Popen(
                [sys.executable, "-m", "coupon", "serve", "--in-memory", "--port", str(port)],
                env=clean_env(tmp_path),
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            starts = [first, second]
            ended: list[subprocess.Popen[str]] = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not ended:
                ended = [p for p in starts if p.poll() is not None]
                time.sleep(0.1)
            probe.close()
            assert ended == [second], "the second server was not the one refused"
            out, err = second.communicate()
            assert second.returncode == 3, err
            assert err == f"coupon: cannot listen on 127.0.0.1:{port}: address already in use\n"
            assert out == ""
            assert first.stdout is not None
            line = first.stdout.readline()
            assert line.startswith(f"coupon: serving on http://127.0.0.1:{port} "), line
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                        break
                assert time.monotonic() < deadline, "the first server never answered"
                time.sleep(0.2)
        finally:
            for start in (first, second):
                if start is not None and start.poll() is None:
                    start.send_signal(signal.SIGTERM)
                if start is not None:
                    start.communicate(timeout=30)


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def healthy(url: str) -> None:
    """Wait (a minute at most) until `url`/healthz answers 200."""
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"nothing answered at {url}"
        time.sleep(0.2)


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_serve_on_an_ipv6_address_says_a_url_that_can_be_called(tmp_path: Path) -> None:
    """`http://::1:8000` is no URL: the address goes in brackets, `http://[::1]:8000`."""
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        done = run_coupon(
            ["serve", "--in-memory", "--host", "::1", "--port", str(port)],
            clean_env(tmp_path),
            tmp_path,
        )
    assert done.returncode == 3, done.stderr
    assert done.stderr == f"coupon: cannot listen on [::1]:{port}: address already in use\n"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "coupon",
            "serve",
            "--in-memory",
            "--host",
            "::1",
            "--port",
            str(port),
        ],
        env=clean_env(tmp_path),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith(f"coupon: serving on http://[::1]:{port} "), line
        healthy(line.split()[3])
    finally:
        server.terminate()
        assert server.wait(30) == 0


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
@pytest.mark.parametrize("workers", [1, 2])
def test_serve_on_the_ipv6_wildcard_takes_ipv4_too(tmp_path: Path, workers: int) -> None:
    """`--host ::` listens on every address, IPv6 and IPv4, with one worker or several."""
    port = free_port()
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "coupon", "serve", "--in-memory", "--host", "::"),
            *("--port", str(port), "--workers", str(workers)),
        ],
        env=clean_env(tmp_path),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        healthy(f"http://[::1]:{port}")
        healthy(f"http://127.0.0.1:{port}")
    finally:
        server.terminate()
        assert server.wait(30) == 0


def test_serve_keeps_a_metrics_directory_it_was_given(tmp_path: Path) -> None:
    """...and every file in it but the metrics files of an earlier run (no process can have
    the pid in their names, or one that is no coupon server has it now), which it deletes:
    /metrics reads the metrics files alone."""
    given = tmp_path / "metrics"
    given.mkdir()
    theirs = ["keep.txt", "users.db", "counter.db", "my_counter_1.db"]
    for name in theirs:
        (given / name).write_text("the operator's")
    other_program = subprocess.Popen(["sleep", "60"])
    # A program whose command line names coupon (a pager on the service's log) is no server.
    pager = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", str(tmp_path / "coupon.log")]
    )
    stale = [
        "counter_99999999.db",
        "histogram_99999999.db",
        "gauge_livesum_99999999.db",
        f"counter_{other_program.pid}.db",
        f"counter_{pager.pid}.db",
    ]
    for name in stale:
        (given / name).write_bytes(b"\0" * 8)
    env = clean_env(tmp_path, PROMETHEUS_MULTIPROC_DIR=str(given))
    server = ServerProcess(env=env, in_memory=True, log_dir=tmp_path)
    try:
        server.wait_ready()
        assert not [name for name in stale if (given / name).exists()]
        metrics = httpx.get(f"{server.url}/metrics", timeout=5)
        assert metrics.status_code == 200, metrics.text
        assert "coupon_rpc_requests_total" in metrics.text
    finally:
        for program in (other_program, pager):
            program.kill()
            program.wait()
        assert server.stop() == 0
    for name in theirs:
        assert (given / name).read_text() == "the operator's", name
    assert metrics_dirs(tmp_path) == []


def test_serve_refuses_the_metrics_directory_of_a_server_still_running(
    tmp_path: Path, server_env: dict[str, str]
) -> None:
    """Deleting a running server's metrics files would lose its counts for good (its
    workers write on into files no one reads): each server needs a directory of its own."""
    given = tmp_path / "metrics"
    env = {**server_env, "PROMETHEUS_MULTIPROC_DIR": str(given)}
    with ServerProcess(env=env, workers=2, log_dir=tmp_path) as first:
        files = metrics_files(given)
        workers = first.worker_pids()
        assert files and {int(path.stem.rpartition("_")[2]) for path in files} <= set(workers)
        second = run_coupon(
            ["serve", "--port", str(free_port())], clean_env(tmp_path, **env), tmp_path
        )
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2, second.stderr
        assert len(lines) == 1 and "PROMETHEUS_MULTIPROC_DIR" in lines[0], second.stderr
        assert "its own directory" in lines[0]
        assert any(str(pid) in lines[0] for pid in workers), lines[0]
        assert "serving" not in second.stdout
        assert all(path.exists() for path in files)


def test_two_servers_started_at_once_on_one_metrics_directory_do_not_both_serve(
    tmp_path: Path,
) -> None:
    """Started at the same moment, neither finds the other's metrics files yet: the
    directory's lock lets one of them have it."""
    given = tmp_path / "metrics"
    env = clean_env(tmp_path, PROMETHEUS_MULTIPROC_DIR=str(given), COUPON_BACKEND="memory")
    starts = [
        subprocess.Popen(
            [sys.executable, "-m", "coupon", "serve", "--port", str(free_port())],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        refused = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not refused:
            refused = [p for p in starts if p.poll() is not None]
            time.sleep(0.1)
        assert len(refused) == 1, "both started, or neither was refused"
        assert refused[0].returncode == 2
        message = refused[0].communicate()[1]
        assert "PROMETHEUS_MULTIPROC_DIR" in message and "its own directory" in message, message
    finally:
        for start in starts:
            if start.poll() is None:
                start.send_signal(signal.SIGTERM)
            start.wait(timeout=30)


def test_a_metrics_directory_that_cannot_be_one_stops_serve_before_the_database_is_made(
    tmp_path: Path, services: TestServices
) -> None:
    """A bad PROMETHEUS_MULTIPROC_DIR is a bad setting: refused before anything else."""
    not_a_directory = tmp_path / "metrics"
    not_a_directory.write_text("a file")
    url = with_database(services.database_url, f"{urlsplit(services.database_url).path[1:]}_md")
    env = clean_env(
        tmp_path,
        DATABASE_URL=url,
        PROMETHEUS_MULTIPROC_DIR=str(not_a_directory),
        COUPON_REDIS_PREFIX=services.redis_prefix,
    )
    try:
        done = run_coupon(["serve", "--port", str(free_port())], env, tmp_path)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, done.stderr
        assert len(lines) == 1 and "PROMETHEUS_MULTIPROC_DIR" in lines[0], done.stderr

        async def exists() -> bool:
            admin = await asyncpg.connect(with_database(url, "postgres"))
            try:
                name = urlsplit(url).path[1:]
                return bool(
                    await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
                )
            finally:
                await admin.close()

        assert not asyncio.run(exists()), "the database was made before the setting was refused"
    finally:
        asyncio.run(drop_database(url))


def test_a_tls_url_to_a_redis_without_tls_is_said_to_be_maybe_that(
    tmp_path: Path, server_env: dict[str, str]
) -> None:
    plain = urlsplit(server_env["REDIS_URL"])
    env = clean_env(
        tmp_path,
        DATABASE_URL=closed_port_url(),
        REDIS_URL=f"rediss://{plain.hostname}:{plain.port}/0",
    )
    server = ServerProcess(env=env, log_dir=tmp_path)
    try:
        wait_answering(server)
        about_redis = warnings_about("Redis", server.log())
        assert len(about_redis) == 1, server.log()
        assert "does that Redis serve TLS, or is it redis://?" in about_redis[0], about_redis
    finally:
        server.stop()


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever reaps it here)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_workers_stop_when_their_supervisor_is_killed(server_env: dict[str, str]) -> None:
    """A supervisor killed outright (SIGKILL, the OOM killer) takes its workers with it,
    gracefully, so that the port is free for the server started in its place."""
    server = ServerProcess(env=server_env, workers=2)
    workers: list[int] = []
    try:
        server.wait_ready()
        workers = server.worker_pids()
        assert len(workers) == 2 and server.process.pid not in workers
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait()
        deadline = time.monotonic() + 30
        while any(running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in workers if running(pid)], "workers outlived their supervisor"
        with ServerProcess(env=server_env, port=server.port) as again:
            assert httpx.get(f"{again.url}/readyz", timeout=5).status_code == 200
    finally:
        server.stop()
        for pid in workers:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_worker_killed_outright_is_a_warning_naming_it_and_the_signal(
    server_env: dict[str, str], tmp_path: Path
) -> None:
    """A worker SIGKILLed (as the out-of-memory killer does) is said at warning level, with
    its pid and the signal, as nginx says it; another takes its place, and its gauges leave
    /metrics' sums (its files are dropped)."""
    metrics_dir = tmp_path / "metrics"
    env = {**server_env, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    with ServerProcess(env=env, workers=2) as server:
        workers = server.worker_pids()
        assert len(workers) == 2
        victim = workers[0]
        assert (metrics_dir / f"gauge_livesum_{victim}.db").exists()
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            entries = server.log_entries()
            said = [e for e in entries if e.get("pid") == victim and e["level"] != "info"]
            if said or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert len(said) == 1, server.log()
        assert said[0]["level"] == "warning", said
        assert said[0]["message"] == f"worker process {victim} exited on signal 9 (SIGKILL)"
        assert said[0]["signal"] == "SIGKILL", said
        assert not (metrics_dir / f"gauge_livesum_{victim}.db").exists()
        while len(server.worker_pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200


def test_a_hung_worker_and_one_killed_meanwhile_are_each_told_as_what_they_did(
    server_env: dict[str, str],
) -> None:
    """One worker stops answering (SIGSTOP): the supervisor's health check waits 5 s for it,
    then kills it. The other is SIGKILLed during that wait: it is told as killed by the
    signal, not as one whose check went unanswered."""
    with ServerProcess(env=server_env, workers=2) as server:
        hung, killed = sorted(server.worker_pids())  # the order the supervisor checks them
        os.kill(hung, signal.SIGSTOP)
        # Within the supervisor's 5-s wait for the stopped worker (its checks come every
        # half second): the death of the other happens after that round began.
        time.sleep(2.5)
        os.kill(killed, signal.SIGKILL)
        deadline = time.monotonic() + 60
        said: dict[int, str] = {}
        while len(said) < 2 and time.monotonic() < deadline:
            for entry in server.log_entries(tail=1_000_000):
                if entry.get("pid") in (hung, killed) and entry.get("level") == "warning":
                    said[entry["pid"]] = entry["message"]
            time.sleep(0.1)
        assert said == {
            hung: f"worker process {hung} did not answer the supervisor's health check in 5 s "
            "and was killed",
            killed: f"worker process {killed} exited on signal 9 (SIGKILL)",
        }, server.log()


@functools.cache
def closed_port() -> int:
    """A loopback port nothing listens on (one just freed), the same for the module."""
    return free_port()


@pytest.mark.parametrize("unreachable_server", ["closed port"], indirect=True)
def test_a_postgres_refusal_is_logged_with_the_address_it_came_from(
    unreachable_server: ServerProcess,
) -> None:
    """The cause logged for PostgreSQL names the host and port that refused, as Redis's
    does, never the password; the caller is told neither."""
    server = unreachable_server
    wait_answering(server)
    answer = httpx.post(
        f"{server.url}/coupon.v1.CouponService/GetCampaign",
        json={"campaignId": "01a244b6-5173-7232-9e3e-cfbd538716e1"},
        timeout=30,
    )
    assert answer.json()["code"] == "unavailable", answer.text
    assert "127.0.0.1" not in answer.text
    entries = server.log_entries()
    failed = [e for e in entries if e.get("rpc") == "GetCampaign"]
    assert failed, server.log()
    cause = str(failed[0].get("cause"))
    assert "ConnectionRefusedError" in cause and "s3cret" not in server.log(), cause
    assert f"127.0.0.1:{closed_port()}" in cause, cause


@pytest.mark.parametrize("unreachable_server", ["unknown host"], indirect=True)
def test_an_export_without_postgres_is_unavailable_with_the_retry_hint_and_a_logged_cause(
    unreachable_server: ServerProcess,
) -> None:
    """As every unary answer: `retry-after-ms` beside the RetryInfo detail (here in the end
    of the stream's metadata, and the headers), and the cause in the log line."""
    server = unreachable_server
    wait_answering(server)
    body = json.dumps({"campaignId": "01a244b6-5173-7232-9e3e-cfbd538716e1"}).encode()
    answer = httpx.post(
        f"{server.url}/coupon.v1.CouponService/ExportCoupons",
        content=b"\x00" + len(body).to_bytes(4, "big") + body,
        headers={"content-type": "application/connect+json"},
        timeout=30,
    )
    flags, size = answer.content[0], int.from_bytes(answer.content[1:5], "big")
    end = json.loads(answer.content[5 : 5 + size])

    assert flags & 0x02, answer.content  # the end of the stream
    assert end["error"]["code"] == "unavailable"
    assert int(end["metadata"]["retry-after-ms"][0]) > 0
    assert int(answer.headers["retry-after-ms"]) > 0
    failed = [line for line in server.log().splitlines() if '"rpc": "ExportCoupons"' in line]
    assert failed and all('"cause": ' in line for line in failed), failed
