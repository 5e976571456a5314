"""`coupon` command line: serve, migrate, loadtest, campaigns."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import importlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

from coupon.entrypoints.settings import (
    Settings,
    SettingsError,
    host_port,
    load_settings,
    read_dotenv,
    redacted,
)

log = logging.getLogger("coupon")


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


# Connections the kernel queues for a worker that has not accepted them yet (a burst).
BACKLOG = 4096


def listen(host: str, port: int) -> list[socket.socket] | str:
    """Listening sockets on every address host:port resolves to (SO_REUSEADDR), for
    `run_asgi`; or why the server cannot listen there. An IPv6 socket takes IPv4 too
    (`--host ::` serves both, as in Node and Go) unless the host also resolves to an IPv4
    address, which then has a socket of its own. Bound and listening here, once: a port
    that was only tried and let go could be taken before the server bound it (two servers
    started at once), and the loser would fail after saying it serves."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"unknown host ({exc.strerror})"
    sockets: list[socket.socket] = []
    v6_only = any(family == socket.AF_INET for family, *_ in addresses)
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        sockets.append(sock)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6_only))
            # Listening at once: Linux lets SO_REUSEADDR sockets share a port until one of
            # them listens, so a bind alone would not keep another server off it.
            sock.bind(address)
            sock.listen(BACKLOG)
        except OSError as exc:
            for opened in sockets:
                opened.close()
            return (exc.strerror or str(exc)).lower()
        sock.set_inheritable(True)
    return sockets


