from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from coupon.domain import coupon as coupon_module
from coupon.domain.campaign import Campaign, CampaignStatus, new_campaign
from coupon.domain.coupon import validate_campaign_id, validate_user_id
from coupon.domain.errors import InvalidArgument

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def campaign(**changes: object) -> Campaign:
    fields: dict[str, object] = {
        "campaign_id": "0192f5e0-7c1a-7b3e-9d2a-5b1c2d3e4f50",
        "name": "launch",
        "total_coupons": 10,
        "starts_at": NOW,
        "ends_at": NOW + timedelta(hours=1),
        "now": NOW - timedelta(minutes=1),
    }
    fields.update(changes)
    return new_campaign(**fields)  # type: ignore[arg-type]


def test_campaign_is_scheduled_before_its_start_and_active_from_it() -> None:
    c = campaign()
    assert c.status_at(NOW - timedelta(microseconds=1)) is CampaignStatus.SCHEDULED
    assert c.status_at(NOW) is CampaignStatus.ACTIVE


def test_campaign_is_sold_out_when_every_coupon_is_issued() -> None:
    assert campaign().with_issued_count(10).status_at(NOW) is CampaignStatus.SOLD_OUT


def test_campaign_is_ended_at_its_end_even_with_stock_left() -> None:
    assert campaign().status_at(NOW + timedelta(hours=1)) is CampaignStatus.ENDED


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "   "}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"name": "a\x00b"}, "name"),
        ({"name": "tab\there"}, "name"),
        ({"name": "two\nlines"}, "name"),
        ({"name": "\x1b[31mred"}, "name"),
        ({"name": "c1\x85"}, "name"),
        ({"name": "\u202eevil"}, "name"),
        ({"name": "isolate\u2066"}, "name"),
        ({"name": "line\u2028separator"}, "name"),
        ({"name": "mark\u200e"}, "name"),
        ({"name": "\u200fmark"}, "name"),
        ({"name": "arabic\u061cmark"}, "name"),
        ({"name": "\u200b"}, "name"),
        ({"name": " \ufeff\u2060 "}, "name"),
        ({"name": "\u3164"}, "name"),
        ({"name": " \u115f\u1160 \uffa0 "}, "name"),
        ({"name": "\u034f\ufe0f\u2800"}, "name"),
        ({"total_coupons": 0}, "total_coupons"),
        ({"total_coupons": -5}, "total_coupons"),
        ({"total_coupons": 10_000_001}, "total_coupons"),
        ({"starts_at": None}, "starts_at"),
        ({"starts_at": datetime(1970, 1, 1, tzinfo=UTC)}, "starts_at"),
        ({"ends_at": NOW}, "ends_at"),
        ({"ends_at": NOW - timedelta(hours=1)}, "ends_at"),
        ({"ends_at": datetime(9500, 1, 1, tzinfo=UTC)}, "ends_at"),
    ],
)
def test_new_campaign_names_the_bad_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        campaign(**changes)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


def test_total_coupons_error_says_the_range_and_the_value() -> None:
    with pytest.raises(InvalidArgument, match=r"between 1 and 10000000 \(got 0\)"):
        campaign(total_coupons=0)


def test_a_name_in_any_script_with_emoji_and_joiners_is_accepted() -> None:
    name = "봄맞이 세일 \U0001f469\u200d\U0001f4bb \u0645\u0631\u062d\u0628\u0627 \u05e9\u05dc"
    assert campaign(name=name).name == name


def test_name_of_200_characters_and_ten_million_coupons_are_accepted() -> None:
    c = campaign(name="쿠" * 200, total_coupons=10_000_000)
    assert c.total_coupons == 10_000_000


@pytest.mark.parametrize(
    "user_id", ["", "x" * 129, "a\x00b", " ", "\u200b", "\u3164", "\ufeff\u2060 ", "\u17b4\u17b5"]
)
def test_bad_user_ids_are_refused(user_id: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_user_id(user_id)
    assert caught.value.field == "user_id"


@pytest.mark.parametrize("user_id", ["x" * 128, "쿠" * 128, "a", "a b|c"])
def test_user_ids_up_to_128_characters_are_accepted(user_id: str) -> None:
    assert validate_user_id(user_id) == user_id


@pytest.mark.parametrize("campaign_id", ["", "42", "not-a-uuid", "x" * 500])
def test_bad_campaign_ids_are_refused(campaign_id: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_campaign_id(campaign_id)
    assert caught.value.field == "campaign_id"


def test_campaign_ids_come_back_canonical_also_when_seen_before() -> None:
    upper = "0192F5E0-7C1A-7B3E-9D2A-5B1C2D3E4F50"
    for _ in range(2):  # the second time from the cache of seen ids
        assert validate_campaign_id(upper) == upper.lower()
    with pytest.raises(InvalidArgument):
        validate_campaign_id(upper[:-1])


def test_the_cache_of_seen_campaign_ids_stays_bounded() -> None:
    for n in range(10_000):
        assert validate_campaign_id(str(uuid.UUID(int=n))) == str(uuid.UUID(int=n))
    assert len(coupon_module._SEEN_CAMPAIGN_IDS) <= coupon_module._SEEN_CAMPAIGN_IDS_MAX
