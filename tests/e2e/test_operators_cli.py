"""`coupon campaigns ...` as an operator runs it: a real process against a real server,
the admin token from the environment, tables or JSON on stdout, one-line errors."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pty
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import unicodedata
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

import httpx
import pytest
from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from coupon.gen.coupon.v1 import coupon_pb
from harness.private_redis import PrivateRedis
from harness.server import ServerProcess, free_port, web_server

TOKEN = "cli-token"
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess(env={"COUPON_ADMIN_TOKEN": TOKEN}, in_memory=True) as proc:
        yield proc


def coupon(
    server: ServerProcess, *args: str, token: str = TOKEN, url: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    env["COUPON_ADMIN_TOKEN"] = token
    if url:
        env["COUPON_URL"] = server.url
    return command(env, None, "campaigns", *args)


def command(env: dict[str, str], cwd: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    """`coupon ARGS...` in its own process, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "coupon", *args],
        env=env,
        cwd=cwd,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def create(server: ServerProcess, name: str, *extra: str) -> dict[str, object]:
    out = ok(coupon(server, "--json", "create", "--name", name, "--coupons", "50", *extra))
    campaign: dict[str, object] = json.loads(out)["campaign"]
    return campaign


def rpc(server: ServerProcess, method: str, body: dict[str, object]) -> dict[str, Any]:
    """One RPC in the Connect protocol's JSON, as `curl` sends it, with the admin token."""
    response = httpx.post(
        f"{server.url}/coupon.v1.CouponService/{method}",
        json=body,
        headers={"authorization": f"Bearer {TOKEN}"},
    )
    response.raise_for_status()
    answer: dict[str, Any] = response.json()
    return answer


def issue(server: ServerProcess, campaign_id: object, users: list[str]) -> None:
    for user in users:
        rpc(server, "IssueCoupon", {"campaignId": campaign_id, "userId": user})


def test_create_list_show_as_tables(server: ServerProcess) -> None:
    out = ok(coupon(server, "create", "--name", "Launch day", "--coupons", "100"))
    assert "Launch day" in out and "active" in out and "0 of 100" in out
    campaign_id = next(line.split()[1] for line in out.splitlines() if line.startswith("id "))
    later = create(server, "Tomorrow", "--starts-at", "+1d")
    listed = ok(coupon(server, "list"))
    header, *rows = listed.splitlines()
    assert header.split() == ["ID", "NAME", "STATUS", "ISSUED", "STARTS", "ENDS", "ENDED"]
    assert rows[0].startswith(str(later["id"])) and "scheduled" in rows[0]
    assert any(row.startswith(campaign_id) and "0/100" in row for row in rows)
    scheduled = ok(coupon(server, "list", "--status", "scheduled"))
    assert str(later["id"]) in scheduled and campaign_id not in scheduled
    shown = ok(coupon(server, "show", campaign_id))
    assert "Launch day" in shown and "status      active" in shown


def table_rows(out: str) -> list[dict[str, str]]:
    """A table's rows as {column: cell}, cut where each header's name begins (a time cell
    holds a space)."""
    header, *lines = out.splitlines()
    names = header.split()
    starts = [header.index(name) for name in names]
    ends = [*starts[1:], None]
    return [
        {name: line[a:b].strip() for name, a, b in zip(names, starts, ends, strict=True)}
        for line in lines
    ]


def table_time(rfc3339: object) -> str:
    """A time as the tables print it: 2026-12-03 09:01:08.580Z."""
    when = datetime.fromisoformat(str(rfc3339).replace("Z", "+00:00"))
    return when.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def test_list_shows_the_scheduled_end_and_when_a_campaign_was_ended_apart(
    server: ServerProcess,
) -> None:
    """ENDS is the end the campaign was created with, as `show`'s ends_at, also once it has
    been ended; ENDED is when EndCampaign ended it, as `show`'s ended_at."""
    running = create(server, "runs to its end", "--ends-at", "+1d")
    ended = create(server, "ended early", "--ends-at", "+2d")
    ended = json.loads(ok(coupon(server, "--json", "end", str(ended["id"]))))["campaign"]
    rows = {row["ID"]: row for row in table_rows(ok(coupon(server, "list", "--limit", "0")))}
    assert rows[str(ended["id"])]["ENDS"] == table_time(ended["endsAt"])
    assert rows[str(running["id"])]["ENDS"] == table_time(running["endsAt"])
    assert rows[str(running["id"])]["ENDED"] == "-"
    assert rows[str(running["id"])]["STATUS"] == "active"
    assert rows[str(ended["id"])]["ENDED"] == table_time(ended["endedAt"])
    assert rows[str(ended["id"])]["STATUS"] == "ended"
    shown = ok(coupon(server, "show", str(ended["id"])))
    assert f"ends_at     {table_time(ended['endsAt'])}" in shown
    assert f"ended_at    {table_time(ended['endedAt'])}" in shown


def test_a_list_cut_by_its_limit_says_so_on_stderr_only(server: ServerProcess) -> None:
    for name in ("cut 1", "cut 2", "cut 3"):
        create(server, name)
    total = len(json.loads(ok(coupon(server, "--json", "list", "--limit", "0")))["campaigns"])
    cut = coupon(server, "list", "--limit", "2")
    assert len(ok(cut).splitlines()) == 1 + 2
    assert cut.stderr == (
        "coupon: showing the newest 2; more exist: --limit N for more, --limit 0 for all\n"
    )
    # All of them, or a limit that leaves none out (exactly the total included): nothing
    # to say; --json carries nextPageToken instead.
    for limit in ("0", str(total), str(total + 1)):
        whole = coupon(server, "list", "--limit", limit)
        assert len(ok(whole).splitlines()) == 1 + total and whole.stderr == "", limit
    listed = coupon(server, "--json", "list", "--limit", "2")
    assert json.loads(ok(listed))["nextPageToken"] and listed.stderr == ""


def test_an_empty_list_says_so_and_its_json_still_has_campaigns() -> None:
    """A script takes `campaigns` without a check (the API's JSON leaves an empty list
    out); a person reads one line on stderr rather than a header over nothing."""
    with ServerProcess(env={"COUPON_ADMIN_TOKEN": TOKEN}, in_memory=True) as empty:
        listed = json.loads(ok(coupon(empty, "--json", "list")))
        assert listed["campaigns"] == [] and "serverTime" in listed
        table = coupon(empty, "list")
        assert (table.returncode, table.stdout, table.stderr) == (0, "", "coupon: no campaigns\n")
        create(empty, "only one")
        active = coupon(empty, "list", "--status", "sold_out")
        assert (active.stdout, active.stderr) == ("", "coupon: no sold_out campaigns\n")
        assert len(json.loads(ok(coupon(empty, "--json", "list")))["campaigns"]) == 1