def run_asgi(
    factory: str,
    sockets: list[socket.socket],
    workers: int,
    *,
    keepalive_seconds: float = 75.0,
    tls_cert_file: str = "",
    tls_key_file: str = "",
) -> None:
    """Serve an ASGI app factory with uvicorn (uvloop, httptools), as `coupon serve` does,
    on the sockets `listen` opened (each worker accepts on them).

    Every connection first meets `AutoProtocol`, which hands it to uvicorn's httptools
    HTTP/1.1 protocol or to our HTTP/2 one (gRPC needs HTTP/2 and trailers): one check per
    connection, none per request. With a certificate and key the port speaks TLS and
    offers `h2` and `http/1.1` through ALPN (uvicorn reads them from the protocol class).

    uvicorn rather than granian: the whole server runs on the worker's one event-loop
    thread. granian hands every request and response between its Rust I/O threads and the
    Python thread, and with the several awaits an issue makes, those handoffs cost more than
    its faster HTTP parsing saves: IssueCoupon at saturation went from 6,300-7,500 to
    8,250-10,400 issues/s on two cores (bench/RESULTS.md).
    """
    import uvicorn

    from coupon.entrypoints.http.budget import raise_open_files_limit
    from coupon.entrypoints.supervisor import Supervisor

    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again with the
    # handlers it found: with these, a graceful stop exits 0 (and a signal that comes before
    # uvicorn takes over still stops the process).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_cleanly)
    # Every connection is a file descriptor: the workers inherit the raised limit, and
    # hold connections up to a budget below it (http/budget.py).
    raise_open_files_limit()
    config = uvicorn.Config(
        factory,
        factory=True,
        workers=workers,
        loop="uvloop",
        # One port for HTTP/1.1 and HTTP/2: a sniffer per connection hands it to our
        # HTTP/1.1 protocol (uvicorn's httptools protocol with limits and IssueCoupon's
        # lane, http/h1.py) or to the HTTP/2 one (http/h2.py). A string, so that worker
        # processes import the class themselves.
        http="coupon.entrypoints.http.sniff:AutoProtocol",
        ssl_certfile=tls_cert_file or None,
        ssl_keyfile=tls_key_file or None,
        # Idle keep-alive connections: closed after longer than common client pools keep
        # theirs (httpx 5 s, undici 4 s, aiohttp 15 s), so clients close first and a request
        # never meets the server's close on the wire.
        timeout_keep_alive=max(1, round(keepalive_seconds)),
        backlog=BACKLOG,
        access_log=False,
        # The service's own JSON logging (configured by the factory) applies, not uvicorn's.
        log_config=None,
        server_header=False,
        # Nothing reads the client's address or scheme: skip X-Forwarded-* handling.
        proxy_headers=False,
        # Bound the graceful shutdown: in-flight issues get this long to commit.
        timeout_graceful_shutdown=30,
    )
    # What uvicorn.run does, on the sockets given rather than ones it would bind itself.
    if workers > 1:
        # SIGHUP: uvicorn's rolling restart of the workers (each worker ignores it, see
        # app.py), the supervisor stops listening as soon as it stops, and a worker's death
        # is a warning (supervisor.py).
        Supervisor(config, sockets=sockets).run()
        return
    server = uvicorn.Server(config)

    def hang_up(signum: int, frame: FrameType | None) -> None:
        # No other process would take over, and a terminal's hang-up means stop: the
        # graceful stop of SIGTERM, not the instant end that is SIGHUP's default.
        log.info(
            "SIGHUP: stopping gracefully, as on SIGTERM (one worker; with --workers 2 or "
            "more, SIGHUP restarts the workers one at a time)"
        )
        server.handle_exit(signal.SIGTERM, frame)

    signal.signal(signal.SIGHUP, hang_up)
    server.run(sockets=sockets)
    if not server.started:
        sys.exit(3)  # uvicorn's STARTUP_FAILURE, as uvicorn.run exits


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    overrides: dict[str, object] = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if args.workers is not None:
        overrides["workers"] = args.workers
    if args.in_memory:
        overrides["backend"] = "memory"
    settings = settings.with_overrides(**overrides)
    if settings.tls_cert_file:
        _check_tls(settings.tls_cert_file, settings.tls_key_file)
    # The port is taken before saying "serving on", and kept for uvicorn: a port already
    # taken is one line and exit status 3, before the schema is touched, never a claim to
    # serve followed by uvicorn's failure.
    sockets = listen(settings.host, settings.port)
    if isinstance(sockets, str):
        print(
            f"coupon: cannot listen on {host_port(settings.host, settings.port)}: {sockets}",
            file=sys.stderr,
        )
        return 3
    # A stop asked for while the schema is being applied ends the process as quietly as a
    # stop while serving (run_asgi sets the same handlers again).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_cleanly)
    from coupon.entrypoints.logs import configure_logging

    configure_logging(settings.log_level)  # the supervisor's own lines (worker restarts)
    # Before the schema: a PROMETHEUS_MULTIPROC_DIR that cannot be used is a bad setting,
    # which stops start-up before anything else is touched (the database created).
    metrics_dir, created = _metrics_dir(settings.metrics_dir)
    schema: BackgroundMigration | None = None
    try:
        if settings.backend == "postgres":
            schema = _migrate_or_defer(settings.database_url)
            _warn_unless_redis_answers(settings.redis_url)
        if settings.tls_cert_file and _is_ca_certificate(settings.tls_cert_file):
            log.warning(
                "COUPON_TLS_CERT_FILE is a CA's certificate (CA:TRUE), which clients built on "
                "rustls (coupon campaigns, coupon loadtest) refuse as a server's: make one "
                "with CA:FALSE (docs/clients.md#tls)",
                extra={"file": settings.tls_cert_file},
            )
        if settings.backend == "memory" and settings.workers > 1:
            log.warning(
                "--in-memory keeps state in one process: serving with 1 worker",
                extra={"workers": settings.workers},
            )
            settings = settings.with_overrides(workers=1)
        # Worker processes build their settings from the environment: hand the overrides on.
        os.environ.update(
            {
                "COUPON_BACKEND": settings.backend,
                "HOST": settings.host,
                "PORT": str(settings.port),
                "WORKERS": str(settings.workers),
                "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
            }
        )
        scheme = "https" if settings.tls_cert_file else "http"
        # For the person at the terminal, on stdout: stderr carries JSON log lines only.
        print(
            f"coupon: serving on {scheme}://{host_port(settings.host, settings.port)} "
            f"({settings.backend}, {settings.workers} worker(s))",
            flush=True,
        )
        if schema is not None:
            schema.start()
        run_asgi(
            "coupon.entrypoints.app:create_app",
            sockets,
            settings.workers,
            keepalive_seconds=settings.keepalive_seconds,
            tls_cert_file=settings.tls_cert_file,
            tls_key_file=settings.tls_key_file,
        )
    finally:
        for sock in sockets:
            sock.close()
        if schema is not None:
            schema.stop()
        if created:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _check_tls(cert_file: str, key_file: str) -> None:
    """Load the certificate and its key as uvicorn will, so that a file that is not a PEM
    certificate, not a PEM key, or a key of another certificate stops the server in one line
    naming the variable, before it claims to serve (uvicorn would load them only then)."""
    import ssl

    for name, path, marker, what in (
        ("COUPON_TLS_CERT_FILE", cert_file, "-----BEGIN CERTIFICATE-----", "certificate"),
        ("COUPON_TLS_KEY_FILE", key_file, "PRIVATE KEY-----", "private key"),
    ):
        try:
            text = Path(path).read_text(encoding="ascii", errors="replace")
        except OSError as exc:
            raise SettingsError(
                f"{name} must name a readable PEM file (got {path!r}: {exc.strerror})"
            ) from None
        if marker not in text:
            raise SettingsError(f"{name} must name a PEM {what} (got {path!r}: no {what} in it)")

    def no_password() -> bytes:
        raise SettingsError(
            f"COUPON_TLS_KEY_FILE must name an unencrypted private key (got {key_file!r})"
        )

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file, no_password)
    except ssl.SSLError as exc:
        reason = str(exc.reason or exc).lower().replace("_", " ")
        if "mismatch" in reason:
            raise SettingsError(
                f"COUPON_TLS_KEY_FILE must be the private key of the certificate in "
                f"COUPON_TLS_CERT_FILE (got {key_file!r} for {cert_file!r}: {reason})"
            ) from None
        raise SettingsError(
            f"COUPON_TLS_CERT_FILE and COUPON_TLS_KEY_FILE must be a PEM certificate and "
            f"its private key (got {cert_file!r} and {key_file!r}: {reason})"
        ) from None


