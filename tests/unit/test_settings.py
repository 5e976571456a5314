from __future__ import annotations

import os
from pathlib import Path

import pytest

from coupon.entrypoints.reach import url_problem
from coupon.entrypoints.settings import (
    SettingsError,
    client_url,
    load_settings,
    read_dotenv,
    redacted,
)


def test_defaults_point_at_local_postgres_and_redis() -> None:
    s = load_settings({}, dotenv=None)
    assert s.database_url == "postgresql://postgres@127.0.0.1:5432/coupon"
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.port == 8000 and s.backend == "postgres"


def test_go_service_redis_variables_build_the_url() -> None:
    s = load_settings(
        {"REDIS_ADDRESS": "cache:6380", "REDIS_PASSWORD": "p@ss", "REDIS_DB": "2"}, dotenv=None
    )
    assert s.redis_url == "redis://:p%40ss@cache:6380/2"


def test_redis_url_wins_over_the_parts() -> None:
    s = load_settings(
        {"REDIS_URL": "redis://other:1/3", "REDIS_ADDRESS": "cache:6380"}, dotenv=None
    )
    assert s.redis_url == "redis://other:1/3"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"PORT": "eighty"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"WORKERS": "0"}, "WORKERS"),
        ({"REDIS_DB": "x"}, "REDIS_DB"),
        ({"REDIS_ADDRESS": "nohost"}, "REDIS_ADDRESS"),
        ({"REDIS_ADDRESS": "::1"}, "REDIS_ADDRESS"),  # host ':' and port 1, read plainly
        ({"REDIS_ADDRESS": "2001:db8::1"}, "REDIS_ADDRESS"),
        ({"REDIS_ADDRESS": "[::1:6379"}, "REDIS_ADDRESS"),
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
        ({"COUPON_BACKEND": "sqlite"}, "COUPON_BACKEND"),
        ({"COUPON_PENDING_LEASE_SECONDS": "-1"}, "COUPON_PENDING_LEASE_SECONDS"),
        ({"APP_ENV": "production"}, "COUPON_ADMIN_TOKEN"),
        ({"APP_ENV": "prod"}, "APP_ENV"),
        ({"APP_ENV": "Production"}, "APP_ENV"),
        ({"APP_ENV": "test"}, "APP_ENV"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"LOG_LEVEL": "warn"}, "LOG_LEVEL"),
        ({"DB_DRIVER": "mysql"}, "DB_DRIVER"),
        ({"DB_DRIVER": "pgx"}, "DB_DRIVER"),
        ({"COUPON_DB_POOL_SIZE": "0"}, "COUPON_DB_POOL_SIZE"),
        ({"COUPON_MAX_BATCH": "0"}, "COUPON_MAX_BATCH"),
    ],
)
def test_bad_values_stop_start_up_naming_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        load_settings(env, dotenv=None)


def test_an_app_env_that_only_looks_like_production_names_the_accepted_values() -> None:
    with pytest.raises(SettingsError) as refused:
        load_settings({"APP_ENV": "Production"}, dotenv=None)
    assert str(refused.value) == (
        "APP_ENV must be one of development, production (got 'Production')"
    )


@pytest.mark.parametrize("level", ["debug", "Info", "WARNING", "error", "critical"])
def test_log_level_is_any_python_level_in_any_case(level: str) -> None:
    assert load_settings({"LOG_LEVEL": level}, dotenv=None).log_level == level.upper()


@pytest.mark.parametrize("driver", ["", "postgres", "postgresql"])
def test_db_driver_of_the_original_service_accepts_postgres(driver: str) -> None:
    assert load_settings({"DB_DRIVER": driver}, dotenv=None).backend == "postgres"


def test_production_with_a_token_starts() -> None:
    token = "t" * 16
    s = load_settings({"APP_ENV": "production", "COUPON_ADMIN_TOKEN": token}, dotenv=None)
    assert s.production and s.admin_token == token


