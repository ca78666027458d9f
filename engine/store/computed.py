"""Computed member attributes, defined once in SQL.

Audience selection compares these expressions in the database; the Python
paths (``if`` steps, event filters) get the very same values loaded with the
member (``computed_columns``), so both evaluators agree by construction.

- ``days_since_signup``, ``days_since_last_order``: whole days (NULL if never)
- ``orders_last_N_days``, ``spend_last_N_days``: purchases recorded as events in the last N days
- ``points_expiring_N_days``: points the member holds that expire within the next N days (engine.store.computed)
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Float, Integer, and_, case, cast, func, literal, select
from sqlalchemy.sql.elements import ColumnElement, Label

from engine.store.models import events, members, points_ledger

_WINDOW = re.compile(r"^(orders|spend)_last_(\d+)_days$")
# An alias, correlated to members only: the outer query may itself join events (the triggering event).
_WINDOW_EVENTS = events.alias("window_events")
_EXPIRING = re.compile(r"^points_expiring_(\d+)_days$")


def _naive(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(tzinfo=None)


def days_since(column: Any, now: datetime, dialect: str) -> Any:
    if dialect == "sqlite":
        return days_since_sql(column, literal(_naive(now).strftime("%Y-%m-%d %H:%M:%S.%f")), dialect)
    return days_since_sql(column, literal(_naive(now)), dialect)


def days_since_sql(column: Any, now: Any, dialect: str) -> Any:
    """Whole days from COLUMN to NOW, an SQL expression: on SQLite the stored text form of the time, on
    PostgreSQL a timestamp (engine.programme.intelligence passes bound parameters so its statement is built once)."""
    if dialect == "sqlite":
        days = func.julianday(now) - func.julianday(column)
        whole = cast(days, Integer)  # truncates toward zero; floor it, as PostgreSQL does, for future dates
        return case((days < whole, whole - 1), else_=whole)
    seconds = func.extract("epoch", now - column)
    return cast(func.floor(seconds / 86400), Integer)


def purchases_between(start: Any, end: Any, dialect: str) -> tuple[Any, Any]:
    """(orders, spend) of the member's (correlated to ``members``) purchase events in [START, END]."""
    orders = _WINDOW_EVENTS
    window = and_(orders.c.member_id == members.c.id, orders.c.type == "purchase",
                  orders.c.occurred_at >= start, orders.c.occurred_at <= end)
    if dialect == "sqlite":
        amount: Any = func.json_extract(orders.c.properties, "$.amount")
    else:
        amount = cast(orders.c.properties.op("->>")("amount"), Float)
    count = select(func.count()).select_from(orders).where(window).correlate(members).scalar_subquery()
    total = select(func.coalesce(func.sum(amount), 0.0)).select_from(orders).where(window)
    return count, total.correlate(members).scalar_subquery()


def computed_sql(name: str, now: datetime, dialect: str) -> Any:
    """The SQL expression of computed attribute NAME over ``members`` at clock NOW."""
    if name == "days_since_signup":
        return days_since(members.c.signup_at, now, dialect)
    if name == "days_since_last_order":
        return days_since(members.c.last_order_at, now, dialect)
    expiring = _EXPIRING.match(name)
    if expiring is not None:
        return expiring_sql(now + timedelta(days=int(expiring.group(1))))
    match = _WINDOW.match(name)
    if match is None:
        raise ValueError(f"unknown computed attribute {name!r}")
    count, total = purchases_between(now - timedelta(days=int(match.group(2))), now, dialect)
    return count if match.group(1) == "orders" else total


def computed_columns(names: Iterable[str], now: datetime, dialect: str) -> list[Label[Any]]:
    """Labelled columns to add to a SELECT over ``members`` so each row carries these values by name."""
    return [computed_sql(name, now, dialect).label(name) for name in sorted(set(names))]


# ---------------------------------------------------------------------------------------------- points
# Built once: building the alias per statement costs more than running the statement.
_LOT = points_ledger.alias("lot")


def held_by(member_id: Any, horizon: Any, *, strict: bool = False) -> ColumnElement[Any]:
    """max(0, E(horizon) - D) for the member whose id is MEMBER_ID (a column or a value); STRICT: before it."""
    lot = _LOT
    due = lot.c.expires_at < horizon if strict else lot.c.expires_at <= horizon
    lots = func.coalesce(func.sum(case((and_(lot.c.points > 0, due), lot.c.points),
                                       else_=0)), 0)
    taken = func.coalesce(func.sum(case((lot.c.points < 0, -lot.c.points), else_=0)), 0)
    held = select(lots - taken).where(lot.c.member_id == member_id).scalar_subquery()
    return case((held > 0, held), else_=literal(0))


def expiring_sql(horizon: datetime) -> ColumnElement[Any]:
    """Points a member (correlated to ``members``) holds that expire at or before HORIZON.

    The stored next expiry guards the ledger subquery: a member whose held points all expire after HORIZON
    (or who holds none that expire) is 0 without reading the ledger, so a segment over the whole base reads
    the ledger only for members with an expiry inside the horizon. It is exact once the tick's expiry pass
    has run (the programme phase runs first in every tick)."""
    return case((members.c.points_next_expiry_at.is_(None), literal(0)),
                (members.c.points_next_expiry_at > horizon, literal(0)),
                else_=held_by(members.c.id, horizon))
