"""`coupon campaigns ...`: the operators' command line, a client of a running service.

It speaks to the service at `--url` (default $COUPON_URL, else http://127.0.0.1:$PORT, else
port 8000) with the generated Connect client, sending the admin token from
COUPON_ADMIN_TOKEN; over https:// it trusts the system's CAs, or those of `--cacert FILE`
(default $COUPON_CA_FILE). Tables for people by default, `--json` for programs; errors are one
line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import signal
import stat
import sys
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, NoReturn, TextIO

import pyqwest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from coupon.domain.campaign import TOTAL_COUPONS_MAX
from coupon.entrypoints.output_path import can_create_in, cannot_write, directory_not_writable
from coupon.entrypoints.reach import (
    add_cacert_argument,
    cannot_reach,
    not_the_service,
    read_ca_file,
    serves_something_else,
    unreachable,
    url_problem,
)
from coupon.entrypoints.settings import (
    SettingsError,
    admin_token_problem,
    client_url,
    redacted,
    without_password,
)
from coupon.gen.coupon.v1 import coupon_pb
from coupon.gen.coupon.v1.coupon_connect import CouponServiceClientSync

STATUSES = {
    "scheduled": coupon_pb.CampaignStatus.SCHEDULED,
    "active": coupon_pb.CampaignStatus.ACTIVE,
    "sold_out": coupon_pb.CampaignStatus.SOLD_OUT,
    "ended": coupon_pb.CampaignStatus.ENDED,
}
_STATUS_NAMES = {value: name for name, value in STATUSES.items()}
_RELATIVE = re.compile(r"^\+(\d+(?:\.\d+)?)([smhd])$")
_DASH_VALUE = re.compile(r"^-\d")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
EXPORT_FORMATS = ("csv", "jsonl")
CSV_COLUMNS = ("code", "user_id", "campaign_id", "issued_at")
# How long the command waits for the service (--timeout, $COUPON_TIMEOUT): for each unary
# call's answer, sent as its connect-timeout-ms; for the export's stream, for each read.
DEFAULT_TIMEOUT_SECONDS = 10.0
MAX_TIMEOUT_SECONDS = 3_600.0
MIN_TIMEOUT_SECONDS = 0.001
# `list`'s table: ENDS is the scheduled end (ends_at), ENDED when EndCampaign ended it.
LIST_COLUMNS = ("ID", "NAME", "STATUS", "ISSUED", "STARTS", "ENDS", "ENDED")


class UsageError(Exception):
    """A bad option value; the message says which and why."""


class OutputError(Exception):
    """The output file cannot be written; the message names it and says why."""


class Declined(Exception):
    """The operator did not confirm; nothing was changed."""


# Set while `end` waits for the operator's answer at the terminal.
_ASKING = threading.Event()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=None,
        help="the service's base URL (default: $COUPON_URL, else http://127.0.0.1:$PORT, "
        "else http://127.0.0.1:8000)",
    )
    add_cacert_argument(parser)
    parser.add_argument(
        "--json", action="store_true", help="print the API's JSON instead of a table"
    )
    parser.add_argument(
        "--timeout",
        default=None,
        metavar="SECONDS",
        help="how long to wait for the service's answer, and during an export for each of "
        "its reads (default: $COUPON_TIMEOUT, else "
        f"{DEFAULT_TIMEOUT_SECONDS:g})",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    create = actions.add_parser("create", help="create a campaign")
    create.add_argument("--name", required=True, help="1 to 200 characters")
    create.add_argument(
        "--coupons", type=int, required=True, help="the stock: 1 to 10,000,000 coupons"
    )
    create.add_argument(
        "--starts-at",
        default="now",
        help="when issuance opens: an ISO 8601 time (2026-12-01T12:00:00Z; one without an "
        "offset is UTC), 'now', or a time from now in seconds, minutes, hours or days: "
        "+30s, +5m, +2h, +1d (default: now)",
    )
    create.add_argument("--ends-at", help="when issuance closes, as --starts-at (default: never)")
    create.add_argument(
        "--request-id",
        metavar="ID",
        help="the create's request id (default: a new UUID): the same command run again "
        "with the same ID answers the campaign the first run created instead of creating "
        "another; for a script that may run twice, with --starts-at and --ends-at as ISO "
        "8601 times",
    )
    # A time before now ('-5m') is a value for --starts-at and --ends-at to judge: argparse
    # takes a word starting with '-' for a value only when it reads as a negative number,
    # and would otherwise refuse it as an option it does not know, without saying why.
    create._negative_number_matcher = _DASH_VALUE

    listing = actions.add_parser("list", help="list campaigns, newest first")
    listing.add_argument("--status", choices=sorted(STATUSES), help="only campaigns of this status")
    listing.add_argument(
        "--limit", type=int, default=50, help="at most this many (default 50; 0 for all)"
    )

    show = actions.add_parser("show", help="show one campaign")
    show.add_argument("campaign_id")

    end = actions.add_parser(
        "end",
        help="end issuance now (the kill switch): requests admitted before the end keep "
        "their coupons, nothing is issued after it; ending an ended campaign changes nothing",
    )
    end.add_argument("campaign_id")
    end.add_argument(
        "--yes",
        "-y",
        action="store_true",
        help="end it without asking (it is asked only when run at a terminal)",
    )

    export = actions.add_parser(
        "export", help="write every issued coupon of a campaign, in issue order"
    )
    export.add_argument("campaign_id")
    for action in (create, listing, show, end, export):
        # Also after the action (`campaigns list --url URL --json`); unset there, the value
        # given before it stands.
        action.add_argument("--url", default=argparse.SUPPRESS, help="as before the action")
        action.add_argument(
            "--timeout",
            default=argparse.SUPPRESS,
            metavar="SECONDS",
            help="as before the action",
        )
        action.add_argument(
            "--cacert", default=argparse.SUPPRESS, metavar="FILE", help="as before the action"
        )
        if action is not export:
            action.add_argument(
                "--json",
                action="store_true",
                default=argparse.SUPPRESS,
                help="print the API's JSON instead of a table",
            )
    export.add_argument("--format", choices=EXPORT_FORMATS, default="csv", help="default csv")
    export.add_argument(
        "--output",
        "-o",
        help="write to this file (default, or '-': standard output; ./- for a file named -)",
        metavar="FILE",
    )
    export.add_argument(
        "--excel",
        action="store_true",
        help="CSV for a spreadsheet: a byte-order mark (Hangul opens as UTF-8) and an "
        "apostrophe before a value it would take for a formula (= + - @ first)",
    )


def run(args: argparse.Namespace, environ: dict[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    files = Unfinished()
    url = args.url or ""
    try:
        if args.url:
            _check_url(url, "--url")
        else:
            try:
                url = client_url(env)
            except SettingsError as exc:
                raise UsageError(str(exc)) from None
            _check_url(url, "COUPON_URL")
        url = url.rstrip("/")
        timeout = _timeout(args.timeout, env.get("COUPON_TIMEOUT", ""))
        token = env.get("COUPON_ADMIN_TOKEN", "")
        problem = admin_token_problem(token)
        if problem is not None:
            raise UsageError(problem)
        headers = {"authorization": f"Bearer {token}"} if token else {}
        ca_file = args.cacert or env.get("COUPON_CA_FILE", "")
        try:
            ca_pem = (
                read_ca_file(ca_file, "--cacert" if args.cacert else "COUPON_CA_FILE")
                if ca_file
                else None
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None

        def act() -> None:
            # No deadline for the client as a whole: an export of millions of coupons takes
            # minutes. Each unary call has its own (`timeout`), sent to the service, which
            # then stops what it could not deliver; every connection and every read of the
            # export's stream waits that long at most.
            with (
                pyqwest.SyncHTTPTransport(
                    connect_timeout=timeout,
                    read_timeout=timeout,
                    tls_ca_cert=ca_pem,
                    tls_include_system_certs=ca_pem is None,
                ) as transport,
                CouponServiceClientSync(
                    url, send_compression=None, http_client=pyqwest.SyncClient(transport)
                ) as client,
            ):
                call = Call(client, headers, args.json, files, round(timeout * 1000), url)
                ACTIONS[args.action](call, args)

        interruptible(act)
        # What stdout still buffers is written now, where a reader gone is caught below,
        # not at the interpreter's exit.
        sys.stdout.flush()
    except ConnectError as exc:
        reason = unreachable(exc, url)
        if reason == "timed out":
            print(
                f"coupon: the service at {redacted(url)} did not answer within {timeout:g}s "
                "(--timeout SECONDS waits longer)",
                file=sys.stderr,
            )
        elif reason is not None:
            print(f"coupon: {cannot_reach(url, reason)}", file=sys.stderr)
        elif serves_something_else(exc):
            print(f"coupon: {not_the_service(url)}", file=sys.stderr)
        else:
            print(
                f"coupon: {exc.code.value}: {without_password(exc.message, url)}", file=sys.stderr
            )
        for note in getattr(exc, "__notes__", ()):
            print(f"coupon: {note}", file=sys.stderr)
        return 1
    except UsageError as exc:
        print(f"coupon: {exc}", file=sys.stderr)
        return 2
    except (OutputError, Declined) as exc:
        print(f"coupon: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`| head -1`): nothing more to do or say.
        files.abandon()
        end_as_a_pipeline_writer()
    except KeyboardInterrupt:
        # Ctrl-C: what was being written to a file is removed; nothing more to say.
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C changes nothing
        files.abandon()
        if _ASKING.is_set():
            print(file=sys.stderr)  # the prompt's line ends before the word
        print("coupon: interrupted", file=sys.stderr)
        sys.stderr.flush()
        # The action's thread may still wait for the service (or for a reader of a pipe),
        # in native code nothing can interrupt: the process ends here, at once, rather than
        # at the interpreter's exit, which would wait for it or stop it midway.
        os._exit(130)
    return 0


def end_as_a_pipeline_writer() -> NoReturn:
    """End the process as SIGPIPE ends cat, or any tool of a pipeline whose reader has gone:
    quietly, with the status of that signal (141 in a shell; `set -o pipefail` sees it).
    Python ignores SIGPIPE, so that a write raises BrokenPipeError instead: it is restored
    and raised. What stdout still buffers goes nowhere, as nothing would read it."""
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    os._exit(128 + signal.SIGPIPE)  # not reached: the signal ends the process


def interruptible(work: Callable[[], None]) -> None:
    """Run `work` on a thread of its own and wait for it on this one, the main thread,
    where Ctrl-C raises KeyboardInterrupt at once: the Connect client waits for the
    service in native code, where Python's handler of SIGINT cannot run until the call
    ends or times out. What `work` raises is raised here."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            failure.append(exc)

    worker = threading.Thread(target=target, name="coupon-campaigns", daemon=True)
    worker.start()
    worker.join()  # a lock's wait, which a signal interrupts
    if failure:
        raise failure[0]


