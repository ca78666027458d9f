"""Who enters and who leaves by the clock: segment and date triggers and exit conditions (events: engine.tick.events).

Segment entry is one INSERT … SELECT per journey: the audience is evaluated in
the database, never by loading members into Python. Each journey's entry phase
runs under its journey_state row lock, so two daemons never enter the same
journey at once; UNIQUE constraints stop duplicates regardless.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import date, datetime, timedelta
from random import Random
from typing import Any

from sqlalchemy import (
    Connection,
    case,
    exists,
    false,
    func,
    literal,
    literal_column,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.sql.elements import ColumnElement

from engine.domain.timeutil import zone
from engine.rules.conditions_sql import to_sql
from engine.rules.journey import DateTrigger, EventTrigger, Journey, SegmentTrigger
from engine.rules.versions import LiveJourney
from engine.store import enrollments as enrollment_rows
from engine.store.database import insert_for
from engine.store.enrollments import History
from engine.store.models import EnrollmentStatus, UTCDateTime, enrollments, journey_state, members
from engine.store.quarantine import is_systemic
from engine.tick.parts import Parts
from engine.tick.report import TickReport

log = logging.getLogger(__name__)

DATE_CATCH_UP = timedelta(days=3)  # after downtime, date triggers fire up to this late, never later
ACTIVE = EnrollmentStatus.ACTIVE.value
# New enrollments in one entry phase after which PostgreSQL's statistics for the table are refreshed at once.
ANALYZE_AFTER = 10_000
# SQLite, segment entry: an audience of at least this share of the members is found by walking the members in
# id order rather than through an index on a tested column. Measured at 1,000,000 members (win-back's
# last_order_at): the index was slower from about 3 % up; at 100 % it took 6.5 s against 2.2 s, and a tick
# that found everyone already enrolled 11.2 s against 0.9 s.
BROAD_AUDIENCE = 0.03
AUDIENCE_SAMPLE = 256  # members looked at to estimate the share


def capped_per_day(journeys: Iterable[LiveJourney]) -> dict[str, int]:
    """The journeys with an entry.max_per_day, and that cap."""
    return {j.id: j.journey.entry.max_per_day for j in journeys if j.journey.entry.max_per_day}


def eligible(journey: Journey, history: History | None, now: datetime) -> bool:
    """The entry rule: never twice at once; then never / always / after a cooldown since the last entry."""
    if history is None:
        return True
    if history.active:
        return False
    rule = journey.entry.reentry
    if rule == "never":
        return False
    if rule == "always":
        return True
    assert isinstance(rule, timedelta)
    return history.last_entered <= now - rule


def new_enrollment(live: LiveJourney, member_id: str, trigger_key: str, now: datetime,
                event_id: int | None = None) -> dict[str, Any]:
    return {"journey_id": live.id, "journey_version": live.version, "member_id": member_id,
            "trigger_key": trigger_key, "event_id": event_id, "status": ACTIVE, "step": live.journey.first_step,
            "next_run_at": now, "entered_at": now, "ended_at": None, "exit_reason": None, "converted_at": None,
            "variant": None, "waiting_for": None, "claimed_by": None, "claimed_until": None}


class EntryPhase:
    def __init__(self, app: Parts) -> None:
        self.app = app

    def exit_by_condition(self, now: datetime, live: dict[str, LiveJourney], report: TickReport) -> None:
        """Members who meet a journey's exit_when condition leave it, even in the middle of a wait. A journey whose
        condition fails in the database is paused (with the reason); the others go on."""
        for journey in list(live.values()):
            try:
                with self.app.store.begin() as conn:
                    report.add("exited", self._exit_journey(conn, journey, now))
            except Exception as exc:
                if is_systemic(exc):
                    raise
                self.app.pause(journey, exc, "exit_when", now, report)
                del live[journey.id]

    def _exit_journey(self, conn: Connection, journey: LiveJourney, now: datetime) -> int:
        dialect = self.app.store.dialect
        exited = 0
        versions = conn.execute(select(enrollments.c.journey_version).distinct().where(
            enrollments.c.journey_id == journey.id, enrollments.c.status == ACTIVE)).scalars().all()
        for number in versions:
            version = self.app.versions.get(conn, journey.id, number)
            if version is None or version.journey.exit_when is None:
                continue
            condition = version.journey.exit_when.condition
            if condition is None:
                continue
            matching = select(members.c.id).where(to_sql(condition, now, version.segments, dialect))
            result = conn.execute(
                update(enrollments)
                .where(enrollments.c.journey_id == journey.id, enrollments.c.journey_version == number,
                       enrollments.c.status == ACTIVE, enrollments.c.member_id.in_(matching.scalar_subquery()))
                .values(status=EnrollmentStatus.EXITED.value, ended_at=now, next_run_at=None,
                        exit_reason="exit_when: condition met"))
            exited += int(result.rowcount or 0)
        return exited

    # ------------------------------------------------------------------ segment and date triggers

    def enter(self, now: datetime, live: dict[str, LiveJourney], report: TickReport) -> None:
        """Segment and date triggers, one journey at a time. A journey whose audience cannot be selected (its
        compiled condition fails in the database) is paused with the reason; the others go on."""
        enrolled = 0
        for journey in list(live.values()):
            trigger = journey.journey.trigger
            if not journey.journey.runs or isinstance(trigger, EventTrigger):
                continue
            try:
                count = self._enter_journey(journey, now)
            except Exception as exc:
                if is_systemic(exc):
                    raise
                self.app.pause(journey, exc, "entry", now, report)
                del live[journey.id]
                continue
            report.add("enrolled", count)
            enrolled += count
        if enrolled >= ANALYZE_AFTER and self.app.store.dialect == "postgresql":
            # The planner's row counts for enrollments predate this entry until autovacuum catches up. Believing
            # a journey had a handful of active enrollments, it claimed each batch by reading and sorting all of
            # them (a million rows per claim after a million-member entry): refresh them now.
            with self.app.store.begin() as conn:
                conn.execute(text("ANALYZE enrollments"))

    def _enter_journey(self, journey: LiveJourney, now: datetime) -> int:
        trigger = journey.journey.trigger
        with self.app.store.begin() as conn:
            state = conn.execute(select(journey_state.c.date_cursor)
                                 .where(journey_state.c.journey_id == journey.id)
                                 .with_for_update(skip_locked=True)).first()
            if state is None:
                return 0  # another daemon is entering this journey right now
            room = enrollment_rows.entries_left_today(conn, capped_per_day([journey]), now,
                                                      self.app.config.default_timezone).get(journey.id)
            if room is not None and room <= 0:
                return 0
            if isinstance(trigger, SegmentTrigger):
                return self._enter_segment(conn, journey, trigger, now, room)
            if isinstance(trigger, DateTrigger):
                count = self._enter_date(conn, journey, trigger, state.date_cursor, now, room)
                conn.execute(update(journey_state).where(journey_state.c.journey_id == journey.id)
                             .values(date_cursor=now))
                return count
            return 0

    def _not_blocked(self, journey: LiveJourney, now: datetime) -> ColumnElement[bool]:
        rule = journey.journey.entry.reentry
        previous = enrollments.alias("previous")
        if rule == "never":
            blocking: ColumnElement[bool] = true()
        elif rule == "always":
            blocking = false()
        else:
            assert isinstance(rule, timedelta)
            blocking = previous.c.entered_at > literal(now - rule, UTCDateTime())
        return ~exists(select(previous.c.id).where(
            previous.c.journey_id == journey.id, previous.c.member_id == members.c.id,
            or_(previous.c.status == ACTIVE, blocking)))

    def _enter_segment(self, conn: Connection, journey: LiveJourney, trigger: SegmentTrigger, now: datetime,
                       room: int | None = None) -> int:
        dialect = self.app.store.dialect
        audience = to_sql(trigger.condition, now, journey.segments, dialect)
        if dialect == "sqlite" and _audience_share(conn, audience) >= BROAD_AUDIENCE:
            # SQLite has no statistics to tell a narrow range from a broad one: for a broad audience, looking
            # each member up from an index on the tested column (and sorting them by id afterwards) costs
            # several times more than reading them all in order.
            audience = to_sql(trigger.condition, now, journey.segments, dialect, indexed=False)
        stamp = literal(now, UTCDateTime())
        select_new = select(
            literal(journey.id), literal(journey.version), members.c.id,
            literal(f"segment:{now.strftime('%Y%m%dT%H%M%S.%f')}"), literal(ACTIVE),
            literal(journey.journey.first_step), stamp, stamp,
        ).where(members.c.forgotten_at.is_(None), audience, self._not_blocked(journey, now))
        # In member id order: the enrollment indexes (journey and member, member) then grow at their right edge
        # instead of taking inserts all over, which at 1,000,000 members took 2.7 times as long.
        select_new = select_new.order_by(members.c.id)
        if room is not None:
            select_new = select_new.limit(room)
        columns = ["journey_id", "journey_version", "member_id", "trigger_key", "status", "step", "next_run_at",
                   "entered_at"]
        stmt = insert_for(self.app.store.dialect)(enrollments).from_select(columns, select_new).on_conflict_do_nothing()
        if self.app.store.dialect == "postgresql":
            # psycopg reports -1 rows for this INSERT … SELECT (the tick said "enrolled=0"): count on the server.
            inserted = stmt.returning(enrollments.c.id).cte("inserted")
            return int(conn.execute(select(func.count()).select_from(inserted)).scalar_one())
        return max(0, int(conn.execute(stmt).rowcount or 0))

    def _enter_date(self, conn: Connection, journey: LiveJourney, trigger: DateTrigger, cursor: datetime | None,
                    now: datetime, room: int | None = None) -> int:
        start = max(cursor or now - timedelta(days=1), now - DATE_CATCH_UP)
        if start >= now:
            return 0
        column = members.c[trigger.attribute]
        # Every calendar day any time zone could be on during (start, now], shifted back by the offset.
        days = [start.date() - timedelta(days=1) + timedelta(days=i)
                for i in range((now.date() - start.date()).days + 3)]
        wanted: set[tuple[int, int]] = set()
        for day in days:
            anniversary = day - timedelta(days=trigger.offset_days)
            wanted.add((anniversary.month, anniversary.day))
            if trigger.attribute == "signup_at":  # stored in UTC: its local date may be a day either side
                for shift in (-1, 1):
                    near = anniversary + timedelta(days=shift)
                    wanted.add((near.month, near.day))
            if anniversary.month == 2 and anniversary.day == 28 and not _leap(anniversary.year):
                wanted.add((2, 29))
        month_day = func.extract("month", column) * 100 + func.extract("day", column)
        stmt = select(members.c.id, members.c.timezone, column.label("anniversary")).where(
            members.c.forgotten_at.is_(None), column.is_not(None),
            month_day.in_(sorted(m * 100 + d for m, d in wanted)))
        new_rows: list[dict[str, Any]] = []
        for chunk in _chunks(conn.execute(stmt), 1000):
            histories = enrollment_rows.histories(conn, [journey.id], [r.id for r in chunk])
            for row in chunk:
                fire_at, occurrence = _date_occurrence(row.anniversary, row.timezone, trigger, start, now,
                                                       self.app.config.default_timezone)
                if fire_at is None or occurrence is None:
                    continue
                if not eligible(journey.journey, histories.get((journey.id, row.id)), now):
                    continue
                new_rows.append(new_enrollment(journey, row.id, f"date:{occurrence.isoformat()}", now))
        if room is not None:
            new_rows = new_rows[:room]
        if not new_rows:
            return 0
        return enrollment_rows.insert_skipping_duplicates(conn, self.app.store.dialect, new_rows)

def _audience_share(conn: Connection, audience: ColumnElement[bool]) -> float:
    """The share of (not forgotten) members in AUDIENCE, estimated from up to AUDIENCE_SAMPLE of them picked
    by rowid (SQLite; the same ones for the same table size); 0.0 for an empty table."""
    rowid: ColumnElement[int] = literal_column("members.rowid")
    top = conn.execute(select(func.max(rowid)).select_from(members)).scalar()
    if not top:
        return 0.0
    top = int(top)
    picks = range(1, top + 1) if top <= AUDIENCE_SAMPLE else \
        sorted({Random(top).randint(1, top) for _ in range(AUDIENCE_SAMPLE)})
    seen, matched = conn.execute(
        select(func.count(), func.coalesce(func.sum(case((audience, 1), else_=0)), 0)).select_from(members)
        .where(rowid.in_(list(picks)), members.c.forgotten_at.is_(None))).one()
    return int(matched) / int(seen) if seen else 0.0


def _leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def _chunks(rows: Iterable[Any], size: int) -> Iterable[list[Any]]:
    chunk: list[Any] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _date_occurrence(value: date | datetime, tz_name: str | None, trigger: DateTrigger, start: datetime,
                     now: datetime, default_tz: str) -> tuple[datetime | None, date | None]:
    """When (in UTC) this member's anniversary fires within (start, now], and the local date it falls on."""
    tz = zone(tz_name, default_tz)
    original = value.astimezone(tz).date() if isinstance(value, datetime) else value
    first, last = start.astimezone(tz).date(), now.astimezone(tz).date()
    day = first
    while day <= last:
        anniversary = day - timedelta(days=trigger.offset_days)
        if anniversary.year > original.year and _same_day(original, anniversary):
            fire_at = datetime.combine(day, trigger.at, tzinfo=tz).astimezone(now.tzinfo)
            if start < fire_at <= now:
                return fire_at, day
        day += timedelta(days=1)
    return None, None


def _same_day(original: date, candidate: date) -> bool:
    if (original.month, original.day) == (candidate.month, candidate.day):
        return True
    # 29 February falls on 28 February in years without one.
    return (original.month, original.day) == (2, 29) and (candidate.month, candidate.day) == (2, 28) \
        and not _leap(candidate.year)