def test_dotenv_file_is_read_and_the_environment_wins(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("# comment\nPORT=9000\nexport WORKERS='3'\nCOUPON_ADMIN_TOKEN=\"abc\"\n")
    s = load_settings({"PORT": "9100"}, dotenv=dotenv)
    assert s.port == 9100 and s.workers == 3 and s.admin_token == "abc"


# What docker compose and python-dotenv make of each line (the same .env is compose's).
DOTENV_VALUES = [
    ("TOKEN=abc # rotate monthly", "abc"),
    ("TOKEN=abc\t# rotate monthly", "abc"),
    ("TOKEN=abc   ", "abc"),
    ("TOKEN=  abc  ", "abc"),
    ("TOKEN=abc#1", "abc#1"),
    ("TOKEN=#1", "#1"),
    ("TOKEN= # none yet", ""),
    ("TOKEN=a b # c", "a b"),
    ('TOKEN="abc # not a comment"', "abc # not a comment"),
    ("TOKEN='abc # not a comment'", "abc # not a comment"),
    ('TOKEN="abc" # rotate monthly', "abc"),
    ("TOKEN='abc'   # rotate monthly", "abc"),
    ('TOKEN=" abc "', " abc "),
    ("TOKEN=", ""),
]


@pytest.mark.parametrize(("line", "value"), DOTENV_VALUES)
def test_dotenv_comments_and_quotes_are_read_as_compose_reads_them(
    tmp_path: Path, line: str, value: str
) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(line + "\n")
    assert read_dotenv(dotenv) == {"TOKEN": value}
    dotenv_values = pytest.importorskip("dotenv").dotenv_values
    assert dotenv_values(dotenv) == {"TOKEN": value}


def test_an_inline_comment_is_not_part_of_the_admin_token(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("COUPON_ADMIN_TOKEN=abc # rotate monthly\nPORT=9000 # the API\n")
    s = load_settings({}, dotenv=dotenv)
    assert s.admin_token == "abc" and s.port == 9000


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('TOKEN="abc', "no closing"),
        ("TOKEN='abc' def", "only a '#' comment may follow"),
    ],
)
def test_a_dotenv_quote_left_open_or_followed_by_text_is_refused(
    tmp_path: Path, line: str, problem: str
) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("PORT=9000\n" + line + "\n")
    with pytest.raises(SettingsError, match=problem) as raised:
        read_dotenv(dotenv)
    assert ":2:" in str(raised.value)


def test_malformed_dotenv_line_is_reported_with_its_number(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("PORT=9000\nnonsense\n")
    with pytest.raises(SettingsError, match=":2:"):
        load_settings({}, dotenv=dotenv)


def test_serve_in_production_without_a_token_refuses_to_start() -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "COUPON_ADMIN_TOKEN"}
    env["APP_ENV"] = "production"
    done = subprocess.run(
        [sys.executable, "-m", "coupon", "serve", "--in-memory", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "COUPON_ADMIN_TOKEN must be set when APP_ENV=production" in done.stderr


def test_redis_cluster_url_is_accepted_and_checked() -> None:
    s = load_settings({"REDIS_URL": "redis+cluster://10.0.0.1:6379,10.0.0.2:6379"}, dotenv=None)
    assert s.redis_url.startswith("redis+cluster://")
    with pytest.raises(SettingsError, match="REDIS_URL"):
        load_settings({"REDIS_URL": "redis+cluster://10.0.0.1:6379/3"}, dotenv=None)


# Every number the service reads, with the largest value it takes (documented in
# docs/operations.md's configuration table).
WHOLE_NUMBERS = {
    "PORT": 65_535,
    "WORKERS": 256,
    "COUPON_DB_POOL_SIZE": 100,
    "COUPON_MAX_BATCH": 10_000,
    "COUPON_TARGET_LATENCY_MS": 60_000,
    "COUPON_REQUEST_DEADLINE_MS": 600_000,
    "COUPON_MAX_IN_FLIGHT": 1_000_000,
    "COUPON_REFUSAL_MEMORY_MS": 60_000,
    "COUPON_HOLDER_FILTER_MAX": 100_000_000,
    "COUPON_MAX_HEADER_BYTES": 1_048_576,
    "COUPON_MAX_HEADERS": 10_000,
}
SECONDS = {
    "COUPON_PENDING_LEASE_SECONDS": 3_600,
    "COUPON_REQUEST_TIMEOUT_SECONDS": 600,
    "COUPON_KEEPALIVE_SECONDS": 3_600,
}


NOT_A_NUMBER_IT_TAKES = ["nan", "NaN", "inf", "-inf", "1e400", "-1", "1e15", "1000000000000000"]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        *((name, value) for name in [*WHOLE_NUMBERS, *SECONDS] for value in NOT_A_NUMBER_IT_TAKES),
        *((name, "0.5") for name in WHOLE_NUMBERS),
        # REDIS_DB's upper bound is the Redis server's own `databases`.
        *(("REDIS_DB", value) for value in NOT_A_NUMBER_IT_TAKES[:-1]),
    ],
)
def test_every_number_refuses_nan_infinity_negatives_and_huge_values(
    variable: str, value: str
) -> None:
    with pytest.raises(SettingsError, match=f"^{variable} must "):
        load_settings({variable: value}, dotenv=None)


