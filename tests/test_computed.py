"""Computed attributes: the same SQL definition selects audiences and feeds `if` steps and event filters."""

from __future__ import annotations

import shutil
from pathlib import Path

from engine.testing import REPO, Harness

LOYAL = """journey: loyal_thanks
name: 忠实会员感谢
trigger:
  segment: {all: [{orders_last_30_days: {gte: 2}}, {spend_last_30_days: {gte: 500}}]}
entry: {reentry: never}
steps:
  - id: newcomer
    if: {days_since_signup: {lt: 90}}
    then: thanks_new
    else: thanks_old
  - id: thanks_new
    send: email
    template: review/thanks
  - end: true
  - id: thanks_old
    send: email
    template: review/ask
"""

BIG_ORDER = """journey: big_order
name: 大额订单
trigger:
  event: purchase
  where: {all: [{event.amount: {gte: 1000}}, {days_since_last_order: {lte: 1}}]}
entry: {reentry: always}
steps:
  - id: vip_call
    send: email
    template: review/thanks
"""


def person(member_id: str, signup: str) -> dict[str, object]:
    return {"id": member_id, "name": member_id, "email": f"{member_id}@example.com", "email_opt_in": True,
            "timezone": "Asia/Shanghai", "locale": "zh-CN", "signup_at": signup}


def rules(tmp_path: Path) -> Path:
    target = tmp_path / "rules"
    shutil.copytree(REPO / "rules", target)
    for path in (target / "journeys").glob("*.yaml"):
        path.unlink()
    (target / "journeys" / "loyal_thanks.yaml").write_text(LOYAL, encoding="utf-8")
    (target / "journeys" / "big_order.yaml").write_text(BIG_ORDER, encoding="utf-8")
    return target


def test_window_counts_and_day_counts_select_and_branch_alike(tmp_path: Path, db_url: str) -> None:
    h = Harness(tmp_path, db_url, rules=rules(tmp_path))
    h.members(person("new", "2026-02-01T00:00:00Z"), person("old", "2024-01-01T00:00:00Z"),
              person("once", "2024-01-01T00:00:00Z"), person("stale", "2024-01-01T00:00:00Z"))
    for who, at, amount in [("new", "2026-02-20", 300), ("new", "2026-02-25", 300), ("old", "2026-02-10", 400),
                            ("old", "2026-02-28", 200), ("once", "2026-02-27", 900), ("stale", "2025-12-01", 800),
                            ("stale", "2026-02-27", 100)]:
        h.event(who, "purchase", f"{at}T12:00:00Z", amount=amount, order_id=f"{who}-{at}")
    h.tick("2026-03-02T04:00:00Z")
    got = {m.member_id: m.step for m in h.sent() if m.journey == "loyal_thanks"}
    assert got == {"new": "thanks_new", "old": "thanks_old"}  # once: one order; stale: one in the window
    h.close()


def test_a_computed_attribute_in_an_event_filter(tmp_path: Path, db_url: str) -> None:
    h = Harness(tmp_path, db_url, rules=rules(tmp_path))
    h.members(person("vip", "2024-01-01T00:00:00Z"))
    h.event("vip", "purchase", "2026-03-02T03:00:00Z", amount=1200, order_id="V-1")
    h.event("vip", "purchase", "2026-03-02T03:30:00Z", amount=80, order_id="V-2")
    h.tick("2026-03-02T04:00:00Z")
    assert [(m.journey, m.step) for m in h.sent() if m.journey == "big_order"] == [("big_order", "vip_call")]
    h.close()


def test_days_since_floors_alike_on_both_databases_for_past_and_future_dates(tmp_path: Path, db_url: str) -> None:
    """A signup date 36 hours in the future is day -2 (floored), 36 hours in the past day 1, in SQL and in the
    values loaded for Python."""
    from sqlalchemy import select

    from engine.store.computed import computed_columns
    from engine.store.models import members

    h = Harness(tmp_path, db_url, rules=rules(tmp_path))
    h.members(person("future", "2026-03-03T16:00:00Z"), person("past", "2026-02-28T16:00:00Z"))
    now = h.at("2026-03-02T04:00:00Z")
    with h.app.store.connect() as conn:
        got = dict(conn.execute(select(members.c.id, *computed_columns(["days_since_signup"], now,
                                                                       h.app.store.dialect))).all())
    assert got == {"future": -2, "past": 1}
    h.close()