# basicConstraints' object identifier (2.5.29.19), as DER writes it.
_BASIC_CONSTRAINTS = bytes.fromhex("0603551d13")


def _is_ca_certificate(cert_file: str) -> bool:
    """Whether the first certificate of the PEM file (checked by `_check_tls`) says
    `CA:TRUE` in its basicConstraints: the extension's value, after its optional
    `critical` flag, is an OCTET STRING holding a SEQUENCE whose first element, when it
    is a BOOLEAN, is cA."""
    import ssl

    text = Path(cert_file).read_text(encoding="ascii", errors="replace")
    end = "-----END CERTIFICATE-----"
    try:
        der = ssl.PEM_cert_to_DER_cert(text[: text.index(end) + len(end)])
    except ValueError:
        return False
    at = der.find(_BASIC_CONSTRAINTS)
    if at < 0:
        return False
    rest = der[at + len(_BASIC_CONSTRAINTS) :]
    if rest[:2] == b"\x01\x01":  # critical
        rest = rest[3:]
    # OCTET STRING (04 len), SEQUENCE (30 len), BOOLEAN (01 01 value)
    return (
        rest[:1] == b"\x04"
        and rest[2:3] == b"\x30"
        and rest[4:6] == b"\x01\x01"
        and (rest[6:7] not in (b"", b"\x00"))
    )


