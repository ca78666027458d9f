"""Step types as stories: split with holdout, update, wait until an event, send with fallback, daily entry caps."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from engine.testing import REPO, Harness


def person(member_id: str, **extra: Any) -> dict[str, Any]:
    return {"id": member_id, "name": f"会员{member_id}", "email": f"{member_id}@example.com", "phone": "13800138000",
            "timezone": "Asia/Shanghai", "locale": "zh-CN", "email_opt_in": True, "sms_opt_in": True, **extra}


def journeys(tmp_path: Path, *keep: str, extra: dict[str, str] | None = None) -> Path:
    rules = tmp_path / "rules"
    shutil.copytree(REPO / "rules", rules)
    for path in (rules / "journeys").glob("*.yaml"):
        if path.stem not in keep:
            path.unlink()
    for name, text in (extra or {}).items():
        (rules / "journeys" / f"{name}.yaml").write_text(text, encoding="utf-8")
    return rules


@pytest.mark.slow
def test_the_ab_welcome_splits_app_sign_ups_by_weight_and_logs_the_holdout(tmp_path: Path, db_url: str) -> None:
    """400 app sign-ups: about 45% coupon, 45% points (+200 points), 10% holdout who get nothing but a logged row;
    the same member always lands in the same variant."""
    h = Harness(tmp_path, db_url, rules=journeys(tmp_path, "welcome_ab", "welcome"))
    h.members(*(person(f"a{i}", phone=None) for i in range(400)), person("web", phone=None))
    for i in range(400):
        h.event(f"a{i}", "signup", "2026-03-02T09:00:00+08:00", source="app")
    h.event("web", "signup", "2026-03-02T09:00:00+08:00", source="web")
    h.tick("2026-03-02T09:05:00+08:00")
    rows = h.log(journey="welcome_ab")
    variants = Counter(r["variant"] for r in rows)
    assert sum(variants.values()) == 400
    assert 140 <= variants["coupon"] <= 220 and 140 <= variants["points"] <= 220 and 20 <= variants["holdout"] <= 65
    holdout = [r for r in rows if r["variant"] == "holdout"]
    assert {(r["status"], r["reason"], r["step"]) for r in holdout} == {("suppressed", "holdout", "offer_test")}
    assert {r["step"] for r in rows if r["variant"] == "points"} == {"points_email"}
    points_member = next(r["member_id"] for r in rows if r["variant"] == "points")
    assert "200" in next(m.text for m in h.sent() if m.member_id == points_member)
    assert [s for s in h.steps_sent("web")] == [("welcome", "welcome_email")]  # web sign-ups: the classic series
    enrollments = {e["member_id"]: e["variant"] for e in h.enrollments(journey_id="welcome_ab")}
    assert enrollments[points_member] == "points"
    h.close()


def test_an_update_step_adds_points_and_tags_and_records_the_change(tmp_path: Path, db_url: str) -> None:
    h = Harness(tmp_path, db_url, rules=journeys(tmp_path, "welcome_ab"))
    h.members(*(person(f"p{i}", points=10) for i in range(40)))
    for i in range(40):
        h.event(f"p{i}", "signup", "2026-03-02T09:00:00+08:00", source="app")
    h.tick("2026-03-02T09:05:00+08:00")
    points_people = [e["member_id"] for e in h.enrollments() if e["variant"] == "points"]
    assert points_people
    from sqlalchemy import select

    from engine.store.models import events, members
    with h.app.store.connect() as conn:
        row = conn.execute(select(members).where(members.c.id == points_people[0])).mappings().one()
        changes = conn.execute(select(events.c.properties).where(events.c.member_id == points_people[0],
                                                                 events.c.type == "member_updated")).scalars().all()
    assert row["points"] == 210 and row["attributes"]["tags"] == ["welcome_bonus"]
    assert changes and changes[0]["changes"]["points"] == {"from": 10, "to": 210}
    h.close()


def test_a_review_request_thanks_on_the_review_and_reminds_on_the_timeout(harness: Harness) -> None:
    harness.members(person("fast"), person("slow", phone="13900139000"))
    for who in ("fast", "slow"):
        harness.event(who, "purchase", "2026-03-02T10:00:00+08:00", amount=100, order_id=f"O-{who}")
    harness.tick("2026-03-02T10:05:00+08:00")
    harness.tick("2026-03-05T10:10:00+08:00")  # three days later: the invitation
    assert sorted(m.member_id for m in harness.sent() if m.step == "ask_review") == ["fast", "slow"]
    assert "O-fast" in next(m.text for m in harness.sent() if m.member_id == "fast")
    harness.event("fast", "review_submitted", "2026-03-06T20:00:00+08:00", stars=5)
    harness.tick("2026-03-06T20:05:00+08:00")
    assert [s for s in harness.steps_sent("fast") if s[0] == "review_request"] == [
        ("review_request", "ask_review"), ("review_request", "thank_you")]
    harness.tick("2026-03-12T10:15:00+08:00")  # 7 days after the invitation: the slow one is reminded
    assert [s for s in harness.steps_sent("slow") if s[0] == "review_request"] == [
        ("review_request", "ask_review"), ("review_request", "reminder")]
    assert [s for s in harness.steps_sent("fast") if s[1] == "reminder"] == []
    fast = harness.enrollments(journey_id="review_request", member_id="fast")[0]
    assert fast["converted_at"] is not None and fast["status"] == "completed"


FALLBACK = """journey: points_news
name: 积分通知
trigger: {event: points_news}
entry: {reentry: always}
steps:
  - id: tell
    send: email
    template: review/reminder_both
    fallback: sms
