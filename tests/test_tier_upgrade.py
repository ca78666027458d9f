"""Tier upgrades, as a story: a purchase that lifts lifetime spend over a tier threshold moves the member up at
once, records a tier_changed event, and the next tick congratulates them by email and SMS, naming the new tier and
its perks. Purchases never move a member down."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from engine.store.models import events, members
from engine.testing import Harness

CONGRATS = [("tier_upgrade", "congrats_email"), ("tier_upgrade", "congrats_sms")]


def member(member_id: str, name: str, total_spend: float, *, locale: str = "zh-CN", **extra: Any) -> dict[str, Any]:
    return {"id": member_id, "name": name, "email": f"{member_id}@example.com", "phone": "13800138000",
            "timezone": "Asia/Shanghai", "locale": locale, "total_spend": total_spend,
            "email_opt_in": True, "sms_opt_in": True, **extra}


def stored(harness: Harness, member_id: str) -> dict[str, Any]:
    with harness.app.store.connect() as conn:
        return dict(conn.execute(select(members).where(members.c.id == member_id)).mappings().one())


def tier_events(harness: Harness, member_id: str) -> list[dict[str, Any]]:
    with harness.app.store.connect() as conn:
        rows = conn.execute(select(events.c.properties).where(events.c.member_id == member_id,
                                                              events.c.type == "tier_changed").order_by(events.c.id))
        return [dict(r) for r in rows.scalars()]


def test_a_purchase_over_the_silver_threshold_brings_a_congratulation(harness: Harness) -> None:
    """Lin has spent ¥4,800; a ¥300 order takes her past ¥5,000: she is Silver, and the next tick tells her so."""
    harness.members(member("lin", "林小雨", 4800))
    assert stored(harness, "lin")["tier"] == "regular"

    report = harness.event("lin", "purchase", "2026-03-10T10:00:00+08:00", amount=300, order_id="A-1")
    assert report.triggered == 2  # points_earned and tier_changed
    assert stored(harness, "lin")["tier"] == "silver"
    assert tier_events(harness, "lin") == [
        {"from": "regular", "to": "silver", "direction": "up", "cause_order_id": "A-1", "qualifying_spend": 5100.0,
         "qualifying_orders": 1}]

    harness.tick("2026-03-10T10:05:00+08:00")
    assert harness.steps_sent("lin") == CONGRATS
    email, sms = harness.sent()
    assert email.subject == "恭喜升级为银卡会员！"
    assert "累计消费 ¥5,100.00，您已升级为银卡会员" in email.text
    for perk in ("全场8折", "积分1.2倍", "生日礼券"):
        assert perk in email.text
    assert "再消费 ¥14,900.00 即可升级为金卡会员" in email.text
    assert sms.text == "【会员中心】恭喜林小雨升级为银卡会员，即享全场8折等专属权益。回T退订"

    harness.tick("2026-03-10T10:10:00+08:00")  # the congratulation goes once
    assert harness.steps_sent("lin") == CONGRATS


def test_an_english_speaking_member_is_congratulated_in_english(harness: Harness) -> None:
    """Amy reaches exactly ¥5,000 (the threshold counts): 'Silver' and its English perks."""
    harness.members(member("amy", "Amy", 4800, locale="en"))
    harness.event("amy", "purchase", "2026-03-10T10:00:00+08:00", amount=200, order_id="B-1")
    harness.tick("2026-03-10T10:05:00+08:00")
    assert harness.steps_sent("amy") == CONGRATS
    email, sms = harness.sent()
    assert email.subject == "Congratulations, you are now Silver!"
    assert "you are now a Silver member" in email.text
    for perk in ("20% off everything", "1.2x points", "Birthday voucher"):
        assert perk in email.text
    assert "to reach Gold" in email.text
    assert "you are now Silver: 20% off everything" in sms.text


def test_a_purchase_that_stays_below_the_threshold_sends_nothing(harness: Harness) -> None:
    """Lin has ¥4,800 and buys for ¥199: ¥4,999 is still a regular member: no event, no message."""
    harness.members(member("lin", "林小雨", 4800))
    report = harness.event("lin", "purchase", "2026-03-10T10:00:00+08:00", amount=199, order_id="A-2")
    assert report.triggered == 1  # points_earned only
    harness.tick("2026-03-10T10:05:00+08:00")
    assert harness.sent() == []
    assert harness.log() == []
    assert tier_events(harness, "lin") == []
    assert stored(harness, "lin")["tier"] == "regular"
    assert stored(harness, "lin")["total_spend"] == 4999


def test_a_purchase_that_jumps_two_tiers_names_the_highest(harness: Harness) -> None:
    """Zhou, a regular member with ¥4,800, buys a ¥20,000 sofa: he goes straight to Gold, one congratulation."""
    harness.members(member("zhou", "周杰", 4800))
    harness.event("zhou", "purchase", "2026-03-10T10:00:00+08:00", amount=20000, order_id="S-9")
    assert stored(harness, "zhou")["tier"] == "gold"
    assert tier_events(harness, "zhou") == [
        {"from": "regular", "to": "gold", "direction": "up", "cause_order_id": "S-9", "qualifying_spend": 24800.0,
         "qualifying_orders": 1}]

    harness.tick("2026-03-10T10:05:00+08:00")
    assert harness.steps_sent("zhou") == CONGRATS
    email, sms = harness.sent()
    assert email.subject == "恭喜升级为金卡会员！"
    assert "银卡会员" not in email.subject
    for perk in ("全场7折", "积分1.5倍", "专属客服"):
        assert perk in email.text
    assert "钻石会员" in email.text  # the next tier up from Gold
    assert "金卡会员" in sms.text and "7折" in sms.text


def test_a_purchase_never_moves_a_member_down(harness: Harness) -> None:
    """Gao was made Gold by a review although her recorded spend is only ¥1,000: a ¥100 order keeps her Gold."""
    harness.members(member("gao", "高敏", 1000, tier="gold"))
    report = harness.event("gao", "purchase", "2026-03-10T10:00:00+08:00", amount=100, order_id="G-1")
    assert report.triggered == 1  # points_earned only
    harness.tick("2026-03-10T10:05:00+08:00")
    assert stored(harness, "gao")["tier"] == "gold"
    assert tier_events(harness, "gao") == []
    assert harness.sent() == []