def _metrics_dir(given: str) -> tuple[str, bool]:
    """Where the workers add up their metrics, fresh for each start, and whether it was made
    here (then it is removed at exit; a directory given by PROMETHEUS_MULTIPROC_DIR is the
    operator's and stays, and of its files only the metrics files of earlier runs go).

    A directory another server still writes its metrics in is refused: deleting its files
    would lose its counts for good (its workers keep writing to files no one reads), and
    /metrics would add up both servers' counts."""
    if not given:
        # Not importing prometheus_client first: it picks where values live (in memory, or
        # in this directory's files) when imported, and with one worker the app runs in
        # this process, so it must find PROMETHEUS_MULTIPROC_DIR already set.
        return tempfile.mkdtemp(prefix="coupon-metrics-"), True
    from coupon.entrypoints.metrics import metrics_files

    try:
        Path(given).mkdir(parents=True, exist_ok=True)
        stale = metrics_files(given)
        live = sorted({pid for pid in map(_metrics_pid, stale) if _is_live_server(pid)})
        if live:
            raise SettingsError(
                f"PROMETHEUS_MULTIPROC_DIR {given!r} holds the metrics of a coupon server that "
                f"is still running (pid {', '.join(map(str, live))}): give each server its "
                "own directory"
            )
        if not _lock_metrics_dir(given):
            raise SettingsError(
                f"PROMETHEUS_MULTIPROC_DIR {given!r} is taken by a coupon server that is "
                "starting or running: give each server its own directory"
            )
        for path in stale:
            path.unlink()
    except OSError as exc:
        raise SettingsError(
            f"PROMETHEUS_MULTIPROC_DIR must be a writable directory ({given!r}: {exc.strerror})"
        ) from None
    return given, False


# The lock on the metrics directory, held as long as this server runs (see below).
_held: list[int] = []


