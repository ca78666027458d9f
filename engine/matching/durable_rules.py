"""Conditions compiled into durable-rules rulesets: attribute and string codes, relative-time fields, and the
splitting that keeps each rule under the engine's limits (ConditionTooComplex when it cannot)."""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple

from engine.domain.attributes import Attribute, Kind
from engine.exceptions import EngineError
from engine.rules.conditions import AllOf, AnyOf, Condition, NotOf, SegmentRef, Test

LOW, HIGH = -(2**63), 2**63 - 1  # fills for a missing value: below and above every real code
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_DAY = date(1970, 1, 1).toordinal()
_US = timedelta(microseconds=1)
_DAY = 86_400_000_000
_MAX_COMPOUNDS = 14  # besides the rule's own $and: durable-rules allows 15 per rule
_MAX_LEAVES = 240
_MAX_RULES = 256  # per rule key, after splitting
SID = "matcher"
FIELD_NAMES = 264_602  # f264602 would share its name hash with f6059
BUILDS = itertools.count(1)


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


@dataclass(frozen=True)
class Field:
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


class Frame:
    """One event's field values, each computed on first use and shared by all its rulesets."""

    def __init__(self, member: Mapping[str, Any], properties: Mapping[str, Any], now: datetime,
                 strings: Mapping[str, int]) -> None:
        self.member, self.properties, self.strings = member, properties, strings
        self.now_us = (now - _EPOCH) // _US
        self.wall_us = (now.replace(tzinfo=None) - _EPOCH.replace(tzinfo=None)) // _US
        self.cache: dict[Field, int | None] = {}

    def value(self, field: Field) -> int | None:
        if field not in self.cache:
            self.cache[field] = self._compute(field)
        return self.cache[field]

    def _compute(self, field: Field) -> int | None:
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


@dataclass(frozen=True)
class _Leaf:
    op: str
    field: Field
    value: int


@dataclass(frozen=True)
class _Node:
    op: str  # $and | $or
    items: tuple[_Leaf | _Node, ...]


Expr = _Leaf | _Node


def _join(op: str, items: Iterable[Expr]) -> Expr:
    """OP over ITEMS, flattened: every nested node costs durable-rules two expression slots."""
    flat: list[Expr] = []
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


def _relative(op: str, kind: str, duration: int, negate: bool, field: Callable[[str], Field]) -> Expr:
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


class Compiler:
    """Conditions to expression trees in negation normal form; string constants numbered as they come."""

    def __init__(self) -> None:
        self.strings: dict[str, int] = {}

    def condition(self, cond: Condition, negate: bool, segments: Mapping[str, Condition], depth: int = 0) -> Expr:
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

    def test(self, test: Test, negate: bool) -> Expr:
        op, value = test.op, test.value
        source, key = _source(test.attribute)
        if op == "exists":
            return _Leaf("$eq", Field(source, key, "", "present"), int(value != negate))
        probe = value[0] if op == "in" else value
        # A free-form value is compared only with constants of its own JSON type, as in conditions._value_kind.
        kind = _KINDS.get(test.attribute.kind) or (
            "bool" if isinstance(probe, bool) else "number" if isinstance(probe, (int, float)) else "string")

        def field(variant: str) -> Field:
            return Field(source, key, kind, variant)

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


def leaves(expr: Expr) -> list[_Leaf]:
    return [expr] if isinstance(expr, _Leaf) else [leaf for item in expr.items for leaf in leaves(item)]


def _compounds(expr: Expr) -> int:
    return 0 if isinstance(expr, _Leaf) else 1 + sum(_compounds(i) for i in expr.items)


def conjuncts(body: Expr) -> tuple[Expr, ...]:
    """A rule body's tests: its own $and merges with the rule's (the one that holds the type test)."""
    return body.items if isinstance(body, _Node) and body.op == "$and" else (body,)


def fit(body: Expr, key: str) -> list[Expr]:
    """Disjuncts of BODY, each small enough for one durable-rules rule."""
    done: list[Expr] = []
    todo = [body]
    while todo:
        expr = todo.pop()
        if sum(map(_compounds, conjuncts(expr))) <= _MAX_COMPOUNDS and len(leaves(expr)) <= _MAX_LEAVES:
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


def rule_groups(bodies: list[Expr]) -> list[list[Expr]]:
    """BODIES packed into rulesets of at most _MAX_LEAVES comparisons; [[]] for no condition."""
    groups: list[list[Expr]] = [[]]
    size = 0
    for body in bodies:
        if groups[-1] and size + len(leaves(body)) > _MAX_LEAVES:
            groups.append([])
            size = 0
        groups[-1].append(body)
        size += len(leaves(body))
    return groups


def field_names() -> Callable[[Field], str]:
    """Property names f0, f1 … for fields. durable-rules finds a property by its 32-bit FNV-1a name hash only;
    f0 … f264601 and the engine's own names hash apart (tests/test_matcher.py checks): never more are made."""
    names: dict[Field, str] = {}

    def name(field: Field) -> str:
        if field not in names:
            if len(names) >= FIELD_NAMES:
                raise ConditionTooComplex(f"more than {FIELD_NAMES} distinct fields for one event matcher")
            names[field] = f"f{len(names)}"
        return names[field]

    return name


def rule_json(expr: Expr, name: Callable[[Field], str]) -> dict[str, Any]:
    if isinstance(expr, _Node):
        return {expr.op: [rule_json(i, name) for i in expr.items]}
    return {name(expr.field): expr.value} if expr.op == "$eq" else {expr.op: {name(expr.field): expr.value}}


def check(entry: RuleEntry, segments: Mapping[str, Condition] | None = None) -> None:
    """Raise ConditionTooComplex if ENTRY's condition cannot be taken by the event matcher (nothing is built)."""
    rule = MatchRule(*entry)
    if rule.condition is not None:
        fit(Compiler().condition(rule.condition, False, rule.segments or segments or {}), rule.key)
