"""The live dashboard in a real browser (Debian's chromium, headless, driven by Playwright)
against a real server (two workers, PostgreSQL, Redis, an admin token) during a real burst:
the page asks for the token, then shows the issued count rising to the stock, the
remaining stock falling to zero, and the refusals by reason. A screenshot is saved in the
test's temporary directory (its path is printed)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from coupon.gen.coupon.v1 import coupon_pb
from harness.burst import Outcome, drive
from harness.client import admin, connect_client, create_campaign, ts
from harness.private_redis import PrivateRedis
from harness.server import ServerProcess

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

TOKEN = "dashboard-token"

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(server_env: dict[str, str]) -> Iterator[ServerProcess]:
    with ServerProcess(env={**server_env, "COUPON_ADMIN_TOKEN": TOKEN}, workers=2) as proc:
        yield proc


async def number(page: Page, selector: str) -> int:
    text = (await page.text_content(selector)) or ""
    digits = re.sub(r"[^0-9]", "", text)
    return int(digits) if digits else -1


async def refusals(page: Page) -> dict[str, int]:
    found = {}
    for row in await page.locator("#refusals tr[data-reason]").all():
        reason = await row.get_attribute("data-reason")
        count = await row.locator("td").nth(1).text_content()
        assert reason is not None and count is not None
        found[reason] = int(count.replace(",", ""))
    return found


async def open_with_token(page: Page, url: str) -> None:
    await page.goto(url)
    await page.wait_for_selector("#login:not([hidden])")  # the API said: token needed
    await page.fill("#token", TOKEN)
    await page.click("#token-form button")
    await page.wait_for_selector("#login", state="hidden")


async def test_dashboard_shows_a_burst_rise_to_the_stock(
    server: ServerProcess, browser: Browser, tmp_path: Path
) -> None:
    total = 300
    page = await browser.new_page(viewport={"width": 1360, "height": 820})
    await open_with_token(page, f"{server.url}/dashboard")
    async with connect_client(server.url) as client:
        campaign = await create_campaign(
            client, total=total, starts_in=2, name="Dashboard launch", token=TOKEN
        )
    await page.evaluate(f"location.hash = '{campaign.id}'")  # as a click on its row does
    await page.wait_for_selector("#live-body:not([hidden])")
    assert await page.text_content("#live-title") == "Dashboard launch"
    assert await number(page, "#issued") == 0
    assert await number(page, "#remaining") == total

    # Paced so that the sell-out spans several of the page's one-second polls: requests
    # before the start (refused), the stock issued, then refusals as sold out.
    requests = [(campaign.id, f"fan-{i}") for i in range(900)]
    outcomes: list[Outcome] = []
    burst = asyncio.ensure_future(
        drive([server.url], requests, outcomes, concurrency=5, pace=0.05, time_limit=60)
    )
    seen: list[int] = []
    during = tmp_path / "dashboard-during.png"
    while not burst.done():
        seen.append(await number(page, "#issued"))
        if 0 < seen[-1] < total and not during.exists():
            await page.screenshot(path=str(during), full_page=True)
            print(f"\ndashboard during the burst: {during}")
        await asyncio.sleep(0.25)
    await burst
    issued = sum(1 for o in outcomes if o.code and not o.already)
    assert issued == total

    sent_before_start = sum(1 for o in outcomes if o.error == "failed_precondition")
    sold_out = sum(1 for o in outcomes if o.error == "resource_exhausted")
    # (On a slow machine the burst may begin after the start: no request is then early.)
    expected = {k: v for k, v in (("not_started", sent_before_start), ("sold_out", sold_out)) if v}
    # Every server process adds its counts once a second: give the page a few polls.
    for _ in range(40):
        reasons = await refusals(page)
        if await number(page, "#issued") == total and reasons == expected:
            break
        await asyncio.sleep(0.25)
    seen.append(await number(page, "#issued"))
    assert seen[-1] == total
    assert seen == sorted(seen), seen  # it only rises
    assert await number(page, "#remaining") == 0
    assert sold_out > 0
    assert reasons == expected
    assert (await page.text_content("#p99") or "").endswith("ms")
    assert await number(page, "#requests") == len(outcomes)
    await page.wait_for_selector(f"#campaigns tr[data-id='{campaign.id}']")
    status = await page.text_content(f"#campaigns tr[data-id='{campaign.id}'] .status")
    assert status in ("scheduled", "active", "sold out")  # the list refreshes every 5 s

    shot = tmp_path / "dashboard.png"
    await page.screenshot(path=str(shot), full_page=True)
    print(f"\ndashboard screenshot: {shot}")
    assert shot.stat().st_size > 0


async def test_dashboard_refuses_a_wrong_token(server: ServerProcess, browser: Browser) -> None:
    page = await browser.new_page()
    await page.goto(f"{server.url}/dashboard")
    await page.wait_for_selector("#login:not([hidden])")
    await page.fill("#token", "not-the-token")
    await page.click("#token-form button")
    await page.wait_for_function("document.getElementById('login-error').textContent !== ''")
    said = await page.text_content("#login-error") or ""
    assert "refused this token" in said and "COUPON_ADMIN_TOKEN" in said
    assert await page.locator("#campaigns tbody tr").count() == 0


@pytest.mark.parametrize(
    ("typed", "said"),
    [
        (f" {TOKEN} ", "spaces"),  # as pasted: not trimmed into the right one behind one's back
        (f"{TOKEN}\u00a0", "spaces"),
        ("tökén-€", "outside printable ASCII"),  # fetch cannot send it in a header
    ],
    ids=["padded", "no-break-space", "not-latin-1"],
)
async def test_a_token_the_service_cannot_have_is_refused_as_typed(
    server: ServerProcess, browser: Browser, typed: str, said: str
) -> None:
    page = await browser.new_page()
    sent: list[str] = []
    page.on(
        "request",
        lambda request: (
            sent.append(request.headers.get("authorization", ""))
            if "/dashboard/api/" in request.url
            else None
        ),
    )
    await page.goto(f"{server.url}/dashboard")
    await page.wait_for_selector("#login:not([hidden])")
    asked = len(sent)
    await page.fill("#token", typed)
    await page.click("#token-form button")
    await page.wait_for_function(
        "document.getElementById('login-error').textContent !== ''", timeout=5000
    )
    assert said in (await page.text_content("#login-error") or "")
    assert await page.is_visible("#login")
    assert await page.text_content("#list-error") == ""
    assert len(sent) == asked  # nothing was sent with it
    assert await page.locator("#campaigns tbody tr").count() == 0


async def test_the_list_reaches_a_campaign_beyond_the_first_hundred(
    server: ServerProcess, browser: Browser
) -> None:
    async with connect_client(server.url) as client:
        # The oldest: open (live), then more than a page of newer ones.
        oldest = await create_campaign(client, total=7, name="Older live one", token=TOKEN)
        for i in range(105):
            await create_campaign(client, total=5, name=f"newer-{i}", starts_in=3600, token=TOKEN)
    page = await browser.new_page(viewport={"width": 1360, "height": 820})
    await open_with_token(page, f"{server.url}/dashboard")
    await page.wait_for_selector("#campaigns tbody tr")
    row = f"#campaigns tr[data-id='{oldest.id}']"
    assert await page.locator(row).count() == 0
    while not await page.locator(row).count():
        assert await page.is_visible("#more"), "no more pages, and the campaign is not listed"
        shown = await page.locator("#campaigns tbody tr").count()
        await page.click("#more")
        await page.wait_for_function(
            f"document.querySelectorAll('#campaigns tbody tr').length > {shown}"
        )
    await page.click(row)
    await page.wait_for_function(
        "document.getElementById('live-title').textContent === 'Older live one'"
    )
    assert await page.text_content(f"{row} .status") == "active"
    # The list's refresh keeps the pages asked for.
    await asyncio.sleep(5.5)
    assert await page.locator(row).count() == 1

    # Of one status: the scheduled ones only, the live one not among them.
    await page.select_option("#status-filter", "scheduled")
    await page.wait_for_function(
        "[...document.querySelectorAll('#campaigns tbody .status')]"
        ".every((s) => s.textContent === 'scheduled')"
    )
    assert await page.locator(row).count() == 0
    assert await page.locator("#campaigns tbody tr").count() == 100


async def test_a_malformed_link_fragment_is_ignored_and_said(
    server: ServerProcess, browser: Browser
) -> None:
    async with connect_client(server.url) as client:
        campaign = await create_campaign(client, total=3, name="Linked", token=TOKEN)
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    # A link cut short: the page still asks for the token, lists, and says what it ignored.
    await open_with_token(page, f"{server.url}/dashboard#%ZZ")
    await page.wait_for_selector(f"#campaigns tr[data-id='{campaign.id}']")
    assert "#%ZZ" in (await page.text_content("#link-error") or "")
    assert await page.is_hidden("#live-body")

    await page.evaluate(f"location.hash = '{campaign.id}'")
    await page.wait_for_function("document.getElementById('live-title').textContent === 'Linked'")
    assert await page.text_content("#link-error") == ""
    # Changed to a malformed one: said, and the campaign shown goes on being polled.
    await page.evaluate("location.hash = '%E0%A4%A'")
    await page.wait_for_function("document.getElementById('link-error').textContent !== ''")
    before = await page.text_content("#updated")
    await page.wait_for_function(
        f"document.getElementById('updated').textContent !== {before!r}", timeout=5000
    )
    assert await page.text_content("#live-title") == "Linked"
    assert errors == []


async def test_times_are_utc_marked_z_with_the_year(
    server: ServerProcess, browser: Browser
) -> None:
    made: dict[int, coupon_pb.Campaign] = {}
    async with connect_client(server.url) as client:
        for year in (2027, 2028):
            reply = await client.create_campaign(
                coupon_pb.CreateCampaignRequest(
                    name=f"New year {year}",
                    total_coupons=3,
                    starts_at=ts(datetime(year, 1, 1, tzinfo=UTC)),
                ),
                headers=admin(TOKEN),
            )
            assert reply.campaign is not None
            made[year] = reply.campaign
    # A browser far from UTC: the page's times are still UTC, as the command line prints.
    context = await browser.new_context(timezone_id="Asia/Seoul")
    page = await context.new_page()
    await open_with_token(page, f"{server.url}/dashboard#{made[2027].id}")
    for year, campaign in made.items():
        row = f"#campaigns tr[data-id='{campaign.id}']"
        await page.wait_for_selector(row)
        starts = page.locator(f"{row} td").nth(3)
        assert await starts.text_content() == f"{year}-01-01 00:00Z"
        assert await starts.get_attribute("title") == f"{year}-01-01 00:00:00Z"
    await page.wait_for_function("document.getElementById('clock').textContent !== ''")
    clock = await page.text_content("#clock") or ""
    assert re.fullmatch(r"server time \d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", clock), clock
    shown = datetime.strptime(clock.removeprefix("server time "), "%Y-%m-%d %H:%M:%SZ")
    assert abs(shown.replace(tzinfo=UTC) - datetime.now(UTC)) < timedelta(seconds=30)
    await page.wait_for_selector("#live-body:not([hidden])")
    updated = await page.text_content("#updated") or ""
    assert re.search(r"\d\d:\d\d:\d\dZ$", updated), updated
    await context.close()


async def test_an_ended_campaigns_unissued_coupons_are_not_called_stock(
    server: ServerProcess, browser: Browser
) -> None:
    async with connect_client(server.url) as client:
        campaign = await create_campaign(client, total=500, name="Ended early", token=TOKEN)
        await client.issue_coupon(
            coupon_pb.IssueCouponRequest(campaign_id=campaign.id, user_id="before-the-end")
        )
        await client.end_campaign(
            coupon_pb.EndCampaignRequest(campaign_id=campaign.id), headers=admin(TOKEN)
        )
    page = await browser.new_page()
    await open_with_token(page, f"{server.url}/dashboard#{campaign.id}")
    await page.wait_for_selector("#live-body:not([hidden])")
    await page.wait_for_function("document.getElementById('remaining').textContent === '499'")
    assert await page.text_content("#remaining-label") == "Unissued (ended)"
    assert await page.text_content("#status") == "none can be issued"
    assert (await page.get_attribute("#status", "title") or "").startswith("ended 20")


@pytest.mark.parametrize("width", [1280, 1360, 1400])
async def test_a_long_name_is_cut_and_every_column_stays_in_sight(
    server: ServerProcess, browser: Browser, width: int
) -> None:
    name = "<b>Spring</b> mega sale & clearance " + "for every shop in every region " * 5
    async with connect_client(server.url) as client:
        campaign = await create_campaign(client, total=10_000, name=name, token=TOKEN)
    page = await browser.new_page(viewport={"width": width, "height": 820})
    await open_with_token(page, f"{server.url}/dashboard")
    row = page.locator(f"#campaigns tr[data-id='{campaign.id}']")
    await row.wait_for()
    cut = row.locator("td").first
    assert await cut.text_content() == name  # as text: the name's markup is not parsed
    assert await cut.get_attribute("title") == name
    assert await row.locator("b").count() == 0
    fits = await page.evaluate(
        """(id) => {
            const list = document.getElementById("list");
            const box = list.getBoundingClientRect();
            return {
                scrolls: list.scrollWidth > list.clientWidth,
                cells: [...document.querySelectorAll("#campaigns thead th")].map(
                    (th) => th.getBoundingClientRect().right <= box.right),
                cut: (() => {
                    const td = document.querySelector(`#campaigns tr[data-id='${id}'] td.name`);
                    return td.scrollWidth > td.clientWidth;
                })(),
            };
        }""",
        campaign.id,
    )
    assert fits == {"scrolls": False, "cells": [True, True, True, True], "cut": True}


async def test_with_redis_down_the_list_and_counts_show_and_the_live_figures_say_why(
    server_env: dict[str, str], browser: Browser
) -> None:
    private = PrivateRedis()
    try:
        env = {**server_env, "REDIS_URL": private.url, "COUPON_ADMIN_TOKEN": TOKEN}
        with ServerProcess(env=env) as proc:
            async with connect_client(proc.url) as client:
                campaign = await create_campaign(
                    client, total=50, name="Through an outage", token=TOKEN
                )
                for user in ("a", "b", "c"):
                    await client.issue_coupon(
                        coupon_pb.IssueCouponRequest(campaign_id=campaign.id, user_id=user)
                    )
            private.kill()
            page = await browser.new_page()
            await open_with_token(page, f"{proc.url}/dashboard")
            await page.wait_for_selector(f"#campaigns tr[data-id='{campaign.id}']")
            await page.evaluate(f"location.hash = '{campaign.id}'")
            await page.wait_for_selector("#live-body:not([hidden])")
            await page.wait_for_function("document.getElementById('issued').textContent === '3'")
            assert await number(page, "#remaining") == 47
            assert await page.text_content("#rate") == "–"
            assert await page.text_content("#requests") == "–"
            said = await page.text_content("#live-error") or ""
            assert said.startswith("Live figures unavailable (Redis is unavailable)"), said
    finally:
        private.close()


async def test_figures_that_stop_updating_are_greyed_and_say_since_when(
    server_env: dict[str, str], browser: Browser
) -> None:
    """The service unreachable: the last figures stay, greyed, with since when and from
    when they are; once it answers again they are live again."""
    env = {**server_env, "COUPON_ADMIN_TOKEN": TOKEN}
    with ServerProcess(env=env) as proc:
        async with connect_client(proc.url) as client:
            campaign = await create_campaign(client, total=5, name="Lost sight", token=TOKEN)
        page = await browser.new_page()
        await open_with_token(page, f"{proc.url}/dashboard#{campaign.id}")
        await page.wait_for_selector("#live-body:not([hidden]):not(.stale)")
        port = proc.port
    try:
        await page.wait_for_selector("#live-body.stale", timeout=15_000)
        said = await page.text_content("#live-error") or ""
        assert re.fullmatch(
            r"cannot reach the service since .+Z; the figures shown are from .+Z\.", said
        ), said
        assert await page.text_content("#issued") == "0"  # the last figures, still shown
        with ServerProcess(env=env, port=port):
            await page.wait_for_selector("#live-body:not(.stale)", timeout=15_000)
            assert await page.text_content("#live-error") == ""
    finally:
        await page.close()
