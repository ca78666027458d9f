"""Per-event rule matching on durable-rules 2.0.28, behind an interface of our own.

``EventMatcher`` tells which rule keys (``trigger:welcome``, ``exit:winback`` …) a stored event matches for its
member at a clock: always the answer of ``conditions.evaluate`` and ``to_sql`` (tests/test_differential.py).
The mapping, and the traps of LIBRARY_NOTES.md it avoids:

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
import itertools
import math
import struct
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from types import TracebackType
from typing import Any, NamedTuple

import durable_rules_engine
from durable.engine import Host, MessageNotHandledException

from engine.attributes import Attribute, Kind
from engine.conditions import AllOf, AnyOf, Condition, NotOf, SegmentRef, Test
from engine.exceptions import EngineError

LOW, HIGH = -(2**63), 2**63 - 1  # fills for a missing value: below and above every real code
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_DAY = date(1970, 1, 1).toordinal()
_US = timedelta(microseconds=1)
_DAY = 86_400_000_000
_MAX_COMPOUNDS = 14  # besides the rule's own $and: durable-rules allows 15 per rule
_MAX_LEAVES = 240
_MAX_RULES = 256  # per rule key, after splitting
_SID = "matcher"
FIELD_NAMES = 264_602  # f264602 would share its name hash with f6059
_BUILDS = itertools.count(1)
_KINDS = {Kind.STRING: "string", Kind.NUMBER: "number", Kind.BOOL: "bool", Kind.DATE: "date",
          Kind.DATETIME: "datetime"}
_POSITIVE = {"eq": "$eq", "ne": "$neq", "gt": "$gt", "gte": "$gte", "lt": "$lt", "lte": "$lte"}
_NEGATED = {"eq": ("$neq", "lo"), "gt": ("$lte", "lo"), "gte": ("$lt", "lo"), "lt": ("$gte", "hi"),
            "lte": ("$gt", "hi")}


class MatcherError(EngineError):
    """The event matcher failed."""


class ConditionTooComplex(MatcherError):
    """A condition is too large for the event matcher; split it into smaller conditions."""


class MatchRule(NamedTuple):
    """KEY matches events of EVENT_TYPE that meet CONDITION (None: every such event)."""

    key: str
    event_type: str
    condition: Condition | None = None
    segments: Mapping[str, Condition] | None = None  # the named segments CONDITION may refer to


RuleEntry = MatchRule | tuple[str, str, Condition | None]


# --------------------------------------------------------------------------- codes


@dataclass(frozen=True)
class _Field:
    source: str  # member | json | event
    key: str
    kind: str  # number | string | bool | date | datetime; "" for presence
    variant: str  # raw | lo | hi | age | age_lo | age_hi | present


def _number_key(value: float | Decimal) -> int:
    """An int64 ordered as VALUE is as a double (-0.0 and 0.0 alike)."""
    try:
        number = float(value) + 0.0
    except OverflowError:  # an integer beyond the doubles compares as an infinity
        number = math.inf if value > 0 else -math.inf
    (bits,) = struct.unpack("<q", struct.pack("<d", number))
    return int(bits) if bits >= 0 else -(bits & 0x7FFF_FFFF_FFFF_FFFF)


def _code(kind: str, value: Any, strings: Mapping[str, int]) -> int | None:
    """VALUE as an int64 ordered like KIND, or None when it is not of KIND (then it counts as missing)."""
    if kind == "string":
        return strings.get(value, 0) if isinstance(value, str) else None
    if kind == "bool":
        return int(value) if isinstance(value, bool) else None
    if kind == "number":
        number = isinstance(value, (int, float, Decimal)) and not isinstance(value, bool) and value == value
        return _number_key(value) if number else None  # value == value: NaN is no number here
    if kind == "date":
        return value.toordinal() if isinstance(value, date) and not isinstance(value, datetime) else None
    if not isinstance(value, datetime):
        return None
    if value.utcoffset() is None:
        raise MatcherError(f"naive date-time {value!r}: the engine compares aware times only")
    return (value - _EPOCH) // _US


class _Frame:
    """One event's field values, each computed on first use and shared by all its rulesets."""

    def __init__(self, member: Mapping[str, Any], properties: Mapping[str, Any], now: datetime,
                 strings: Mapping[str, int]) -> None:
        self.member, self.properties, self.strings = member, properties, strings
        self.now_us = (now - _EPOCH) // _US
        self.wall_us = (now.replace(tzinfo=None) - _EPOCH.replace(tzinfo=None)) // _US
        self.cache: dict[_Field, int | None] = {}

    def value(self, field: _Field) -> int | None:
        if field not in self.cache:
            self.cache[field] = self._compute(field)
        return self.cache[field]

    def _compute(self, field: _Field) -> int | None:
        if field.source == "member":
            actual = self.member.get(field.key)
        elif field.source == "json":
            actual = (self.member.get("attributes") or {}).get(field.key)
        else:
            actual = self.properties.get(field.key)
        if field.variant == "present":
            return int(actual is not None)
        code = None if actual is None else _code(field.kind, actual, self.strings)
        if code is not None and field.variant.startswith("age"):
            code = self.now_us - code if field.kind == "datetime" else self.wall_us - (code - _EPOCH_DAY + 1) * _DAY
        if code is None and field.variant in ("lo", "age_lo"):
            return LOW
        return HIGH if code is None and field.variant in ("hi", "age_hi") else code