def test_end_is_the_kill_switch_and_idempotent(server: ServerProcess) -> None:
    campaign = create(server, "to end")
    issue(server, campaign["id"], ["before"])
    first = json.loads(ok(coupon(server, "--json", "end", str(campaign["id"]))))["campaign"]
    again = json.loads(ok(coupon(server, "--json", "end", str(campaign["id"]))))["campaign"]
    assert first["status"] == "CAMPAIGN_STATUS_ENDED" and first["endedAt"]
    assert again["endedAt"] == first["endedAt"]
    refused = httpx.post(
        f"{server.url}/coupon.v1.CouponService/IssueCoupon",
        json={"campaignId": campaign["id"], "userId": "after"},
    )
    assert refused.json()["code"] == "failed_precondition"
    assert "ended" in ok(coupon(server, "show", str(campaign["id"])))


@pytest.mark.parametrize(
    ("still_recording", "said"),
    [
        (15, "15 still being recorded"),
        (-1, "whether more are still being recorded is unknown"),
    ],
)
def test_end_says_when_its_count_is_not_final_yet(still_recording: int, said: str) -> None:
    """EndCampaign waited for the admissions made before the end, in vain (PostgreSQL that
    slow), or could not learn about them (-1: Redis or PostgreSQL failed once the end was
    in force): the table says the count is so far, and where the final one is."""

    class Handler(ProtoHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            campaign = coupon_pb.Campaign(
                id=CAMPAIGN_ID, total_coupons=20_000, issued_count=10_076, status=4
            )
            reply = coupon_pb.EndCampaignResponse(
                campaign=campaign, still_recording=still_recording
            )
            self.answer(reply.to_binary())

    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    with FakeService(Handler) as service:
        env.update({"COUPON_ADMIN_TOKEN": TOKEN, "COUPON_URL": service.url})
        table = ok(command(env, None, "campaigns", "end", "--yes", CAMPAIGN_ID))
        as_json = json.loads(ok(command(env, None, "campaigns", "--json", "end", CAMPAIGN_ID)))
    issued = [line for line in table.splitlines() if line.startswith("issued")]
    assert issued == [
        f"issued      10,076 of 20,000 so far; {said} "
        "(`coupon campaigns show` gives the final count)"
    ], table
    assert as_json["stillRecording"] == str(still_recording)


def at_a_terminal(server: ServerProcess, answer: str | None, *args: str) -> tuple[int, str]:
    """`coupon campaigns ARGS...` with a terminal for stdin, stdout and stderr, `answer`
    typed at it (None: Ctrl-D, the end of input): its exit status and everything it wrote
    to the terminal."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    env |= {"COUPON_ADMIN_TOKEN": TOKEN, "COUPON_URL": server.url}
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "coupon", "campaigns", *args],
        env=env,
        stdin=follower,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    seen = b""
    try:
        while b"[y/N]" not in seen and (chunk := read_terminal(leader, 30)):
            seen += chunk
        if b"[y/N]" in seen:
            os.write(leader, b"\x04" if answer is None else answer.encode() + b"\n")
        status = proc.wait(timeout=60)
        while chunk := read_terminal(leader, 0.2):
            seen += chunk
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
    return status, seen.decode()


def read_terminal(leader: int, wait: float) -> bytes:
    """What the program wrote to its terminal within `wait` seconds; b"" once it has
    closed the terminal (Linux then answers EIO) or wrote nothing in time."""
    if not select.select([leader], [], [], wait)[0]:
        return b""
    try:
        return os.read(leader, 4096)
    except OSError:
        return b""


def test_end_at_a_terminal_names_the_campaign_and_waits_for_yes(server: ServerProcess) -> None:
    campaign = create(server, "asked first")
    issue(server, campaign["id"], ["one"])
    status, seen = at_a_terminal(server, "n", "end", str(campaign["id"]))
    assert status == 1, seen
    assert "End campaign 'asked first'" in seen and "1 of 50 issued" in seen
    assert "coupon: not ended" in seen
    shown = rpc(server, "GetCampaign", {"campaignId": campaign["id"]})["campaign"]
    assert shown["status"] == "CAMPAIGN_STATUS_ACTIVE" and "endedAt" not in shown

    status, seen = at_a_terminal(server, None, "end", str(campaign["id"]))
    assert status == 1 and "coupon: not ended" in seen, seen
    assert "[y/N] coupon" not in seen  # the prompt's line ended first

    status, seen = at_a_terminal(server, "yes", "end", str(campaign["id"]))
    assert status == 0, seen
    assert rpc(server, "GetCampaign", {"campaignId": campaign["id"]})["campaign"]["endedAt"]
    # Ended already: nothing to ask. --yes never asks.
    status, seen = at_a_terminal(server, "", "end", str(campaign["id"]))
    assert status == 0 and "[y/N]" not in seen, seen
    other = create(server, "not asked")
    status, seen = at_a_terminal(server, "", "end", "--yes", str(other["id"]))
    assert status == 0 and "[y/N]" not in seen, seen
    assert rpc(server, "GetCampaign", {"campaignId": other["id"]})["campaign"]["endedAt"]


def test_end_with_stdin_closed_ends_the_campaign_without_asking(server: ServerProcess) -> None:
    """A script started with its input closed (`cmd <&-`) has no terminal to ask at."""
    campaign = create(server, "no input")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    env |= {"COUPON_ADMIN_TOKEN": TOKEN, "COUPON_URL": server.url}
    result = subprocess.run(
        ["sh", "-c", 'exec "$0" -m coupon campaigns end "$1" <&-', sys.executable, campaign["id"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert rpc(server, "GetCampaign", {"campaignId": campaign["id"]})["campaign"]["endedAt"]


def test_export_csv_to_stdout_and_json_lines_to_a_file(
    server: ServerProcess, tmp_path: Path
) -> None:
    campaign = create(server, "export")
    users = [f"user-{i}" for i in range(30)]
    issue(server, campaign["id"], users)
    rows = list(csv.reader(io.StringIO(ok(coupon(server, "export", str(campaign["id"]))))))
    assert rows[0] == ["code", "user_id", "campaign_id", "issued_at"]
    assert [r[1] for r in rows[1:]] == users  # issue order
    assert {r[2] for r in rows[1:]} == {campaign["id"]}
    target = tmp_path / "coupons.jsonl"
    result = coupon(server, "export", str(campaign["id"]), "--format", "jsonl", "-o", str(target))
    ok(result)
    assert "exported 30 coupons" in result.stderr
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert [x["userId"] for x in lines] == users
    assert [x["code"] for x in lines] == [r[0] for r in rows[1:]]
    assert not (tmp_path / "coupons.jsonl.partial").exists()


def test_export_to_dash_is_standard_output_not_a_file_named_dash(
    server: ServerProcess, tmp_path: Path
) -> None:
    """`-o -` is standard output, as for curl and kubectl; `./-` is still a file."""
    campaign = create(server, "dash")
    issue(server, campaign["id"], ["ann", "ben"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    env.update({"COUPON_ADMIN_TOKEN": TOKEN, "COUPON_URL": server.url})
    plain = ok(coupon(server, "export", str(campaign["id"])))
    for output in ("-o", "--output"):
        dashed = command(env, tmp_path, "campaigns", "export", str(campaign["id"]), output, "-")
        assert ok(dashed) == plain and dashed.stderr == ""
    assert list(tmp_path.iterdir()) == []
    jsonl = command(
        env, tmp_path, "campaigns", "export", str(campaign["id"]), "--format", "jsonl", "-o", "-"
    )
    assert [json.loads(line)["userId"] for line in ok(jsonl).splitlines()] == ["ann", "ben"]
    named = command(env, tmp_path, "campaigns", "export", str(campaign["id"]), "-o", "./-")
    assert ok(named) == "" and (tmp_path / "-").read_text() == plain


def first_line_then_close(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """`ARGS | head -1`: the first line read, then the pipe closed while the rest is being
    written; the exit status (negative: the signal that ended it) and stderr."""
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    proc.stdout.close()
    try:
        err = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, line, err


def test_a_reader_that_stops_early_ends_the_command_quietly_as_it_ends_cat(
    server: ServerProcess, tmp_path: Path
) -> None:
    """`campaigns export | head -1`: the command stops writing and ends as cat (and every
    coreutils tool) does when its reader is gone, by SIGPIPE (status 141 in a shell), with
    nothing on stderr; `list` alike."""
    campaign = create(server, "read in part", "--coupons", "1500")
    with httpx.Client(headers={"authorization": f"Bearer {TOKEN}"}) as client:
        for n in range(1500):  # far more than a pipe holds (64 KiB)
            client.post(
                f"{server.url}/coupon.v1.CouponService/IssueCoupon",
                json={"campaignId": campaign["id"], "userId": f"user-{n}"},
            ).raise_for_status()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    env.update({"COUPON_ADMIN_TOKEN": TOKEN, "COUPON_URL": server.url})
    coupon_cmd = [sys.executable, "-m", "coupon", "campaigns"]
    everything = tmp_path / "everything.csv"
    everything.write_text(ok(coupon(server, "export", str(campaign["id"]))))
    cat = first_line_then_close(["cat", str(everything)], env)
    assert cat == (-signal.SIGPIPE, "code,user_id,campaign_id,issued_at\n", "")
    exported = first_line_then_close([*coupon_cmd, "export", str(campaign["id"])], env)
    assert exported == cat
    # The pipe named as the file to write (-o /dev/stdout) ends the same way.
    named = first_line_then_close(
        [*coupon_cmd, "export", str(campaign["id"]), "-o", "/dev/stdout"], env
    )
    assert named == cat
    listed = first_line_then_close([*coupon_cmd, "list", "--limit", "0"], env)
    assert listed[2] == "" and listed[0] in (0, -signal.SIGPIPE), listed


def test_export_for_a_spreadsheet_marks_utf8_and_defuses_formulas(
    server: ServerProcess, tmp_path: Path
) -> None:
    campaign = create(server, "spreadsheet")
    users = ['=HYPERLINK("http://x","y")', "+8210", "-1+1", "@SUM(1)", "a=b", "plain"]
    issue(server, campaign["id"], users)
    plain = ok(coupon(server, "export", str(campaign["id"])))
    assert not plain.startswith("\ufeff")
    assert [r[1] for r in list(csv.reader(io.StringIO(plain)))[1:]] == users  # as issued
    target = tmp_path / "coupons.csv"
    ok(coupon(server, "export", str(campaign["id"]), "--excel", "-o", str(target)))
    data = target.read_bytes()
    assert data.startswith(b"\xef\xbb\xbf"), data[:8]
    rows = list(csv.reader(io.StringIO(data.decode("utf-8-sig"))))
    assert rows[0] == ["code", "user_id", "campaign_id", "issued_at"]
    assert [r[1] for r in rows[1:]] == [
        '\'=HYPERLINK("http://x","y")',
        "'+8210",
        "'-1+1",
        "'@SUM(1)",
        "a=b",
        "plain",
    ]
    assert [r[0] for r in rows[1:]] == [r[0] for r in list(csv.reader(io.StringIO(plain)))[1:]]
    refused = coupon(server, "export", str(campaign["id"]), "--excel", "--format", "jsonl")
    assert refused.returncode == 2
    assert refused.stderr.strip().endswith("--excel applies to --format csv only"), refused.stderr


def test_export_to_a_path_that_cannot_be_a_file_is_one_line_and_leaves_nothing(
    server: ServerProcess, tmp_path: Path
) -> None:
    campaign = create(server, "export nowhere")
    issue(server, campaign["id"], ["someone"])
    folder = tmp_path / "folder"
    folder.mkdir()
    into_dir = coupon(server, "export", str(campaign["id"]), "-o", str(folder))
    assert into_dir.returncode == 1
    assert into_dir.stderr == f"coupon: cannot write {folder}: it is a directory\n"
    missing = tmp_path / "no" / "such" / "x.csv"
    nowhere = coupon(server, "export", str(campaign["id"]), "-o", str(missing))
    assert nowhere.returncode == 1
    assert nowhere.stderr == (
        f"coupon: cannot write {missing}: its directory {missing.parent} does not exist\n"
    )
    assert into_dir.stdout == nowhere.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]
    assert list(folder.iterdir()) == []


# Root may write any file, whatever its mode: as root, the command runs without that
# privilege (CAP_DAC_OVERRIDE), as a user file permissions apply to.
AS_A_USER = (
    ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
)


def as_user(server: ServerProcess, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`coupon campaigns ARGS` as a user whom a file's permissions bind."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    env.update({"COUPON_ADMIN_TOKEN": TOKEN, "COUPON_URL": server.url})
    return subprocess.run(
        [*AS_A_USER, sys.executable, "-m", "coupon", "campaigns", *args],
        env=env,
        cwd=cwd,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_export_over_a_read_only_file_or_into_a_read_only_folder_is_refused(
    server: ServerProcess, tmp_path: Path
) -> None:
    """The complete export is renamed into place, which needs only the folder's permission:
    a file the user may not write is still refused, as a shell's `>` refuses it, and left
    as it was; the file replaced otherwise keeps its permissions."""
    campaign = create(server, "read-only target")
    issue(server, campaign["id"], ["ann"])
    kept = tmp_path / "kept.csv"
    kept.write_text("precious\n")
    kept.chmod(0o444)
    refused = as_user(server, tmp_path, "export", str(campaign["id"]), "-o", "kept.csv")
    assert (refused.returncode, refused.stdout) == (1, "")
    assert refused.stderr == (
        "coupon: cannot write kept.csv: it is read-only to you (permission denied)\n"
    )
    assert kept.read_text() == "precious\n"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o444
    closed = tmp_path / "closed"
    closed.mkdir()
    (closed / "old.csv").write_text("old\n")
    closed.chmod(0o555)  # no file may be created in it, nor renamed into it
    for name in ("new.csv", "old.csv"):
        refused = as_user(server, tmp_path, "export", str(campaign["id"]), "-o", f"closed/{name}")
        assert refused.returncode == 1, refused.stderr
        assert refused.stderr == (
            f"coupon: cannot write closed/{name}: its directory closed is read-only to you "
            "(permission denied)\n"
        )
        assert sorted(p.name for p in closed.iterdir()) == ["old.csv"]
        assert (closed / "old.csv").read_text() == "old\n"
    private = tmp_path / "private.csv"
    private.write_text("old\n")
    private.chmod(0o600)
    ok(as_user(server, tmp_path, "export", str(campaign["id"]), "-o", "private.csv"))
    assert private.read_text().startswith("code,user_id,")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_export_through_a_link_replaces_the_file_it_points_to_and_a_pipe_stays_a_pipe(
    server: ServerProcess, tmp_path: Path
) -> None:
    campaign = create(server, "export into odd places")
    issue(server, campaign["id"], ["a", "b"])
    real = tmp_path / "real"
    real.mkdir()
    (real / "target.csv").write_text("old\n")
    link = tmp_path / "link.csv"
    link.symlink_to(real / "target.csv")
    ok(coupon(server, "export", str(campaign["id"]), "-o", str(link)))
    assert link.is_symlink()
    assert [r[1] for r in csv.reader(io.StringIO((real / "target.csv").read_text()))] == [
        "user_id",
        "a",
        "b",
    ]
    assert sorted(p.name for p in real.iterdir()) == ["target.csv"]
    pipe = tmp_path / "pipe.csv"
    os.mkfifo(pipe)
    read: list[str] = []
    reader = threading.Thread(target=lambda: read.append(pipe.read_text()))
    reader.start()
    result = coupon(server, "export", str(campaign["id"]), "--format", "jsonl", "-o", str(pipe))
    reader.join(timeout=30)
    ok(result)
    assert [json.loads(line)["userId"] for line in read[0].splitlines()] == ["a", "b"]
    assert pipe.is_fifo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.csv", "pipe.csv", "real"]


def test_ctrl_c_during_an_export_is_one_line_and_leaves_nothing(
    server: ServerProcess, tmp_path: Path
) -> None:
    """Interrupted while waiting for a reader of the pipe it writes to."""
    campaign = create(server, "export interrupted")
    pipe = tmp_path / "nobody-reads.csv"
    os.mkfifo(pipe)
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    env.update({"COUPON_ADMIN_TOKEN": TOKEN, "COUPON_URL": server.url})
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "coupon",
            "campaigns",
            "export",
            str(campaign["id"]),
            "-o",
            str(pipe),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not _blocked_opening(proc.pid, pipe):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err == "coupon: interrupted\n" and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nobody-reads.csv"]


CAMPAIGN_ID = "01a23ac5-0000-7000-8000-000000000000"


class ProtoHandler(BaseHTTPRequestHandler):
    """A fake service's handler: HTTP/1.1, silent, answering binary Connect messages."""

    protocol_version = "HTTP/1.1"

    def answer(self, message: bytes) -> None:
        self.send_response(200)
        self.send_header("content-type", "application/proto")
        self.send_header("content-length", str(len(message)))
        self.end_headers()
        self.wfile.write(message)

    def log_message(self, format: str, *args: object) -> None:
        pass


class FakeService:
    """A service of the test's own on a free port, its handler on threads of their own."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class SilentService(FakeService):
    """A listener that takes every call and never answers, but GetCampaign's when asked:
    for an export, whose stream then never sends a coupon."""

    def __init__(self, *, answers_get_campaign: bool) -> None:
        self.called = called = threading.Event()
        self._released = released = threading.Event()
        campaign = coupon_pb.GetCampaignResponse(
            campaign=coupon_pb.Campaign(id=CAMPAIGN_ID, total_coupons=10, issued_count=3)
        ).to_binary()

        class Handler(ProtoHandler):
            def do_POST(self) -> None:
                if answers_get_campaign and self.path.endswith("/GetCampaign"):
                    self.rfile.read(int(self.headers.get("content-length", 0)))
                    self.answer(campaign)
                    return
                called.set()
                released.wait()  # until the test ends

        super().__init__(Handler)

    def __exit__(self, *_: object) -> None:
        self._released.set()
        super().__exit__()


@pytest.mark.parametrize(
    "action",
    [
        ["list"],
        ["show", CAMPAIGN_ID],
        ["create", "--name", "n", "--coupons", "5"],
        ["end", CAMPAIGN_ID],
        ["export", CAMPAIGN_ID],
        ["export", CAMPAIGN_ID, "-o", "coupons.csv"],
        ["export", CAMPAIGN_ID, "--format", "jsonl", "-o", "coupons.jsonl"],
    ],
    ids=" ".join,
)
def test_ctrl_c_while_the_service_never_answers_ends_the_command_at_once(
    tmp_path: Path, action: list[str]
) -> None:
    """The call waits for the service in native code: Ctrl-C still ends the command at
    once, rather than when its time-out (--timeout, 10 s by default; for an export's
    stream, a read's) ends; the file being exported is removed."""
    export = action[0] == "export"
    output = tmp_path / action[-1] if "-o" in action else None
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    env["COUPON_ADMIN_TOKEN"] = TOKEN
    with SilentService(answers_get_campaign=export) as service:
        proc = subprocess.Popen(
            [sys.executable, "-m", "coupon", "campaigns", "--url", service.url, *action],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert service.called.wait(30), "the call never came"
            if output is not None:  # being written under another name, until complete
                partial = output.with_name(output.name + ".partial")
                deadline = time.monotonic() + 30
                while not partial.exists():
                    assert proc.poll() is None and time.monotonic() < deadline
                    time.sleep(0.05)
            time.sleep(0.3)  # well inside the call's wait
            assert proc.poll() is None
            signalled = time.monotonic()
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=10)
            elapsed = time.monotonic() - signalled
        finally:
            proc.kill()
    assert proc.returncode == 130, err
    assert err == "coupon: interrupted\n"
    assert elapsed < 3, elapsed
    if action != ["export", CAMPAIGN_ID]:  # rows to stdout may have begun
        assert out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == []


class StalledService(SilentService):
    """SilentService that keeps the connect-timeout-ms each call carried (None: none)."""

    def __init__(self, *, answers_get_campaign: bool) -> None:
        super().__init__(answers_get_campaign=answers_get_campaign)
        self.deadlines: dict[str, str | None] = {}
        handler = self._server.RequestHandlerClass
        deadlines = self.deadlines

        class Recording(handler):  # type: ignore[valid-type,misc]
            def do_POST(self) -> None:
                deadlines[self.path.rsplit("/", 1)[-1]] = self.headers.get("connect-timeout-ms")
                super().do_POST()

        self._server.RequestHandlerClass = Recording


@pytest.mark.parametrize(
    ("action", "rpc"),
    [
        (["list"], "ListCampaigns"),
        (["show", CAMPAIGN_ID], "GetCampaign"),
        (["create", "--name", "n", "--coupons", "5"], "ListCampaigns"),  # the service's now
        (["end", CAMPAIGN_ID], "EndCampaign"),
        (["export", CAMPAIGN_ID], "ExportCoupons"),
        (["export", CAMPAIGN_ID, "-o", "coupons.csv"], "ExportCoupons"),
    ],
    ids=" ".join,
)
def test_a_service_that_never_answers_is_given_up_on_after_the_timeout(
    tmp_path: Path, action: list[str], rpc: str
) -> None:
    """A socket that takes the call and never answers: --timeout (or $COUPON_TIMEOUT) ends
    the wait, in one line naming the service, with exit status 1; a unary call tells the
    service its deadline (connect-timeout-ms), the export's stream, which may rightly last
    minutes, has none but waits as long for each read."""
    export = action[0] == "export"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    env["COUPON_ADMIN_TOKEN"] = TOKEN
    for where in ("option", "environment"):
        with StalledService(answers_get_campaign=export) as service:
            given = ["--timeout", "1.5"] if where == "option" else []
            if where == "environment":
                env["COUPON_TIMEOUT"] = "1.5"
            started = time.monotonic()
            result = command(env, tmp_path, "campaigns", "--url", service.url, *given, *action)
            elapsed = time.monotonic() - started
        assert result.returncode == 1, result.stderr
        assert result.stderr == (
            f"coupon: the service at {service.url} did not answer within 1.5s "
            "(--timeout SECONDS waits longer)\n"
        )
        assert elapsed < 25, elapsed  # not the default 10 s twice over, nor forever
        assert service.deadlines[rpc] == (None if export else "1500"), service.deadlines
        if export:
            assert service.deadlines["GetCampaign"] == "1500"
        assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("given", "name", "got"),
    [
        (["--timeout", "0"], "--timeout", "0"),
        (["--timeout", "0.0001"], "--timeout", "0.0001"),
        (["--timeout", "nan"], "--timeout", "nan"),
        (["list", "--timeout", "soon"], "--timeout", "soon"),
        ([], "COUPON_TIMEOUT", "-1"),
    ],
)
def test_a_bad_timeout_is_one_line_and_exit_2(
    server: ServerProcess, given: list[str], name: str, got: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    env.update({"COUPON_ADMIN_TOKEN": TOKEN, "COUPON_URL": server.url, "COUPON_TIMEOUT": "-1"})
    args = given if given[:1] == ["list"] else [*given, "list"]
    result = command(env, None, "campaigns", *args)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"coupon: {name} must be a number of seconds from 0.001 to 3600 (got {got!r})\n"
    )


def test_the_timeout_option_wins_over_the_environment(server: ServerProcess) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    env.update({"COUPON_ADMIN_TOKEN": TOKEN, "COUPON_URL": server.url, "COUPON_TIMEOUT": "x"})
    assert "ID" in ok(command(env, None, "campaigns", "list", "--timeout", "30"))


def _blocked_opening(pid: int, path: Path) -> bool:
    """Whether a thread of the process waits in open() for a reader of that pipe (the
    action runs on a thread of its own). The kernel names the wait (wchan: Linux's
    `wait_for_partner`, `fifo_open` in older ones); where it hides it, the same open() call
    still waiting 0.3 s later, which no open() of a module being imported at start-up
    does: a Ctrl-C sent during start-up would test something else."""
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            syscall = (task / "syscall").read_text()
            wchan = (task / "wchan").read_text()
        except OSError:
            continue
        if "fifo" in wchan or "wait_for_partner" in wchan:
            return True
        if wchan in ("", "0") and syscall.split()[:1] in (["2"], ["257"]):  # open, openat
            time.sleep(0.3)
            with contextlib.suppress(OSError):
                if (task / "syscall").read_text() == syscall:
                    return True
    return False


def test_a_table_lines_up_hangul_names_by_their_width_on_a_terminal(
    server: ServerProcess,
) -> None:
    create(server, "봄맞이 세일")
    create(server, "plain name")
    header, *rows = ok(coupon(server, "list", "--limit", "2")).splitlines()

    def column(line: str, at: str) -> int:
        before = line[: line.index(at)]
        return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in before)

    starts = {
        column(line, word)
        for line, word in zip([header, *rows], ["STATUS", "active", "active"], strict=True)
    }
    assert len(starts) == 1, [header, *rows]


