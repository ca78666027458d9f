"""Statements about enrollments as a whole: who has been in which journey, how many entered today, and inserting
new ones without ever a duplicate (the UNIQUE constraints decide)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, time
from typing import Any

from sqlalchemy import Connection, bindparam, func, or_, select, update

from engine.domain.timeutil import zone
from engine.store.database import insert_for
from engine.store.models import EnrollmentStatus, enrollments

ACTIVE = EnrollmentStatus.ACTIVE.value


@dataclass
class History:
    active: bool
    last_entered: datetime


def histories(conn: Connection, journey_ids: Iterable[str],
              member_ids: Iterable[str]) -> dict[tuple[str, str], History]:
    """Per (journey, member): whether an enrollment is active, and when the last one entered."""
    ids, journeys = list(set(member_ids)), list(set(journey_ids))
    if not ids or not journeys:
        return {}
    is_active = func.max(func.cast(enrollments.c.status == ACTIVE, enrollments.c.journey_version.type))
    stmt = (select(enrollments.c.journey_id, enrollments.c.member_id, func.max(enrollments.c.entered_at), is_active)
            .where(enrollments.c.member_id.in_(ids), enrollments.c.journey_id.in_(journeys))
            .group_by(enrollments.c.journey_id, enrollments.c.member_id))
    out = {}
    for journey_id, member_id, last, active in conn.execute(stmt):
        out[(journey_id, member_id)] = History(bool(active), last)
    return out


def entries_left_today(conn: Connection, capped: dict[str, int], now: datetime, tz_name: str) -> dict[str, int]:
    """Entries each journey of CAPPED (id: max per day) may still take today (calendar day in TZ_NAME)."""
    if not capped:
        return {}
    tz = zone(tz_name)
    midnight = datetime.combine(now.astimezone(tz).date(), time(0, 0), tzinfo=tz)
    counts: dict[str, int] = dict(conn.execute(
        select(enrollments.c.journey_id, func.count()).where(
            enrollments.c.journey_id.in_(list(capped)), enrollments.c.entered_at >= midnight)
        .group_by(enrollments.c.journey_id)).all())
    return {journey_id: cap - int(counts.get(journey_id, 0)) for journey_id, cap in capped.items()}


def insert_skipping_duplicates(conn: Connection, dialect: str, rows: list[dict[str, Any]]) -> int:
    """Insert, skipping any the UNIQUE constraints refuse; the count comes from RETURNING because DBAPI
    row counts of a multi-row insert are not reliable across drivers (psycopg reports -1)."""
    stmt = insert_for(dialect)(enrollments).on_conflict_do_nothing().returning(enrollments.c.id)
    return len(conn.execute(stmt, rows).all())


def open_by_member(conn: Connection, member_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Per member, the enrollments an event can still affect: active, or ended but not yet converted."""
    by_member: dict[str, list[dict[str, Any]]] = {}
    for row in conn.execute(
            select(enrollments.c.id, enrollments.c.journey_id, enrollments.c.journey_version,
                   enrollments.c.member_id, enrollments.c.status, enrollments.c.entered_at,
                   enrollments.c.converted_at, enrollments.c.step, enrollments.c.waiting_for)
            .where(enrollments.c.member_id.in_(member_ids),
                   or_(enrollments.c.status == ACTIVE, enrollments.c.converted_at.is_(None)))).mappings():
        by_member.setdefault(row["member_id"], []).append(dict(row))
    return by_member


def convert(conn: Connection, conversions: dict[int, datetime]) -> None:
    """Record when each enrollment (by id) reached its goal."""
    if conversions:
        conn.execute(update(enrollments).where(enrollments.c.id == bindparam("_id"))
                     .values(converted_at=bindparam("_at")),
                     [{"_id": k, "_at": v} for k, v in conversions.items()])


def resume(conn: Connection, steps: dict[int, str | None], now: datetime) -> None:
    """Active enrollments (by id) waiting for an event go on at the given step, due now."""
    # An empty parameter list here once made every tick fail with "A value is required for bind parameter".
    if steps:
        conn.execute(update(enrollments).where(enrollments.c.id == bindparam("_id"), enrollments.c.status == ACTIVE)
                     .values(step=bindparam("_step"), waiting_for=None, next_run_at=now),
                     [{"_id": k, "_step": v} for k, v in steps.items()])


def exit_with_reasons(conn: Connection, reasons: dict[int, str], now: datetime) -> None:
    """Active enrollments (by id) leave their journey, each with its reason."""
    if reasons:
        conn.execute(update(enrollments).where(enrollments.c.id == bindparam("_id"), enrollments.c.status == ACTIVE)
                     .values(status=EnrollmentStatus.EXITED.value, ended_at=now, exit_reason=bindparam("_why"),
                             next_run_at=None),
                     [{"_id": k, "_why": v} for k, v in reasons.items()])
