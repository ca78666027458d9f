"""Conditions compiled to SQL over the members table (and an event's JSON properties): how a segment's audience
is found in the database, never by loading members into Python."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Float, Numeric, and_, case, false, func, literal, not_, or_, select, true
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import ColumnElement, UnaryExpression

from engine.domain.attributes import Kind
from engine.rules.conditions import (
    AllOf,
    AnyOf,
    Condition,
    NotOf,
    SegmentRef,
    Test,
    value_kind,
)
from engine.store.computed import computed_sql
from engine.store.models import members


def to_sql(cond: Condition, now: datetime, segments: Mapping[str, Condition], dialect: str,
           indexed: bool = True) -> ColumnElement[bool]:
    """Compile to a WHERE clause over ``members``; never NULL, so NOT behaves as in Python.

    INDEXED False (SQLite): the member columns are written ``+column``, which SQLite's planner takes as "no
    index for this term", for an audience broad enough that walking the members in order beats looking each
    one up from an index on the tested column (see ``entry``).
    """
    if isinstance(cond, AllOf):
        return and_(true(), *(to_sql(i, now, segments, dialect, indexed) for i in cond.items))
    if isinstance(cond, AnyOf):
        return or_(false(), *(to_sql(i, now, segments, dialect, indexed) for i in cond.items))
    if isinstance(cond, NotOf):
        return not_(to_sql(cond.item, now, segments, dialect, indexed))
    if isinstance(cond, SegmentRef):
        return to_sql(segments[cond.name], now, segments, dialect, indexed)
    return _test_sql(cond, now, dialect, indexed)


def _unindexed(column: Any) -> Any:
    """``+column``: the same value, but SQLite's planner will not use an index to find it."""
    return UnaryExpression(column, operator=operators.custom_op("+"), type_=column.type)


def _test_sql(test: Test, now: datetime, dialect: str, indexed: bool = True) -> ColumnElement[bool]:
    attribute, op, expected = test.attribute, test.op, test.value
    if attribute.event_key is not None:
        raise ValueError(f"{attribute.name} refers to an event and cannot select an audience")
    if attribute.json_key is not None:
        return _json_test_sql(attribute.json_key, op, expected, dialect)
    col: Any = computed_sql(attribute.name, now, dialect) if attribute.computed else members.c[attribute.column or ""]
    if not indexed and dialect == "sqlite" and not attribute.computed:
        col = _unindexed(col)
    if op == "exists":
        return col.is_not(None) if expected else col.is_(None)  # type: ignore[no-any-return]
    present = col.is_not(None)
    if op in ("before", "within"):
        cutoff: Any = now - expected
        upper: Any = now
        if attribute.kind is Kind.DATE:
            cutoff, upper = cutoff.date(), now.date()
        if op == "before":
            return and_(present, col < cutoff)
        return and_(present, col >= cutoff, col <= upper)
    if attribute.kind is Kind.NUMBER and dialect != "sqlite":
        expected = tuple(map(_number_literal, expected)) if op == "in" else _number_literal(expected)
    return and_(present, _compare_sql(op, col, expected))


def _number_literal(value: Any) -> Any:
    # A bare constant takes its column's type: on PostgreSQL `points = 2.5` became `points = 2.5::INTEGER`,
    # that is `points = 3` (and 2**31 an error). Typed by its own value it compares exactly, as in Python.
    return literal(value, Float() if isinstance(value, float) else Numeric())


def _compare_sql(op: str, col: Any, expected: Any) -> ColumnElement[bool]:
    if op == "eq":
        return col == expected  # type: ignore[no-any-return]
    if op == "ne":
        return col != expected  # type: ignore[no-any-return]
    if op == "in":
        return col.in_(list(expected))  # type: ignore[no-any-return]
    if op == "gt":
        return col > expected  # type: ignore[no-any-return]
    if op == "gte":
        return col >= expected  # type: ignore[no-any-return]
    if op == "lt":
        return col < expected  # type: ignore[no-any-return]
    if op == "lte":
        return col <= expected  # type: ignore[no-any-return]
    raise AssertionError(op)


_SQLITE_TYPES: dict[str, tuple[str, ...]] = {
    "number": ("integer", "real"), "string": ("text",), "bool": ("true", "false"),
}


_PG_TYPES: dict[str, tuple[str, ...]] = {"number": ("number",), "string": ("string",), "bool": ("boolean",)}


def _json_test_sql(key: str, op: str, expected: Any, dialect: str) -> ColumnElement[bool]:
    if dialect == "sqlite":
        # Not a path ('$."会员等级"'): SQLite (3.40) compares a path with the key as written, and the stored JSON
        # escapes non-ASCII keys ("\\u4f1a…"), so such attributes looked missing. json_each decodes keys.
        entry = func.json_each(members.c.attributes).table_valued("key", "type", "value")
        jtype = func.coalesce(select(entry.c.type).where(entry.c.key == key).scalar_subquery(), "null")
        raw: Any = select(entry.c.value).where(entry.c.key == key).scalar_subquery()
        types = _SQLITE_TYPES
    else:
        element = members.c.attributes.op("->")(key)
        jtype = func.coalesce(func.json_typeof(element), "null")
        raw = members.c.attributes.op("->>")(key)
        types = _PG_TYPES
    if op == "exists":
        present = jtype != "null"
        return present if expected else not_(present)
    kind = value_kind(expected[0] if op == "in" else expected)
    is_kind = jtype.in_(types[kind])
    if kind == "number":
        value: Any = case((is_kind, raw), else_=None).cast(Float) if dialect != "sqlite" else raw
        if dialect != "sqlite":  # `IN (0, 3.4)` took the first value's type: 3.4::INTEGER, so 3 matched
            expected = tuple(map(_number_literal, expected)) if op == "in" else _number_literal(expected)
    elif kind == "bool":
        value = raw
        if dialect == "sqlite":
            # json_extract gives 1/0 for JSON booleans.
            expected = (tuple(int(v) for v in expected) if op == "in" else int(expected))
        else:
            expected = (tuple("true" if v else "false" for v in expected) if op == "in"
                        else ("true" if expected else "false"))
    else:
        value = raw
    return and_(is_kind, func.coalesce(_compare_sql(op, value, expected), false()))
