"""GetCampaign, page by page: every page of a campaign in order, and chosen pages again and
again, each timed from sending the request to having the whole body."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.generators import BenchBroke
from coupon.gen.coupon.v1 import coupon_pb

GET_CAMPAIGN = "/coupon.v1.CouponService/GetCampaign"
PAGE_SIZE = 1000


def stats(samples: list[float]) -> dict[str, float]:
    """n, p50, p99, max and mean (nearest-rank percentiles) of milliseconds."""
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)

    def rank(q: float) -> float:
        return ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]

    return {
        "n": len(ordered),
        "p50": rank(50),
        "p99": rank(99),
        "max": ordered[-1],
        "mean": sum(ordered) / len(ordered),
    }


def mib(size: float) -> str:
    return f"{size / 2**20:,.0f} MiB"


def say(text: str) -> None:
    print(text, flush=True)


@contextmanager
def no_gc() -> Iterator[None]:
    """This process's cyclic GC off while timing: its pauses would be charged to the server."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class Pager:
    """GetCampaign in binary protobuf over one keep-alive HTTP/1.1 connection; each call
    timed from sending the request to having the whole body (decoding not included)."""

    def __init__(self, url: str, token: str, page_size: int) -> None:
        self.page_size = page_size
        self._client = httpx.Client(
            base_url=url,
            headers={
                "content-type": "application/proto",
                "connect-protocol-version": "1",
                "authorization": f"Bearer {token}",
            },
            timeout=30,
        )

    def close(self) -> None:
        self._client.close()

    def page(self, campaign_id: str, token: str) -> tuple[float, coupon_pb.GetCampaignResponse]:
        body = coupon_pb.GetCampaignRequest(
            campaign_id=campaign_id, page_size=self.page_size, page_token=token
        ).to_binary()
        started = time.perf_counter()
        answer = self._client.post(GET_CAMPAIGN, content=body)
        elapsed = (time.perf_counter() - started) * 1000
        if answer.status_code != 200:
            raise BenchBroke(f"GetCampaign: HTTP {answer.status_code} {answer.text[:300]}")
        return elapsed, coupon_pb.GetCampaignResponse.from_binary(answer.content)

    def sweep(self, campaign_id: str) -> dict[str, Any]:
        """Every page in order (after one untimed request that opens the connection). The
        page times, the token of every page, and what the pages listed."""
        with no_gc():
            return self._sweep(campaign_id)

    def _sweep(self, campaign_id: str) -> dict[str, Any]:
        self.page(campaign_id, "")
        times: list[float] = []
        tokens: list[str] = []
        codes: set[str] = set()
        listed = 0
        wrong_campaign = 0
        token = ""
        campaign: coupon_pb.Campaign | None = None
        while True:
            elapsed, page = self.page(campaign_id, token)
            times.append(elapsed)
            tokens.append(token)
            campaign = page.campaign or campaign
            listed += len(page.coupons)
            for coupon in page.coupons:
                codes.add(coupon.code)
                wrong_campaign += coupon.campaign_id != campaign_id
            token = page.next_page_token
            if not token:
                break
        first, middle, last = page_indexes(len(times))
        return {
            "pages": len(times),
            "times_ms": times,
            "tokens": tokens,
            "latency_ms": stats(times),
            "first_ms": times[first],
            "middle_ms": times[middle],
            "last_ms": times[last],
            "listed": listed,
            "distinct_codes": len(codes),
            "wrong_campaign": wrong_campaign,
            "issued_count": 0 if campaign is None else campaign.issued_count,
            "total_coupons": 0 if campaign is None else campaign.total_coupons,
            "status": 0 if campaign is None else int(campaign.status),
        }


def page_indexes(pages: int) -> tuple[int, int, int]:
    """0-based indexes of the first, middle and last page."""
    return 0, (pages - 1) // 2, pages - 1


@dataclass
class Target:
    """One page of one campaign, to fetch again and again."""

    label: str  # e.g. "end of table (100,000)"
    campaign_id: str
    page: str  # first / middle / last
    page_number: int
    token: str
    times_ms: list[float] = field(default_factory=list)


def repeat_pages(pager: Pager, targets: list[Target], repeats: int) -> None:
    """Each target `repeats` times, round robin, so drift over time hits all alike."""
    with no_gc():
        for _ in range(repeats):
            for target in targets:
                elapsed, _page = pager.page(target.campaign_id, target.token)
                target.times_ms.append(elapsed)


def targets_of(label: str, campaign_id: str, sweep: dict[str, Any]) -> list[Target]:
    first, middle, last = page_indexes(sweep["pages"])
    return [
        Target(label, campaign_id, name, index + 1, sweep["tokens"][index])
        for name, index in (("first", first), ("middle", middle), ("last", last))
    ]


def target_rows(table_rows: int, targets: list[Target]) -> list[dict[str, Any]]:
    return [
        {
            "table_rows": table_rows,
            "campaign": t.label,
            "campaign_id": t.campaign_id,
            "page": t.page,
            "page_number": t.page_number,
            # The first fetch of a page is the coldest; the rest repeat it.
            "first_fetch_ms": t.times_ms[0] if t.times_ms else None,
            **stats(t.times_ms),
        }
        for t in targets
    ]