def _timeout(option: str | None, variable: str) -> float:
    """--timeout, else $COUPON_TIMEOUT, else the default: seconds, from a millisecond (the
    deadline sent to the service counts whole milliseconds) to an hour."""
    name, text = ("--timeout", option) if option is not None else ("COUPON_TIMEOUT", variable)
    if text == "":
        return DEFAULT_TIMEOUT_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    # nan passes every comparison's negation: finite first.
    if not (math.isfinite(seconds) and MIN_TIMEOUT_SECONDS <= seconds <= MAX_TIMEOUT_SECONDS):
        raise UsageError(
            f"{name} must be a number of seconds from {MIN_TIMEOUT_SECONDS:g} to "
            f"{MAX_TIMEOUT_SECONDS:g} (got {text!r})"
        )
    return seconds


def _check_url(url: str, name: str) -> None:
    problem = url_problem(url, name)
    if problem is not None:
        raise UsageError(problem)


class Call:
    def __init__(
        self,
        client: CouponServiceClientSync,
        headers: dict[str, str],
        as_json: bool,
        files: Unfinished,
        timeout_ms: int,
        url: str,
    ) -> None:
        self.client = client
        self.headers = headers
        self.as_json = as_json
        self.files = files
        # Each unary call's deadline, sent as its connect-timeout-ms.
        self.timeout_ms = timeout_ms
        self.url = url