def test_errors_are_one_line_with_a_nonzero_exit(server: ServerProcess) -> None:
    missing = coupon(server, "show", "0192f5e0-7c1a-7b3e-9d2a-5b1c2d3e4f50")
    assert missing.returncode == 1
    assert missing.stderr == (
        "coupon: not_found: campaign 0192f5e0-7c1a-7b3e-9d2a-5b1c2d3e4f50 does not exist\n"
    )
    wrong = coupon(server, "list", token="not-the-token")
    assert wrong.returncode == 1 and wrong.stderr.startswith("coupon: unauthenticated: ")
    assert len(wrong.stderr.splitlines()) == 1
    bad = coupon(server, "create", "--name", "x", "--coupons", "0")
    assert bad.returncode == 1
    assert bad.stderr.startswith("coupon: invalid_argument: total_coupons")
    usage = coupon(server, "create", "--name", "x", "--coupons", "5", "--starts-at", "soon")
    assert usage.returncode == 2 and "--starts-at" in usage.stderr
    assert usage.stdout == ""
    # Every unit a relative time takes is listed, days included.
    assert "+30s, +5m, +2h or +1d" in usage.stderr and len(usage.stderr.splitlines()) == 1


def test_times_in_an_error_are_written_as_every_other_time_the_command_prints(
    server: ServerProcess,
) -> None:
    """The service's message quotes its times with Z (RFC 3339 UTC), to the microsecond, as
    the command's tables and exports write them."""
    backwards = coupon(
        server, "create", "--name", "x", "--coupons", "5",
        "--starts-at", "2100-01-02T03:04:05.250Z", "--ends-at", "2100-01-01T00:00:00Z",
    )  # fmt: skip
    assert (backwards.returncode, backwards.stdout) == (1, "")
    assert backwards.stderr == (
        "coupon: invalid_argument: ends_at: must be after starts_at "
        "(2100-01-02T03:04:05.250000Z); got 2100-01-01T00:00:00Z\n"
    )


