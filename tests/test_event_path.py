"""Events go through durable-rules (engine.matching.events): many members, restarts, and the same answers as Python."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("durable", reason="durable-rules does not import on this Python (3.13+): the engine uses its "
                    "Python matcher")

from engine.ingest.events import import_events
from engine.matching.events import EventMatcher, PythonMatcher
from engine.testing import Harness


@pytest.mark.slow
def test_events_of_well_over_1024_distinct_members_all_match(harness: Harness) -> None:
    """durable-rules holds at most 1,024 sessions per ruleset: the engine uses one stateless session, so 1,500
    members signing up in one tick all enter the welcome journey (and app sign-ups the A/B one)."""
    count = 1500
    harness.members(*({"id": f"s{i}", "name": f"S{i}", "email": f"s{i}@example.com", "timezone": "Asia/Shanghai"}
                      for i in range(count)))
    path = harness.tmp / "signups.jsonl"
    path.write_text("".join(json.dumps({"member_id": f"s{i}", "type": "signup", "at": "2026-03-02T02:00:00Z",
                                        "properties": {"source": "app" if i % 5 == 0 else "web"}}) + "\n"
                            for i in range(count)), encoding="utf-8")
    report = import_events(harness.app.store, path, harness.app.loyalty(), harness.at("2026-03-02T02:00:00Z"))
    assert report.loaded == count
    tick = harness.tick("2026-03-02T02:05:00Z")
    assert tick.counts["events"] == count and tick.counts["enrolled"] == count
    journeys = [e["journey_id"] for e in harness.enrollments()]
    assert journeys.count("welcome_ab") == count // 5 and journeys.count("welcome") == count - count // 5
    assert isinstance(harness.app.events.matchers._matcher, EventMatcher)


def test_matching_survives_a_restart(tmp_path: Path, db_url: str) -> None:
    """Matching state is rebuilt from the database: a purchase recorded while no daemon ran still ends win-back."""
    first = Harness(tmp_path, db_url)
    first.members({"id": "w", "email": "w@example.com", "email_opt_in": True, "timezone": "Asia/Shanghai",
                   "last_order_at": "2025-06-01T00:00:00Z"})
    first.tick("2026-03-02T04:00:00Z")
    first.event("w", "purchase", "2026-03-03T04:00:00Z", amount=99, order_id="R-1")
    first.close()
    second = Harness(tmp_path, db_url)
    second.tick("2026-03-03T05:00:00Z")
    [winback] = second.enrollments(journey_id="winback")
    assert winback["status"] == "exited" and winback["converted_at"] is not None
    second.close()


def test_the_python_fallback_gives_the_same_keys(harness: Harness) -> None:
    from engine.matching.events import rules_for

    live = harness.app.live_journeys(harness.at("2026-03-02T04:00:00Z"))
    rules = rules_for(live.values())
    engine_matcher, python = EventMatcher(rules), PythonMatcher(rules)
    member = {"id": "m", "tier": "silver", "total_spend": 6000.0, "attributes": {}}
    now = harness.at("2026-03-02T04:00:00Z")
    for kind, props in [("signup", {"source": "app"}), ("signup", {}), ("tier_changed", {"direction": "up"}),
                        ("tier_changed", {"direction": "down"}), ("purchase", {"amount": 10})]:
        assert engine_matcher.matches(1, kind, props, member, now) == python.matches(1, kind, props, member, now)
    engine_matcher.close()
