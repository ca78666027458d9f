"""The condition language: one grammar, two evaluators.

A condition is YAML, not code::

    all:
      - tier: {in: [gold, diamond]}
      - last_order_at: {before: 60d}
      - not: {segment: vip_blocklist}

It compiles to SQL (audience selection over the whole members table) and
evaluates in Python (per event); both give the same answer. A missing
attribute (NULL) fails every test except ``exists: false``, in both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from engine.domain import attributes as attrs
from engine.domain.attributes import Attribute, Kind
from engine.rules.durations import parse_duration
from engine.rules.problems import Problems, shown
from engine.rules.yamlsrc import UNKNOWN, Mark, YMap, YSeq

OPERATORS = ("eq", "ne", "in", "gt", "gte", "lt", "lte", "before", "within", "exists")
_ORDERED = ("gt", "gte", "lt", "lte")
_COMBINATORS = ("all", "any", "not", "segment")


@dataclass(frozen=True)
class Test:
    attribute: Attribute
    op: str
    value: Any


@dataclass(frozen=True)
class AllOf:
    items: tuple[Condition, ...]


@dataclass(frozen=True)
class AnyOf:
    items: tuple[Condition, ...]


@dataclass(frozen=True)
class NotOf:
    item: Condition


@dataclass(frozen=True)
class SegmentRef:
    name: str
    mark: Mark = UNKNOWN


Condition = Test | AllOf | AnyOf | NotOf | SegmentRef


def _mark(container: Any, key: Any) -> Mark:
    if isinstance(container, YMap):
        return container.value_mark(key)
    if isinstance(container, YSeq):
        return container.item_mark(key)
    return UNKNOWN


# all:/any:/not: inside each other, at most (and, counting the segments a condition uses, see ``nesting``). Real
# conditions nest three or four levels; the bound keeps evaluate() and to_sql(), which recurse once per level,
# and SQLAlchemy's compiler, which recurses a few times per level, far from Python's recursion limit.
MAX_DEPTH = 32


_NESTING = ("all", "any", "not")


def parse(value: Any, mark: Mark, problems: Problems, where: str, *, allow_event: bool = False,
          stored: bool = False) -> Condition | None:
    """Parse a condition; on error add problems (naming WHERE) and return None.

    STORED: a condition re-read from a stored journey version; it was valid when stored, so the limits added
    since (nesting depth, number sizes, duration horizon) do not apply to it.
    """
    return _Parser(problems, where, allow_event, stored).parse(value, mark, where, 0)


class _Parser:
    def __init__(self, problems: Problems, root: str, allow_event: bool, stored: bool) -> None:
        self.problems = problems
        self.root = root  # where the condition is, for messages about the whole of it
        self.allow_event = allow_event
        self.stored = stored

    def parse(self, value: Any, mark: Mark, where: str, depth: int) -> Condition | None:
        problems = self.problems
        if not isinstance(value, dict) or not value:
            problems.add(mark, f"{where} must be a mapping such as {{tier: gold}} or {{all: [...]}}, "
                               f"got: {shown(value)}")
            return None
        parts: list[Condition] = []
        ok = True
        for key, item in value.items():
            item_mark = _mark(value, key)
            key_mark = value.key_mark(key) if isinstance(value, YMap) else UNKNOWN
            if key in _NESTING and depth >= MAX_DEPTH and not self.stored:
                problems.add(key_mark, f"{self.root} must nest all:, any: and not: at most {MAX_DEPTH} levels "
                                       f"deep, got: {key}: at level {depth + 1} here; simplify the condition")
                ok = False
                continue
            part = self._entry(key, item, key_mark, item_mark, f"{where}.{key}", depth)
            if part is None:
                ok = False
            else:
                parts.append(part)
        if not ok:
            return None
        return parts[0] if len(parts) == 1 else AllOf(tuple(parts))

    def _entry(self, key: str, item: Any, key_mark: Mark, mark: Mark, where: str, depth: int) -> Condition | None:
        problems, allow_event = self.problems, self.allow_event
        if key in ("all", "any"):
            if not isinstance(item, list) or not item:
                problems.add(mark, f"{where} must be a non-empty list of conditions, got: {shown(item)}")
                return None
            items = [self.parse(sub, _mark(item, i), f"{where}[{i}]", depth + 1) for i, sub in enumerate(item)]
            if any(i is None for i in items):
                return None
            clean = tuple(i for i in items if i is not None)
            return AllOf(clean) if key == "all" else AnyOf(clean)
        if key == "not":
            inner = self.parse(item, mark, where, depth + 1)
            return None if inner is None else NotOf(inner)
        if key == "segment":
            if not isinstance(item, str) or not item:
                problems.add(mark, f"{where} must be the name of a segment in rules/segments.yaml, "
                                   f"got: {shown(item)}")
                return None
            return SegmentRef(item, mark)
        attribute = attrs.resolve(key, allow_event=allow_event)
        if attribute is None and key.startswith("event.") and not allow_event:
            container = where[: -len(key) - 1] or "this condition"
            problems.add(key_mark, f"{key!r} is a property of the triggering event, which {container} cannot use; "
                                   "event.NAME works only in an event trigger's where:, exit_when.where and "
                                   "goal.where")
            return None
        if attribute is None:
            choices = [*attrs.BUILTIN, *_COMBINATORS, *attrs.COMPUTED_EXAMPLES]
            hint = problems.suggest(key, choices)
            extra = " (your own attributes are written attributes.NAME"
            extra += ", event properties event.NAME)" if allow_event else ")"
            problems.add(key_mark, f"unknown attribute {key!r}{hint}{extra}")
            return None
        if not isinstance(item, dict):
            # Shorthand: `tier: gold` means `tier: {eq: gold}`.
            return _parse_test(attribute, "eq", item, mark, problems, where, self.stored)
        tests: list[Condition] = []
        ok = True
        for op, operand in item.items():
            op_mark = item.key_mark(op) if isinstance(item, YMap) else UNKNOWN
            if op not in OPERATORS:
                problems.add(op_mark, f"unknown test {op!r} in {where}{problems.suggest(op, OPERATORS)}")
                ok = False
                continue
            test = _parse_test(attribute, op, operand, _mark(item, op), problems, f"{where}.{op}", self.stored)
            if test is None:
                ok = False
            else:
                tests.append(test)
        if not ok or not tests:
            if ok:
                problems.add(mark, f"{where} needs a test such as {{eq: ...}}; expected one of: "
                                   f"{', '.join(OPERATORS)}")
            return None
        return tests[0] if len(tests) == 1 else AllOf(tuple(tests))


Nesting = tuple[int, list[tuple[str, int, Mark]]]


def nesting(value: Any) -> Nesting:
    """How deep a condition AS WRITTEN nests all:/any:/not:, and each ``segment:`` it names with the depth it is
    named at, so that the rulebook can add the depth of the segments themselves (see ``MAX_DEPTH``).

    Walks the raw YAML without recursion, whatever it holds; mappings of tests under an attribute are not
    conditions and are not entered.
    """
    deepest = 0
    refs: list[tuple[str, int, Mark]] = []
    todo: list[tuple[Any, int]] = [(value, 0)]
    while todo:
        current, depth = todo.pop()
        if not isinstance(current, dict):
            continue
        deepest = max(deepest, depth)
        for key, item in current.items():
            if key in ("all", "any") and isinstance(item, list):
                todo.extend((sub, depth + 1) for sub in item)
            elif key == "not":
                todo.append((item, depth + 1))
            elif key == "segment" and isinstance(item, str):
                refs.append((item, depth, _mark(current, key)))
    return deepest, refs


def _parse_time(text: Any, kind: Kind) -> datetime | date | None:
    if not isinstance(text, str):
        return None
    try:
        if kind is Kind.DATE:
            return date.fromisoformat(text)
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _scalar_ok(attribute: Attribute, value: Any) -> bool:
    kind = attribute.kind
    if kind is Kind.ANY:
        return isinstance(value, (str, int, float, bool))
    if kind is Kind.NUMBER:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is Kind.BOOL:
        return isinstance(value, bool)
    if kind is Kind.STRING:
        return isinstance(value, str)
    return False


def _parse_test(attribute: Attribute, op: str, value: Any, mark: Mark, problems: Problems, where: str,
                stored: bool = False) -> Test | None:
    name, kind = attribute.name, attribute.kind

    def bad(expected: str) -> None:
        problems.add(mark, f"{where} must be {expected}, got: {shown(value)}")

    if op == "exists":
        if not isinstance(value, bool):
            bad("true or false")
            return None
        return Test(attribute, op, value)
    if op in ("before", "within"):
        if not attribute.is_time:
            problems.add(mark, f"{where}: {op!r} only applies to dates and times (birthday, signup_at, "
                               f"last_order_at), not to {name}; compare numbers and text with eq, ne, in, gt, gte, "
                               "lt or lte")
            return None
        try:
            return Test(attribute, op, parse_duration(value, bounded=not stored))
        except ValueError as exc:
            problems.add(mark, f"{where}: {exc}")
            return None
    if attribute.is_time:
        if op == "in":
            problems.add(mark, f"{where}: 'in' does not apply to dates; use gte/lte, before or within")
            return None
        parsed = _parse_time(value, kind)
        if parsed is None:
            bad("an ISO date such as 2026-01-31"
                + ("" if kind is Kind.DATE else " or date-time 2026-01-31T10:00:00+08:00"))
            return None
        return Test(attribute, op, parsed)
    if op == "in":
        if not isinstance(value, list) or not value or not all(_scalar_ok(attribute, v) for v in value):
            bad(f"a non-empty list of {_KIND_WORDS[kind]} such as [a, b]")
            return None
        unknown = [v for v in value if attribute.choices and v not in attribute.choices]
        if unknown:
            problems.add(mark, f"{where}: {name} is never {unknown[0]!r}"
                               f"{problems.suggest(str(unknown[0]), attribute.choices)}")
            return None
        kinds = {value_kind(v) for v in value}
        if len(kinds) > 1:
            bad("a list of values of one type (all text or all numbers)")
            return None
        return Test(attribute, op, tuple(value))
    if not _scalar_ok(attribute, value):
        bad(_KIND_VALUE[kind])
        return None
    if attribute.choices and value not in attribute.choices:
        problems.add(mark, f"{where}: {name} is never {value!r}{problems.suggest(str(value), attribute.choices)}")
        return None
    if op in _ORDERED and (value_kind(value) != "number"):
        bad("a number (gt/gte/lt/lte compare numbers and dates only)")
        return None
    return Test(attribute, op, value)


# How a marketer reads each kind: "must be true or false", not "must be a bool value".
_KIND_VALUE = {Kind.STRING: "text (quote it if it looks like a number or true/false)", Kind.NUMBER: "a number",
               Kind.BOOL: "true or false (yes/no/on/off are not accepted)",
               Kind.ANY: "a plain value (text, number, true/false)"}


_KIND_WORDS = {Kind.STRING: "texts", Kind.NUMBER: "numbers", Kind.BOOL: "true/false values",
               Kind.ANY: "plain values"}


def value_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    # A list or object in the free-form attributes is no text: only `exists` applies to it, as in SQL.
    return "other"


def segment_refs(cond: Condition) -> list[SegmentRef]:
    if isinstance(cond, SegmentRef):
        return [cond]
    if isinstance(cond, (AllOf, AnyOf)):
        return [ref for item in cond.items for ref in segment_refs(item)]
    if isinstance(cond, NotOf):
        return segment_refs(cond.item)
    return []


def computed_names(cond: Condition, segments: Mapping[str, Condition] | None = None) -> set[str]:
    """The computed attributes a condition (and the segments it names) needs loaded with each member."""
    if isinstance(cond, Test):
        return {cond.attribute.name} if cond.attribute.computed else set()
    if isinstance(cond, (AllOf, AnyOf)):
        return set().union(*(computed_names(i, segments) for i in cond.items))
    if isinstance(cond, NotOf):
        return computed_names(cond.item, segments)
    if segments is not None and cond.name in segments:
        return computed_names(segments[cond.name], segments)
    return set()


def uses_event(cond: Condition, segments: Mapping[str, Condition] | None = None) -> bool:
    if isinstance(cond, Test):
        return cond.attribute.event_key is not None
    if isinstance(cond, (AllOf, AnyOf)):
        return any(uses_event(i, segments) for i in cond.items)
    if isinstance(cond, NotOf):
        return uses_event(cond.item, segments)
    return False


def evaluate(
    cond: Condition,
    member: Mapping[str, Any],
    now: datetime,
    segments: Mapping[str, Condition],
    event: Mapping[str, Any] | None = None,
) -> bool:
    """Evaluate against one member (a mapping of column values plus ``attributes``) and optional event properties."""
    if isinstance(cond, AllOf):
        return all(evaluate(i, member, now, segments, event) for i in cond.items)
    if isinstance(cond, AnyOf):
        return any(evaluate(i, member, now, segments, event) for i in cond.items)
    if isinstance(cond, NotOf):
        return not evaluate(cond.item, member, now, segments, event)
    if isinstance(cond, SegmentRef):
        return evaluate(segments[cond.name], member, now, segments, event)
    return _evaluate_test(cond, member, now, event)


def _lookup(attribute: Attribute, member: Mapping[str, Any], event: Mapping[str, Any] | None) -> Any:
    if attribute.column is not None:
        return member.get(attribute.column)
    if attribute.computed:
        return member.get(attribute.name)
    if attribute.json_key is not None:
        return (member.get("attributes") or {}).get(attribute.json_key)
    return (event or {}).get(attribute.event_key or "")


def _evaluate_test(test: Test, member: Mapping[str, Any], now: datetime, event: Mapping[str, Any] | None) -> bool:
    actual = _lookup(test.attribute, member, event)
    op, expected = test.op, test.value
    if op == "exists":
        return (actual is not None) is expected
    if actual is None:
        return False
    if test.attribute.is_time:
        cutoff: Any
        if op in ("before", "within"):
            cutoff = now - expected
            if test.attribute.kind is Kind.DATE:
                cutoff, upper = cutoff.date(), now.date()
            else:
                upper = now
            return bool(actual < cutoff) if op == "before" else bool(cutoff <= actual <= upper)
        return _compare(op, actual, expected)
    if test.attribute.kind is Kind.ANY:
        probe = expected[0] if op == "in" else expected
        if value_kind(actual) != value_kind(probe):
            return False
    return _compare(op, actual, expected)


def _compare(op: str, actual: Any, expected: Any) -> bool:
    if op == "eq":
        return bool(actual == expected)
    if op == "ne":
        return bool(actual != expected)
    if op == "in":
        return actual in expected
    if op == "gt":
        return bool(actual > expected)
    if op == "gte":
        return bool(actual >= expected)
    if op == "lt":
        return bool(actual < expected)
    if op == "lte":
        return bool(actual <= expected)
    raise AssertionError(op)
