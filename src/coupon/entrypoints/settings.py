"""Settings: one typed object built once from the environment (and a `.env` file).

Names stay compatible with the original Go service (APP_ENV, PORT, DATABASE_URL,
REDIS_ADDRESS, REDIS_PASSWORD, REDIS_DB). Nothing else in the project reads os.environ.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import quote, urlsplit


class SettingsError(ValueError):
    """A variable has a value the service cannot use; the message names it."""


# Exact spellings: a value that merely looks like production (`prod`, `Production`) must
# not start the service in development, with the admin RPCs open.
APP_ENVS = ("development", "production")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# The shortest COUPON_ADMIN_TOKEN production takes: a word or a short password ("admin",
# "changeme") that guards every code is refused; token_urlsafe(32) gives 43 characters.
MIN_PRODUCTION_TOKEN = 16
# What COUPON_ADMIN_TOKEN guards, besides the dashboard.
ADMIN_RPCS = ("CreateCampaign", "GetCampaign", "ListCampaigns", "EndCampaign", "ExportCoupons")
# The original service's DB_DRIVER: coupons live in PostgreSQL only.
DB_DRIVERS = ("postgres", "postgresql")

# The most connections a worker keeps: each worker opens them all at start, and PostgreSQL
# serves 100 connections in all by default (max_connections), every instance's included.
# Group commit keeps a few busy: 8 is the default.
MAX_DB_POOL_SIZE = 100
# The most coupons one group commit inserts: a batch holds what waited during the last
# commit, so a bigger cap only makes each commit, and every issue in it, slower.
MAX_BATCH = 10_000
# Upper bounds of the settings in seconds: a lease or a timeout beyond them is no longer
# one (stock stranded for hours after a crash; slow senders held for hours).
MAX_LEASE_SECONDS = 3_600.0
MAX_REQUEST_TIMEOUT_SECONDS = 600.0
MAX_KEEPALIVE_SECONDS = 3_600.0


@dataclass(frozen=True, slots=True)
class Settings:
    app_env: str = "development"
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    backend: str = "postgres"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/coupon"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "coupon"
    admin_token: str = ""
    # Bearer token /metrics asks for; empty: /metrics is open, for a scraper on the
    # operator's network.
    metrics_token: str = ""
    pending_lease_seconds: float = 15.0
    db_pool_size: int = 8
    max_batch: int = 512
    log_level: str = "INFO"
    # Where worker processes share Prometheus metrics (prometheus_client reads it too).
    metrics_dir: str = ""
    # Overload: the in-process latency IssueCoupon's admission limit aims at; how long a
    # request may wait in the process before it is answered `unavailable` untouched; how
    # long a process answers sold out / ended / not started from memory.
    target_latency_ms: int = 100
    # The most IssueCoupon requests one process works on at once, whatever it measures.
    max_in_flight: int = 8_192
    request_deadline_ms: int = 500
    refusal_memory_ms: int = 500
    holder_filter_max: int = 2_000_000
    # HTTP/1.1 front door: header limits, the time to receive a whole request, keep-alive.
    max_header_bytes: int = 16_384
    max_headers: int = 100
    request_timeout_seconds: float = 10.0
    keepalive_seconds: float = 75.0
    # TLS (with HTTP/2 offered through ALPN) when both are set.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # Browser origins allowed to call the API (CORS); none by default.
    cors_origins: tuple[str, ...] = ()

    @property
    def production(self) -> bool:
        return self.app_env == "production"

    def with_overrides(self, **changes: object) -> Settings:
        settings = replace(self, **changes)  # type: ignore[arg-type]
        settings.check()
        return settings

    def check(self) -> None:
        if self.app_env not in APP_ENVS:
            raise SettingsError(
                f"APP_ENV must be one of {', '.join(APP_ENVS)} (got {self.app_env!r})"
            )
        if self.log_level not in LOG_LEVELS:
            raise SettingsError(
                f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)} (got {self.log_level!r})"
            )
        for name, token in (
            ("COUPON_ADMIN_TOKEN", self.admin_token),
            ("COUPON_METRICS_TOKEN", self.metrics_token),
        ):
            problem = admin_token_problem(token, name)
            if problem is not None:
                raise SettingsError(problem)
        if self.production and not self.admin_token:
            raise SettingsError(
                "COUPON_ADMIN_TOKEN must be set when APP_ENV=production: the admin RPCs "
                f"({', '.join(ADMIN_RPCS)}) and the dashboard would otherwise be open to anyone"
            )
        if self.production and len(self.admin_token) < MIN_PRODUCTION_TOKEN:
            raise SettingsError(
                f"COUPON_ADMIN_TOKEN must be at least {MIN_PRODUCTION_TOKEN} characters when "
                f"APP_ENV=production (got {len(self.admin_token)}): a short one can be "
                "guessed; make one with: python3 -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'"
            )
        if "{" in self.redis_prefix or "}" in self.redis_prefix:
            raise SettingsError(
                "COUPON_REDIS_PREFIX must not hold '{' or '}': keys are "
                "<prefix>:{<campaign id>}:..., and Redis Cluster would take a brace of the "
                "prefix for every campaign's hash tag, one slot for all "
                f"(got {self.redis_prefix!r})"
            )
        if self.backend not in ("postgres", "memory"):
            raise SettingsError(
                f"COUPON_BACKEND must be 'postgres' or 'memory' (got {self.backend!r})"
            )
        for name, value, low, high in (
            ("PORT", self.port, 1, 65535),
            ("WORKERS", self.workers, 1, 256),
            ("COUPON_DB_POOL_SIZE", self.db_pool_size, 1, MAX_DB_POOL_SIZE),
            ("COUPON_MAX_BATCH", self.max_batch, 1, MAX_BATCH),
            ("COUPON_TARGET_LATENCY_MS", self.target_latency_ms, 1, 60_000),
            ("COUPON_REQUEST_DEADLINE_MS", self.request_deadline_ms, 1, 600_000),
            ("COUPON_MAX_IN_FLIGHT", self.max_in_flight, 1, 1_000_000),
            ("COUPON_REFUSAL_MEMORY_MS", self.refusal_memory_ms, 0, 60_000),
            ("COUPON_HOLDER_FILTER_MAX", self.holder_filter_max, 0, 100_000_000),
            ("COUPON_MAX_HEADER_BYTES", self.max_header_bytes, 1_024, 1_048_576),
            ("COUPON_MAX_HEADERS", self.max_headers, 8, 10_000),
        ):
            if not low <= value <= high:
                raise SettingsError(f"{name} must be between {low} and {high} (got {value})")
        for name, seconds, most in (
            ("COUPON_PENDING_LEASE_SECONDS", self.pending_lease_seconds, MAX_LEASE_SECONDS),
            (
                "COUPON_REQUEST_TIMEOUT_SECONDS",
                self.request_timeout_seconds,
                MAX_REQUEST_TIMEOUT_SECONDS,
            ),
            ("COUPON_KEEPALIVE_SECONDS", self.keepalive_seconds, MAX_KEEPALIVE_SECONDS),
        ):
            # nan passes every comparison's negation: finite first.
            if not (math.isfinite(seconds) and 0 < seconds <= most):
                raise SettingsError(
                    f"{name} must be a number of seconds above 0 and at most {most:g} "
                    f"(got {seconds!r})"
                )
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            missing = "COUPON_TLS_KEY_FILE" if self.tls_cert_file else "COUPON_TLS_CERT_FILE"
            raise SettingsError(
                f"{missing} must be set too: TLS needs both COUPON_TLS_CERT_FILE "
                "and COUPON_TLS_KEY_FILE"
            )
        for name, path in (
            ("COUPON_TLS_CERT_FILE", self.tls_cert_file),
            ("COUPON_TLS_KEY_FILE", self.tls_key_file),
        ):
            if path and not Path(path).is_file():
                raise SettingsError(f"{name} must name a readable PEM file (got {path!r})")


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs; also for a URL that does not
    parse (urlsplit raises on an unclosed IPv6 bracket)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    # Everything before the last '@' is taken for credentials when it begins with a user
    # name and a colon: a password may hold '@', '/', '?' or '#' unencoded, which ends the
    # authority early to a parser. (A path with an '@' in it is hidden too: never a password
    # shown.)
    userinfo, at, after = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if at and colon and not re.search(r"[/?#]", user):
        return f"{scheme}://{user}:***@{after}"
    return url


def _ipv6_or_name(host: str) -> bool:
    """Whether `host` (of host:port) can be one: a name or IPv4 address, or an IPv6 address,
    in brackets or not."""
    inner = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if ":" not in inner and not host.startswith("["):
        return True
    try:
        ipaddress.IPv6Address(inner)
    except ValueError:
        return False
    return True


def without_password(text: str, url: str) -> str:
    """`text` (a parser's message, which may quote the URL's authority) with `url`'s
    password, however written, replaced by ***."""
    userinfo, at, _ = url.partition("://")[2].rpartition("@")
    password = userinfo.partition(":")[2] if at else ""
    return text.replace(password, "***") if password else text


def admin_token_problem(token: str, name: str = "COUPON_ADMIN_TOKEN") -> str | None:
    """Why the token `name` sets cannot be sent as `Authorization: Bearer <token>`; None if
    it can (or is empty: no token). HTTP drops the spaces around a header's value, so a token
    of spaces would let `Bearer ` through and one with spaces at its ends could never be
    matched; a browser refuses a header value beyond Latin-1, and a newline ends the header."""
    if not token:
        return None
    if not token.strip():
        return (
            f"{name} must not be blank (got only whitespace): set a token, "
            "or leave it empty for none"
            + (" (development only)" if name == "COUPON_ADMIN_TOKEN" else "")
        )
    odd = next((c for c in token if not "!" <= c <= "~"), None)
    if odd is not None:
        return (
            f"{name} must be printable ASCII without spaces, as an HTTP header "
            f"carries it (got {odd!r} at {token.index(odd)})"
        )
    return None


def host_port(host: str, port: int | str) -> str:
    """`host:port` as a URL writes it: an IPv6 address in brackets (`[::1]:8000`), else
    the port would read as one more group of the address."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


