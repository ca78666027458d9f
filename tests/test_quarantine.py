"""One bad unit of work is set aside, retried, then quarantined; the rest goes on; `retry` runs it after a fix."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import update
from support import COUPON, member, project

from engine.cli.main import main
from engine.store import quarantine
from engine.store.models import enrollments
from engine.testing import Harness

NOON = "2026-03-02T04:00:00Z"  # 12:00 in Shanghai

@pytest.fixture
def h(tmp_path: Path, db_url: str) -> Any:
    rules, templates = project(tmp_path)
    harness = Harness(tmp_path, db_url, rules=rules, templates=templates)
    yield harness
    harness.close()


def test_a_step_that_fails_for_one_member_is_retried_then_quarantined_and_never_stops_the_others(h: Harness) -> None:
    h.members(member("ok1", 30), member("bad", "abc"), member("ok2", 50))
    first = h.tick(NOON)
    assert sorted(m.member_id for m in h.sent()) == ["ok1", "ok2"]  # the batch went on
    assert first.counts["retrying"] == 1 and first.ok
    assert any(("bad" in p and "money" not in p) or "abc" in p or "Invalid" in p for p in first.problems)
    stuck = h.enrollments(member_id="bad")[0]
    assert (stuck["status"], stuck["step"], stuck["failures"]) == ("active", "coupon_email", 1)
    assert [r["member_id"] for r in h.log()] == ["ok1", "ok2"]  # no 'failed' row: the member did not move on

    h.tick(h.at(NOON) + timedelta(seconds=30))  # not yet: retried a minute later
    assert h.enrollments(member_id="bad")[0]["failures"] == 1
    h.tick(h.at(NOON) + timedelta(minutes=1))
    assert h.enrollments(member_id="bad")[0]["failures"] == 2
    last = h.tick(h.at(NOON) + timedelta(minutes=11))
    assert last.counts["quarantined"] == 1
    with h.app.store.connect() as conn:
        [entry] = quarantine.entries(conn)
    assert (entry["kind"], entry["status"], entry["attempts"], entry["member_id"], entry["step"]) == \
        ("enrollment", "quarantined", 3, "bad", "coupon_email")
    assert "coupon" in entry["detail"] and entry["error"].startswith("TemplateRenderError")
    stuck = h.enrollments(member_id="bad")[0]
    assert stuck["status"] == "active" and stuck["next_run_at"] is None  # waits for run.py retry, in place
    h.tick(h.at(NOON) + timedelta(days=2))  # others move on; the quarantined one is not tried again by itself
    assert sorted(m.member_id for m in h.sent() if m.step == "thanks") == ["ok1", "ok2"]
    assert h.enrollments(member_id="bad")[0]["failures"] == 3


def cli(tmp_path: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--config", str(tmp_path / "config.yaml"), *args], catch_exceptions=False)


def test_log_member_show_report_and_retry_after_the_fix(h: Harness, tmp_path: Path) -> None:
    h.members(member("ok1", 30), member("bad", "abc"))
    for minutes in (0, 1, 11):
        h.tick(h.at(NOON) + timedelta(minutes=minutes))
    h.close()

    listed = cli(tmp_path, "log", "--status", "quarantined", "--format", "jsonl")
    assert listed.exit_code == 0
    [entry] = [json.loads(line) for line in listed.output.splitlines()]
    assert (entry["kind"], entry["journey_id"], entry["member_id"], entry["status"]) == \
        ("enrollment", "coupon", "bad", "quarantined")
    table = cli(tmp_path, "log")
    assert "1 unit(s) of work quarantined" in table.output
    shown = cli(tmp_path, "member", "show", "bad").output
    assert "stuck at step coupon_email: quarantined" in shown and "TemplateRenderError" in shown
    assert "set aside after failing: 1 quarantined" in cli(tmp_path, "report").output

    # Still broken: one more try each call, and it goes straight back (exit 1, nothing sent).
    later = "2026-03-03T04:00:00Z"  # noon in Shanghai: no quiet hours in the way
    again = cli(tmp_path, "retry", "--now", later)
    assert again.exit_code == 1 and "failed again, quarantined" in again.output
    # The marketer fixes the member's data; retry sends it, once.
    h2 = Harness(tmp_path, h.config.database.url, rules=tmp_path / "rules", templates=tmp_path / "templates")
    h2.members(member("bad", 25))
    h2.close()
    fixed = cli(tmp_path, "retry", "--now", later)
    assert fixed.exit_code == 0 and "went through" in fixed.output
    outbox = tmp_path / "var" / "outbox" / "email.jsonl"
    sent = [json.loads(line) for line in outbox.read_text(encoding="utf-8").splitlines()]
    assert [(m["member_id"], m["step"]) for m in sent] == [("bad", "coupon_email")]
    assert "25" in sent[0]["text"]
    h3 = Harness(tmp_path, h.config.database.url, rules=tmp_path / "rules", templates=tmp_path / "templates")
    with h3.app.store.connect() as conn:
        assert [e["status"] for e in quarantine.entries(conn, statuses=())] == ["resolved"]
    assert h3.enrollments(member_id="bad")[0]["failures"] == 0
    h3.close()


def test_abandon_ends_the_enrollment_and_logs_the_message_failed(h: Harness, tmp_path: Path) -> None:
    h.members(member("bad", "abc"))
    for minutes in (0, 1, 11):
        h.tick(h.at(NOON) + timedelta(minutes=minutes))
    h.close()
    result = cli(tmp_path, "retry", "--abandon")
    assert result.exit_code == 0 and "left the journey" in result.output
    h2 = Harness(tmp_path, h.config.database.url, rules=tmp_path / "rules", templates=tmp_path / "templates")
    [row] = h2.log()
    assert (row["status"], row["reason"], row["step"]) == ("failed", "abandoned", "coupon_email")
    assert "abandoned after quarantine" in row["error"]
    [enrollment] = h2.enrollments()
    assert (enrollment["status"], enrollment["exit_reason"]) == ("exited", "abandoned after quarantine")
    h2.close()


def test_a_batch_write_that_fails_for_one_enrollment_is_written_one_by_one(h: Harness,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """When the batch's single transaction fails because of one enrollment's data (the database refuses a value),
    the others are still written and sent, and that one is set aside."""
    from engine.tick import writer as writer_module

    real = writer_module.save_member_updates
    h.members(*(member(f"m{i}", 10) for i in range(4)))

    def refuse_m2(conn: Any, changed: Any, loyalty: Any, now: Any) -> None:  # the database refusing one row
        if any(after["id"] == "m2" for _, after, _, _ in changed):
            raise ValueError("value out of range for column points")
        real(conn, changed, loyalty, now)

    rules = Path(h.config.rules_path)
    (rules / "journeys" / "coupon.yaml").write_text(COUPON.replace(
        "steps:\n", "steps:\n  - id: bonus\n    update: {points: 100}\n"), encoding="utf-8")
    monkeypatch.setattr(writer_module, "save_member_updates", refuse_m2)
    report = h.tick(NOON)
    assert sorted(m.member_id for m in h.sent()) == ["m0", "m1", "m3"]
    assert report.counts["retrying"] == 1
    stuck = h.enrollments(member_id="m2")[0]
    assert (stuck["step"], stuck["failures"]) == ("bonus", 1)  # nothing of its step was written
    assert [r["member_id"] for r in h.log()] == ["m0", "m1", "m3"]


def test_a_journey_whose_audience_fails_in_the_database_is_paused_and_the_others_run(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.tick import entry as entry_module

    rules = Path(h.config.rules_path)
    (rules / "journeys" / "other.yaml").write_text(COUPON.replace("journey: coupon", "journey: other"),
                                                   encoding="utf-8")
    real = entry_module.to_sql

    def broken_for_coupon(condition: Any, now: Any, segments: Any, dialect: str, indexed: bool = True) -> Any:
        if "coupon" in [j.id for j in h.app.versions.all_live() if j.journey.trigger.condition is condition]:  # type: ignore[union-attr]
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        return real(condition, now, segments, dialect, indexed)

    h.members(member("ok1", 30))
    monkeypatch.setattr(entry_module, "to_sql", broken_for_coupon)
    report = h.tick(NOON)
    assert report.counts["paused"] == 1 and report.ok
    assert [e["journey_id"] for e in h.enrollments()] == ["other"]
    assert h.steps_sent() == [("other", "coupon_email")]
    with h.app.store.connect() as conn:
        assert quarantine.paused_journeys(conn)["coupon"][1].startswith("entry: OverflowError")
    monkeypatch.setattr(entry_module, "to_sql", real)
    h.tick(h.at(NOON) + timedelta(hours=1))  # still paused: nobody lifted it
    assert [e["journey_id"] for e in h.enrollments()] == ["other"]
    (rules / "journeys" / "coupon.yaml").write_text(COUPON.replace("name: 专属优惠券", "name: 优惠券"),
                                                    encoding="utf-8")
    h.tick(h.at(NOON) + timedelta(hours=2))  # a new version of the journey runs again
    assert sorted(e["journey_id"] for e in h.enrollments()) == ["coupon", "other"]


def test_an_event_whose_matching_fails_is_quarantined_and_the_others_are_matched(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    rules = Path(h.config.rules_path)
    (rules / "journeys" / "coupon.yaml").write_text(COUPON.replace("{segment: lapsed_60d}", "{event: cart_abandoned}"),
                                                    encoding="utf-8")
    h.members(member("a", 1), member("b", 1), member("c", 1))
    for who in ("a", "b", "c"):
        h.event(who, "cart_abandoned", "2026-03-02T03:00:00Z")
    h.tick(NOON)  # the matcher is built
    for who in ("a", "b", "c"):
        h.event(who, "cart_abandoned", "2026-03-03T03:00:00Z")
    matcher = h.app.events.matchers._matcher
    assert matcher is not None
    real = matcher.matches

    def fails_for_b(event_id: int, kind: str, props: Any, person: Any, now: Any) -> set[str]:
        if person["id"] == "b":
            raise RuntimeError("durable-rules: message could not be posted")
        return real(event_id, kind, props, person, now)

    monkeypatch.setattr(matcher, "matches", fails_for_b)
    with h.app.store.begin() as conn:  # let them enter again, so the second events would start journeys
        conn.execute(update(enrollments).values(status="completed"))
    report = h.tick("2026-03-03T04:00:00Z")
    assert report.counts["events"] == 3 and report.counts["quarantined"] == 1
    with h.app.store.connect() as conn:
        [entry] = quarantine.entries(conn)
    assert (entry["kind"], entry["member_id"], entry["status"]) == ("event", "b", "quarantined")