@pytest.mark.parametrize(
    "action",
    [
        ["list"],
        ["show", CAMPAIGN_ID],
        ["create", "--name", "n", "--coupons", "5", "--starts-at", "2026-01-01T00:00:00Z"],
        ["create", "--name", "n", "--coupons", "5"],
        ["end", CAMPAIGN_ID],
        ["export", CAMPAIGN_ID],
    ],
    ids=" ".join,
)
def test_a_wrong_token_is_said_refused_and_a_missing_one_missing(
    server: ServerProcess, action: list[str]
) -> None:
    """Like `gh`'s "Bad credentials": a token the service does not take is not reported as
    no token at all, whichever RPC the command calls."""
    wrong = coupon(server, *action, token="not-the-token")
    assert wrong.returncode == 1 and wrong.stdout == ""
    assert wrong.stderr == (
        "coupon: unauthenticated: the token given is not the service's COUPON_ADMIN_TOKEN\n"
    )
    missing = coupon(server, *action, token="")
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr == (
        "coupon: unauthenticated: this RPC needs the header "
        "'Authorization: Bearer <COUPON_ADMIN_TOKEN>'\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["create", "--name", "x", "--coupons", "5", "--starts-at", "+99999999999d"],
            "coupon: --starts-at is too far from now (got '+99999999999d')",
        ),
        # A time before now reaches the command, which says what it takes, rather than
        # being taken for an option that is not there.
        (
            ["create", "--name", "x", "--coupons", "5", "--starts-at", "-5m"],
            "coupon: --starts-at must be an ISO 8601 time such as 2026-12-01T12:00:00Z, 'now' "
            "or a time from now: +30s, +5m, +2h or +1d (got '-5m')",
        ),
        (
            ["create", "--name", "x", "--coupons", "5", "--ends-at", "-1d"],
            "coupon: --ends-at must be an ISO 8601 time such as 2026-12-01T12:00:00Z, 'now' "
            "or a time from now: +30s, +5m, +2h or +1d (got '-1d')",
        ),
        (
            ["create", "--name", "x", "--coupons", "99999999999999999999"],
            "coupon: --coupons must be between 1 and 10000000 (got 99999999999999999999)",
        ),
        (
            ["--url", "http://127.0.0.1:99999", "list"],
            "coupon: --url has no valid port: 1 to 65535 (got 'http://127.0.0.1:99999')",
        ),
        (["--url", "http://:8000", "list"], "coupon: --url names no host (got 'http://:8000')"),
        (
            ["--url", "http://127.0.0.1:0", "list"],
            "coupon: --url has no valid port: 1 to 65535 (got 'http://127.0.0.1:0')",
        ),
        (
            ["--url", "http://[::1:8000", "list"],
            "coupon: --url must be a URL (Invalid IPv6 URL; got 'http://[::1:8000')",
        ),
        (
            ["--url", "http://%zz", "list"],
            "coupon: --url must be a URL (invalid international domain name; got 'http://%zz')",
        ),
        (
            ["--url", "http://[fe80::1%25eth0]:8000", "list"],
            "coupon: --url must be a URL (invalid IPv6 address; "
            "got 'http://[fe80::1%25eth0]:8000')",
        ),
    ],
)
def test_a_bad_option_is_one_line_and_exit_2(
    server: ServerProcess, args: list[str], message: str
) -> None:
    result = coupon(server, *args)
    assert (result.returncode, result.stderr, result.stdout) == (2, message + "\n", "")