PORT_TEXT = re.compile(r"[0-9]{1,5}")


def _is_port(text: str) -> bool:
    return PORT_TEXT.fullmatch(text) is not None and 1 <= int(text) <= 65535


def client_url(env: Mapping[str, str]) -> str:
    """Where the service's clients (`coupon campaigns`, the load tool) call when not told:
    COUPON_URL, else this machine at the PORT `coupon serve` listens on, read from the same
    environment and .env, else port 8000. A PORT the server would refuse is a SettingsError."""
    url = env.get("COUPON_URL", "")
    if url:
        return url
    port = env.get("PORT", "").strip()
    if not port:
        return f"http://127.0.0.1:{DEFAULTS.port}"
    if not _is_port(port):
        # Calling port 8000 instead could reach another service, or another deployment.
        raise SettingsError(
            f"PORT must be a port number, 1 to 65535 (got {port!r}): the port coupon serve "
            "listens on, which its clients call when COUPON_URL is not set"
        )
    return f"http://127.0.0.1:{int(port)}"


def _url_scheme(name: str, url: str) -> str:
    """The scheme of a URL whose every port (`host:port`, `[v6]:port`, and each of a
    comma-separated host list, as libpq allows) is 1 to 65535."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket; it may quote the password
        why = without_password(str(exc), url)
        raise SettingsError(f"{name} must be a URL ({why}; got {redacted(url)!r})") from None
    for item in parts.netloc.rpartition("@")[2].split(","):
        if item.startswith("["):
            port = item.partition("]")[2].removeprefix(":")
        else:
            port = item.rpartition(":")[2] if ":" in item else ""
        if port and not _is_port(port):
            raise SettingsError(
                f"{name} must give ports between 1 and 65535 (got {redacted(url)!r})"
            )
    return parts.scheme


def read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, read as docker compose and python-dotenv read them: blank lines and
    lines starting with '#' are skipped, `export ` before a key is allowed. A value in single
    or double quotes is taken as written between them ('#' and spaces included; no escapes),
    and may be followed by a comment. In a value without quotes, whitespace then '#' begins
    a comment (`TOKEN=abc # rotate monthly` is `abc`; `abc#1` stays whole), and the
    whitespace around the value is dropped.

    No `.env` at all is no settings; one that is there but cannot be read (a directory, a
    link to nothing, not UTF-8) is a SettingsError naming it: ignoring it would start the
    service without the settings the operator wrote there."""
    values: dict[str, str] = {}
    if not path.exists() and not path.is_symlink():
        return values
    if path.exists() and not path.is_file() and not path.is_dir():
        # A FIFO or a device: reading one would wait, silently, for a writer.
        raise SettingsError(f"{path}: not a regular file: it must be a readable text file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        at = exc.object[: exc.start].count(b"\n") + 1
        raise SettingsError(
            f"{path}:{at}: not UTF-8 text (byte {exc.object[exc.start]:#04x}): "
            "save the file as UTF-8"
        ) from None
    except OSError as exc:
        why = exc.strerror or str(exc)
        if path.is_symlink() and not path.exists():
            why = f"a link to {os.readlink(path)!r}, which does not exist"
        raise SettingsError(
            f"{path}: cannot be read ({why}): it must be a readable text file"
        ) from None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :]
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"{path}:{number}: expected KEY=VALUE (got {raw!r})")
        values[key.strip()] = _dotenv_value(value, f"{path}:{number}")
    return values


