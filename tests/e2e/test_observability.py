"""/metrics adds up every worker; logs are JSON lines carrying a request id."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from harness.client import connect_client, create_campaign
from harness.private_redis import PrivateRedis
from harness.raw_http import open_connection, read_response
from harness.server import ServerProcess, free_port
from harness.server import metric_value as metric
from harness.services import table_locked

pytestmark = pytest.mark.e2e
ISSUE = "/coupon.v1.CouponService/IssueCoupon"
CREATE = "/coupon.v1.CouponService/CreateCampaign"


@pytest.fixture(scope="module")
def server(server_env: dict[str, str]) -> Iterator[ServerProcess]:
    with ServerProcess(env=server_env, workers=2) as proc:
        yield proc


def test_metrics_count_every_worker_s_requests_and_issues(server: ServerProcess) -> None:
    created = httpx.post(
        f"{server.url}{CREATE}",
        json={"name": "metrics", "totalCoupons": 30, "startsAt": "2026-01-01T00:00:00Z"},
        headers={"x-request-id": "create-42"},
    ).json()["campaign"]["id"]
    # New connections each time, so the requests spread over both workers.
    for i in range(40):
        httpx.post(f"{server.url}{ISSUE}", json={"campaignId": created, "userId": f"u{i % 35}"})
    wanted = [  # (metric, labels, at least)
        ("coupon_coupons_issued_total", {"campaign_id": created}, 30),
        ("coupon_rpc_requests_total", {"rpc": "IssueCoupon", "code": "ok"}, 35),
        ("coupon_issue_rejections_total", {"reason": "sold_out"}, 5),
        ("coupon_issue_rejections_total", {"reason": "already_issued"}, 5),
        ("coupon_rpc_duration_seconds_count", {"rpc": "IssueCoupon"}, 40),
        ("coupon_db_batch_size_count", {}, 1),
        ("coupon_db_commit_seconds_count", {}, 1),
    ]

    def short(text: str) -> list[str]:
        return [
            f"{name}{labels} = {metric(text, name, **labels)} < {least}"
            for name, labels, least in wanted
            if metric(text, name, **labels) < least
        ]

    # Each worker writes its tallies out every second: the other worker's are that late.
    deadline = time.monotonic() + 10
    text = httpx.get(f"{server.url}/metrics").text
    while short(text) and time.monotonic() < deadline:
        time.sleep(0.2)
        text = httpx.get(f"{server.url}/metrics").text
    assert short(text) == []
    assert metric(text, "coupon_coupons_issued_total", campaign_id=created) == 30
    assert re.search(
        r'coupon_rpc_requests_total\{code="resource_exhausted",rpc="IssueCoupon"\}', text
    )


def test_the_rejections_help_says_already_issued_is_answered_with_the_coupon(
    server: ServerProcess,
) -> None:
    """A repeat is answered `ok` with the user's coupon and counted under
    reason="already_issued": the metric's HELP, all /metrics says of it, must not call every
    one of its requests turned away."""
    created = httpx.post(
        f"{server.url}{CREATE}",
        json={"name": "help", "totalCoupons": 5, "startsAt": "2026-01-01T00:00:00Z"},
    ).json()["campaign"]["id"]
    for _ in range(2):
        answer = httpx.post(f"{server.url}{ISSUE}", json={"campaignId": created, "userId": "u"})
        assert answer.status_code == 200, answer.text
    prefix = "# HELP coupon_issue_rejections_total "
    deadline = time.monotonic() + 10
    while True:  # each worker writes its tallies out once a second
        text = httpx.get(f"{server.url}/metrics").text
        found = [line for line in text.splitlines() if line.startswith(prefix)]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(found) == 1, text[:2000]
    words = found[0][len(prefix) :]
    assert not words.startswith("IssueCoupon requests turned away"), words
    assert "'already_issued' (a repeat, answered ok with the user's coupon)" in words, words


def test_an_issue_request_whose_body_cannot_be_read_is_counted_as_invalid(
    server: ServerProcess,
) -> None:
    def counts() -> tuple[float, float]:
        text = httpx.get(f"{server.url}/metrics").text
        return (
            metric(text, "coupon_issue_rejections_total", reason="invalid"),
            metric(text, "coupon_rpc_requests_total", rpc="IssueCoupon", code="invalid_argument"),
        )

    def settled() -> tuple[float, float]:
        # Each worker writes its tallies out every second: read until they stop moving.
        last, same_since = counts(), time.monotonic()
        while time.monotonic() - same_since < 2.5:
            time.sleep(0.25)
            now = counts()
            if now != last:
                last, same_since = now, time.monotonic()
        return last

    before = settled()
    json_bodies = [b'{"campaignId": 5', b'{"campaignId": 5, "userId": "u"}', b"not json"]
    for body in json_bodies:
        answer = httpx.post(
            f"{server.url}{ISSUE}", content=body, headers={"content-type": "application/json"}
        )
        assert answer.json()["code"] == "invalid_argument", answer.text
    for body in (b"\xff\xff\xff", b"\x0a\x05ab"):
        answer = httpx.post(
            f"{server.url}{ISSUE}", content=body, headers={"content-type": "application/proto"}
        )
        assert answer.status_code == 400, answer.text
    after = settled()
    assert (after[0] - before[0], after[1] - before[1]) == (5, 5)


def test_metrics_of_a_single_worker_server(server_env: dict[str, str]) -> None:
    """One worker runs the app in the serving process itself: its counts are served too."""
    with ServerProcess(env=server_env, workers=1) as single:
        created = httpx.post(
            f"{single.url}{CREATE}",
            json={"name": "one worker", "totalCoupons": 3, "startsAt": "2026-01-01T00:00:00Z"},
        ).json()["campaign"]["id"]
        for user in ("a", "b"):
            httpx.post(f"{single.url}{ISSUE}", json={"campaignId": created, "userId": user})
        deadline = time.monotonic() + 10
        while True:
            text = httpx.get(f"{single.url}/metrics").text
            issued = metric(text, "coupon_coupons_issued_total", campaign_id=created)
            if issued == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert issued == 2, text[:2000]
        assert metric(text, "coupon_rpc_requests_total", rpc="IssueCoupon", code="ok") == 2


async def test_gauges_tell_requests_in_flight_and_connections_in_use(
    server_env: dict[str, str], pg_pool: asyncpg.Pool
) -> None:
    """While PostgreSQL holds every statement on `campaigns` (a lock), IssueCoupon requests
    wait in flight and GetCampaign calls hold pool connections: /metrics says so, and says
    both are let go once the lock is; the admission limit and the pool's size are there."""
    with ServerProcess(env=server_env, workers=1) as single:

        def gauges() -> dict[str, float]:
            text = httpx.get(f"{single.url}/metrics").text
            names = (
                "coupon_issue_in_flight",
                "coupon_issue_admission_limit",
                "coupon_db_pool_connections_in_use",
                "coupon_db_pool_connections_open",
                "coupon_db_pool_connections_max",
            )
            return {name: metric(text, name) for name in names}

        created = httpx.post(
            f"{single.url}{CREATE}",
            json={"name": "gauges", "totalCoupons": 50, "startsAt": "2026-01-01T00:00:00Z"},
        ).json()["campaign"]["id"]
        warm = httpx.post(f"{single.url}{ISSUE}", json={"campaignId": created, "userId": "w"})
        assert warm.status_code == 200, warm.text
        at_rest = gauges()
        assert at_rest["coupon_issue_in_flight"] == 0, at_rest
        assert at_rest["coupon_issue_admission_limit"] == 1024, at_rest  # a new process's
        assert at_rest["coupon_db_pool_connections_max"] == 8, at_rest
        async with httpx.AsyncClient(base_url=single.url, timeout=30) as client:
            async with table_locked(pg_pool, "campaigns", "ACCESS EXCLUSIVE"):
                issues = [
                    client.post(ISSUE, json={"campaignId": created, "userId": f"u{i}"})
                    for i in range(10)
                ]
                gets = [
                    client.post(
                        "/coupon.v1.CouponService/GetCampaign", json={"campaignId": created}
                    )
                    for _ in range(4)
                ]
                calls = asyncio.gather(*issues, *gets)
                deadline = time.monotonic() + 8
                while True:
                    held_up = await asyncio.to_thread(gauges)
                    waiting = (
                        held_up["coupon_issue_in_flight"] == 10
                        and held_up["coupon_db_pool_connections_in_use"] >= 5
                    )
                    if waiting or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.1)
            answers = await calls
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        assert held_up["coupon_issue_in_flight"] == 10, held_up
        assert held_up["coupon_db_pool_connections_in_use"] >= 5, held_up  # 4 reads, a commit
        assert (
            held_up["coupon_db_pool_connections_open"]
            >= held_up["coupon_db_pool_connections_in_use"]
        ), held_up
        after = gauges()
        assert after["coupon_issue_in_flight"] == 0, after
        # The group commit keeps one connection between its commits; the reads gave theirs.
        assert after["coupon_db_pool_connections_in_use"] <= 1, after


