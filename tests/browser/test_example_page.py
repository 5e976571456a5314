"""The example page (/example/) in headless Chromium (Debian's, never a downloaded build),
calling the API on another origin with connect-web, in the Connect protocol and gRPC-Web:
it works from the origin COUPON_CORS_ORIGINS allows and fails from any other. A screenshot
of the page is saved in the test's directory (its path is printed)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest

from coupon.gen.coupon.v1 import coupon_pb
from harness.client import all_coupons, connect_client, create_campaign
from harness.server import ServerProcess

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def page_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Serves the page; its origin is http://127.0.0.1:<port>."""
    with ServerProcess(env={}, in_memory=True, log_dir=tmp_path_factory.mktemp("page")) as proc:
        yield proc


@pytest.fixture(scope="module")
def api_server(
    page_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """The API, on another port (another origin), allowing only the page's origin."""
    with ServerProcess(
        env={"COUPON_CORS_ORIGINS": page_server.url},
        in_memory=True,
        log_dir=tmp_path_factory.mktemp("api"),
    ) as proc:
        yield proc


async def issue_from_page(
    browser: object, page_url: str, api: str, campaign_id: str, user: str, transport: str
) -> tuple[object, str, str, str]:
    """Open the page, issue; the page, and the result's state, title and detail."""
    page = await browser.new_page(viewport={"width": 720, "height": 560})
    query = urlencode({"api": api, "campaign": campaign_id, "user": user})
    await page.goto(f"{page_url}/example/?{query}")
    await page.wait_for_selector("body[data-ready=true]")
    await page.select_option("#transport", transport)
    await page.click("button[type=submit]")
    result = page.locator("#result:not([data-state=idle]):not([data-state=pending])")
    await result.wait_for()
    state = await result.get_attribute("data-state")
    return page, state, await page.inner_text("#result h2"), await page.inner_text("#result p")


async def test_the_page_issues_a_coupon_cross_origin(
    browser: object, page_server: ServerProcess, api_server: ServerProcess, tmp_path: Path
) -> None:
    async with connect_client(api_server.url) as client:
        campaign = await create_campaign(client, total=10, name="browser")

        page, state, code, detail = await issue_from_page(
            browser, page_server.url, api_server.url, campaign.id, "alice", "connect"
        )
        assert (state, detail) == ("ok", "issued to alice")
        screenshot = tmp_path / "example-page.png"
        await page.screenshot(path=str(screenshot), full_page=True)
        print(f"example page screenshot: {screenshot}")

        _, state, again, detail = await issue_from_page(
            browser, page_server.url, api_server.url, campaign.id, "alice", "grpcweb"
        )
        assert (state, again, detail) == ("again", code, "alice already had this coupon")
        _, state, bobs, _ = await issue_from_page(
            browser, page_server.url, api_server.url, campaign.id, "bob", "grpcweb"
        )
        assert state == "ok" and bobs != code

        _, coupons = await all_coupons(client, campaign.id, token="")
        assert {(c.user_id, c.code) for c in coupons} == {("alice", code), ("bob", bobs)}


async def test_an_error_reaches_the_page_with_its_code(
    browser: object, page_server: ServerProcess, api_server: ServerProcess
) -> None:
    unknown = "0192f5e0-7c1a-7b3e-9d2a-5b1c2d3e4f50"
    for transport in ("connect", "grpcweb"):
        _, state, code, detail = await issue_from_page(
            browser, page_server.url, api_server.url, unknown, "alice", transport
        )
        assert (state, code, detail) == ("error", "not_found", f"campaign {unknown} does not exist")


async def test_an_origin_not_allowed_is_refused_by_the_browser(
    browser: object, page_server: ServerProcess, api_server: ServerProcess
) -> None:
    async with connect_client(api_server.url) as client:
        campaign = await create_campaign(client, total=10, name="browser")
        # Same server, but the page's origin is now http://localhost:<port>: not allowed.
        other_origin = page_server.url.replace("127.0.0.1", "localhost")
        _, state, _, _ = await issue_from_page(
            browser, other_origin, api_server.url, campaign.id, "mallory", "connect"
        )
        assert state == "error"
        page = await client.get_campaign(coupon_pb.GetCampaignRequest(campaign_id=campaign.id))
        assert page.campaign is not None and page.campaign.issued_count == 0