@pytest.mark.parametrize("variable", [*WHOLE_NUMBERS, *SECONDS])
def test_every_number_takes_its_documented_maximum_and_not_one_more(variable: str) -> None:
    most = {**WHOLE_NUMBERS, **SECONDS}[variable]
    load_settings({variable: str(most)}, dotenv=None)
    above = most + 1 if variable in WHOLE_NUMBERS else most + 0.001
    with pytest.raises(SettingsError, match=f"^{variable} must be "):
        load_settings({variable: str(above)}, dotenv=None)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("REDIS_ADDRESS", "127.0.0.1:99999"),
        ("REDIS_ADDRESS", "127.0.0.1:0"),
        ("REDIS_ADDRESS", "cache:65536"),
        ("REDIS_URL", "redis://127.0.0.1:99999/0"),
        ("REDIS_URL", "rediss://:pw@cache:0/0"),
        ("REDIS_URL", "redis+cluster://10.0.0.1:6379,10.0.0.2:70000"),
        ("REDIS_URL", "redis://[::1/0"),
        ("DATABASE_URL", "postgresql://postgres@127.0.0.1:99999/coupon"),
        ("DATABASE_URL", "postgresql://postgres@db1:5432,db2:0/coupon"),
        ("DATABASE_URL", "postgresql://postgres@[::1]:65536/coupon"),
        ("DATABASE_URL", "postgresql://shop:pw@[::1/coupon"),
    ],
)
def test_every_port_is_1_to_65535(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"^{variable} must ") as refused:
        load_settings({variable: value}, dotenv=None)
    assert ":pw@" not in str(refused.value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("REDIS_ADDRESS", "[::1]:6379"),
        ("REDIS_URL", "redis://[::1]:65535/0"),
        ("REDIS_URL", "unix:///run/redis.sock"),
        ("DATABASE_URL", "postgresql://shop:pw@db1:5432,db2:5433,[::1]:1/coupon"),
        ("DATABASE_URL", "postgresql:///coupon?host=/run/postgresql"),
    ],
)
def test_valid_ports_and_host_lists_pass(variable: str, value: str) -> None:
    load_settings({variable: value}, dotenv=None)


@pytest.mark.parametrize("app_env", ["development", "production"])
@pytest.mark.parametrize("token", [" ", "   ", "\t", " \t "])
def test_a_blank_admin_token_is_refused_wherever_it_is_set(app_env: str, token: str) -> None:
    with pytest.raises(SettingsError, match=r"^COUPON_ADMIN_TOKEN must not be blank"):
        load_settings({"APP_ENV": app_env, "COUPON_ADMIN_TOKEN": token}, dotenv=None)


@pytest.mark.parametrize(
    ("token", "shown"),
    [
        ("s3cret ", "' ' at 6"),
        (" s3cret", "' ' at 0"),
        ("two words", "' ' at 3"),
        ("s3cret\n", "'\\n' at 6"),
        ("비밀토큰", "'비' at 0"),
        ("caf\xe9", "'é' at 3"),
    ],
)
def test_an_admin_token_a_header_cannot_carry_is_refused(token: str, shown: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"APP_ENV": "production", "COUPON_ADMIN_TOKEN": token}, dotenv=None)
    assert str(caught.value) == (
        "COUPON_ADMIN_TOKEN must be printable ASCII without spaces, as an HTTP header "
        f"carries it (got {shown})"
    )


@pytest.mark.parametrize("token", ["s3cret", "a-b_c.d~e+f/g=", "!#$%&*^|`{}"])
def test_a_printable_admin_token_is_taken_as_it_is(token: str) -> None:
    settings = load_settings({"COUPON_ADMIN_TOKEN": token}, dotenv=None)
    assert settings.admin_token == token