def test_metrics_asks_for_its_token_when_one_is_set(server_env: dict[str, str]) -> None:
    """/metrics names campaigns and what each issued: COUPON_METRICS_TOKEN keeps it to the
    scraper that holds the token; the health endpoints and the API are not affected."""
    token = "scrape-token-0123456789"
    env = {**server_env, "COUPON_METRICS_TOKEN": token}
    with ServerProcess(env=env, workers=1) as guarded:
        url = f"{guarded.url}/metrics"
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": token}):
            refused = httpx.get(url, headers=headers)
            assert refused.status_code == 401, (headers, refused.text)
            assert refused.headers["www-authenticate"] == "Bearer"
            assert "COUPON_METRICS_TOKEN" in refused.text and token not in refused.text
            assert "coupon_" not in refused.text
        for value in (f"Bearer {token}", f"bearer {token}"):
            answer = httpx.get(url, headers={"authorization": value})
            assert answer.status_code == 200, (value, answer.text[:200])
            assert "coupon_rpc_requests_total" in answer.text
        assert httpx.get(f"{guarded.url}/healthz").status_code == 200
        created = httpx.post(
            f"{guarded.url}{CREATE}",
            json={"name": "guarded", "totalCoupons": 1, "startsAt": "2026-01-01T00:00:00Z"},
        )
        assert created.status_code == 200, created.text