# --------------------------------------------------------------------------- compiling conditions


@dataclass(frozen=True)
class _Leaf:
    op: str
    field: _Field
    value: int


@dataclass(frozen=True)
class _Node:
    op: str  # $and | $or
    items: tuple[_Leaf | _Node, ...]


_Expr = _Leaf | _Node


def _join(op: str, items: Iterable[_Expr]) -> _Expr:
    """OP over ITEMS, flattened: every nested node costs durable-rules two expression slots."""
    flat: list[_Expr] = []
    for item in items:
        flat.extend(item.items if isinstance(item, _Node) and item.op == op else (item,))
    return flat[0] if len(flat) == 1 else _Node(op, tuple(flat))


def _source(attribute: Attribute) -> tuple[str, str]:
    if attribute.column is not None:
        return "member", attribute.column
    if attribute.computed:
        return "member", attribute.name  # loaded with the member under its own name
    if attribute.json_key is not None:
        return "json", attribute.json_key
    return "event", attribute.event_key or ""


def _relative(op: str, kind: str, duration: int, negate: bool, field: Callable[[str], _Field]) -> _Expr:
    """before/within DURATION (µs) as comparisons of the value's age (see the module docstring)."""
    age, lo, hi = field("age"), field("age_lo"), field("age_hi")
    floor = 0 if kind == "datetime" else -_DAY  # the lowest age of a value not after now
    if op == "before":
        if kind == "datetime":
            return _Leaf("$lte", lo, duration) if negate else _Leaf("$gt", age, duration)
        return _Leaf("$lt", lo, duration) if negate else _Leaf("$gte", age, duration)
    # Date-times within: 0 <= age <= d; dates: -D <= age < d.
    upper, outside = ("$lte", "$gt") if kind == "datetime" else ("$lt", "$gte")
    if negate:
        return _join("$or", (_Leaf("$lt", lo, floor), _Leaf(outside, hi, duration)))
    return _join("$and", (_Leaf("$gte", age, floor), _Leaf(upper, age, duration)))