class Unfinished:
    """The files an action is writing under a temporary name. Ctrl-C is received on
    another thread than the action's (see `interruptible`): `abandon` removes each of them
    there, and from then on none is created or renamed into place."""

    # How long Ctrl-C waits for a file being opened: a regular file opens at once; only
    # something else under the temporary name (a pipe) could hold it.
    WAIT_SECONDS = 1.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: set[Path] = set()
        self._abandoned = False

    def create(self, path: Path) -> IO[str]:
        with self._lock:
            self._refuse_if_abandoned()
            out = path.open("w", newline="", encoding="utf-8")
            self._paths.add(path)
            return out

    def finish(self, path: Path, final: Path) -> None:
        """Rename the complete file into place."""
        with self._lock:
            self._refuse_if_abandoned()
            path.replace(final)
            self._paths.discard(path)

    def discard(self, path: Path) -> None:
        with self._lock:
            path.unlink(missing_ok=True)
            self._paths.discard(path)

    def abandon(self) -> None:
        locked = self._lock.acquire(timeout=self.WAIT_SECONDS)
        try:
            self._abandoned = True
            for path in self._paths:
                path.unlink(missing_ok=True)
            self._paths.clear()
        finally:
            if locked:
                self._lock.release()

    def _refuse_if_abandoned(self) -> None:
        if self._abandoned:
            raise KeyboardInterrupt