def test_a_token_no_header_can_carry_or_a_bad_dotenv_is_one_line_and_exit_2(
    server: ServerProcess, tmp_path: Path
) -> None:
    newline = coupon(server, "list", token=TOKEN + "\n")
    assert newline.returncode == 2
    assert newline.stderr == (
        "coupon: COUPON_ADMIN_TOKEN must be printable ASCII without spaces, as an HTTP "
        "header carries it (got '\\n' at 9)\n"
    )
    (tmp_path / ".env").write_text("this line is bad\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    broken = command(env, tmp_path, "campaigns", "--url", server.url, "list")
    assert broken.returncode == 2
    assert broken.stderr.startswith("coupon: ") and len(broken.stderr.splitlines()) == 1
    assert ".env" in broken.stderr


def test_a_url_that_is_not_the_service_is_said_plainly(
    server: ServerProcess, tmp_path: Path
) -> None:
    result = coupon(server, "--url", server.url + "/api", "list", url=False)
    assert result.returncode == 1
    assert result.stderr == (
        f"coupon: {server.url}/api does not serve the coupon API (its paths are not "
        "found there); give the service's base URL, such as http://127.0.0.1:8000\n"
    )
    # Another web server, whose 404 has a page of its own.
    port = free_port()
    (tmp_path / "index.html").write_text("a site")
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    with web_server(argv, port, cwd=tmp_path) as url:
        elsewhere = coupon(server, "--url", url, "list", url=False)
    assert elsewhere.returncode == 1
    assert elsewhere.stderr.startswith(f"coupon: {url} does not serve the coupon API"), (
        elsewhere.stderr
    )


def test_a_password_in_the_url_is_never_printed(server: ServerProcess) -> None:
    # As the server prints DATABASE_URL and REDIS_URL: the user, never the password.
    port = urlsplit(server.url).port
    closed = free_port()
    with socket.create_server(("127.0.0.1", 0)) as silent:
        quiet = silent.getsockname()[1]
        for url, said in (
            (
                f"http://admin:hunter2@127.0.0.1:{closed}",
                f"cannot reach the service at http://admin:***@127.0.0.1:{closed}: "
                "connection refused",
            ),
            (
                f"http://admin:hunter2@127.0.0.1:{quiet}",
                f"the service at http://admin:***@127.0.0.1:{quiet} did not answer within 1s",
            ),
            (
                f"http://admin:hunter2@127.0.0.1:{port}/api",
                f"http://admin:***@127.0.0.1:{port}/api does not serve the coupon API",
            ),
            (
                "http://admin:hunter2@127.0.0.1:99999",
                "--url has no valid port: 1 to 65535 (got 'http://admin:***@127.0.0.1:99999')",
            ),
            ("ftp://admin:hunter2@host", "--url must start with http:// or https://"),
        ):
            result = coupon(server, "--url", url, "--timeout", "1", "list", url=False)
            assert result.returncode in (1, 2), result.stderr
            assert result.stderr.startswith(f"coupon: {said}"), result.stderr
            assert "hunter2" not in result.stderr + result.stdout


def test_list_show_and_export_work_while_redis_is_down(server_env: dict[str, str]) -> None:
    """What the operator reads is in PostgreSQL: an outage of the gate does not hide it."""
    private = PrivateRedis()
    try:
        with ServerProcess(
            env={**server_env, "REDIS_URL": private.url, "COUPON_ADMIN_TOKEN": TOKEN}
        ) as proc:
            campaign = create(proc, "export without redis")
            issue(proc, campaign["id"], ["a", "b", "c"])
            private.kill()
            shown = ok(coupon(proc, "show", str(campaign["id"])))
            assert "export without redis" in shown and "3 of 50" in shown, shown
            assert str(campaign["id"]) in ok(coupon(proc, "list"))
            rows = list(csv.reader(io.StringIO(ok(coupon(proc, "export", str(campaign["id"]))))))
            assert [r[1] for r in rows] == ["user_id", "a", "b", "c"]
    finally:
        private.close()


def test_create_help_lists_every_unit_and_that_a_bare_time_is_utc(server: ServerProcess) -> None:
    helped = " ".join(ok(coupon(server, "create", "--help")).split())
    assert "+30s, +5m, +2h, +1d" in helped
    assert "without an offset is UTC" in helped
    bare = create(server, "bare time", "--starts-at", "2031-06-01T12:00:00")
    assert bare["startsAt"] == "2031-06-01T12:00:00Z"


def test_a_lowercase_rfc_3339_time_is_taken(server: ServerProcess) -> None:
    # RFC 3339 (5.6) lets the T and the Z be lowercase.
    lower = create(server, "lowercase time", "--starts-at", "2031-06-01t12:00:00z")
    assert lower["startsAt"] == "2031-06-01T12:00:00Z"
    mixed = create(
        server, "mixed", "--starts-at", "2031-06-01T12:00:00z", "--ends-at", "2031-06-02t00:00:00Z"
    )
    assert (mixed["startsAt"], mixed["endsAt"]) == ("2031-06-01T12:00:00Z", "2031-06-02T00:00:00Z")


def test_the_url_comes_from_the_option_or_the_environment(server: ServerProcess) -> None:
    assert "ID" in ok(coupon(server, "--url", server.url, "list", url=False))
    # After the action too, where it wins over the one before it.
    campaign = create(server, "url after the action")
    after = ok(
        coupon(server, "--url", "http://127.0.0.1:9", "list", "--url", server.url, url=False)
    )
    assert "url after the action" in after
    exported = coupon(server, "export", str(campaign["id"]), "--url", server.url, url=False)
    assert ok(exported).startswith("code,")
    default = coupon(server, "--url", "http://127.0.0.1:9", "list", url=False)
    assert default.returncode == 1
    assert default.stderr == (
        "coupon: cannot reach the service at http://127.0.0.1:9: connection refused\n"
    )


@pytest.mark.parametrize("action", [["list"], ["show", "x"], ["export", "x"], ["end", "x"]])
@pytest.mark.parametrize(
    ("where", "reason"),
    [
        ("http://127.0.0.1:{closed}", "connection refused"),
        ("http://no-such-host.invalid:8000", "name not resolved"),
        (
            "https://127.0.0.1:{port}",
            "the port does not speak TLS (use http:// in --url or COUPON_URL)",
        ),
    ],
)
def test_an_unreachable_service_is_one_plain_line(
    server: ServerProcess, action: list[str], where: str, reason: str
) -> None:
    url = where.format(closed=free_port(), port=urlsplit(server.url).port)
    result = coupon(server, "--url", url, *action, url=False)
    assert result.returncode == 1
    assert result.stderr == f"coupon: cannot reach the service at {url}: {reason}\n"
    assert result.stdout == ""


def test_the_url_and_token_come_from_dotenv_and_server_settings_do_not_matter(
    server: ServerProcess, tmp_path: Path
) -> None:
    """A client of a running service reads COUPON_URL and COUPON_ADMIN_TOKEN from ./.env as
    serve reads its settings, and a server-only setting it does not use (a bad
    DATABASE_URL, WORKERS=0, production without a token) does not stop it."""
    (tmp_path / ".env").write_text(f"COUPON_URL={server.url}\nCOUPON_ADMIN_TOKEN={TOKEN}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COUPON_", "DATABASE_URL"))}
    env.update({"DATABASE_URL": "garbage", "WORKERS": "0", "APP_ENV": "production"})
    for args in (["campaigns", "list"], ["loadtest", "--help"]):
        result = command(env, tmp_path, *args)
        assert result.returncode == 0, (args, result.stderr)
    # The environment still wins over .env.
    env["COUPON_ADMIN_TOKEN"] = "wrong"
    refused = command(env, tmp_path, "campaigns", "list")
    assert refused.returncode == 1 and "unauthenticated" in refused.stderr, refused.stderr


