"""Templates are rules: one saved broken keeps its last good version in use, across restarts (issue 13, item 7)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from support import member, project

from engine.store import quarantine
from engine.testing import Harness

NOON = "2026-03-02T04:00:00Z"  # 12:00 in Shanghai
GOOD = "Your coupon: {{ member.attributes.coupon | money }}"
BROKEN = "Your coupon: {{ member.attributes.coupon | money }"  # the closing brace lost while editing


def texts(h: Harness) -> list[tuple[str, str]]:
    return [(m.member_id, m.text) for m in h.sent()]


def write(templates: Path, body: str) -> None:
    for locale in ("en", "zh-CN"):
        (templates / locale / "test" / "coupon.text.j2").write_text(body, encoding="utf-8")


def test_a_template_saved_broken_while_the_daemon_runs_keeps_its_last_good_version(tmp_path: Path,
                                                                                   db_url: str) -> None:
    rules, templates = project(tmp_path)
    h = Harness(tmp_path, db_url, rules=rules, templates=templates)
    h.members(member("a", 10))
    h.tick(NOON)
    assert [t for _, t in texts(h)] == ["Your coupon: CN¥10.00"]

    write(templates, BROKEN)  # saved broken while `serve` runs
    h.members(member("b", 20), member("c", 30))
    report = h.tick(h.at(NOON) + timedelta(minutes=1))
    assert report.counts["sent"] == 2 and "retrying" not in report.counts
    assert texts(h)[1:] == [("b", "Your coupon: CN¥20.00"), ("c", "Your coupon: CN¥30.00")]
    problems = [str(p) for p in h.app.rules().problems]
    assert any("coupon.text.j2:1:" in p and "template syntax error" in p and "still using its last good version"
               in p for p in problems)
    h.close()

    # A restart with the file still broken: the last good version comes back from the database.
    again = Harness(tmp_path, db_url, rules=rules, templates=templates)
    again.members(member("d", 40))
    again.tick(again.at(NOON) + timedelta(minutes=2))
    assert texts(again) == [("d", "Your coupon: CN¥40.00")]

    write(templates, "Fixed: {{ member.attributes.coupon | money }}")  # the fix is used at once
    again.members(member("e", 50))
    again.tick(again.at(NOON) + timedelta(minutes=3))
    assert texts(again)[-1] == ("e", "Fixed: CN¥50.00")
    assert not [p for p in again.app.rules().problems if "coupon" in p.file]
    again.close()


def test_a_template_broken_from_the_start_holds_its_messages_until_fixed(tmp_path: Path, db_url: str) -> None:
    """No good version yet: the messages are not dropped as `failed` (5 of 10 once were, while a template was
    being edited); the members wait at the step and go once it is fixed."""
    rules, templates = project(tmp_path)
    write(templates, BROKEN)
    h = Harness(tmp_path, db_url, rules=rules, templates=templates)
    h.members(member("a", 10), member("b", 20))
    report = h.tick(NOON)
    assert report.counts["retrying"] == 2 and h.log() == [] and h.sent() == []
    problems = [str(p) for p in h.app.rules().problems]
    assert any("it has no good version yet" in p for p in problems)
    with h.app.store.connect() as conn:
        assert {e["error"].split(":")[0] for e in quarantine.entries(conn)} == {"TemplateRenderError"}
    write(templates, GOOD)
    h.tick(h.at(NOON) + timedelta(minutes=1))
    assert sorted(texts(h)) == [("a", "Your coupon: CN¥10.00"), ("b", "Your coupon: CN¥20.00")]
    h.close()


@pytest.mark.slow
def test_the_compose_worker_renders_the_versions_the_daemon_uses(tmp_path: Path, db_url: str) -> None:
    """A large send composed in the second process uses the same last good version, not its own reading of the
    broken file."""
    rules, templates = project(tmp_path)
    h = Harness(tmp_path, db_url, rules=rules, templates=templates,
                config={"scheduler": {"batch_size": 5, "compose_worker": "on"}, "frequency_caps": []})
    h.members(member("first", 1))
    h.tick(NOON)
    write(templates, BROKEN)
    h.members(*(member(f"m{i:02d}", i) for i in range(20)))
    h.tick(h.at(NOON) + timedelta(minutes=1))
    assert h.app.runner.worker_batches > 0  # the worker did compose some of them
    assert len(h.sent()) == 21 and all(t.startswith("Your coupon: CN¥") for _, t in texts(h))
    h.close()