# --- actions ------------------------------------------------------------------------------


def _create(call: Call, args: argparse.Namespace) -> None:
    if not -(2**63) <= args.coupons < 2**63:  # what the request cannot carry; the rest the
        # service judges, as for any client
        raise UsageError(
            f"--coupons must be between 1 and {TOTAL_COUPONS_MAX} (got {args.coupons})"
        )

    def window(now: datetime) -> tuple[datetime, datetime | None]:
        starts = parse_time("--starts-at", args.starts_at, now)
        ends = None if args.ends_at is None else parse_time("--ends-at", args.ends_at, now)
        return starts, ends

    if args.request_id == "":
        raise UsageError("--request-id must not be empty (leave it out for a fresh one)")
    starts, ends = window(datetime.now(UTC))  # a bad value is refused before any call
    # 'now' and +N are the service's now: it opens and closes the window by its own clock,
    # which this machine's may be minutes off. An absolute time needs no clock.
    relative = any(_is_relative(t) for t in (args.starts_at, args.ends_at) if t is not None)
    if relative:
        starts, ends = window(service_now(call))
    request = coupon_pb.CreateCampaignRequest(
        name=args.name,
        total_coupons=args.coupons,
        starts_at=Timestamp.from_datetime(starts),
        ends_at=None if ends is None else Timestamp.from_datetime(ends),
        # Every create has one, so that the retries below (and a rerun given the same
        # --request-id) never make a second campaign.
        request_id=str(uuid.uuid4()) if args.request_id is None else args.request_id,
    )
    try:
        response = create_retrying(call, request)
    except ConnectError as exc:
        if exc.code is Code.ALREADY_EXISTS and relative:
            exc.add_note(
                "'now' and +N times are read anew on every run: give --starts-at and "
                "--ends-at as ISO 8601 times with --request-id"
            )
        raise
    assert response.campaign is not None
    _print_campaign(call, response.campaign, response.to_json())


# How long `create` waits before each retry of a CreateCampaign that failed in a way a
# retry could fix; the request, its request id included, is sent again as it was.
CREATE_RETRY_DELAYS = (0.5, 1.0, 2.0)
# Failures to reach the service that may pass (a restart, a connection cut on the way);
# not a name that does not resolve or a TLS failure.
_PASSING = frozenset({"connection refused", "connection reset", "the connection failed"})


def create_retrying(
    call: Call, request: coupon_pb.CreateCampaignRequest
) -> coupon_pb.CreateCampaignResponse:
    """CreateCampaign, sent again with the same request id after a failure that a retry
    could fix (no answer in time, a connection that failed, `unavailable`), saying so on
    stderr: the service answers the campaign the first one created, if it did."""

    def send() -> coupon_pb.CreateCampaignResponse:
        return call.client.create_campaign(
            request, headers=call.headers, timeout_ms=call.timeout_ms
        )

    for retry, delay in enumerate(CREATE_RETRY_DELAYS, start=1):
        try:
            return send()
        except ConnectError as exc:
            why = _passing_failure(exc, call)
            if why is None:
                raise
        print(
            f"coupon: CreateCampaign failed ({why}); retrying in {delay:g}s with the same "
            f"request id (retry {retry} of {len(CREATE_RETRY_DELAYS)})",
            file=sys.stderr,
        )
        time.sleep(delay)
    return send()


