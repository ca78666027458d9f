"""Which event rules (triggers, exits, goals) an event matches: durable-rules, behind engine.matching.durable.

The rule set is built from the journey versions in play and rebuilt when they change. Keys name the journey and
version: ``trigger:welcome:3``, ``exit:winback:1``, ``goal:winback:1``. A rule whose condition durable-rules
cannot take (engine.matching.durable.ConditionTooComplex) is evaluated in Python instead, with the same answers, and the
log says which; the other rules stay in durable-rules. If durable-rules refuses the build as a whole, every rule
falls back to Python; so does every rule where durable-rules does not import (Python 3.13: ``DURABLE_MISSING``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Protocol

from engine.matching.durable_rules import ConditionTooComplex, MatcherError, MatchRule, check
from engine.rules.conditions import Condition, evaluate
from engine.rules.journey import EventTrigger
from engine.rules.versions import LiveJourney

log = logging.getLogger(__name__)

try:
    from engine.matching.durable import EventMatcher
except ImportError as exc:  # durable-rules 2.0.28 does not import on Python 3.13 (PyEval_CallObject is gone)
    EventMatcher = None  # type: ignore[assignment,misc]
    DURABLE_MISSING: str | None = (f"durable-rules cannot be imported here ({exc}); every event rule is "
                                   "evaluated in Python")
else:
    DURABLE_MISSING = None


class Matcher(Protocol):
    def matches(self, event_id: int, event_type: str, properties: Mapping[str, Any] | None,
                member: Mapping[str, Any], now: datetime) -> set[str]:
        """The rule keys this event matches for MEMBER at NOW."""

    def close(self) -> None:
        """Release what the matcher holds."""


def rules_for(journeys: Iterable[LiveJourney]) -> list[MatchRule]:
    rules: list[MatchRule] = []
    for live in journeys:
        journey, tag = live.journey, f"{live.id}:{live.version}"
        if isinstance(journey.trigger, EventTrigger):
            rules.append(MatchRule(f"trigger:{tag}", journey.trigger.event, journey.trigger.where, live.segments))
        if journey.exit_when is not None and journey.exit_when.event:
            rules.append(MatchRule(f"exit:{tag}", journey.exit_when.event, journey.exit_when.where, live.segments))
        if journey.goal is not None:
            rules.append(MatchRule(f"goal:{tag}", journey.goal.event, journey.goal.where, live.segments))
    return rules


class PythonMatcher:
    """The same answers, evaluated in Python: the fallback, and a reference for tests."""

    def __init__(self, rules: Iterable[MatchRule]) -> None:
        self.rules = list(rules)

    def matches(self, event_id: int, event_type: str, properties: Mapping[str, Any] | None,
                member: Mapping[str, Any], now: datetime) -> set[str]:
        found = set()
        for rule in self.rules:
            condition: Condition | None = rule.condition
            if rule.event_type == event_type and (
                    condition is None or evaluate(condition, member, now, rule.segments or {}, properties or {})):
                found.add(rule.key)
        return found

    def close(self) -> None:
        self.rules = []


class SplitMatcher:
    """Durable-rules for the rules it can take, Python for the rest; answers are the union."""

    def __init__(self, engine: Matcher, python: PythonMatcher) -> None:
        self.engine, self.python = engine, python

    @property
    def python_keys(self) -> set[str]:
        return {rule.key for rule in self.python.rules}

    def matches(self, event_id: int, event_type: str, properties: Mapping[str, Any] | None,
                member: Mapping[str, Any], now: datetime) -> set[str]:
        return (self.engine.matches(event_id, event_type, properties, member, now)
                | self.python.matches(event_id, event_type, properties, member, now))

    def close(self) -> None:
        self.engine.close()
        self.python.close()


def build(rules: list[MatchRule]) -> Matcher:
    """The matcher for RULES: durable-rules where it can, Python where it cannot (or where durable-rules does not
    import at all: Python 3.13)."""
    if DURABLE_MISSING is not None:
        if not _told:
            log.warning("%s", DURABLE_MISSING)
            _told.append(True)
        return PythonMatcher(rules)
    durable: list[MatchRule] = []
    python: list[MatchRule] = []
    for rule in rules:
        try:
            check(rule)
            durable.append(rule)
        except ConditionTooComplex as exc:
            log.warning("%s is evaluated in Python: %s", rule.key, exc)
            python.append(rule)
    try:
        engine = EventMatcher(durable)
    except MatcherError as exc:
        log.error("event rules fall back to Python evaluation: %s", exc)
        return PythonMatcher(rules)
    return SplitMatcher(engine, PythonMatcher(python)) if python else engine


_told: list[bool] = []  # DURABLE_MISSING is logged once per process


class MatcherCache:
    """One matcher for the current set of journey versions; a new set builds a new one and closes the old."""

    def __init__(self) -> None:
        self._key: frozenset[tuple[str, int]] | None = None
        self._matcher: Matcher | None = None

    def get(self, journeys: Iterable[LiveJourney]) -> Matcher:
        versions = {(j.id, j.version): j for j in journeys}
        key = frozenset(versions)
        if self._matcher is None or key != self._key:
            self.close()
            self._matcher = build(rules_for(versions.values()))
            self._key = key
        return self._matcher

    def close(self) -> None:
        if self._matcher is not None:
            self._matcher.close()
        self._matcher, self._key = None, None