class _Compiler:
    """Conditions to expression trees in negation normal form; string constants numbered as they come."""

    def __init__(self) -> None:
        self.strings: dict[str, int] = {}

    def condition(self, cond: Condition, negate: bool, segments: Mapping[str, Condition], depth: int = 0) -> _Expr:
        if isinstance(cond, (AllOf, AnyOf)):
            op = "$and" if isinstance(cond, AllOf) != negate else "$or"
            return _join(op, (self.condition(i, negate, segments, depth) for i in cond.items))
        if isinstance(cond, NotOf):
            return self.condition(cond.item, not negate, segments, depth)
        if isinstance(cond, SegmentRef):
            if cond.name not in segments or depth > 32:
                raise MatcherError(f"segment {cond.name!r} is unknown or refers to itself")
            return self.condition(segments[cond.name], negate, segments, depth + 1)
        return self.test(cond, negate)

    def test(self, test: Test, negate: bool) -> _Expr:
        op, value = test.op, test.value
        source, key = _source(test.attribute)
        if op == "exists":
            return _Leaf("$eq", _Field(source, key, "", "present"), int(value != negate))
        probe = value[0] if op == "in" else value
        # A free-form value is compared only with constants of its own JSON type, as in conditions._value_kind.
        kind = _KINDS.get(test.attribute.kind) or (
            "bool" if isinstance(probe, bool) else "number" if isinstance(probe, (int, float)) else "string")

        def field(variant: str) -> _Field:
            return _Field(source, key, kind, variant)

        if op in ("before", "within"):
            return _relative(op, kind, max(LOW + 1, min(HIGH - 1, value // _US)), negate, field)
        if op == "in":
            codes = sorted({self.constant(kind, v) for v in value})
            if negate:
                return _join("$and", (_Leaf("$neq", field("lo"), c) for c in codes))
            return _join("$or", (_Leaf("$eq", field("raw"), c) for c in codes))
        code = self.constant(kind, value)
        if not negate:
            return _Leaf(_POSITIVE[op], field("raw"), code)
        if op == "ne":  # missing or equal: lo <= c <= hi
            return _join("$and", (_Leaf("$lte", field("lo"), code), _Leaf("$gte", field("hi"), code)))
        negated, variant = _NEGATED[op]
        return _Leaf(negated, field(variant), code)

    def constant(self, kind: str, value: Any) -> int:
        if kind == "string":
            return self.strings.setdefault(value, len(self.strings) + 1)
        code = _code(kind, value, self.strings)
        if code is None:
            raise MatcherError(f"constant {value!r} is not a {kind}")
        return code


def _leaves(expr: _Expr) -> list[_Leaf]:
    return [expr] if isinstance(expr, _Leaf) else [leaf for item in expr.items for leaf in _leaves(item)]


def _compounds(expr: _Expr) -> int:
    return 0 if isinstance(expr, _Leaf) else 1 + sum(_compounds(i) for i in expr.items)


def _conjuncts(body: _Expr) -> tuple[_Expr, ...]:
    """A rule body's tests: its own $and merges with the rule's (the one that holds the type test)."""
    return body.items if isinstance(body, _Node) and body.op == "$and" else (body,)


def _fit(body: _Expr, key: str) -> list[_Expr]:
    """Disjuncts of BODY, each small enough for one durable-rules rule."""
    done: list[_Expr] = []
    todo = [body]
    while todo:
        expr = todo.pop()
        if sum(map(_compounds, _conjuncts(expr))) <= _MAX_COMPOUNDS and len(_leaves(expr)) <= _MAX_LEAVES:
            done.append(expr)
        elif isinstance(expr, _Node) and expr.op == "$or":  # halves: as few rules as will fit
            half = len(expr.items) // 2
            todo.extend((_join("$or", expr.items[:half]), _join("$or", expr.items[half:])))
        elif isinstance(expr, _Node) and any(isinstance(i, _Node) for i in expr.items):
            pivot = max((i for i in expr.items if isinstance(i, _Node)), key=_compounds)
            rest = [i for i in expr.items if i is not pivot]
            todo.extend(_join("$and", (*rest, alt)) for alt in pivot.items)
        else:
            raise ConditionTooComplex(f"{key}: more than {_MAX_LEAVES} tests that must all hold are too many for "
                                      "the event matcher")
        if len(done) + len(todo) > _MAX_RULES:
            raise ConditionTooComplex(f"{key}: the condition is too large for the event matcher; split it into "
                                      "smaller conditions")
    return done


def _groups(bodies: list[_Expr]) -> list[list[_Expr]]:
    """BODIES packed into rulesets of at most _MAX_LEAVES comparisons; [[]] for no condition."""
    groups: list[list[_Expr]] = [[]]
    size = 0
    for body in bodies:
        if groups[-1] and size + len(_leaves(body)) > _MAX_LEAVES:
            groups.append([])
            size = 0
        groups[-1].append(body)
        size += len(_leaves(body))
    return groups


def _field_names() -> Callable[[_Field], str]:
    """Property names f0, f1 … for fields. durable-rules finds a property by its 32-bit FNV-1a name hash only;
    f0 … f264601 and the engine's own names hash apart (tests/test_matcher.py checks): never more are made."""
    names: dict[_Field, str] = {}

    def name(field: _Field) -> str:
        if field not in names:
            if len(names) >= FIELD_NAMES:
                raise ConditionTooComplex(f"more than {FIELD_NAMES} distinct fields for one event matcher")
            names[field] = f"f{len(names)}"
        return names[field]

    return name


def _json(expr: _Expr, name: Callable[[_Field], str]) -> dict[str, Any]:
    if isinstance(expr, _Node):
        return {expr.op: [_json(i, name) for i in expr.items]}
    return {name(expr.field): expr.value} if expr.op == "$eq" else {expr.op: {name(expr.field): expr.value}}


def check(entry: RuleEntry, segments: Mapping[str, Condition] | None = None) -> None:
    """Raise ConditionTooComplex if ENTRY's condition cannot be taken by the event matcher (nothing is built)."""
    rule = MatchRule(*entry)
    if rule.condition is not None:
        _fit(_Compiler().condition(rule.condition, False, rule.segments or segments or {}), rule.key)


# --------------------------------------------------------------------------- the matcher


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
    fields: tuple[tuple[str, _Field], ...]


class EventMatcher:
    """Matches stored events against rule keys. Build a new one when the rules change and close the old one;
    one matcher serves one thread at a time (calls are serialised by a lock)."""

    def __init__(self, rules: Iterable[RuleEntry], segments: Mapping[str, Condition] | None = None) -> None:
        self.version = f"matcher-{next(_BUILDS)}"
        self._lock = threading.Lock()
        self._fired: list[str] = []
        self._handles: list[int] = []
        self._finalizer = weakref.finalize(self, _release, self._handles)
        self._host: _Host | None = _Host(lambda key: lambda _closure: self._record(key))
        self._by_type: dict[str, list[_Ruleset]] = {}
        compiler, name = _Compiler(), _field_names()
        types: dict[str, int] = {}
        try:
            for index, entry in enumerate(rules):
                rule = MatchRule(*entry)
                code = types.setdefault(rule.event_type, len(types) + 1)
                bodies = [] if rule.condition is None else _fit(
                    compiler.condition(rule.condition, False, rule.segments or segments or {}), rule.key)
                for part, group in enumerate(_groups(bodies)):
                    self._register(f"{self.version}.{index}.{part}", rule, code, group, name)
        except BaseException:
            self.close()
            raise
        self._strings = compiler.strings

    @property
    def ruleset_names(self) -> tuple[str, ...]:
        return tuple(r.name for rulesets in self._by_type.values() for r in rulesets)

    def _register(self, ruleset: str, rule: MatchRule, code: int, group: list[_Expr],
                  name: Callable[[_Field], str]) -> None:
        assert self._host is not None
        anchor: dict[str, Any] = {"t": code}
        definition = {f"r{n}": {"all": [{"m": {"$and": [anchor, *(_json(t, name) for t in _conjuncts(body))]}}],
                                "run": rule.key} for n, body in enumerate(group)}
        try:
            self._host.set_rulesets({ruleset: definition or {"r0": {"all": [{"m": anchor}], "run": rule.key}}})
        except Exception as exc:
            raise MatcherError(f"{rule.key}: durable-rules refused the compiled rule: {exc}") from exc
        self._handles.append(self._host.get_ruleset(ruleset)._handle)
        fields = sorted({leaf.field for body in group for leaf in _leaves(body)}, key=name)
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
            frame = _Frame(member, properties or {}, now, self._strings)
            matched: set[str] = set()
            for ruleset in self._by_type.get(event_type, ()):
                if ruleset.key not in matched and self._post(self._host, ruleset, event_id, frame):
                    matched.add(ruleset.key)
            return matched

    def _post(self, host: _Host, ruleset: _Ruleset, event_id: int, frame: _Frame) -> bool:
        message: dict[str, Any] = {"id": event_id, "sid": _SID, "t": ruleset.type_code}
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
            host.delete_state(ruleset.name, _SID)  # the engine keeps the exception in the session: start afresh
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