def _passing_failure(exc: ConnectError, call: Call) -> str | None:
    """What went wrong, in a few words, when a retry could fix it; else None."""
    reason = unreachable(exc, call.url)
    if exc.code is Code.DEADLINE_EXCEEDED or reason == "timed out":
        return f"no answer within {call.timeout_ms / 1000:g}s"
    if reason is not None:
        return reason if reason in _PASSING else None
    if exc.code is Code.UNAVAILABLE:
        return f"unavailable: {without_password(exc.message, call.url)}"
    return None


# How far this machine's clock may be from the service's before the command says so.
SKEW_NOTED = timedelta(seconds=1)


def service_now(call: Call) -> datetime:
    """The service's clock now: its serverTime from a ListCampaigns of one campaign, moved on
    by the time since (this machine's clock counts the seconds; only its offset is wrong).
    When the service gives no time, this machine's clock, with a warning."""
    before = time.monotonic()
    local_before = datetime.now(UTC)
    page = call.client.list_campaigns(
        coupon_pb.ListCampaignsRequest(page_size=1),
        headers=call.headers,
        timeout_ms=call.timeout_ms,
    )
    round_trip = timedelta(seconds=time.monotonic() - before)
    if page.server_time is None:
        print(
            "coupon: warning: the service gave no time; 'now' and +N times are this "
            "machine's clock, which may not be the service's",
            file=sys.stderr,
        )
        return datetime.now(UTC)
    served: datetime = page.server_time.to_datetime()
    # The service read its clock somewhere in the call, about halfway through (what the
    # note says), at the latest as the answer left: counted from that latest, 'now' is
    # never ahead of the service's clock (a sale created to open now is open at once, not
    # scheduled for part of a second), and behind it by one round trip at most.
    skew: timedelta = served - (local_before + round_trip / 2)
    if abs(skew) > SKEW_NOTED:
        side = "behind" if skew > timedelta(0) else "ahead of"
        print(
            f"coupon: note: this machine's clock is {_duration(abs(skew))} {side} the "
            "service's; 'now' and +N times are the service's",
            file=sys.stderr,
        )
    return datetime.now(UTC) + (served - (local_before + round_trip))


def _duration(span: timedelta) -> str:
    seconds = span.total_seconds()
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (rest, "s")]
    return " ".join(f"{n}{unit}" for n, unit in parts if n) or "0s"


def _list(call: Call, args: argparse.Namespace) -> None:
    if args.limit < 0:
        raise UsageError(f"--limit must be 0 or more (got {args.limit})")
    status = STATUSES[args.status] if args.status else coupon_pb.CampaignStatus.UNSPECIFIED
    campaigns: list[coupon_pb.Campaign] = []
    token = ""
    while True:
        # Pages of exactly what is still wanted: the last page's token then continues
        # right after the last campaign listed.
        wanted = 1000 if args.limit == 0 else min(1000, args.limit - len(campaigns))
        page = call.client.list_campaigns(
            coupon_pb.ListCampaignsRequest(page_size=wanted, page_token=token, status=status),
            headers=call.headers,
            timeout_ms=call.timeout_ms,
        )
        campaigns.extend(page.campaigns)
        token = page.next_page_token
        if not token or (args.limit and len(campaigns) >= args.limit):
            break
    if call.as_json:
        # ListCampaigns' own answer, as `curl` gets it: the campaigns of every page read,
        # with the last page's nextPageToken (set when --limit stopped before the end)
        # and serverTime.
        # `campaigns` is there when empty too (as `[]`, where the API's JSON leaves an
        # empty list out), so that a script can take it without a check.
        answer = coupon_pb.ListCampaignsResponse(
            campaigns=campaigns,
            next_page_token=page.next_page_token,
            server_time=page.server_time,
        ).to_json()
        if not campaigns:
            fields = {"campaigns": [], **json.loads(answer)}
            answer = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
        print(answer)
        return
    rows = [
        (
            c.id,
            c.name,
            _STATUS_NAMES.get(c.status, "?"),
            f"{c.issued_count:,}/{c.total_coupons:,}",
            _time(c.starts_at),
            # The scheduled end, as `show`'s ends_at; when EndCampaign ended it, apart.
            _time(c.ends_at),
            _time(c.ended_at),
        )
        for c in campaigns
    ]
    if not rows:
        # As `kubectl get` says it: on stderr, leaving stdout empty.
        which = f"{args.status} " if args.status else ""
        print(f"coupon: no {which}campaigns", file=sys.stderr)
        return
    print_table(LIST_COLUMNS, rows, sys.stdout)
    if page.next_page_token:
        # --limit stopped the listing and the service has more (a token is given only
        # then): said on stderr, so what reads the table on stdout sees only the table.
        sys.stdout.flush()
        print(
            f"coupon: showing the newest {len(campaigns):,}; more exist: --limit N for "
            "more, --limit 0 for all",
            file=sys.stderr,
        )


