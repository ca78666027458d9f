"""The safety rails, as a story: no consent or no address means no send (and a logged reason); a message due in
the member's night waits for their morning instead of being dropped, unless they withdraw consent meanwhile; and a
frequency cap counts every journey together."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from engine.testing import Harness

BIRTHDAY_TICK = "2026-05-20T10:01:00+08:00"


def member(member_id: str, name: str, **extra: Any) -> dict[str, Any]:
    return {"id": member_id, "name": name, "email": f"{member_id}@example.com", "phone": "13800138000",
            "timezone": "Asia/Shanghai", "locale": "zh-CN", "email_opt_in": True, "sms_opt_in": True, **extra}


def statuses(harness: Harness, member_id: str) -> dict[str, tuple[str, str | None]]:
    """Step -> (status, reason); the reason only for rows that did not go (a sent row may keep 'quiet_hours')."""
    return {r["step"]: (r["status"], None if r["status"] == "sent" else r["reason"])
            for r in harness.log(member_id=member_id)}


# --------------------------------------------------------------------------- consent and addresses


def test_a_member_without_email_consent_gets_no_email_but_a_logged_reason(harness: Harness) -> None:
    """Lin said yes to SMS only: her birthday email is suppressed for consent, her birthday SMS goes."""
    harness.members(member("lin", "林小雨", birthday="1990-05-20", email_opt_in=False))
    harness.tick(BIRTHDAY_TICK)
    assert statuses(harness, "lin") == {"birthday_email": ("suppressed", "consent"),
                                        "birthday_sms": ("sent", None)}
    assert harness.sent("email") == []
    assert [m.step for m in harness.sent("sms")] == ["birthday_sms"]
    row = harness.log(step="birthday_email")[0]
    assert row["sent_at"] is None and row["body"] is None


def test_a_member_without_an_address_is_suppressed_as_invalid_address(harness: Harness) -> None:
    """Wang has consent but left the email empty; Zhao has no phone: each missing channel is logged, not sent."""
    harness.members(member("wang", "王伟", birthday="1990-05-20", email=None),
                    member("zhao", "赵磊", birthday="1990-05-20", phone=None))
    harness.tick(BIRTHDAY_TICK)
    assert statuses(harness, "wang") == {"birthday_email": ("suppressed", "invalid_address"),
                                         "birthday_sms": ("sent", None)}
    assert statuses(harness, "zhao") == {"birthday_email": ("sent", None),
                                         "birthday_sms": ("suppressed", "invalid_address")}
    assert [m.member_id for m in harness.sent("email")] == ["zhao"]
    assert [m.member_id for m in harness.sent("sms")] == ["wang"]


# --------------------------------------------------------------------------- quiet hours


def test_a_message_due_at_night_waits_for_the_members_morning(harness: Harness) -> None:
    """At 15:30 UTC Lin (Shanghai) is at 23:30 and Joe (Los Angeles) at 08:30. Both cross into Silver then.

    Joe's congratulation goes at once; Lin's is queued for quiet hours, still queued at 07:59, sent at 08:01.
    """
    harness.members(member("lin", "林小雨", total_spend=4800),
                    member("joe", "Joe", total_spend=4800, timezone="America/Los_Angeles", locale="en",
                           phone="+14155552671"))
    harness.event("lin", "purchase", "2026-03-10T15:29:00Z", amount=300, order_id="L-1")
    harness.event("joe", "purchase", "2026-03-10T15:29:00Z", amount=300, order_id="J-1")

    harness.tick("2026-03-10T15:30:00Z")
    assert sorted(m.member_id for m in harness.sent()) == ["joe", "joe"]
    night = harness.log(member_id="lin")
    assert [(r["step"], r["status"], r["reason"]) for r in night] == [
        ("congrats_email", "queued", "quiet_hours"), ("congrats_sms", "queued", "quiet_hours")]
    assert {r["next_attempt_at"] for r in night} == {datetime(2026, 3, 11, 0, 0, tzinfo=UTC)}  # 08:00 Shanghai

    harness.tick("2026-03-11T07:59:00+08:00")
    assert [m.member_id for m in harness.sent()].count("lin") == 0

    harness.tick("2026-03-11T08:01:00+08:00")
    assert harness.steps_sent("lin") == [("tier_upgrade", "congrats_email"), ("tier_upgrade", "congrats_sms")]
    morning = harness.log(member_id="lin")
    assert [r["status"] for r in morning] == ["sent", "sent"]  # (the reason still says it was deferred)
    assert {r["sent_at"] for r in morning} == {datetime(2026, 3, 11, 0, 1, tzinfo=UTC)}
    assert [m.subject for m in harness.sent("email") if m.member_id == "lin"] == ["恭喜升级为银卡会员！"]


def test_a_deferred_message_is_never_dropped_even_if_the_morning_tick_is_late(harness: Harness) -> None:
    """The daemon was down from midnight to 14:00: Lin's congratulation from 23:00 still goes at the 14:00 tick."""
    harness.members(member("lin", "林小雨", total_spend=4800))
    harness.event("lin", "purchase", "2026-03-10T23:00:00+08:00", amount=300, order_id="L-1")
    harness.tick("2026-03-10T23:00:30+08:00")
    assert harness.sent() == []
    harness.tick("2026-03-11T14:00:00+08:00")
    assert harness.steps_sent("lin") == [("tier_upgrade", "congrats_email"), ("tier_upgrade", "congrats_sms")]
    assert [r["status"] for r in harness.log()] == ["sent", "sent"]