# In a value without quotes, a comment begins at whitespace followed by '#'.
_INLINE_COMMENT = re.compile(r"\s#")


def _dotenv_value(text: str, where: str) -> str:
    """The value of one .env line from the text after its '='."""
    quoted = text.lstrip()
    quote = quoted[:1]
    if quote in ("'", '"'):
        text = quoted
        end = text.find(quote, 1)
        if end < 0:
            raise SettingsError(f"{where}: the value has no closing {quote} (got {text!r})")
        rest = text[end + 1 :].strip()
        if rest and not rest.startswith("#"):
            raise SettingsError(
                f"{where}: only a '#' comment may follow the closing {quote} (got {rest!r})"
            )
        return text[1:end]
    # `KEY= # note` is empty; `KEY=#1` is `#1`.
    return _INLINE_COMMENT.split(text, maxsplit=1)[0].strip()


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "")
    if raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number (got {raw!r})") from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "")
    if raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number (got {raw!r})") from None


def _origins(env: Mapping[str, str]) -> tuple[str, ...]:
    """Exact origins (scheme://host[:port]), as a browser sends them in `Origin`."""
    origins = []
    for raw in env.get("COUPON_CORS_ORIGINS", "").split(","):
        origin = raw.strip()
        if not origin:
            continue
        parts = urlsplit(origin)
        if (
            parts.scheme not in ("http", "https")
            or not parts.netloc
            or parts.path
            or parts.query
            or parts.fragment
            or origin != origin.lower()
        ):
            raise SettingsError(
                "COUPON_CORS_ORIGINS must be comma-separated origins like "
                f"https://shop.example.com or http://127.0.0.1:8080, lower case, no path "
                f"(got {origin!r})"
            )
        origins.append(origin)
    return tuple(origins)