def test_without_coupon_url_the_client_calls_the_port_serve_listens_on(
    server: ServerProcess, tmp_path: Path
) -> None:
    """The .env that moved `coupon serve` to another PORT moves its clients with it; a
    COUPON_URL still wins."""
    port = urlsplit(server.url).port
    assert port is not None and port != 8000
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COUPON_", "PORT"))}
    env["COUPON_ADMIN_TOKEN"] = TOKEN
    (tmp_path / ".env").write_text(f"PORT={port}\n")
    listed = command(env, tmp_path, "campaigns", "list")
    assert listed.returncode == 0, listed.stderr
    (tmp_path / ".env").write_text(f"PORT={port}\nCOUPON_URL=http://127.0.0.1:1\n")
    refused = command(env, tmp_path, "campaigns", "list")
    assert refused.returncode == 1 and "http://127.0.0.1:1" in refused.stderr, refused.stderr
    # A PORT serve would refuse is said to be wrong, not replaced by 8000.
    (tmp_path / ".env").write_text(f"PORT={port}#x\n")
    bad = command(env, tmp_path, "campaigns", "list")
    assert (bad.returncode, bad.stdout) == (2, ""), bad.stderr
    assert bad.stderr.startswith(f"coupon: PORT must be a port number, 1 to 65535 (got '{port}#x')")