def test_production_without_a_token_names_everything_the_token_guards() -> None:
    """Every RPC of the service that checks the token (and the dashboard, which does too)."""
    import ast
    import inspect

    from coupon.entrypoints import connect_service
    from coupon.entrypoints.settings import ADMIN_RPCS

    service = ast.parse(inspect.getsource(connect_service.CouponService)).body[0]
    assert isinstance(service, ast.ClassDef)
    guarded = {
        "".join(word.title() for word in method.name.split("_"))
        for method in service.body
        if isinstance(method, ast.AsyncFunctionDef) and "self._admin.check(" in ast.unparse(method)
    }
    assert guarded == set(ADMIN_RPCS)
    with pytest.raises(SettingsError) as refused:
        load_settings({"APP_ENV": "production"}, dotenv=None)
    for name in [*ADMIN_RPCS, "dashboard"]:
        assert name in str(refused.value)


@pytest.mark.parametrize("prefix", ["shop{eu}", "a{", "}b"])
def test_a_redis_prefix_with_a_brace_is_refused(prefix: str) -> None:
    with pytest.raises(SettingsError, match=r"^COUPON_REDIS_PREFIX must not hold"):
        load_settings({"COUPON_REDIS_PREFIX": prefix}, dotenv=None)


@pytest.mark.parametrize(
    ("env", "url"),
    [
        ({}, "http://127.0.0.1:8000"),
        ({"PORT": "9000"}, "http://127.0.0.1:9000"),
        ({"PORT": " 9000 "}, "http://127.0.0.1:9000"),
        ({"PORT": "9000", "COUPON_URL": "http://service:8080"}, "http://service:8080"),
        ({"PORT": "eighty", "COUPON_URL": "http://service:8080"}, "http://service:8080"),
    ],
)
def test_clients_call_coupon_url_else_the_port_serve_listens_on(
    env: dict[str, str], url: str
) -> None:
    assert client_url(env) == url


@pytest.mark.parametrize("token", ["admin", "changeme", "s3cret-s3cret-1"])
def test_production_refuses_a_short_admin_token_without_showing_it(token: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"APP_ENV": "production", "COUPON_ADMIN_TOKEN": token}, dotenv=None)
    message = str(caught.value)
    assert message.startswith(
        "COUPON_ADMIN_TOKEN must be at least 16 characters when APP_ENV=production "
        f"(got {len(token)})"
    )
    assert token not in message and "secrets.token_urlsafe(32)" in message
    # Development takes it: a token there guards a laptop's service.
    assert load_settings({"COUPON_ADMIN_TOKEN": token}, dotenv=None).admin_token == token


@pytest.mark.parametrize(("token", "shown"), [(" \t", None), ("two words", "' ' at 3")])
def test_a_metrics_token_a_header_cannot_carry_is_refused(token: str, shown: str | None) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"COUPON_METRICS_TOKEN": token}, dotenv=None)
    message = str(caught.value)
    assert message.startswith("COUPON_METRICS_TOKEN must")
    assert shown is None or f"(got {shown})" in message


def test_the_metrics_token_is_read_from_the_environment() -> None:
    assert load_settings({}, dotenv=None).metrics_token == ""
    settings = load_settings({"COUPON_METRICS_TOKEN": "scrape"}, dotenv=None)
    assert settings.metrics_token == "scrape"


@pytest.mark.parametrize("port", ["99999", "0", "eighty", "18900#x"])
def test_a_port_serve_would_refuse_is_no_default_for_its_clients(port: str) -> None:
    """Calling port 8000 instead could reach another service, or another deployment."""
    with pytest.raises(SettingsError, match=rf"^PORT must be a port number.*\(got '{port}'\)"):
        client_url({"PORT": port})


def test_a_dotenv_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    source = tmp_path / ".env"
    source.write_bytes("\ufeffPORT=9000\n".encode())
    assert read_dotenv(source) == {"PORT": "9000"}


def test_no_dotenv_is_no_settings(tmp_path: Path) -> None:
    assert read_dotenv(tmp_path / ".env") == {}


