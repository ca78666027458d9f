"""Loading a batch of claimed enrollments with their members (and triggering events) for the runner.

One SELECT joining enrollments, members and events. SQLAlchemy's per-row result processing cost more than
the query itself, so the columns are read through the DBAPI cursor and converted with SQLAlchemy's own result
processors per column type, with a shortcut for the one text form the engine writes times in on SQLite; the
values are the same as Core's. On PostgreSQL the ids go in as one array. Batches that also load computed
attributes go through Core.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, Connection, Dialect, Select, select
from sqlalchemy.sql.elements import Label

from engine.store.models import UTCDateTime, enrollments, events, members, messages
from engine.store.queries import chunked

_ENROLLMENT_COLUMNS: tuple[tuple[str, Column[Any]], ...] = (
    ("enrollment_id", enrollments.c.id), ("journey_id", enrollments.c.journey_id),
    ("journey_version", enrollments.c.journey_version), ("step", enrollments.c.step),
    ("variant", enrollments.c.variant), ("event_id", enrollments.c.event_id),
    ("waiting_for", enrollments.c.waiting_for), ("failures", enrollments.c.failures),
    ("event_properties", events.c.properties),
)
_COLUMNS: tuple[tuple[str, Column[Any]], ...] = (*_ENROLLMENT_COLUMNS, *((c.name, c) for c in members.c))
_FROM = (
    "SELECT " + ", ".join(f"{c.table.name}.{c.name}" for _, c in _COLUMNS)
    + " FROM enrollments JOIN members ON members.id = enrollments.member_id"
    + " LEFT OUTER JOIN events ON events.id = enrollments.event_id"
)
_SQLITE_SQL = _FROM + " WHERE enrollments.id IN ({marks}) ORDER BY enrollments.id"
_POSTGRESQL_SQL = _FROM + " WHERE enrollments.id = ANY(%s) ORDER BY enrollments.id"

Converter = Callable[[Any], Any]


def select_batch(ids: Sequence[int], extra: Sequence[Label[Any]]) -> Select[Any]:
    """Enrollments IDS in id order: enrollment fields, ``event_properties``, member columns, EXTRA."""
    return (
        select(*(c.label(name) if name != c.name else c for name, c in _ENROLLMENT_COLUMNS), *members.c, *extra)
        .select_from(enrollments.join(members, members.c.id == enrollments.c.member_id)
                     .outerjoin(events, events.c.id == enrollments.c.event_id))
        .where(enrollments.c.id.in_(list(ids)))
        .order_by(enrollments.c.id)
    )


def load_batch(conn: Connection, ids: Sequence[int], extra: Sequence[Label[Any]]) -> list[dict[str, Any]]:
    """The rows of select_batch(IDS, EXTRA), as dicts."""
    if extra:
        return [dict(r) for r in conn.execute(select_batch(ids, extra)).mappings()]
    ordered = sorted(ids)
    cursor = conn.connection.cursor()  # the DBAPI's own: rows as plain tuples, no Row objects on the way
    fetched: list[Any] = []
    try:
        if conn.dialect.name == "sqlite":
            for chunk in chunked(ordered, "sqlite"):
                cursor.execute(_SQLITE_SQL.format(marks=", ".join("?" * len(chunk))), tuple(chunk))
                fetched += cursor.fetchall()
        else:  # one array parameter: the same statement text for every batch
            cursor.execute(_POSTGRESQL_SQL, (ordered,))
            fetched = list(cursor.fetchall())
        # PostgreSQL's numeric processors depend on the type the server sent (SQLite sends none).
        types = tuple(d[1] for d in cursor.description or ())
    finally:
        cursor.close()
    converters = _converters(conn.dialect, types)
    names = [name for name, _ in _COLUMNS]
    out: list[dict[str, Any]] = []
    for raw in fetched:
        values = list(raw)
        for index, convert in converters:
            value = values[index]
            if value is not None:
                values[index] = convert(value)
        out.append(dict(zip(names, values, strict=True)))
    return out


_CONVERTERS: dict[tuple[str, tuple[Any, ...]], list[tuple[int, Converter]]] = {}


def _converters(dialect: Dialect, types: tuple[Any, ...]) -> list[tuple[int, Converter]]:
    """(column index, converter) for the columns whose stored form is not already the Python value; TYPES are
    the DBAPI's type codes of the columns (cursor.description)."""
    key = (dialect.name, types)
    if key not in _CONVERTERS:
        found: list[tuple[int, Converter]] = []
        for index, (_, column) in enumerate(_COLUMNS):
            type_code = types[index] if index < len(types) else None
            processor = column.type.dialect_impl(dialect).result_processor(dialect, type_code)
            if processor is None:
                continue
            if isinstance(column.type, UTCDateTime):
                found.append((index, _utc_datetime(processor)))
            elif isinstance(column.type, JSON):
                found.append((index, _json(processor)))
            else:
                found.append((index, processor))
        _CONVERTERS[key] = found
    return _CONVERTERS[key]


def _utc_datetime(processor: Converter) -> Converter:
    """The text form BulkWriter and SQLAlchemy store (``2026-06-15 04:00:00.000000``) parsed directly."""

    def convert(value: Any) -> Any:
        if type(value) is str and len(value) == 26 and value[10] == " ":
            try:
                return datetime.fromisoformat(value + "+00:00")  # aware UTC, as UTCDateTime gives
            except ValueError:
                pass
        return processor(value)

    return convert


def _json(processor: Converter) -> Converter:
    def convert(value: Any) -> Any:
        if value == "{}":  # members without free-form attributes: most of them
            return {}
        return processor(value)

    return convert


def load_queued_messages(conn: Connection, ids: Sequence[int]) -> list[dict[str, Any]]:
    """Claimed queued messages IDS, in id order, with what the rails need of their members (consent, address)."""
    return [dict(r) for r in conn.execute(
        select(messages, members.c.email_opt_in, members.c.sms_opt_in, members.c.email.label("m_email"),
               members.c.phone.label("m_phone"))
        .select_from(messages.join(members, members.c.id == messages.c.member_id))
        .where(messages.c.id.in_(list(ids))).order_by(messages.c.id)).mappings()]


def load_events(conn: Connection, ids: Sequence[int]) -> list[dict[str, Any]]:
    """Events IDS in the order they happened (then by id), as dicts."""
    return [dict(r) for r in conn.execute(select(events).where(events.c.id.in_(list(ids)))
                                          .order_by(events.c.occurred_at, events.c.id)).mappings()]


def event_member(conn: Connection, event_id: int) -> str | None:
    """The member an event belongs to (None when there is no such event)."""
    return conn.execute(select(events.c.member_id).where(events.c.id == event_id)).scalar()


def load_members(conn: Connection, member_ids: Sequence[str], extra: Sequence[Label[Any]]) -> dict[str, dict[str, Any]]:
    """The members of MEMBER_IDS that are not forgotten, by id: their columns and EXTRA."""
    return {r["id"]: dict(r) for r in conn.execute(
        select(members, *extra).where(members.c.id.in_(list(member_ids)), members.c.forgotten_at.is_(None)))
        .mappings()}