def _lock_metrics_dir(directory: str) -> bool:
    """Take the directory for this server: an exclusive lock on a file in it, which the
    system releases when the process ends however it ends. Two servers started at the same
    moment would both find no other's metrics files yet; one of them cannot have the lock."""
    fd = os.open(os.path.join(directory, ".coupon-serve.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    _held.append(fd)
    return True


def _metrics_pid(path: Path) -> int:
    """The process a metrics file belongs to: `<type>_<pid>.db`."""
    return int(path.stem.rpartition("_")[2])


def _is_live_server(pid: int) -> bool:
    """Whether `pid` is a running coupon server process: its command line is `coupon serve` or,
    for a worker (started as `python -c 'from multiprocessing.spawn ...'`), its supervisor's
    does. A pid the system has since given to another program is no server."""
    if pid == os.getpid():
        return False  # this start's own pid: the file is an earlier process's
    for _ in range(2):  # the process, then a worker's supervisor
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:  # gone (or no /proc: nothing to tell by)
            return False
        if "\nState:\tZ" in status:  # exited, not yet reaped
            return False
        args = command.split(b"\0")
        if b"serve" in args and any(a == b"coupon" or a.endswith(b"/coupon") for a in args):
            return True  # `coupon serve` (or `python -m coupon serve`), not a pager on coupon.log
        if b"multiprocessing" not in command:
            return False
        pid = int(status.partition("\nPPid:")[2].split()[0])
    return False


def _migrate_or_defer(database_url: str) -> BackgroundMigration | None:
    """Create the database and apply the migrations now; when PostgreSQL cannot be used
    yet, say so in one line and leave it to a background retry: the server starts and
    /readyz answers 503 until the schema is in place, rather than the process failing."""
    from coupon.adapters.postgres.migrate import describe_failure, migrate_schema

    try:
        _warn_if_newer(asyncio.run(migrate_schema(database_url)).found)
    except Exception as exc:
        failure = describe_failure(exc, database_url)
        if failure is None:
            raise
        log.warning(
            "PostgreSQL is not usable yet: serving anyway, /readyz answers 503 until it "
            "answers and the schema is in place (retrying in the background)",
            extra={"database_url": redacted(database_url), "error": failure},
        )
        return BackgroundMigration(database_url, failure)
    return None


def _warn_if_newer(version: int) -> None:
    """One warning line when the schema is newer than this release's migrations: served
    as it is (see `newer_than_release`), but an operator rolling back should know."""
    from coupon.adapters.postgres.migrate import latest_version, newer_than_release

    newer = newer_than_release(version)
    if newer is not None:
        log.warning(
            f"{newer}: serving it as it is (a release rolled back after a newer one migrated?)",
            extra={"schema_version": version, "release_schema_version": latest_version()},
        )


REDIS_PROBE_SECONDS = 3.0


def _warn_unless_redis_answers(redis_url: str) -> None:
    """PING Redis once at start-up; when it does not answer, say so in one warning line, as
    for PostgreSQL: the server starts anyway and /readyz names Redis until it answers."""
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from coupon.adapters.redis.client import answers, create_client, is_cluster_url

    async def ping() -> bool:
        """Whether the one server named is a node of a Redis Cluster."""
        client = create_client(redis_url, max_connections=1)
        try:
            await answers(client, REDIS_PROBE_SECONDS)
            if is_cluster_url(redis_url):
                return False
            with contextlib.suppress(Exception):  # INFO may be renamed away: no matter
                info = await asyncio.wait_for(client.info("cluster"), REDIS_PROBE_SECONDS)
                return str(info.get("cluster_enabled", 0)) == "1"
            return False
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()

    try:
        if asyncio.run(ping()):
            log.warning(
                "REDIS_URL names one node of a Redis Cluster: campaigns whose slots other "
                "nodes serve would answer unavailable; name it redis+cluster://...",
                extra={"redis_url": redacted(redis_url)},
            )
    except Exception as exc:  # noqa: BLE001 - whatever fails, the server serves and says so
        # The probe's own bound, or the client's connect time-out (2 s) before it.
        if isinstance(exc, (TimeoutError, RedisTimeoutError)):
            failure = f"no answer within {REDIS_PROBE_SECONDS:g} s"
            if redis_url.startswith("rediss"):
                # A TLS handshake to a server without TLS waits in silence this way.
                failure += " (with TLS: does that Redis serve TLS, or is it redis://?)"
        else:
            failure = f"{type(exc).__name__}: {exc}"
        log.warning(
            "Redis is not usable yet: serving anyway, /readyz answers 503 until it answers",
            extra={"redis_url": redacted(redis_url), "error": failure},
        )


class BackgroundMigration:
    """Applies the migrations once PostgreSQL answers, on a thread of the serving process
    (one per server, whatever WORKERS says; several servers take turns under the
    migrations' advisory lock). A line is logged when what fails changes, not per try."""

    FIRST_DELAY = 0.5
    MAX_DELAY = 5.0

    def __init__(self, database_url: str, failure: str) -> None:
        self._url = database_url
        self._failure = failure
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Future[None] | None = None
        self._thread = threading.Thread(target=self._run, name="coupon-migrate", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        with self._lock:  # the loop stays open while these are set (see _run)
            if self._loop is not None and self._task is not None:
                self._loop.call_soon_threadsafe(self._task.cancel)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        async def main() -> None:
            with self._lock:
                if self._stopping.is_set():
                    return
                self._loop = asyncio.get_running_loop()
                self._task = task = asyncio.ensure_future(self._retry())
            try:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            finally:
                with self._lock:
                    self._loop = self._task = None

        asyncio.run(main())

    async def _retry(self) -> None:
        from coupon.adapters.postgres.migrate import describe_failure, migrate_schema

        delay = self.FIRST_DELAY
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.MAX_DELAY)
            try:
                migrated = await migrate_schema(self._url)
            except Exception as exc:  # noqa: BLE001 - whatever fails, the next try may not
                failure = describe_failure(exc, self._url) or f"{type(exc).__name__}: {exc}"
                if failure != self._failure:
                    self._failure = failure
                    log.warning(
                        "PostgreSQL is still not usable; retrying",
                        extra={"database_url": redacted(self._url), "error": failure},
                    )
                continue
            log.info(
                "PostgreSQL answers: schema in place",
                extra={"applied": [f"{v:04d}" for v in migrated.applied]},
            )
            _warn_if_newer(migrated.found)
            return


def _migrate(_: argparse.Namespace, settings: Settings) -> int:
    from coupon.adapters.postgres.migrate import (
        describe_failure,
        migrate_schema,
        newer_than_release,
    )

    try:
        migrated = asyncio.run(migrate_schema(settings.database_url))
    except Exception as exc:
        failure = describe_failure(exc, settings.database_url)
        if failure is None:
            raise
        print(
            f"coupon migrate: cannot use DATABASE_URL={redacted(settings.database_url)}: {failure}",
            file=sys.stderr,
        )
        return 1
    newer = newer_than_release(migrated.found)
    if newer is not None:
        print(f"{newer}: left as it is")  # a rollback: the newer release's schema is kept
    elif migrated.applied:
        print(f"applied migrations: {', '.join(f'{v:04d}' for v in migrated.applied)}")
    else:
        print("schema is up to date")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coupon", description="First-come-first-served coupon issuance service."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", help="serve the Connect API (creates the database and schema when missing)"
    )
    serve.add_argument("--host", help="address to listen on (HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (PORT, default 8000)")
    serve.add_argument("--workers", type=int, help="worker processes (WORKERS, default 1)")
    serve.add_argument(
        "--in-memory",
        action="store_true",
        help="keep everything in memory (demo; no PostgreSQL or Redis needed)",
    )
    serve.set_defaults(handler=_serve)

    migrate = commands.add_parser("migrate", help="create the database and apply migrations")
    migrate.set_defaults(handler=_migrate)

    # The load tool is a distribution of its own (coupon-loadtest): imported only when asked
    # for, so that serving never loads it; every argument after the word goes to it.
    loadtest = commands.add_parser(
        "loadtest",
        help="drive a burst at a server and verify the invariants (needs coupon-loadtest)",
        add_help=False,
        prefix_chars="\0",
    )
    loadtest.add_argument("args", nargs=argparse.REMAINDER)
    loadtest.set_defaults(handler=_loadtest, client=True)

    campaigns = commands.add_parser(
        "campaigns", help="operate a running service: create, list, show, end, export campaigns"
    )
    operator = importlib.import_module("coupon.entrypoints.operator_cli")
    operator.add_arguments(campaigns)
    campaigns.set_defaults(handler=operator.run, client=True)
    return parser


def _loadtest(args: argparse.Namespace) -> int:
    try:
        tool = importlib.import_module("coupon_loadtest.cli")
    except ModuleNotFoundError:
        print(
            "coupon loadtest: the load tool is not installed: pip install ./loadtest "
            "(or `just setup` in the repository)",
            file=sys.stderr,
        )
        return 2
    result: int = tool.main(args.args, prog="coupon loadtest")
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "client", False):
        # A client of a running service (campaigns, loadtest): the server's settings are
        # not its business, so a bad DATABASE_URL or WORKERS does not stop it; what it reads
        # (COUPON_URL, COUPON_ADMIN_TOKEN) comes from the environment or ./.env, as for serve.
        try:
            dotenv = read_dotenv(Path(".env"))
        except SettingsError as exc:
            # The load tool speaks as `loadtest:` (run as `coupon-loadtest` too), of its
            # .env as of everything else.
            who = "loadtest" if args.command == "loadtest" else "coupon"
            print(f"{who}: {exc}", file=sys.stderr)
            return 2
        for key, value in dotenv.items():
            os.environ.setdefault(key, value)
        return int(args.handler(args))
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"coupon: {exc}", file=sys.stderr)
        return 2
    try:
        result: int = args.handler(args, settings)
    except SettingsError as exc:
        print(f"coupon: {exc}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