def test_a_dotenv_that_is_not_utf8_is_refused_with_its_line(tmp_path: Path) -> None:
    source = tmp_path / ".env"
    source.write_bytes("PORT=9000\n# réglages\n".encode("latin-1"))
    with pytest.raises(SettingsError, match=r"\.env:2: not UTF-8 text \(byte 0xe9\)"):
        read_dotenv(source)


@pytest.mark.parametrize("kind", ["directory", "link to nothing"])
def test_a_dotenv_that_is_there_but_no_file_is_refused(tmp_path: Path, kind: str) -> None:
    """Ignoring it would start the service without the settings written for it."""
    source = tmp_path / ".env"
    if kind == "directory":
        source.mkdir()
    else:
        source.symlink_to(tmp_path / "settings.env")
    with pytest.raises(SettingsError, match=r"\.env: cannot be read"):
        read_dotenv(source)


def test_a_dotenv_that_is_a_fifo_is_refused_rather_than_waited_on(tmp_path: Path) -> None:
    """Opened, a FIFO waits for a writer: every command hung without a word."""
    source = tmp_path / ".env"
    os.mkfifo(source)
    with pytest.raises(SettingsError, match=r"\.env: not a regular file"):
        read_dotenv(source)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://admin:hunter2@host:8000", "http://admin:***@host:8000"),
        ("http://admin:hun/ter2@host:8000", "http://admin:***@host:8000"),
        ("http://admin:hun#ter2@host:8000/x", "http://admin:***@host:8000/x"),
        (
            "postgresql://postgres:se?cret@db:5432/coupon",
            "postgresql://postgres:***@db:5432/coupon",
        ),
        ("redis://:s3cr/etpass@cache:6379/0", "redis://:***@cache:6379/0"),
        (
            "postgresql://postgres:pa@ss/word@db:5432/coupon",
            "postgresql://postgres:***@db:5432/coupon",
        ),
        ("redis://u:pa@ss?word@cache:6379/0", "redis://u:***@cache:6379/0"),
        ("http://host:8000/path", "http://host:8000/path"),
    ],
)
def test_a_password_never_shows_in_a_url_however_it_is_written(url: str, shown: str) -> None:
    """Operators write passwords with '/', '?' or '#' unencoded: to a URL parser the
    authority ends there, and the password was printed whole."""
    assert redacted(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        "redis://cache:6379/abc",
        "redis://:pw@cache:6379/1x",
        "rediss://cache/-1",
        "redis://cache/1_0",
        "redis://cache/0/",
        "redis://cache/3?db=abc",
        "unix:///run/redis.sock?db=x",
    ],
)
def test_a_redis_url_whose_database_is_no_whole_number_is_refused(url: str) -> None:
    """redis-py would take `/abc` for database 0, silently: refused as REDIS_DB=abc is."""
    with pytest.raises(SettingsError, match=r"^REDIS_URL: ") as refused:
        load_settings({"REDIS_URL": url}, dotenv=None)
    assert ":pw@" not in str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://cache",
        "redis://cache/",
        "redis://cache:6379/15",
        "redis://cache/?db=4",
        "rediss://:pw@cache:6380/2?ssl_cert_reqs=none",
        "unix:///run/redis.sock?db=2",
    ],
)
def test_a_redis_url_with_a_database_number_or_none_passes(url: str) -> None:
    assert load_settings({"REDIS_URL": url}, dotenv=None).redis_url == url


def test_an_ipv6_redis_address_becomes_a_url_with_brackets() -> None:
    """`redis://::1:6379/0` is no URL: redis-py would fail to read its port."""
    for address in ("::1:6379", "[::1]:6379"):
        settings = load_settings({"REDIS_ADDRESS": address}, dotenv=None)
        assert settings.redis_url == "redis://[::1]:6379/0"


def test_a_url_a_parser_refuses_is_said_without_its_password() -> None:
    """The parser's own message quotes the URL's authority, password included."""
    url = "postgresql://postgres:s3cret@\u2100.example:5432/coupon"
    with pytest.raises(SettingsError) as refused:
        load_settings({"DATABASE_URL": url}, dotenv=None)
    assert "s3cret" not in str(refused.value) and "***" in str(refused.value)
    problem = url_problem("http://admin:s3cret@\u2100.example:8000", "--url")
    assert problem is not None and "s3cret" not in problem, problem
