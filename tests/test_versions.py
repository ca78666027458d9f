"""Journey versions: edits, broken files, removed files, paused and draft journeys."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine.testing import REPO, Harness

LAPSED = {"name": "Ada", "email": "ada@example.com", "phone": "+447911123456", "timezone": "Asia/Shanghai",
          "locale": "en", "email_opt_in": True, "sms_opt_in": True, "last_order_at": "2025-09-01T00:00:00Z"}
NOON = "2026-03-02T04:00:00Z"  # 12:00 in Shanghai


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    target = tmp_path / "rules"
    shutil.copytree(REPO / "rules", target)
    for other in ("welcome", "birthday", "tier_upgrade"):
        (target / "journeys" / f"{other}.yaml").unlink()
    return target


def winback(rules: Path) -> Path:
    return rules / "journeys" / "winback.yaml"


def test_members_finish_on_the_version_they_entered(tmp_path: Path, db_url: str, rules: Path) -> None:
    h = Harness(tmp_path, db_url, rules=rules)
    h.members({"id": "early", **LAPSED})
    h.tick(NOON)
    path = winback(rules)
    path.write_text(path.read_text().replace("- wait: 7d", "- wait: 3d"), encoding="utf-8")
    h.members({"id": "late", **LAPSED, "email": "late@example.com"})
    h.tick("2026-03-03T04:00:00Z")  # the edit is picked up; "late" enters version 2
    h.tick("2026-03-06T05:00:00Z")
    assert h.steps_sent("late") == [("winback", "first_touch"), ("winback", "sms_offer")]
    assert h.steps_sent("early") == [("winback", "first_touch")]  # version 1 still waits 7 days
    h.tick("2026-03-09T05:00:00Z")
    assert h.steps_sent("early") == [("winback", "first_touch"), ("winback", "sms_offer")]
    versions = {(r["member_id"], r["journey_version"]) for r in h.log()}
    assert versions == {("early", 1), ("late", 2)}
    h.close()


def test_a_broken_journey_file_keeps_its_last_good_version_running(tmp_path: Path, db_url: str,
                                                                   rules: Path) -> None:
    h = Harness(tmp_path, db_url, rules=rules)
    h.members({"id": "m1", **LAPSED})
    h.tick(NOON)
    path = winback(rules)
    path.write_text(path.read_text().replace("send: sms", "send: pigeon"), encoding="utf-8")
    h.members({"id": "m2", **LAPSED, "email": "m2@example.com"})
    h.tick("2026-03-09T05:00:00Z")
    assert any("pigeon" in p.message for p in h.app.rules().problems)
    assert h.steps_sent("m1") == [("winback", "first_touch"), ("winback", "sms_offer")]
    assert h.steps_sent("m2") == [("winback", "first_touch")]  # new members still enter, on version 1
    assert {r["journey_version"] for r in h.log()} == {1}
    h.close()


def test_a_removed_journey_is_retired(tmp_path: Path, db_url: str, rules: Path) -> None:
    h = Harness(tmp_path, db_url, rules=rules)
    h.members({"id": "m1", **LAPSED})
    h.tick(NOON)
    winback(rules).unlink()
    h.members({"id": "m2", **LAPSED, "email": "m2@example.com"})
    h.tick("2026-03-10T05:00:00Z")
    assert h.steps_sent() == [("winback", "first_touch")]
    h.close()


def test_paused_journeys_neither_enroll_nor_send_and_resume_where_they_were(tmp_path: Path, db_url: str,
                                                                            rules: Path) -> None:
    h = Harness(tmp_path, db_url, rules=rules)
    h.members({"id": "m1", **LAPSED})
    h.tick(NOON)
    path = winback(rules)
    original = path.read_text()
    path.write_text(original.replace("status: active", "status: paused"), encoding="utf-8")
    h.members({"id": "m2", **LAPSED, "email": "m2@example.com"})
    h.tick("2026-03-10T05:00:00Z")
    assert h.steps_sent() == [("winback", "first_touch")]
    assert [e["member_id"] for e in h.enrollments()] == ["m1"]
    path.write_text(original, encoding="utf-8")
    h.tick("2026-03-10T06:00:00Z")
    assert ("winback", "sms_offer") in h.steps_sent("m1")
    assert h.steps_sent("m2") == [("winback", "first_touch")]
    h.close()


def test_draft_journeys_are_validated_but_never_run(tmp_path: Path, db_url: str, rules: Path) -> None:
    path = winback(rules)
    path.write_text(path.read_text().replace("status: active", "status: draft"), encoding="utf-8")
    h = Harness(tmp_path, db_url, rules=rules)
    h.members({"id": "m1", **LAPSED})
    h.tick(NOON)
    assert h.app.rules().problems == []
    assert h.enrollments() == [] and h.log() == []
    h.close()


def test_exit_when_a_condition_holds_takes_effect_mid_wait(tmp_path: Path, db_url: str, rules: Path) -> None:
    path = winback(rules)
    path.write_text(path.read_text().replace("exit_when:\n  event: purchase",
                                             "exit_when:\n  segment: {sms_opt_in: false}"), encoding="utf-8")
    h = Harness(tmp_path, db_url, rules=rules)
    h.members({"id": "m1", **LAPSED})
    h.tick(NOON)
    h.members({"id": "m1", "sms_opt_in": False})
    h.tick("2026-03-04T04:00:00Z")
    [enrollment] = h.enrollments()
    assert enrollment["status"] == "exited" and enrollment["exit_reason"] == "exit_when: condition met"
    h.tick("2026-03-10T04:00:00Z")
    assert h.steps_sent() == [("winback", "first_touch")]
    h.close()
