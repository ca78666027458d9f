"""Who enters and who leaves: event triggers, segment and date triggers, exit rules, goals.

Segment entry is one INSERT … SELECT per journey: the audience is evaluated in
the database, never by loading members into Python. Each journey's entry phase
runs under its journey_state row lock, so two daemons never enter the same
journey at once; UNIQUE constraints stop duplicates regardless.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from random import Random
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Connection,
    bindparam,
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
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.elements import ColumnElement

from engine import queries
from engine.computed import computed_columns
from engine.conditions import to_sql
from engine.durations import parse_duration
from engine.journey import DateTrigger, EventTrigger, Journey, SegmentTrigger
from engine.matching import Matcher, MatcherCache
from engine.models import EnrollmentStatus, UTCDateTime, enrollments, events, journey_state, members
from engine.quarantine import Failure, Kind, describe, is_systemic
from engine.quarantine import record as record_failures
from engine.report import TickReport
from engine.timeutil import zone
from engine.versions import LiveJourney, VersionUnreadable, computed_needed

if TYPE_CHECKING:
    from engine.app import App

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


@dataclass
class History:
    active: bool
    last_entered: datetime


@dataclass
class _Effects:
    """What one event does (entry.EntryPhase._effects)."""

    exits: dict[int, str] = field(default_factory=dict)
    conversions: dict[int, datetime] = field(default_factory=dict)
    resumes: dict[int, str | None] = field(default_factory=dict)
    entries: list[tuple[tuple[str, str], dict[str, Any]]] = field(default_factory=list)
    stale: bool = False
    capped: int = 0


@dataclass
class _Matching:
    """A batch of events' effects so far, and what later events of the batch must see of them."""

    now: datetime
    oldest: datetime
    histories: dict[tuple[str, str], History]
    quota: dict[str, int]
    exits: dict[int, str] = field(default_factory=dict)
    conversions: dict[int, datetime] = field(default_factory=dict)
    resumes: dict[int, str | None] = field(default_factory=dict)
    new_rows: list[dict[str, Any]] = field(default_factory=list)

    def apply(self, effects: _Effects, report: TickReport) -> None:
        for key, why in effects.exits.items():
            self.exits.setdefault(key, why)
        for key, at in effects.conversions.items():
            self.conversions.setdefault(key, at)
        for key, step in effects.resumes.items():
            self.resumes.setdefault(key, step)
        if effects.stale:
            report.add("stale")
        report.add("capped", effects.capped)
        for who, row in effects.entries:
            if who[0] in self.quota:
                self.quota[who[0]] -= 1
            self.histories[who] = History(True, self.now)
            self.new_rows.append(row)


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


def _histories(conn: Connection, journey_ids: Iterable[str],
               member_ids: Iterable[str]) -> dict[tuple[str, str], History]:
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


def _insert(dialect: str) -> Any:
    return sqlite.insert if dialect == "sqlite" else postgresql.insert


def _enrollment(live: LiveJourney, member_id: str, trigger_key: str, now: datetime,
                event_id: int | None = None) -> dict[str, Any]:
    return {"journey_id": live.id, "journey_version": live.version, "member_id": member_id,
            "trigger_key": trigger_key, "event_id": event_id, "status": ACTIVE, "step": live.journey.first_step,
            "next_run_at": now, "entered_at": now, "ended_at": None, "exit_reason": None, "converted_at": None,
            "variant": None, "waiting_for": None, "claimed_by": None, "claimed_until": None}