def _first_page(call: Call, campaign_id: str) -> coupon_pb.GetCampaignResponse:
    """GetCampaign with a page of one coupon: the campaign, with what is known of it."""
    response = call.client.get_campaign(
        coupon_pb.GetCampaignRequest(campaign_id=campaign_id, page_size=1),
        headers=call.headers,
        timeout_ms=call.timeout_ms,
    )
    assert response.campaign is not None
    return response


def _show(call: Call, args: argparse.Namespace) -> None:
    response = _first_page(call, args.campaign_id)
    assert response.campaign is not None
    # GetCampaign's own answer for a page of one coupon: the campaign, its first coupon,
    # nextPageToken when there are more, and serverTime.
    _print_campaign(call, response.campaign, response.to_json())


def _end(call: Call, args: argparse.Namespace) -> None:
    # An end cannot be undone: at a terminal the operator sees which campaign it is and
    # says yes. A script (no terminal) ends it at once, as it did before any question.
    if not args.yes and _at_a_terminal():
        _confirm_end(call, args.campaign_id)
    response = call.client.end_campaign(
        coupon_pb.EndCampaignRequest(campaign_id=args.campaign_id),
        headers=call.headers,
        timeout_ms=call.timeout_ms,
    )
    assert response.campaign is not None
    campaign = response.campaign
    issued = None
    if response.still_recording < 0:
        # The end is in force, but Redis or PostgreSQL did not answer the count's wait.
        issued = (
            f"{campaign.issued_count:,} of {campaign.total_coupons:,} so far; whether more "
            "are still being recorded is unknown (`coupon campaigns show` gives the final "
            "count)"
        )
    elif response.still_recording:
        # The service's wait for what was admitted before the end ran out: not final yet.
        issued = (
            f"{campaign.issued_count:,} of {campaign.total_coupons:,} so far; "
            f"{response.still_recording:,} still being recorded "
            "(`coupon campaigns show` gives the final count)"
        )
    _print_campaign(call, campaign, response.to_json(), issued=issued)


def _at_a_terminal() -> bool:
    """Whether someone can be asked: stdin and stderr are a terminal (either may also be
    closed, started as `cmd <&-`: then Python has no file for it)."""
    return all(f is not None and f.isatty() for f in (sys.stdin, sys.stderr))


def _confirm_end(call: Call, campaign_id: str) -> None:
    """Name the campaign and wait for the operator's yes; anything else ends nothing."""
    campaign = _first_page(call, campaign_id).campaign
    assert campaign is not None
    if campaign.status == coupon_pb.CampaignStatus.ENDED:
        return  # ending an ended campaign changes nothing: nothing to ask
    sys.stderr.write(
        f"End campaign {campaign.name!r} ({campaign.id}), {campaign.issued_count:,} of "
        f"{campaign.total_coupons:,} issued? No coupon is issued after the end, and it "
        "cannot be undone. [y/N] "
    )
    sys.stderr.flush()
    _ASKING.set()  # a Ctrl-C meanwhile ends the prompt's line first (main)
    answer = sys.stdin.readline()
    _ASKING.clear()
    if not answer.endswith("\n"):
        sys.stderr.write("\n")  # end of input (Ctrl-D): the prompt's line ends here
    if answer.strip().lower() not in ("y", "yes"):
        raise Declined("not ended (answer y to end it; --yes ends it without asking)")


