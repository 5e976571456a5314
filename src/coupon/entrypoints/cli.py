"""`coupon` command line: serve, migrate, loadtest."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType

from coupon.entrypoints.settings import Settings, SettingsError, load_settings


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def run_asgi(factory: str, host: str, port: int, workers: int) -> None:
    """Serve an ASGI app factory with uvicorn (uvloop, httptools), as `coupon serve` does.

    uvicorn rather than granian: the whole server runs on the worker's one event-loop
    thread. granian hands every request and response between its Rust I/O threads and the
    Python thread, and with the several awaits an issue makes, those handoffs cost more than
    its faster HTTP parsing saves: IssueCoupon at saturation went from 6,300-7,500 to
    8,250-10,400 issues/s on two cores (bench/RESULTS.md).
    """
    import uvicorn

    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again with the
    # handlers it found: with these, a graceful stop exits 0 (and a signal that comes before
    # uvicorn takes over still stops the process).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_cleanly)
    uvicorn.run(
        factory,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http="httptools",
        backlog=4096,
        access_log=False,
        # The service's own JSON logging (configured by the factory) applies, not uvicorn's.
        log_config=None,
        server_header=False,
        # Nothing reads the client's address or scheme: skip X-Forwarded-* handling.
        proxy_headers=False,
        # Bound the graceful shutdown: in-flight issues get this long to commit.
        timeout_graceful_shutdown=30,
    )


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
    if settings.backend == "postgres":
        from coupon.adapters.postgres.migrate import migrate

        asyncio.run(migrate(settings.database_url))
    if settings.backend == "memory" and settings.workers > 1:
        print("--in-memory keeps state in one process: serving with 1 worker", file=sys.stderr)
        settings = settings.with_overrides(workers=1)
    # Workers add up their metrics through files in one directory, fresh for each start.
    metrics_dir = settings.metrics_dir or tempfile.mkdtemp(prefix="coupon-metrics-")
    for stale in Path(metrics_dir).glob("*.db"):
        stale.unlink()
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
    print(
        f"coupon: serving on http://{settings.host}:{settings.port} "
        f"({settings.backend}, {settings.workers} worker(s))",
        file=sys.stderr,
        flush=True,
    )
    from coupon.entrypoints.logs import configure_logging

    configure_logging(settings.log_level)  # the supervisor's own lines (worker restarts)
    run_asgi("coupon.entrypoints.app:create_app", settings.host, settings.port, settings.workers)
    return 0


def _migrate(_: argparse.Namespace, settings: Settings) -> int:
    from coupon.adapters.postgres.migrate import migrate

    applied = asyncio.run(migrate(settings.database_url))
    if applied:
        print(f"applied migrations: {', '.join(f'{v:04d}' for v in applied)}")
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
    loadtest.set_defaults(handler=_loadtest)
    return parser


def _loadtest(args: argparse.Namespace, _: Settings) -> int:
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