class EntryPhase:
    def __init__(self, app: App) -> None:
        self.app = app
        self.matchers = MatcherCache()

    # ------------------------------------------------------------------ events

    def handle_events(self, now: datetime, live: dict[str, LiveJourney], report: TickReport,
                      stop: Callable[[], bool], *, only: Sequence[int] | None = None) -> None:
        """Match unhandled events (ONLY: just these, as `run.py retry` asks) against triggers, exits, goals and
        waits. An event whose matching fails is quarantined and marked handled; the batch goes on. If the
        batch's writes fail because of one event, the batch is matched again one event at a time."""
        running = [j for j in live.values() if j.journey.runs]
        size = self.app.config.scheduler.batch_size
        while not stop():
            ids: list[int] = []
            try:
                with self.app.store.begin() as conn:
                    ids = queries.claim_unhandled_events(conn, now, size, only=only)
                    if not ids:
                        return
                    self._match_and_mark(conn, ids, now, running, report)
            except Exception as exc:
                if is_systemic(exc) or not ids:
                    raise
                log.warning("matching a batch of %d events failed (%s); matching them one by one", len(ids),
                            describe(exc))
                for event_id in ids:
                    self._match_one(event_id, now, running, report)
            report.add("events", len(ids))
            if only is not None:
                return

    def _match_and_mark(self, conn: Connection, ids: list[int], now: datetime, running: list[LiveJourney],
                        report: TickReport) -> None:
        failures = self._match(conn, ids, now, running, report)
        conn.execute(update(events).where(events.c.id.in_(ids)).values(handled_at=now))
        self._quarantine_events(conn, failures, now, report)

    def _match_one(self, event_id: int, now: datetime, running: list[LiveJourney], report: TickReport) -> None:
        try:
            with self.app.store.begin() as conn:
                ids = queries.claim_unhandled_events(conn, now, 1, only=[event_id])
                if ids:
                    self._match_and_mark(conn, ids, now, running, report)
        except Exception as exc:
            if is_systemic(exc):
                raise
            with self.app.store.begin() as conn:
                member = conn.execute(select(events.c.member_id).where(events.c.id == event_id)).scalar()
                conn.execute(update(events).where(events.c.id == event_id).values(handled_at=now))
                self._quarantine_events(conn, [Failure.of(exc, Kind.EVENT, event_id, member_id=member)], now,
                                        report)

    def _quarantine_events(self, conn: Connection, failures: list[Failure], now: datetime,
                           report: TickReport) -> None:
        """Events whose matching failed: marked handled (a later tick would fail the same way), kept in the
        quarantine until `run.py retry` matches them again."""
        for outcome in record_failures(conn, [Failure(f.kind, f.ref, f.error, f.detail, member_id=f.member_id,
                                                      retry=False) for f in failures], now):
            report.add("quarantined")
            report.problems.append(f"event {outcome.failure.ref} of member {outcome.failure.member_id}: "
                                   f"{outcome.failure.error} (quarantined: run.py retry after a fix)")
            log.error("event %s of member %s quarantined: %s", outcome.failure.ref, outcome.failure.member_id,
                      outcome.failure.error)

    def _match(self, conn: Connection, ids: list[int], now: datetime, running: list[LiveJourney],
               report: TickReport) -> list[Failure]:
        batch = [dict(r) for r in conn.execute(select(events).where(events.c.id.in_(ids))
                                               .order_by(events.c.occurred_at, events.c.id))
                 .mappings()]
        member_ids = list({e["member_id"] for e in batch})
        extra = computed_columns(computed_needed(self.app.versions.all_live()), now, self.app.store.dialect)
        people = {r["id"]: dict(r) for r in conn.execute(
            select(members, *extra).where(members.c.id.in_(member_ids), members.c.forgotten_at.is_(None))).mappings()}
        open_rows = [dict(r) for r in conn.execute(
            select(enrollments.c.id, enrollments.c.journey_id, enrollments.c.journey_version,
                   enrollments.c.member_id, enrollments.c.status, enrollments.c.entered_at,
                   enrollments.c.converted_at, enrollments.c.step, enrollments.c.waiting_for)
            .where(enrollments.c.member_id.in_(member_ids),
                   or_(enrollments.c.status == ACTIVE, enrollments.c.converted_at.is_(None)))).mappings()]
        triggered = [j for j in running if isinstance(j.journey.trigger, EventTrigger)]
        versions = self._versions(conn, {(r["journey_id"], r["journey_version"]) for r in open_rows}, report)
        matcher = self.matchers.get([*triggered, *versions.values()])
        state = _Matching(
            now=now, oldest=now - parse_duration(self.app.config.scheduler.trigger_window),
            histories=_histories(conn, [j.id for j in triggered], member_ids),
            quota=self._quotas(conn, triggered, now))
        by_member: dict[str, list[dict[str, Any]]] = {}
        for row in open_rows:
            by_member.setdefault(row["member_id"], []).append(row)
        failures: list[Failure] = []
        for event in batch:
            member = people.get(event["member_id"])
            if member is None:
                continue
            try:
                effects = self._effects(event, member, by_member.get(member["id"], []), versions, triggered, matcher,
                                        state)
            except Exception as exc:
                if is_systemic(exc):
                    raise
                failures.append(Failure.of(exc, Kind.EVENT, event["id"], member_id=member["id"]))
                continue
            state.apply(effects, report)
        self._write_effects(conn, state, now, report)
        return failures

    def _versions(self, conn: Connection, keys: set[tuple[str, int]],
                  report: TickReport) -> dict[tuple[str, int], LiveJourney]:
        """The journey versions members are in; one that cannot be read is left out (its exits, goals and waits
        wait) with the reason in the tick's problems, instead of failing every event."""
        out: dict[tuple[str, int], LiveJourney] = {}
        for key in sorted(keys):
            try:
                version = self.app.versions.get(conn, *key)
            except VersionUnreadable as exc:
                report.problems.append(str(exc))
                continue
            if version is not None:
                out[key] = version
        return out

    def _effects(self, event: dict[str, Any], member: dict[str, Any], rows: list[dict[str, Any]],
                 versions: dict[tuple[str, int], LiveJourney], triggered: list[LiveJourney], matcher: Matcher,
                 state: _Matching) -> _Effects:
        """What one event does, computed against the batch so far without changing anything: applied only if
        all of it could be worked out."""
        now = state.now
        effects = _Effects()
        props = event["properties"] or {}
        keys = matcher.matches(event["id"], event["type"], props, member, now)
        for row in rows:
            version = versions.get((row["journey_id"], row["journey_version"]))
            if version is None:
                continue
            self._goal_and_exit(version, row, event, keys, effects.exits, effects.conversions,
                                state.exits, state.conversions)
            if row["waiting_for"] == event["type"] and row["status"] == ACTIVE and row["id"] not in state.resumes \
                    and row["id"] not in effects.resumes and event["occurred_at"] >= row["entered_at"] \
                    and version.journey.has_step(row["step"]):
                wait = version.journey.step(row["step"])
                effects.resumes[row["id"]] = version.journey.resolve(wait, getattr(wait, "then", None))
        if event["occurred_at"] < state.oldest:
            effects.stale = True
            return effects
        taken: dict[str, int] = {}
        for live in triggered:
            if f"trigger:{live.id}:{live.version}" not in keys:
                continue
            key = (live.id, member["id"])
            if not eligible(live.journey, state.histories.get(key), now):
                continue
            if live.id in state.quota:
                if state.quota[live.id] - taken.get(live.id, 0) <= 0:
                    effects.capped += 1
                    continue
                taken[live.id] = taken.get(live.id, 0) + 1
            effects.entries.append((key, _enrollment(live, member["id"], f"event:{event['id']}", now, event["id"])))
        return effects

    def _write_effects(self, conn: Connection, state: _Matching, now: datetime, report: TickReport) -> None:
        exits, conversions, resumes = state.exits, state.conversions, state.resumes
        if conversions:
            conn.execute(update(enrollments).where(enrollments.c.id == bindparam("_id"))
                         .values(converted_at=bindparam("_at")),
                         [{"_id": k, "_at": v} for k, v in conversions.items()])
            report.add("converted", len(conversions))
        # A member whose event both ends a wait and exits the journey leaves it: no resume to write for them. (An
        # empty parameter list here once made every tick fail with "A value is required for bind parameter".)
        resumed = [{"_id": k, "_step": v} for k, v in resumes.items() if k not in exits]
        if resumed:
            conn.execute(update(enrollments).where(enrollments.c.id == bindparam("_id"), enrollments.c.status == ACTIVE)
                         .values(step=bindparam("_step"), waiting_for=None, next_run_at=now), resumed)
        if exits:
            conn.execute(update(enrollments).where(enrollments.c.id == bindparam("_id"), enrollments.c.status == ACTIVE)
                         .values(status=EnrollmentStatus.EXITED.value, ended_at=now, exit_reason=bindparam("_why"),
                                 next_run_at=None),
                         [{"_id": k, "_why": v} for k, v in exits.items()])
            report.add("exited", len(exits))
        if state.new_rows:
            report.add("enrolled", self._insert_enrollments(conn, state.new_rows))

    def _quotas(self, conn: Connection, journeys: Iterable[LiveJourney], now: datetime) -> dict[str, int]:
        """Entries each capped journey may still take today (calendar day in default_timezone)."""
        capped = {j.id: j.journey.entry.max_per_day for j in journeys if j.journey.entry.max_per_day}
        if not capped:
            return {}
        tz = zone(self.app.config.default_timezone)
        midnight = datetime.combine(now.astimezone(tz).date(), time(0, 0), tzinfo=tz)
        counts: dict[str, int] = dict(conn.execute(
            select(enrollments.c.journey_id, func.count()).where(
                enrollments.c.journey_id.in_(list(capped)), enrollments.c.entered_at >= midnight)
            .group_by(enrollments.c.journey_id)).all())
        return {journey_id: cap - int(counts.get(journey_id, 0)) for journey_id, cap in capped.items()}

    @staticmethod
    def _goal_and_exit(live: LiveJourney, row: dict[str, Any], event: Mapping[str, Any], keys: set[str],
                       exits: dict[int, str], conversions: dict[int, datetime], exited: Mapping[int, str],
                       converted: Mapping[int, datetime]) -> None:
        """KEYS: the rules the event matched (engine.matching); here only the time windows are checked. EXITED and
        CONVERTED: what earlier events of the batch already did."""
        tag, at, goal = f"{live.id}:{live.version}", event["occurred_at"], live.journey.goal
        if (goal is not None and f"goal:{tag}" in keys and row["converted_at"] is None
                and row["id"] not in converted and row["id"] not in conversions
                and row["entered_at"] <= at <= row["entered_at"] + goal.within):
            conversions[row["id"]] = at
        if f"exit:{tag}" in keys and row["status"] == ACTIVE and at >= row["entered_at"] and row["id"] not in exited:
            exits.setdefault(row["id"], f"exit_when: {event['type']} event")

    # ------------------------------------------------------------------ condition exits

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
            room = self._quotas(conn, [journey], now).get(journey.id)
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
        stmt = _insert(self.app.store.dialect)(enrollments).from_select(columns, select_new).on_conflict_do_nothing()
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
            histories = _histories(conn, [journey.id], [r.id for r in chunk])
            for row in chunk:
                fire_at, occurrence = _date_occurrence(row.anniversary, row.timezone, trigger, start, now,
                                                       self.app.config.default_timezone)
                if fire_at is None or occurrence is None:
                    continue
                if not eligible(journey.journey, histories.get((journey.id, row.id)), now):
                    continue
                new_rows.append(_enrollment(journey, row.id, f"date:{occurrence.isoformat()}", now))
        if room is not None:
            new_rows = new_rows[:room]
        if not new_rows:
            return 0
        return self._insert_enrollments(conn, new_rows)

    def _insert_enrollments(self, conn: Connection, rows: list[dict[str, Any]]) -> int:
        """Insert, skipping any the UNIQUE constraints refuse; the count comes from RETURNING because DBAPI
        row counts of a multi-row insert are not reliable across drivers (psycopg reports -1)."""
        stmt = _insert(self.app.store.dialect)(enrollments).on_conflict_do_nothing().returning(enrollments.c.id)
        return len(conn.execute(stmt, rows).all())


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

