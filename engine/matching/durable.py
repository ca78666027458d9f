"""Per-event rule matching on durable-rules 2.0.28, behind an interface of our own.

``EventMatcher`` tells which rule keys (``trigger:welcome``, ``exit:winback`` …) a stored event matches for its
member at a clock: always the answer of ``conditions.evaluate`` and ``to_sql`` (tests/test_differential.py).
The mapping, and the traps of durable-rules 2.0.28 it avoids (each measured; tests/test_matcher.py shows them):

* One ruleset per rule key, built from data (``set_rulesets``, JSON rule format, a ``Host`` subclass), named
  ``matcher-<build>.<entry>.<part>``: unique in the process, on a fresh ``Host`` per matcher, so a reload never
  clashes. Not one ruleset for all keys: an event is *consumed* by the first rule that fires. Each event is
  posted to the rulesets of its type with ``id`` = the stored event's primary key and one shared ``sid``: no
  session per member, no facts, nothing accumulates (no 1,024-session cap, no 32-bit session-hash clash).
* Messages carry int64 codes for the fields their ruleset reads, no text: numbers as an order-preserving key of
  their double (as PostgreSQL compares them; integers beyond ±2**53 round), strings as their index among the
  conditions' constants (0: any other; strings only meet eq/ne/in), booleans 0/1, dates as ordinals,
  date-times as µs since the epoch. durable-rules mis-parses floats like ``1e+300`` and finds ``true == 1``.
* ``before``/``within`` need ``now``, which a rule cannot know: the message carries the value's age. Date-time:
  ``age = now − value`` (µs), ``value < now − d`` is ``age > d``. Date: ``age = W − (day + 1)·D`` with W the
  wall clock of ``now`` (µs since 1970-01-01) and D a day: ``value < (now − d).date()`` is ``age >= d`` and
  ``value <= now.date()`` is ``age >= −D``. Exact, given a clock with a fixed offset (the engine's is UTC).
* A missing value fails every test but ``exists: false``: durable-rules fails comparisons on absent fields, and
  a value is absent when None or, free-form, of another JSON type than the constant (typed slots). The format
  has no NOT: negation is pushed down to the tests, where "missing or not X" compares a copy filled with
  −2**63 (``lo``) or 2**63−1 (``hi``): ``not {gt: c}`` is ``lo <= c``. ``exists`` reads a 0/1 presence field;
  ``$ex``/``$nex`` are never used (a lone ``$nex`` hangs the engine).
* Engine limits are met when building, never at run time: ≤ 15 ``$and``/``$or`` per rule, ≤ 240 comparisons per
  ruleset (an alpha node hangs past 511 children; a message holds ≤ 253 properties). Bigger conditions are
  split into rules (``any`` halves, ``all`` distributed over ``any``) and rulesets, else ``ConditionTooComplex``.
  Every rule starts with the event-type test ``t``: the anchor the engine needs, and what keeps types apart.
* No threads: ``Host`` re-arms a dispatcher ``threading.Timer`` every 0.2 s, which could run an action on its
  own thread after ``post`` returned (a race on the answer); ours arms none, actions run inside ``post``.
  ``close()`` (or garbage collection) deletes the C rulesets.
* ``MessageNotHandledException`` means no match. An exception inside an action is swallowed into the returned
  state's ``exception`` key and kept in the session: we reset the session and raise ``MatcherError``.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

import durable_rules_engine
from durable.engine import Host, MessageNotHandledException

from engine.matching.durable_rules import (
    BUILDS,
    SID,
    Compiler,
    Expr,
    Field,
    Frame,
    MatcherError,
    MatchRule,
    RuleEntry,
    conjuncts,
    field_names,
    fit,
    leaves,
    rule_groups,
    rule_json,
)
from engine.rules.conditions import Condition

# durable-rules times its actions with datetime.utcfromtimestamp, deprecated since Python 3.12; the engine does not
# use that timing, and a process running with warnings as errors must still match events.
warnings.filterwarnings("ignore", message=r"datetime\.datetime\.utcfromtimestamp", category=DeprecationWarning,
                        module=r"durable\.engine")


class _Host(Host):  # type: ignore[misc]
    """A durable-rules host whose actions come from a callback, and that starts no threads."""

    def __init__(self, action: Callable[[str], Callable[[Any], None]]) -> None:
        self._action = action
        super().__init__()

    def get_action(self, action_name: str) -> Callable[[Any], None]:
        return self._action(action_name)

    def _run(self) -> None:
        """No dispatcher timers: actions run inside post() (see the module docstring)."""


def _release(handles: list[int]) -> None:
    for handle in handles:
        with contextlib.suppress(Exception):  # already deleted: nothing left to free
            durable_rules_engine.delete_ruleset(handle)
    handles.clear()


@dataclass(frozen=True)
class _Ruleset:
    name: str
    key: str
    type_code: int
    fields: tuple[tuple[str, Field], ...]


class EventMatcher:
    """Matches stored events against rule keys. Build a new one when the rules change and close the old one;
    one matcher serves one thread at a time (calls are serialised by a lock)."""

    def __init__(self, rules: Iterable[RuleEntry], segments: Mapping[str, Condition] | None = None) -> None:
        self.version = f"matcher-{next(BUILDS)}"
        self._lock = threading.Lock()
        self._fired: list[str] = []
        self._handles: list[int] = []
        self._finalizer = weakref.finalize(self, _release, self._handles)
        self._host: _Host | None = _Host(lambda key: lambda _closure: self._record(key))
        self._by_type: dict[str, list[_Ruleset]] = {}
        compiler, name = Compiler(), field_names()
        types: dict[str, int] = {}
        try:
            for index, entry in enumerate(rules):
                rule = MatchRule(*entry)
                code = types.setdefault(rule.event_type, len(types) + 1)
                bodies = [] if rule.condition is None else fit(
                    compiler.condition(rule.condition, False, rule.segments or segments or {}), rule.key)
                for part, group in enumerate(rule_groups(bodies)):
                    self._register(f"{self.version}.{index}.{part}", rule, code, group, name)
        except BaseException:
            self.close()
            raise
        self._strings = compiler.strings

    @property
    def ruleset_names(self) -> tuple[str, ...]:
        return tuple(r.name for rulesets in self._by_type.values() for r in rulesets)

    def _register(self, ruleset: str, rule: MatchRule, code: int, group: list[Expr],
                  name: Callable[[Field], str]) -> None:
        assert self._host is not None
        anchor: dict[str, Any] = {"t": code}
        definition = {f"r{n}": {"all": [{"m": {"$and": [anchor, *(rule_json(t, name) for t in conjuncts(body))]}}],
                                "run": rule.key} for n, body in enumerate(group)}
        try:
            self._host.set_rulesets({ruleset: definition or {"r0": {"all": [{"m": anchor}], "run": rule.key}}})
        except Exception as exc:
            raise MatcherError(f"{rule.key}: durable-rules refused the compiled rule: {exc}") from exc
        self._handles.append(self._host.get_ruleset(ruleset)._handle)
        fields = sorted({leaf.field for body in group for leaf in leaves(body)}, key=name)
        self._by_type.setdefault(rule.event_type, []).append(
            _Ruleset(ruleset, rule.key, code, tuple((name(f), f) for f in fields)))

    def _record(self, key: str) -> None:
        """The action of every rule (durable-rules calls it inside post): note the key."""
        self._fired.append(key)

    def matches(self, event_id: int, event_type: str, properties: Mapping[str, Any] | None,
                member: Mapping[str, Any], now: datetime) -> set[str]:
        """The rule keys this event (stored under EVENT_ID) matches for MEMBER at clock NOW."""
        if not isinstance(now.tzinfo, timezone):
            raise ValueError(f"now must be an aware date-time with a fixed offset, such as UTC; got {now!r}")
        with self._lock:
            if self._host is None:
                raise MatcherError("this event matcher is closed")
            frame = Frame(member, properties or {}, now, self._strings)
            matched: set[str] = set()
            for ruleset in self._by_type.get(event_type, ()):
                if ruleset.key not in matched and self._post(self._host, ruleset, event_id, frame):
                    matched.add(ruleset.key)
            return matched

    def _post(self, host: _Host, ruleset: _Ruleset, event_id: int, frame: Frame) -> bool:
        message: dict[str, Any] = {"id": event_id, "sid": SID, "t": ruleset.type_code}
        for name, field in ruleset.fields:
            value = frame.value(field)
            if value is not None:
                message[name] = value
        self._fired.clear()
        try:
            state = host.post(ruleset.name, message)
        except MessageNotHandledException:
            return False
        except Exception as exc:
            raise MatcherError(f"durable-rules failed on event {event_id} for {ruleset.key}: {exc}") from exc
        if isinstance(state, dict) and state.get("exception"):
            host.delete_state(ruleset.name, SID)  # the engine keeps the exception in the session: start afresh
            raise MatcherError(f"matching event {event_id} for {ruleset.key} failed: {state['exception']}")
        if not self._fired:
            raise MatcherError(f"durable-rules handled event {event_id} for {ruleset.key} but ran no action")
        return True

    def close(self) -> None:
        """Free the C rulesets; the matcher cannot be used afterwards. Safe to call twice."""
        with self._lock:
            self._host = None
            self._finalizer()

    def __enter__(self) -> EventMatcher:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()