def _redis_url(env: Mapping[str, str]) -> str:
    url = env.get("REDIS_URL", "")
    if url:
        scheme = _url_scheme("REDIS_URL", url)
        if scheme not in (
            "redis",
            "rediss",
            "unix",
            "redis+cluster",
            "rediss+cluster",
        ):
            raise SettingsError(
                "REDIS_URL must start with redis://, rediss://, unix://, redis+cluster:// "
                f"or rediss+cluster:// (got {redacted(url)!r})"
            )
        from coupon.adapters.redis.client import parse_cluster_url, parse_server_url

        # As the client will read it: a database part that is not a number (`/abc`) would
        # otherwise be database 0, silently.
        parse = parse_cluster_url if scheme.endswith("+cluster") else parse_server_url
        try:
            parse(url)
        except ValueError as exc:
            # The parser quotes the URL it was given: quote it without its password.
            raise SettingsError(f"REDIS_URL: {without_password(str(exc), url)}") from None
        return url
    address = env.get("REDIS_ADDRESS", "") or "127.0.0.1:6379"
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not _ipv6_or_name(host):
        # `::1` alone would be host ':' and port 1.
        raise SettingsError(
            f"REDIS_ADDRESS must be host:port, an IPv6 address as [::1]:6379 (got {address!r})"
        )
    if not _is_port(port):
        raise SettingsError(f"REDIS_ADDRESS must have a port between 1 and 65535 (got {address!r})")
    db = _int(env, "REDIS_DB", 0)
    if db < 0:
        raise SettingsError(f"REDIS_DB must be 0 or more (got {db})")
    password = env.get("REDIS_PASSWORD", "")
    auth = f":{quote(password, safe='')}@" if password else ""
    return f"redis://{auth}{host_port(host, port)}/{db}"