def test_json_is_read_before_or_after_the_action_and_refused_for_export(
    server: ServerProcess,
) -> None:
    campaign = create(server, "either side")
    after = json.loads(ok(coupon(server, "show", str(campaign["id"]), "--json")))
    before = json.loads(ok(coupon(server, "--json", "show", str(campaign["id"]))))
    assert after["campaign"] == before["campaign"] and after["campaign"]["id"] == campaign["id"]
    listed = json.loads(ok(coupon(server, "list", "--json")))
    assert campaign["id"] in {c["id"] for c in listed["campaigns"]}
    refused = coupon(server, "--json", "export", str(campaign["id"]))
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip() == (
        "coupon: --json does not apply to export: choose --format csv or jsonl"
    )


def test_json_is_the_rpcs_own_answer(server: ServerProcess) -> None:
    """Every --json output is the corresponding RPC's answer in canonical Connect JSON, so a
    script reads the CLI and `curl` alike: the same keys, the same values (serverTime
    aside, a clock reading)."""

    def same(cli: dict[str, Any], api: dict[str, Any]) -> None:
        assert cli.keys() == api.keys(), (cli, api)
        assert {k: v for k, v in cli.items() if k != "serverTime"} == {
            k: v for k, v in api.items() if k != "serverTime"
        }

    out = json.loads(ok(coupon(server, "--json", "create", "--name", "shape", "--coupons", "9")))
    assert out.keys() == {"campaign"}
    campaign_id = out["campaign"]["id"]
    issue(server, campaign_id, ["ann", "ben"])
    shown = json.loads(ok(coupon(server, "--json", "show", campaign_id)))
    page = rpc(server, "GetCampaign", {"campaignId": campaign_id, "pageSize": 1})
    assert shown.keys() == {"campaign", "coupons", "nextPageToken", "serverTime"}
    same(shown, page)
    create(server, "shape 2")
    create(server, "shape 3")
    listed = json.loads(ok(coupon(server, "--json", "list", "--limit", "2")))
    first = rpc(server, "ListCampaigns", {"pageSize": 2})
    assert listed.keys() == {"campaigns", "nextPageToken", "serverTime"}
    same(listed, first)
    rest = json.loads(ok(coupon(server, "--json", "list", "--limit", "0")))
    assert "nextPageToken" not in rest and "serverTime" in rest
    ended = json.loads(ok(coupon(server, "--json", "end", campaign_id)))
    assert ended.keys() == {"campaign"}
    same(ended, rpc(server, "EndCampaign", {"campaignId": campaign_id}))