"""


def test_send_falls_back_to_the_other_channel_when_the_first_cannot_reach(tmp_path: Path, db_url: str) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(REPO / "templates", templates)
    for locale in ("zh-CN", "en"):
        folder = templates / locale / "review"
        (folder / "reminder_both.subject.j2").write_text("积分提醒", encoding="utf-8")
        (folder / "reminder_both.text.j2").write_text("{{ member.name }}，您有积分待使用。", encoding="utf-8")
    h = Harness(tmp_path, db_url, rules=journeys(tmp_path, extra={"points_news": FALLBACK}), templates=templates)
    h.members(person("both"), person("sms_only", email_opt_in=False), person("neither", email=None, sms_opt_in=False))
    for who in ("both", "sms_only", "neither"):
        h.event(who, "points_news", "2026-03-02T10:00:00+08:00")
    h.tick("2026-03-02T10:05:00+08:00")
    got = {r["member_id"]: (r["channel"], r["status"], r["reason"]) for r in h.log()}
    assert got["both"] == ("email", "sent", None)
    assert got["sms_only"] == ("sms", "sent", "fallback")
    assert got["neither"] == ("email", "suppressed", "invalid_address")
    h.close()


CAPPED = """journey: vip_survey
name: 会员调研
trigger: {segment: high_value}
entry: {reentry: never, max_per_day: 3}
steps:
  - id: ask
    send: email
    template: review/ask
"""


def test_max_per_day_spreads_a_big_audience_over_days(tmp_path: Path, db_url: str) -> None:
    h = Harness(tmp_path, db_url, rules=journeys(tmp_path, extra={"vip_survey": CAPPED}))
    h.members(*(person(f"v{i}", tier="gold", total_spend=30000) for i in range(7)))
    h.tick("2026-03-02T10:00:00+08:00")
    h.tick("2026-03-02T15:00:00+08:00")
    assert len(h.enrollments(journey_id="vip_survey")) == 3
    h.tick("2026-03-03T10:00:00+08:00")
    h.tick("2026-03-04T10:00:00+08:00")
    assert len(h.enrollments(journey_id="vip_survey")) == 7
    h.close()


WEEKDAY = """journey: weekend_nudge
name: 周末提醒
trigger: {event: browse}
entry: {reentry: always}
steps:
  - wait: {until: "10:00", weekdays: [sat, sun]}
  - id: nudge
    send: email
    template: review/ask
"""


def test_wait_until_a_local_time_on_allowed_weekdays(tmp_path: Path, db_url: str) -> None:
    h = Harness(tmp_path, db_url, rules=journeys(tmp_path, extra={"weekend_nudge": WEEKDAY}))
    h.members(person("w1"))
    h.event("w1", "browse", "2026-03-04T12:00:00+08:00")  # a Wednesday
    h.tick("2026-03-04T12:05:00+08:00")
    h.tick("2026-03-06T10:05:00+08:00")  # Friday 10:05: not an allowed day
    assert h.sent() == []
    h.tick("2026-03-07T10:01:00+08:00")  # Saturday
    assert [m.step for m in h.sent()] == ["nudge"]
    h.close()