def _export(call: Call, args: argparse.Namespace) -> None:
    if args.json:
        raise UsageError("--json does not apply to export: choose --format csv or jsonl")
    if args.excel and args.format != "csv":
        raise UsageError("--excel applies to --format csv only")
    # The campaign first: a clear error before any output, and the total for the progress.
    # (GetCampaign answers while Redis is down, as the export does: both read PostgreSQL.)
    view = _first_page(call, args.campaign_id)
    assert view.campaign is not None
    total = view.campaign.issued_count
    # `-o -` is standard output, as for curl and kubectl: not a file named "-".
    target = None if args.output in (None, "-") else Path(args.output)
    if target is not None:
        _check_output(target)
    stream = call.client.export_coupons(
        coupon_pb.ExportCouponsRequest(campaign_id=args.campaign_id), headers=call.headers
    )
    # On a terminal, unless the rows go to that same terminal.
    shown = sys.stderr.isatty() and (target is not None or not sys.stdout.isatty())
    progress = Progress(total, sys.stderr) if shown else None
    if target is None:
        written = write_export(stream, args.format, sys.stdout, progress, excel=args.excel)
    else:
        written = _write_file(target, args, stream, progress, call.files)
    if progress is not None:
        progress.done()
    if target is not None:
        print(f"exported {written:,} coupons to {args.output}", file=sys.stderr)


def _write_file(
    target: Path,
    args: argparse.Namespace,
    stream: Iterator[coupon_pb.ExportCouponsResponse],
    progress: Progress | None,
    files: Unfinished,
) -> int:
    """A regular file (or a new one) is written under another name and renamed when
    complete: a file of that name is always a whole export, and nothing is left behind when
    the export fails. Through a symbolic link, the file it points to is replaced and the link
    stays. Anything else (a pipe, /dev/null, a terminal) is written as it is: renaming over
    it would put a file in its place."""
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        mode = None  # a new file, or a link to one still to be made
    except OSError as exc:
        raise _unwritable(args.output, exc) from None
    if mode is not None and not stat.S_ISREG(mode):
        try:
            with target.open("w", newline="", encoding="utf-8") as out:
                return write_export(stream, args.format, out, progress, excel=args.excel)
        except BrokenPipeError:
            raise  # a pipe's reader that stopped early (-o /dev/stdout | head): as on stdout
        except OSError as exc:
            raise _unwritable(args.output, exc) from None
    final = target.resolve() if target.is_symlink() else target
    partial = final.with_name(final.name + ".partial")
    try:
        with files.create(partial) as out:
            if mode is not None:
                # The file replaced keeps its permissions (a file of codes kept 0600 stays
                # so), from before the first code is written.
                partial.chmod(stat.S_IMODE(mode))
            written = write_export(stream, args.format, out, progress, excel=args.excel)
        files.finish(partial, final)
    except OSError as exc:
        files.discard(partial)
        raise _unwritable(args.output, exc) from None
    except BaseException:
        files.discard(partial)
        raise
    return written


def _unwritable(output: str, exc: OSError) -> OutputError:
    return OutputError(f"cannot write {output}: {exc.strerror or exc}")


def _check_output(target: Path) -> None:
    """Refuse, before anything is fetched or written, an output that cannot be a file, or
    that the user may not write: a read-only file is not replaced, though the rename that
    puts a complete export in place would need only its folder to be writable."""
    problem = cannot_write(target)
    if problem is None and target.is_file():
        # A regular file is written beside it and renamed over it (see _write_file).
        folder = (target.resolve() if target.is_symlink() else target).parent
        if not can_create_in(folder):
            problem = directory_not_writable(target, folder)
    if problem is not None:
        raise OutputError(problem)


ACTIONS: dict[str, Callable[[Call, argparse.Namespace], None]] = {
    "create": _create,
    "list": _list,
    "show": _show,
    "end": _end,
    "export": _export,
}


# --- output -------------------------------------------------------------------------------


def write_export(
    stream: Iterator[coupon_pb.ExportCouponsResponse],
    fmt: str,
    out: IO[str],
    progress: Progress | None,
    *,
    excel: bool = False,
) -> int:
    """Write each chunk as it arrives (nothing is held beyond one chunk); rows written.
    With `excel`, the CSV is made for a spreadsheet (see `for_spreadsheet`)."""
    written = 0
    writer = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
    if writer is not None:
        if excel:
            out.write(BOM)
        writer.writerow(CSV_COLUMNS)
    for message in stream:
        for coupon in message.coupons:
            if writer is not None:
                # Only a user id is the caller's text; a code, an id and a time never
                # begin with a formula's character.
                user_id = for_spreadsheet(coupon.user_id) if excel else coupon.user_id
                writer.writerow((coupon.code, user_id, coupon.campaign_id, _iso(coupon.issued_at)))
            else:
                out.write(coupon.to_json())
                out.write("\n")
        written += len(message.coupons)
        if progress is not None:
            progress.update(written)
    out.flush()
    return written


