"""Where durable-rules cannot be imported (Python 3.13), every event rule is evaluated in Python with the same
answers: journeys still start, exit and convert on events."""

from __future__ import annotations

import logging

import pytest

from engine.matching import events as matching
from engine.testing import Harness


@pytest.fixture
def without_durable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(matching, "DURABLE_MISSING", "durable-rules cannot be imported here (test)")
    monkeypatch.setattr(matching, "_told", [])


@pytest.mark.usefixtures("without_durable")
def test_event_journeys_run_on_the_python_matcher(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    harness.members({"id": "a", "name": "A", "email": "a@example.com", "email_opt_in": True,
                     "timezone": "Asia/Shanghai"},
                    {"id": "b", "name": "B", "email": "b@example.com", "email_opt_in": True,
                     "timezone": "Asia/Shanghai"})
    harness.event("a", "signup", "2026-03-02T02:00:00Z", source="web")
    harness.event("b", "signup", "2026-03-02T02:00:00Z", source="app")
    with caplog.at_level(logging.WARNING, logger="engine.matching.events"):
        harness.tick("2026-03-02T02:05:00Z")
        harness.tick("2026-03-02T02:10:00Z")
    assert isinstance(harness.app.events.matchers._matcher, matching.PythonMatcher)
    assert {(e["member_id"], e["journey_id"]) for e in harness.enrollments()} == {("a", "welcome"),
                                                                                 ("b", "welcome_ab")}
    told = [r for r in caplog.records if "cannot be imported" in r.getMessage()]
    assert len(told) == 1  # once per process, not once per tick


def test_with_durable_rules_importable_the_python_matcher_is_only_the_fallback(harness: Harness) -> None:
    if matching.DURABLE_MISSING is not None:
        pytest.skip(matching.DURABLE_MISSING)
    harness.members({"id": "a", "name": "A", "email": "a@example.com", "timezone": "Asia/Shanghai"})
    harness.event("a", "signup", "2026-03-02T02:00:00Z", source="web")
    harness.tick("2026-03-02T02:05:00Z")
    assert not isinstance(harness.app.events.matchers._matcher, matching.PythonMatcher)