DEFAULTS = Settings()


def load_settings(
    environ: Mapping[str, str] | None = None, dotenv: Path | None = Path(".env")
) -> Settings:
    env: dict[str, str] = {}
    if dotenv is not None:
        env.update(read_dotenv(dotenv))
    env.update(os.environ if environ is None else environ)
    database_url = env.get("DATABASE_URL", "") or DEFAULTS.database_url
    if _url_scheme("DATABASE_URL", database_url) not in ("postgresql", "postgres"):
        raise SettingsError(
            f"DATABASE_URL must start with postgresql:// (got {redacted(database_url)!r})"
        )
    app_env = env.get("APP_ENV", "") or "development"
    db_driver = env.get("DB_DRIVER", "")
    if db_driver and db_driver not in DB_DRIVERS:
        raise SettingsError(
            f"DB_DRIVER must be {' or '.join(DB_DRIVERS)}: coupons are stored in PostgreSQL "
            f"only (got {db_driver!r})"
        )
    settings = Settings(
        app_env=app_env,
        host=env.get("HOST", "") or DEFAULTS.host,
        port=_int(env, "PORT", DEFAULTS.port),
        workers=_int(env, "WORKERS", DEFAULTS.workers),
        backend=(env.get("COUPON_BACKEND", "") or "postgres").lower(),
        database_url=database_url,
        redis_url=_redis_url(env),
        redis_prefix=env.get("COUPON_REDIS_PREFIX", "") or DEFAULTS.redis_prefix,
        admin_token=env.get("COUPON_ADMIN_TOKEN", ""),
        metrics_token=env.get("COUPON_METRICS_TOKEN", ""),
        pending_lease_seconds=_float(
            env, "COUPON_PENDING_LEASE_SECONDS", DEFAULTS.pending_lease_seconds
        ),
        db_pool_size=_int(env, "COUPON_DB_POOL_SIZE", DEFAULTS.db_pool_size),
        max_batch=_int(env, "COUPON_MAX_BATCH", DEFAULTS.max_batch),
        log_level=(env.get("LOG_LEVEL", "") or "INFO").strip().upper(),
        metrics_dir=env.get("PROMETHEUS_MULTIPROC_DIR", ""),
        target_latency_ms=_int(env, "COUPON_TARGET_LATENCY_MS", DEFAULTS.target_latency_ms),
        request_deadline_ms=_int(env, "COUPON_REQUEST_DEADLINE_MS", DEFAULTS.request_deadline_ms),
        max_in_flight=_int(env, "COUPON_MAX_IN_FLIGHT", DEFAULTS.max_in_flight),
        refusal_memory_ms=_int(env, "COUPON_REFUSAL_MEMORY_MS", DEFAULTS.refusal_memory_ms),
        holder_filter_max=_int(env, "COUPON_HOLDER_FILTER_MAX", DEFAULTS.holder_filter_max),
        max_header_bytes=_int(env, "COUPON_MAX_HEADER_BYTES", DEFAULTS.max_header_bytes),
        max_headers=_int(env, "COUPON_MAX_HEADERS", DEFAULTS.max_headers),
        request_timeout_seconds=_float(
            env, "COUPON_REQUEST_TIMEOUT_SECONDS", DEFAULTS.request_timeout_seconds
        ),
        keepalive_seconds=_float(env, "COUPON_KEEPALIVE_SECONDS", DEFAULTS.keepalive_seconds),
        tls_cert_file=env.get("COUPON_TLS_CERT_FILE", ""),
        tls_key_file=env.get("COUPON_TLS_KEY_FILE", ""),
        cors_origins=_origins(env),
    )
    settings.check()
    return settings