BOM = "\ufeff"
# A spreadsheet opening a CSV runs a cell beginning with one of these as a formula
# (`=HYPERLINK(...)`, `@SUM(...)`, `+cmd|...`; tab and carriage return are skipped first).
FORMULA_FIRST = ("=", "+", "-", "@", "\t", "\r")


def for_spreadsheet(value: str) -> str:
    """The value as a spreadsheet shows it as text: an apostrophe before a leading formula
    character (OWASP's CSV injection advice); any other value unchanged."""
    return "'" + value if value.startswith(FORMULA_FIRST) else value


class Progress:
    """A one-line progress bar on a terminal, redrawn at most five times a second."""

    WIDTH = 30

    def __init__(self, total: int, out: TextIO) -> None:
        self._total = total
        self._out = out
        self._started = time.monotonic()
        self._drawn = 0.0
        self._count = 0

    def update(self, count: int) -> None:
        self._count = count
        now = time.monotonic()
        if now - self._drawn >= 0.2:
            self._drawn = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self._count / max(now - self._started, 1e-9)
        share = min(1.0, self._count / self._total) if self._total else 1.0
        filled = int(share * self.WIDTH)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        self._out.write(
            f"\r[{bar}] {self._count:,}/{self._total:,} coupons ({share:.0%}), {rate:,.0f}/s"
        )
        self._out.flush()

    def done(self) -> None:
        self._draw(time.monotonic())
        self._out.write("\n")
        self._out.flush()


def _print_campaign(
    call: Call, campaign: coupon_pb.Campaign, as_json: str, *, issued: str | None = None
) -> None:
    if call.as_json:
        print(as_json)
        return
    rows = [
        ("id", campaign.id),
        ("name", campaign.name),
        ("status", _STATUS_NAMES.get(campaign.status, "?")),
        ("issued", issued or f"{campaign.issued_count:,} of {campaign.total_coupons:,}"),
        ("starts_at", _time(campaign.starts_at)),
        ("ends_at", _time(campaign.ends_at)),
        ("ended_at", _time(campaign.ended_at)),
        ("created_at", _time(campaign.created_at)),
    ]
    print_table(None, rows, sys.stdout)


def print_table(header: Sequence[str] | None, rows: Sequence[Sequence[str]], out: TextIO) -> None:
    lines = [list(header)] if header else []
    lines += [list(row) for row in rows]
    if not lines:
        return
    widths = [max(_cells(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        cells = (
            cell + " " * (width - _cells(cell)) for cell, width in zip(line, widths, strict=True)
        )
        out.write("  ".join(cells).rstrip())
        out.write("\n")


def _cells(text: str) -> int:
    """How many columns of a terminal `text` takes: two for a wide character (Hangul, CJK,
    most emoji), none for a combining mark or a joiner, one for the rest."""
    if text.isascii():
        return len(text)
    width = 0
    for char in text:
        if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
            continue
        width += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
    return width


def _iso(value: Timestamp | None) -> str:
    if value is None:
        return ""
    return value.to_datetime().isoformat().replace("+00:00", "Z")


def _time(value: Timestamp | None) -> str:
    if value is None:
        return "-"
    return value.to_datetime().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _is_relative(text: str) -> bool:
    """Whether `text` is a time from now ('now' or +N), which needs a clock."""
    return text == "now" or _RELATIVE.match(text) is not None


def parse_time(option: str, text: str, now: datetime) -> datetime:
    """An ISO 8601 time (UTC when no offset is given), 'now', or +N[smhd] from now."""
    if text == "now":
        return now
    relative = _RELATIVE.match(text)
    if relative:
        try:
            return now + timedelta(seconds=float(relative[1]) * _UNIT_SECONDS[relative[2]])
        except OverflowError:
            raise UsageError(f"{option} is too far from now (got {text!r})") from None
    try:
        # RFC 3339 lets the T and the Z be lowercase; fromisoformat takes neither z.
        value = datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"{option} must be an ISO 8601 time such as 2026-12-01T12:00:00Z, 'now' "
            f"or a time from now: +30s, +5m, +2h or +1d (got {text!r})"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