def test_consent_withdrawn_during_the_night_suppresses_the_deferred_message(harness: Harness) -> None:
    """Lin's congratulation waits for the morning; at 02:00 she unsubscribes from email: only the SMS goes."""
    harness.members(member("lin", "林小雨", total_spend=4800))
    harness.event("lin", "purchase", "2026-03-10T23:00:00+08:00", amount=300, order_id="L-1")
    harness.tick("2026-03-10T23:00:30+08:00")
    harness.event("lin", "unsubscribe", "2026-03-11T02:00:00+08:00", channel="email")
    harness.tick("2026-03-11T02:01:00+08:00")
    harness.tick("2026-03-11T08:01:00+08:00")

    assert harness.sent("email") == []
    assert harness.steps_sent("lin") == [("tier_upgrade", "congrats_sms")]
    assert statuses(harness, "lin") == {"congrats_email": ("suppressed", "consent"),
                                        "congrats_sms": ("sent", None)}
    harness.tick("2026-03-12T08:01:00+08:00")
    assert harness.steps_sent("lin") == [("tier_upgrade", "congrats_sms")]


# --------------------------------------------------------------------------- frequency caps


@pytest.fixture
def capped(tmp_path: Path, db_url: str) -> Iterator[Harness]:
    """A harness whose config allows at most 2 messages per member per 7 days, on any channel."""
    harness = Harness(tmp_path, db_url, config={"frequency_caps": [{"channel": "any", "max": 2, "per": "7d"}]})
    yield harness
    harness.close()


def test_the_third_message_in_seven_days_across_journeys_is_suppressed(capped: Harness) -> None:
    """Lin signs up on 19 May (welcome email: 1), has her birthday on the 20th (birthday email: 2; birthday SMS: 3rd,
    suppressed); the welcome SMS due later that day is suppressed too. Amy, with only her birthday, gets both."""
    capped.members(member("lin", "林小雨", birthday="1990-05-20", total_spend=4800),
                   member("amy", "Amy", birthday="1990-05-20", locale="en"))
    capped.event("lin", "signup", "2026-05-19T10:00:00+08:00")
    capped.tick("2026-05-19T10:05:00+08:00")
    capped.tick(BIRTHDAY_TICK)
    capped.tick("2026-05-20T10:10:00+08:00")

    assert capped.steps_sent("lin") == [("welcome", "welcome_email"), ("birthday", "birthday_email")]
    assert statuses(capped, "lin") == {
        "welcome_email": ("sent", None), "birthday_email": ("sent", None),
        "birthday_sms": ("suppressed", "frequency_cap"), "welcome_sms": ("suppressed", "frequency_cap")}
    capped_row = capped.log(member_id="lin", step="birthday_sms")[0]
    assert "2" in capped_row["error"] and "7d" in capped_row["error"]
    assert capped.steps_sent("amy") == [("birthday", "birthday_email"), ("birthday", "birthday_sms")]

    capped.tick("2026-05-22T10:15:00+08:00")  # the welcome coupon: still two in the window
    assert statuses(capped, "lin")["first_order_coupon"] == ("suppressed", "frequency_cap")

    # Seven days after the welcome email only the birthday email is still inside the window: one more may go.
    capped.event("lin", "purchase", "2026-05-26T10:00:00+08:00", amount=300, order_id="L-9")
    capped.tick("2026-05-26T10:06:00+08:00")
    assert capped.steps_sent("lin") == [("welcome", "welcome_email"), ("birthday", "birthday_email"),
                                        ("tier_upgrade", "congrats_email")]
    assert statuses(capped, "lin")["congrats_sms"] == ("suppressed", "frequency_cap")