def _when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.mark.skipif(shutil.which("faketime") is None, reason="faketime (just test-deps)")
def test_now_and_times_from_now_are_the_services_clock_not_this_machines(
    server: ServerProcess,
) -> None:
    """An operator whose clock is 10 minutes slow creates a sale "in 2 minutes": it opens 2
    minutes after the service's now, which decides the window, not at once; the command
    says the clocks differ."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    env.update({"COUPON_ADMIN_TOKEN": TOKEN, "COUPON_URL": server.url})
    for shift, side in (("-10m", "behind"), ("+10m", "ahead of")):
        before = _when(rpc(server, "ListCampaigns", {"pageSize": 1})["serverTime"])
        args = ["create", "--name", f"slow laptop {shift}", "--coupons", "5"]
        args += ["--starts-at", "+2m", "--ends-at", "+1d"]
        result = subprocess.run(
            ["faketime", "-f", shift, sys.executable, "-m", "coupon", "campaigns", "--json", *args],
            env=env,
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        after = _when(rpc(server, "ListCampaigns", {"pageSize": 1})["serverTime"])
        campaign = json.loads(ok(result))["campaign"]
        starts, ends = _when(campaign["startsAt"]), _when(campaign["endsAt"])
        slack = timedelta(seconds=1)
        assert before + timedelta(minutes=2) - slack <= starts <= after + timedelta(minutes=2)
        assert ends - starts == timedelta(days=1) - timedelta(minutes=2)
        assert campaign["status"] == "CAMPAIGN_STATUS_SCHEDULED"
        assert result.stderr.startswith(f"coupon: note: this machine's clock is 10m {side} ")
        assert len(result.stderr.splitlines()) == 1
    # The same clock as the service's: nothing to say.
    same = coupon(server, "create", "--name", "on time", "--coupons", "5", "--starts-at", "+2m")
    assert ok(same) and same.stderr == ""


class LateClockService(FakeService):
    """A service that reads its clock (this machine's) for ListCampaigns' serverTime only
    after a second, as one busy or a new connection's set-up would, then answers at once;
    CreateCampaign echoes the start it is sent and keeps its clock's time then."""

    def __init__(self) -> None:
        self.created_at: list[datetime] = []
        created_at = self.created_at

        class Handler(ProtoHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path.endswith("/CreateCampaign"):
                    created_at.append(datetime.now(UTC))
                    sent = coupon_pb.CreateCampaignRequest.from_binary(body)
                    answer = coupon_pb.CreateCampaignResponse(
                        campaign=coupon_pb.Campaign(id=CAMPAIGN_ID, starts_at=sent.starts_at)
                    ).to_binary()
                else:
                    time.sleep(1.0)
                    answer = coupon_pb.ListCampaignsResponse(
                        server_time=Timestamp.from_datetime(datetime.now(UTC))
                    ).to_binary()
                self.answer(answer)

        super().__init__(Handler)


def test_now_is_never_ahead_of_the_services_clock() -> None:
    """The service may read its clock anywhere in the call that tells it: 'now' counts from
    the latest it can have, so a sale created to open now is open at once, never scheduled
    for a fraction of a second; the clocks (the same here) are not said to differ."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    env.update({"COUPON_ADMIN_TOKEN": TOKEN})
    with LateClockService() as service:
        args = ["--url", service.url, "--json", "create", "--name", "n", "--coupons", "5"]
        result = command(env, None, "campaigns", *args)
    starts = _when(json.loads(ok(result))["campaign"]["startsAt"])
    assert starts <= service.created_at[0], (starts, service.created_at)
    assert result.stderr == ""


class TimelessService(FakeService):
    """A service whose ListCampaigns answers without serverTime; CreateCampaign echoes the
    start and end it is sent."""

    def __init__(self) -> None:
        class Handler(ProtoHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path.endswith("/CreateCampaign"):
                    sent = coupon_pb.CreateCampaignRequest.from_binary(body)
                    answer = coupon_pb.CreateCampaignResponse(
                        campaign=coupon_pb.Campaign(
                            id=CAMPAIGN_ID, starts_at=sent.starts_at, ends_at=sent.ends_at
                        )
                    ).to_binary()
                else:
                    answer = coupon_pb.ListCampaignsResponse().to_binary()
                self.answer(answer)

        super().__init__(Handler)


def test_a_service_that_gives_no_time_leaves_this_machines_clock_with_a_warning() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    with TimelessService() as service:
        env.update({"COUPON_ADMIN_TOKEN": TOKEN, "COUPON_URL": service.url})
        before = datetime.now(UTC)
        result = command(
            env, None, "campaigns", "--json", "create", "--name", "n", "--coupons", "5"
        )
        after = datetime.now(UTC)
    starts = _when(json.loads(ok(result))["campaign"]["startsAt"])
    assert before <= starts <= after
    assert result.stderr.startswith("coupon: warning: the service gave no time; ")
    assert len(result.stderr.splitlines()) == 1