def test_metrics_content_type_names_each_parameter_once(server: ServerProcess) -> None:
    """Prometheus 3 parses the Content-Type strictly: a parameter given twice (two charsets)
    fails the scrape."""
    answer = httpx.get(f"{server.url}/metrics")
    assert answer.status_code == 200
    media_type, *params = [part.strip() for part in answer.headers["content-type"].split(";")]
    names = [param.split("=", 1)[0].lower() for param in params]
    assert media_type == "text/plain" and "version" in names, answer.headers["content-type"]
    assert len(names) == len(set(names)), answer.headers["content-type"]


def test_logs_are_json_lines_with_a_request_id(server: ServerProcess) -> None:
    httpx.post(
        f"{server.url}{CREATE}",
        json={"name": "logged", "totalCoupons": 1, "startsAt": "2026-01-01T00:00:00Z"},
        headers={"x-request-id": "req-logged-7"},
    )
    entries = server.log_entries()
    created = [e for e in entries if e.get("message") == "campaign created"]
    assert any(
        e.get("request_id") == "req-logged-7" and e["campaign_name"] == "logged" for e in created
    )
    assert all({"time", "level", "message"} <= set(e) for e in entries)


async def test_a_request_id_cannot_split_a_log_line(server_env: dict[str, str]) -> None:
    """The byte 0x85 of an X-Request-Id is U+0085 (NEL) in the log line that carries it, a
    line break to Unicode readers (Python's splitlines among them): it is written escaped,
    and the line reads back whole."""
    private = PrivateRedis()
    try:
        with ServerProcess(env={**server_env, "REDIS_URL": private.url}) as server:
            async with connect_client(server.url) as client:
                campaign_id = (await create_campaign(client, total=10, name="nel")).id
            private.kill()
            body = json.dumps({"campaignId": campaign_id, "userId": "nel"}).encode()
            raw = (
                f"POST {ISSUE} HTTP/1.1\r\nHost: test\r\nX-Request-Id: rid\x85nel\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode("latin-1") + body
            reader, writer = await open_connection(server.url)
            try:
                writer.write(raw)
                response = await asyncio.wait_for(read_response(reader), 30)
            finally:
                writer.close()
            assert response.status == 503, response.body
            log = server.log()
            assert not {"\x85", "\u2028", "\u2029"} & set(log)
            entries = [json.loads(x) for x in log.splitlines() if x.startswith("{")]
            failed = [e for e in entries if e.get("message") == "rpc failed"]
            assert [e.get("request_id") for e in failed] == ["rid\x85nel"], failed
    finally:
        private.close()


async def test_issue_coupon_failures_are_logged_with_the_caller_s_request_id_and_cause(
    server_env: dict[str, str],
) -> None:
    """However IssueCoupon's request arrives (in one read, or its body after its head), a
    failure's log line carries the caller's X-Request-Id, as the other RPCs' do, and the
    failure's cause, which the caller is not told."""
    private = PrivateRedis()
    try:
        with ServerProcess(env={**server_env, "REDIS_URL": private.url}) as server:
            async with connect_client(server.url) as client:
                campaign_id = (await create_campaign(client, total=10, name="ids")).id
            private.kill()
            answers: list[str] = []
            for n, split in enumerate((False, True)):
                body = json.dumps({"campaignId": campaign_id, "userId": f"u{n}"}).encode()
                raw = (
                    f"POST {ISSUE} HTTP/1.1\r\nHost: test\r\nX-Request-Id: rid-{n}\r\n"
                    "Content-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                ).encode() + body
                reader, writer = await open_connection(server.url)
                try:
                    writer.write(raw[: len(raw) - len(body)] if split else raw)
                    if split:
                        await writer.drain()
                        await asyncio.sleep(0.05)
                        writer.write(body)
                    response = await asyncio.wait_for(read_response(reader), 30)
                finally:
                    writer.close()
                assert response.status == 503, response.body
                answers.append(str(response.json()["message"]))
                time.sleep(1.1)  # a failure of one kind is logged once a second
            entries = server.log_entries()
            failed = [e for e in entries if e.get("message") == "rpc failed"]
            assert {e.get("request_id") for e in failed} >= {"rid-0", "rid-1"}, failed
            # Anonymous callers are not told where Redis is nor what its client said; the
            # log line has that, as its cause.
            port = private.url.rsplit(":", 1)[1].split("/")[0]
            assert answers == ["Redis is unavailable"] * 2, answers
            assert all(port in str(e.get("cause")) for e in failed), failed
    finally:
        private.close()


def test_a_campaign_ended_is_logged_once_however_often_it_is_ended(
    server: ServerProcess,
) -> None:
    created = httpx.post(
        f"{server.url}{CREATE}",
        json={"name": "ended once", "totalCoupons": 1, "startsAt": "2026-01-01T00:00:00Z"},
    ).json()["campaign"]["id"]
    for _ in range(3):
        ended = httpx.post(
            f"{server.url}/coupon.v1.CouponService/EndCampaign", json={"campaignId": created}
        )
        assert ended.status_code == 200, ended.text
    entries = server.log_entries()
    logged = [
        e for e in entries if e.get("message") == "campaign ended" and e["campaign_id"] == created
    ]
    assert len(logged) == 1, logged


def test_the_server_itself_logs_json_lines(server: ServerProcess) -> None:
    """Start-up lines of the HTTP server (supervisor and workers) are JSON like the service's
    own, so one log pipeline reads them all; only the command's banner line is plain (on
    stdout, which this server's log takes in too)."""
    lines = [
        line for line in server.log().splitlines() if not line.startswith("coupon: serving on")
    ]
    entries = [json.loads(line) for line in lines]
    server_lines = [e for e in entries if e["logger"].startswith("uvicorn")]
    assert any("parent process" in e["message"] for e in server_lines)
    assert sum("startup complete" in e["message"] for e in server_lines) == 2
    assert all("color_message" not in e for e in entries)


def test_stderr_carries_json_lines_only(tmp_path: Path) -> None:
    """What a log pipeline reads (stderr) parses line by line; the banner is on stdout."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "coupon", "serve", "--in-memory", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert out.startswith("coupon: serving on http://"), out
    lines = err.splitlines()
    assert lines, "no log lines"
    assert all(isinstance(json.loads(line), dict) for line in lines), err
