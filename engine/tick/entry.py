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
from typing import Any

from sqlalchemy import Connection

from engine.domain.timeutil import zone
from engine.rules.conditions_sql import to_sql
from engine.rules.journey import DateTrigger, EventTrigger, Journey, SegmentTrigger
from engine.rules.versions import LiveJourney
from engine.store import enrollments as enrollment_rows
from engine.store import entries
from engine.store.enrollments import History
from engine.store.models import EnrollmentStatus
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
        exited = 0
        for number in entries.active_versions(conn, journey.id):
            version = self.app.versions.get(conn, journey.id, number)
            if version is None or version.journey.exit_when is None:
                continue
            condition = version.journey.exit_when.condition
            if condition is None:
                continue
            exited += entries.exit_matching(conn, journey.id, number,
                                            to_sql(condition, now, version.segments, self.app.store.dialect),
                                            now, "exit_when: condition met")
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
        if enrolled >= ANALYZE_AFTER:
            # PostgreSQL's row counts for enrollments predate this entry until autovacuum catches up. Believing
            # a journey had a handful of active enrollments, it claimed each batch by reading and sorting all of
            # them (a million rows per claim after a million-member entry): refresh them now.
            with self.app.store.begin() as conn:
                entries.refresh_statistics(conn, self.app.store.dialect)

    def _enter_journey(self, journey: LiveJourney, now: datetime) -> int:
        trigger = journey.journey.trigger
        with self.app.store.begin() as conn:
            state = entries.lock_journey(conn, journey.id)
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
                entries.move_date_cursor(conn, journey.id, now)
                return count
            return 0

    def _enter_segment(self, conn: Connection, journey: LiveJourney, trigger: SegmentTrigger, now: datetime,
                       room: int | None = None) -> int:
        dialect = self.app.store.dialect
        audience = to_sql(trigger.condition, now, journey.segments, dialect)
        if dialect == "sqlite" and entries.audience_share(conn, audience) >= BROAD_AUDIENCE:
            # SQLite has no statistics to tell a narrow range from a broad one: for a broad audience, looking
            # each member up from an index on the tested column (and sorting them by id afterwards) costs
            # several times more than reading them all in order.
            audience = to_sql(trigger.condition, now, journey.segments, dialect, indexed=False)
        return entries.enter_audience(
            conn, dialect, journey_id=journey.id, version=journey.version, first_step=journey.journey.first_step,
            trigger_key=f"segment:{now.strftime('%Y%m%dT%H%M%S.%f')}", audience=audience,
            reentry=journey.journey.entry.reentry, now=now, room=room)

    def _enter_date(self, conn: Connection, journey: LiveJourney, trigger: DateTrigger, cursor: datetime | None,
                    now: datetime, room: int | None = None) -> int:
        start = max(cursor or now - timedelta(days=1), now - DATE_CATCH_UP)
        if start >= now:
            return 0
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
        candidates = entries.anniversary_candidates(conn, trigger.attribute, [m * 100 + d for m, d in wanted])
        new_rows: list[dict[str, Any]] = []
        for chunk in _chunks(candidates, 1000):
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

