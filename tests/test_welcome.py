"""The welcome series, as a story: sign-up email, day-1 SMS unless they bought, day-3 coupon unless they bought."""

from __future__ import annotations

from engine.testing import Harness

LIN = {"id": "m1", "name": "林小雨", "email": "lin@example.com", "phone": "13800138000", "timezone": "Asia/Shanghai",
       "locale": "zh-CN", "email_opt_in": True, "sms_opt_in": True}
AMY = {"id": "m2", "name": "Amy", "email": "amy@example.com", "phone": "+447911123456", "timezone": "Europe/London",
       "locale": "en", "email_opt_in": True, "sms_opt_in": True}


def test_welcome_series_for_a_member_who_never_buys(harness: Harness) -> None:
    harness.members(LIN)
    harness.event("m1", "signup", "2026-03-02T10:00:00+08:00")
    harness.tick("2026-03-02T10:05:00+08:00")
    assert harness.steps_sent() == [("welcome", "welcome_email")]
    welcome = harness.sent()[0]
    assert welcome.recipient == "lin@example.com"
    assert "林小雨" in (welcome.subject or "")
    assert welcome.headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"

    harness.tick("2026-03-03T09:00:00+08:00")  # not yet a day later
    assert len(harness.sent()) == 1
    harness.tick("2026-03-03T10:10:00+08:00")
    assert harness.steps_sent()[-1] == ("welcome", "welcome_sms")
    assert harness.sent("sms")[0].recipient == "+8613800138000"

    harness.tick("2026-03-05T10:20:00+08:00")
    assert harness.steps_sent() == [("welcome", "welcome_email"), ("welcome", "welcome_sms"),
                                    ("welcome", "first_order_coupon")]
    assert [e["status"] for e in harness.enrollments(journey_id="welcome")] == ["completed"]


def test_a_purchase_on_day_two_stops_the_coupon_but_not_the_sms_already_sent(harness: Harness) -> None:
    harness.members(AMY)
    harness.event("m2", "signup", "2026-03-02T09:00:00Z")
    harness.tick("2026-03-02T09:01:00Z")
    harness.tick("2026-03-03T09:30:00Z")
    harness.event("m2", "purchase", "2026-03-04T12:00:00Z", amount=120, order_id="A-1")
    harness.tick("2026-03-04T12:05:00Z")
    harness.tick("2026-03-06T12:00:00Z")
    assert harness.steps_sent() == [("welcome", "welcome_email"), ("welcome", "welcome_sms")]
    enrollment = harness.enrollments(journey_id="welcome")[0]
    assert enrollment["status"] == "completed"
    assert enrollment["converted_at"] is not None  # the goal: a purchase within 7 days


def test_ticking_twice_at_the_same_clock_sends_nothing_new(harness: Harness) -> None:
    harness.members(LIN, AMY)
    harness.event("m1", "signup", "2026-03-02T10:00:00Z")
    harness.event("m2", "signup", "2026-03-02T10:00:00Z")
    # 18:05 in Shanghai, 10:05 in London: outside quiet hours for both
    first = harness.tick("2026-03-02T10:05:00Z")
    second = harness.tick("2026-03-02T10:05:00Z")
    assert first.counts["sent"] == 2
    assert second.counts["sent"] == 0
    assert len(harness.sent()) == 2
    assert len(harness.log()) == 2


def test_signing_up_twice_never_enrolls_twice(harness: Harness) -> None:
    harness.members(LIN)
    harness.event("m1", "signup", "2026-03-02T10:00:00+08:00")
    harness.tick("2026-03-02T10:05:00+08:00")
    harness.event("m1", "signup", "2026-03-09T10:00:00+08:00")
    harness.tick("2026-03-09T10:05:00+08:00")
    assert len(harness.enrollments(journey_id="welcome")) == 1
    assert [s for s in harness.steps_sent() if s[1] == "welcome_email"] == [("welcome", "welcome_email")]


def test_importing_old_sign_ups_does_not_welcome_last_years_members(harness: Harness) -> None:
    harness.members(LIN, AMY)
    harness.event("m1", "signup", "2025-05-02T10:00:00Z")  # history, imported today
    harness.event("m2", "signup", "2026-03-02T09:00:00Z")
    report = harness.tick("2026-03-02T10:05:00Z")
    assert report.counts["stale"] == 1
    assert harness.steps_sent() == [("welcome", "welcome_email")]
    assert harness.sent()[0].member_id == "m2"