# --------------------------------------------------------------------------- more rails


def test_quiet_hours_release_at_local_8am_across_the_spring_forward_change(harness: Harness) -> None:
    """London springs forward on 29 March 2026 at 01:00: a message held from 23:30 on the 28th goes out at 08:00
    BST, which is 07:00 UTC — not at 08:00 UTC, as it would with a fixed offset."""
    harness.members(member("amy", "Amy", birthday="1990-03-28", timezone="Europe/London", locale="en",
                           phone="+447911123456", sms_opt_in=False))
    harness.tick("2026-03-28T10:01:00Z")  # birthday 10:00 London (GMT): sends at once
    assert [m.step for m in harness.sent()] == ["birthday_email"]
    harness.members(member("bea", "Bea", timezone="Europe/London", locale="en", phone="+447911123457",
                           sms_opt_in=False, last_order_at="2025-01-01T00:00:00Z"))
    harness.tick("2026-03-28T23:30:00Z")  # 23:30 GMT: inside quiet hours, the win-back email waits
    [held] = harness.log(member_id="bea")
    assert (held["status"], held["reason"]) == ("queued", "quiet_hours")
    assert held["next_attempt_at"] == datetime(2026, 3, 29, 7, 0, tzinfo=UTC)
    harness.tick("2026-03-29T06:59:00Z")
    assert harness.log(member_id="bea")[0]["status"] == "queued"
    harness.tick("2026-03-29T07:00:30Z")
    assert harness.log(member_id="bea")[0]["status"] == "sent"


def test_marketing_sms_gets_the_opt_out_hint_once(harness: Harness) -> None:
    """The shipped Chinese SMS already ends with 回T退订: it is not added twice. An English SMS without a hint
    gets the configured one."""
    harness.members(member("zh", "林小雨", birthday="1990-05-20"),
                    member("en", "Amy", birthday="1990-05-20", locale="en", phone="13800138001"))
    harness.tick(BIRTHDAY_TICK)
    texts = {m.member_id: m.text for m in harness.sent("sms")}
    assert texts["zh"].count("回T退订") == 1
    assert texts["en"].endswith("Reply STOP to opt out") and texts["en"].count("STOP") == 1


def test_an_email_address_that_is_not_valid_is_never_sent_to(harness: Harness) -> None:
    harness.members(member("bad", "Bad Address", birthday="1990-05-20", sms_opt_in=False))
    with harness.app.store.begin() as conn:  # written by another system, bypassing import validation
        from sqlalchemy import update

        from engine.store.models import members
        conn.execute(update(members).where(members.c.id == "bad").values(email="bad@@example"))
    harness.tick(BIRTHDAY_TICK)
    assert statuses(harness, "bad")["birthday_email"] == ("suppressed", "invalid_address")
    assert harness.sent() == []


def test_transactional_messages_are_exempt_from_caps_and_do_not_use_them_up(tmp_path: Path, db_url: str) -> None:
    """With at most 1 marketing message a week: the order confirmation (transactional) still goes after the
    birthday email, and does not count — the cap stops only the second marketing message."""
    import shutil

    from engine.testing import REPO

    rules = tmp_path / "rules"
    shutil.copytree(REPO / "rules", rules)
    (rules / "journeys" / "order_confirmation.yaml").write_text(
        "journey: order_confirmation\nname: 订单确认\ncategory: transactional\n"
        "trigger: {event: purchase}\nentry: {reentry: always}\n"
        "steps:\n  - id: confirm\n    send: email\n    template: welcome/first_order_coupon\n", encoding="utf-8")
    h = Harness(tmp_path, db_url, rules=rules,
                config={"frequency_caps": [{"channel": "email", "max": 1, "per": "7d"}]})
    h.members(member("lin", "林小雨", birthday="1990-05-20", sms_opt_in=False, total_spend=4900))
    h.tick(BIRTHDAY_TICK)
    h.event("lin", "purchase", "2026-05-20T11:00:00+08:00", amount=200, order_id="O-1")  # → silver
    h.tick("2026-05-20T11:05:00+08:00")
    got = {r["step"]: (r["status"], r["reason"] if r["status"] != "sent" else None) for r in h.log()}
    assert got == {"birthday_email": ("sent", None), "birthday_sms": ("suppressed", "consent"),
                   "confirm": ("sent", None), "congrats_email": ("suppressed", "frequency_cap"),
                   "congrats_sms": ("suppressed", "consent")}
    h.close()
