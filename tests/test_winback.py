"""The win-back sequence, as a story: members whose last order is more than 60 days old get an email, and seven
days later, if they still have not ordered, an SMS offer. A purchase ends the sequence at once (and is the goal);
after one pass a member may come back into it only after 180 days."""

from __future__ import annotations

from typing import Any

from engine.testing import Harness

FIRST_TOUCH = ("winback", "first_touch")
SMS_OFFER = ("winback", "sms_offer")


def member(member_id: str, name: str, last_order_at: str | None, **extra: Any) -> dict[str, Any]:
    return {"id": member_id, "name": name, "email": f"{member_id}@example.com", "phone": "13800138000",
            "timezone": "Asia/Shanghai", "locale": "zh-CN", "total_spend": 800, "order_count": 0 if
            last_order_at is None else 3, "last_order_at": last_order_at, "email_opt_in": True, "sms_opt_in": True,
            **extra}


def test_a_lapsed_member_gets_the_email_then_seven_days_later_the_sms(harness: Harness) -> None:
    """Wang last ordered on 15 January; on 1 April (76 days on) the email goes, on 8 April the SMS offer."""
    harness.members(member("wang", "王芳", "2026-01-15T12:00:00+08:00"))

    harness.tick("2026-04-01T10:00:00+08:00")
    assert harness.steps_sent() == [FIRST_TOUCH]
    email = harness.sent("email")[0]
    assert email.recipient == "wang@example.com"
    assert email.subject == "王芳，好久不见，我们想您了"
    assert "2026年1月15日" in email.text  # the last order date, in her locale

    harness.tick("2026-04-07T10:00:00+08:00")  # six days: still waiting
    assert harness.steps_sent() == [FIRST_TOUCH]

    harness.tick("2026-04-08T10:05:00+08:00")
    assert harness.steps_sent() == [FIRST_TOUCH, SMS_OFFER]
    sms = harness.sent("sms")[0]
    assert sms.recipient == "+8613800138000"
    assert "BACK60" in sms.text
    enrollment = harness.enrollments(journey_id="winback")[0]
    assert enrollment["status"] == "completed"
    assert enrollment["converted_at"] is None


def test_a_purchase_during_the_wait_ends_the_sequence_at_the_next_tick(harness: Harness) -> None:
    """Wang buys three days after the email: she leaves at the next tick, gets no SMS, and counts as converted."""
    harness.members(member("wang", "王芳", "2026-01-15T12:00:00+08:00"))
    harness.tick("2026-04-01T10:00:00+08:00")
    harness.event("wang", "purchase", "2026-04-04T12:00:00+08:00", amount=259, order_id="W-1001")

    harness.tick("2026-04-04T12:05:00+08:00")
    enrollment = harness.enrollments(journey_id="winback")[0]
    assert enrollment["status"] == "exited"
    assert enrollment["converted_at"] is not None
    assert enrollment["converted_at"].isoformat() == "2026-04-04T04:00:00+00:00"

    harness.tick("2026-04-08T10:05:00+08:00")
    harness.tick("2026-04-15T10:05:00+08:00")
    # The purchase starts a review request (its own journey); win-back sends nothing more.
    assert [s for s in harness.steps_sent() if s[0] == "winback"] == [FIRST_TOUCH]
    assert [m["step"] for m in harness.log(journey="winback")] == ["first_touch"]  # not even a suppressed SMS row
    assert ("review_request", "ask_review") in harness.steps_sent()


def test_a_member_whose_last_order_is_30_days_old_does_not_enter_until_60_days_have_passed(harness: Harness) -> None:
    """Zhao ordered on 2 March: on 1 April (30 days) and 29 April (58 days) nothing; on 2 May (61 days) the email."""
    harness.members(member("zhao", "赵磊", "2026-03-02T12:00:00+08:00"))
    harness.tick("2026-04-01T10:00:00+08:00")
    harness.tick("2026-04-29T10:00:00+08:00")
    assert harness.sent() == []
    assert harness.enrollments(journey_id="winback") == []

    harness.tick("2026-05-02T13:00:00+08:00")
    assert harness.steps_sent("zhao") == [FIRST_TOUCH]


def test_a_member_who_never_ordered_is_not_lapsed(harness: Harness) -> None:
    """Sun has no order at all (last_order_at empty): she is not a lapsed customer and never enters win-back."""
    harness.members(member("sun", "孙丽", None), member("wang", "王芳", "2026-01-15T12:00:00+08:00"))
    harness.tick("2026-04-01T10:00:00+08:00")
    harness.tick("2026-09-01T10:00:00+08:00")
    assert harness.steps_sent("sun") == []
    assert [e["member_id"] for e in harness.enrollments(journey_id="winback")] == ["wang"]
    assert [m["member_id"] for m in harness.log()] == ["wang", "wang"]


def test_after_one_pass_a_still_lapsed_member_comes_back_only_after_180_days(harness: Harness) -> None:
    """Wang goes through win-back in April and stays lapsed: nothing again before 180 days, then a new pass."""
    harness.members(member("wang", "王芳", "2026-01-15T12:00:00+08:00"))
    harness.tick("2026-04-01T10:00:00+08:00")
    harness.tick("2026-04-08T10:05:00+08:00")
    assert harness.steps_sent() == [FIRST_TOUCH, SMS_OFFER]

    harness.tick("2026-06-01T10:00:00+08:00")
    harness.tick("2026-09-27T10:00:00+08:00")  # 179 days after entering (172 after completing)
    assert harness.steps_sent() == [FIRST_TOUCH, SMS_OFFER]
    assert len(harness.enrollments(journey_id="winback")) == 1

    harness.tick("2026-10-06T10:00:00+08:00")  # 188 days after entering, 181 after completing
    assert harness.steps_sent() == [FIRST_TOUCH, SMS_OFFER, FIRST_TOUCH]
    assert [e["status"] for e in harness.enrollments(journey_id="winback")] == ["completed", "active"]
    harness.tick("2026-10-13T10:05:00+08:00")
    assert harness.steps_sent() == [FIRST_TOUCH, SMS_OFFER, FIRST_TOUCH, SMS_OFFER]


def test_a_member_who_ordered_before_the_sms_but_without_an_event_gets_no_sms(harness: Harness) -> None:
    """Li's last order is updated by a member re-import (not an event) during the wait: the 'still lapsed' check
    after seven days sees the new order date and ends the sequence without the SMS."""
    harness.members(member("li", "李娜", "2026-01-15T12:00:00+08:00"))
    harness.tick("2026-04-01T10:00:00+08:00")
    harness.members(member("li", "李娜", "2026-04-03T15:00:00+08:00"))
    harness.tick("2026-04-08T10:05:00+08:00")
    assert harness.steps_sent() == [FIRST_TOUCH]
    enrollment = harness.enrollments(journey_id="winback")[0]
    assert enrollment["status"] == "completed"
