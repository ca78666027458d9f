"""The statements that matter for correctness under concurrency, named and kept in one place.

Claims are one statement each: pick due rows ``FOR UPDATE SKIP LOCKED`` (on
PostgreSQL; SQLite runs a single engine process, see Store.acquire_process_lock)
and set the owner and lease expiry in the same statement.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    ARRAY,
    Connection,
    Dialect,
    any_,
    bindparam,
    case,
    func,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.sql.elements import ColumnClause, ColumnElement

from engine.store.database import insert_for
from engine.store.models import (
    Base,
    EnrollmentStatus,
    MessageStatus,
    enrollments,
    events,
    members,
    messages,
    programme_state,
    webhook_receipts,
)
from engine.store.seal import reseal

# Inline literals, not bound parameters: SQLite only uses a partial index (WHERE status = 'active') when the
# query's own WHERE visibly implies it, and a "status = ?" placeholder does not.


# Inline literals, not bound parameters: SQLite only uses a partial index (WHERE status = 'active') when the
# query's own WHERE visibly implies it, and a "status = ?" placeholder does not.
_ACTIVE: ColumnClause[str] = literal_column(f"'{EnrollmentStatus.ACTIVE.value}'")


_QUEUED: ColumnClause[str] = literal_column(f"'{MessageStatus.QUEUED.value}'")
T = TypeVar("T")


UNKNOWN_EXPLANATION = ("handed to the channel, but the engine stopped before the channel's answer was recorded; "
                       "not re-sent: reconciling with the channel (run.py reconcile)")


REQUEUED_EXPLANATION = ("the engine stopped before handing this message to the channel; it was never attempted and "
                        "goes out at the next tick")


def among(column: ColumnElement[Any], values: Sequence[Any], dialect: str) -> ColumnElement[bool]:
    """COLUMN IN VALUES. On PostgreSQL ``COLUMN = ANY(array)``: one parameter, so the statement's text is the
    same whatever the count and psycopg and the server parse it once; a list of placeholders is a new statement
    (and for a batch's thousand ids a slow one to parse) every time."""
    if dialect == "postgresql":
        return column == any_(bindparam(None, list(values), type_=ARRAY(column.type)))
    return column.in_(list(values))


def chunked(values: Sequence[T], dialect: str) -> Iterator[Sequence[T]]:
    """VALUES in pieces for among(): 900 at a time on SQLite (bound parameters per statement stay under old
    builds' limit of 999), all at once on PostgreSQL (one array)."""
    size = 900 if dialect == "sqlite" else max(1, len(values))
    for start in range(0, len(values), size):
        yield values[start:start + size]


def claim_due_enrollments(conn: Connection, worker: str, now: datetime, lease_until: datetime, limit: int,
                          journeys: Collection[str], only: Sequence[int] | None = None) -> list[int]:
    """Due enrollments of JOURNEYS (ONLY: among these ids), claimed until LEASE_UNTIL."""
    if not journeys or (only is not None and not only):
        return []
    # On SQLite, "+journey_id" keeps the planner off the (journey_id, member_id) index, which would make every
    # batch scan and sort all of a journey's active enrollments; the due index gives them in order instead.
    journey = literal_column("+enrollments.journey_id") if conn.dialect.name == "sqlite" else enrollments.c.journey_id
    due = (
        select(enrollments.c.id)
        .where(enrollments.c.status == _ACTIVE,
               enrollments.c.next_run_at <= now,
               journey.in_(list(journeys)),
               or_(enrollments.c.claimed_until.is_(None), enrollments.c.claimed_until < now))
        .order_by(enrollments.c.next_run_at, enrollments.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    if only is not None:
        due = due.where(enrollments.c.id.in_(list(only)))
    stmt = (update(enrollments).where(enrollments.c.id.in_(due.scalar_subquery()))
            .values(claimed_by=worker, claimed_until=lease_until).returning(enrollments.c.id))
    return [int(i) for i in conn.execute(stmt).scalars()]


def claim_queued_messages(conn: Connection, worker: str, now: datetime, lease_until: datetime,
                          limit: int, only: Sequence[int] | None = None) -> list[int]:
    """Queued messages due by NOW (ONLY: among these ids), claimed (status ``sending``) until LEASE_UNTIL."""
    due = (
        select(messages.c.id)
        .where(messages.c.status == _QUEUED, messages.c.next_attempt_at <= now)
        .order_by(messages.c.next_attempt_at, messages.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    if only is not None:
        due = due.where(messages.c.id.in_(list(only)))
    stmt = (update(messages).where(messages.c.id.in_(due.scalar_subquery()))
            .values(status=MessageStatus.SENDING.value, claimed_by=worker, claimed_until=lease_until,
                    updated_at=now).returning(messages.c.id))
    ids = [int(i) for i in conn.execute(stmt).scalars()]
    reseal(conn, ids)
    return ids


def claim_unhandled_events(conn: Connection, now: datetime, limit: int, *,
                           only: Sequence[int] | None = None) -> list[int]:
    """Events that happened by NOW and that no tick has matched yet (ONLY: among these ids), oldest first, locked
    until the caller commits.

    Ordered by occurred_at so that the partial index ix_events_unhandled serves the query: ordering by id alone
    made SQLite scan the whole events table on every tick.
    """
    stmt = (select(events.c.id)
            .where(events.c.handled_at.is_(None), events.c.occurred_at <= now)
            .order_by(events.c.occurred_at, events.c.id).limit(limit).with_for_update(skip_locked=True))
    if only is not None:
        stmt = stmt.where(events.c.id.in_(list(only)))
    return [int(i) for i in conn.execute(stmt).scalars()]


def mark_events_handled(conn: Connection, ids: Sequence[int], now: datetime) -> None:
    conn.execute(update(events).where(events.c.id.in_(list(ids))).values(handled_at=now))


def claim_task(conn: Connection, task: str, now: datetime, every: timedelta) -> tuple[bool, datetime | None]:
    """(due, when it last ran): lock TASK's row; if due, mark it run at NOW (committed with the caller's work)."""
    insert = insert_for(conn.dialect.name)
    conn.execute(insert(programme_state).values(task=task, ran_at=datetime.min.replace(tzinfo=now.tzinfo))
                 .on_conflict_do_nothing(index_elements=["task"]))
    stmt = select(programme_state.c.ran_at).where(programme_state.c.task == task)
    if conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    last = conn.execute(stmt).scalar_one()
    never = last.year == 1
    if not never and now < last + every:
        return False, last
    conn.execute(update(programme_state).where(programme_state.c.task == task).values(ran_at=now))
    return True, None if never else last


def members_at_least(conn: Connection, count: int) -> bool:
    """Whether there are at least COUNT members (counting no further)."""
    found = conn.execute(select(func.count()).select_from(select(members.c.id).limit(count).subquery())).scalar_one()
    return int(found) >= count


def enrollment_place(conn: Connection, enrollment_id: int) -> tuple[str, int, str, str | None]:
    """Where an enrollment is: (journey id, journey version, member id, step)."""
    row = conn.execute(select(enrollments.c.journey_id, enrollments.c.journey_version, enrollments.c.member_id,
                              enrollments.c.step).where(enrollments.c.id == enrollment_id)).one()
    return str(row[0]), int(row[1]), str(row[2]), row[3]


def extend_message_leases(conn: Connection, ids: list[int], worker: str, until: datetime) -> set[int]:
    """A long, paced delivery keeps its claim on the rows it has not handed over yet; returns those still its
    own (a reaper elsewhere takes rows whose claim ran out: they are not handed over by this worker)."""
    kept: set[int] = set()
    dialect = conn.dialect.name
    for chunk in chunked(sorted(ids), dialect):
        kept.update(int(i) for i in conn.execute(
            update(messages).where(among(messages.c.id, chunk, dialect), messages.c.claimed_by == worker,
                                   messages.c.status == MessageStatus.SENDING.value)
            .values(claimed_until=until).returning(messages.c.id)).scalars())
    return kept


def merge_answers(conn: Connection, answers: Sequence[tuple[int, str | None, int, datetime]]) -> None:
    """Accepted answers for rows a delivery callback already moved on (it overtook the answer): keep the provider
    id and the attempt count the callback could not know, and settle a row a reaper had made unknown."""
    if not answers:
        return
    unknown = MessageStatus.UNKNOWN.value
    conn.execute(
        update(messages)
        # Plain comparisons, not IN: an IN list is an "expanding" parameter, which executemany refuses (with two
        # or more answers in a chunk this statement failed, and took the chunk's answers with it).
        .where(messages.c.id == bindparam("_id"), messages.c.status != MessageStatus.SENDING.value,
               messages.c.status != MessageStatus.QUEUED.value, messages.c.status != MessageStatus.SUPPRESSED.value)
        .values(provider_id=func.coalesce(messages.c.provider_id, bindparam("_provider")),
                attempts=bindparam("_attempts"),
                sent_at=func.coalesce(messages.c.sent_at, bindparam("_sent", type_=messages.c.sent_at.type)),
                status=case((messages.c.status == unknown, MessageStatus.SENT.value), else_=messages.c.status),
                claimed_by=None, claimed_until=None),
        [{"_id": i, "_provider": p, "_attempts": a, "_sent": at} for i, p, a, at in answers])
    reseal(conn, [answer[0] for answer in answers])


def erased_among(conn: Connection, ids: Sequence[int]) -> list[int]:
    """Which of the messages IDS `member forget` has erased."""
    dialect = conn.dialect.name
    out: list[int] = []
    for chunk in chunked(sorted(ids), dialect):
        out += conn.execute(select(messages.c.id).where(among(messages.c.id, chunk, dialect),
                                                        messages.c.redacted)).scalars().all()
    return out


def requeue_messages(conn: Connection, ids: list[int], worker: str, now: datetime) -> None:
    """Rows claimed but never handed to a channel go back to the queue (a graceful stop mid-delivery)."""
    for start in range(0, len(ids), 900):
        conn.execute(update(messages).where(messages.c.id.in_(ids[start:start + 900]), messages.c.claimed_by == worker,
                                            messages.c.status == MessageStatus.SENDING.value)
                     .values(status=MessageStatus.QUEUED.value, next_attempt_at=now, claimed_by=None,
                             claimed_until=None, updated_at=now))
    reseal(conn, ids)


def park_message(conn: Connection, message_id: int, worker: str, until: datetime | None, now: datetime) -> None:
    """A queued message that could not be prepared: back to the queue until UNTIL (None: quarantined, it waits
    for `run.py retry`, which sets the time again)."""
    conn.execute(update(messages).where(messages.c.id == message_id, messages.c.claimed_by == worker,
                                        messages.c.status == MessageStatus.SENDING.value)
                 .values(status=MessageStatus.QUEUED.value, next_attempt_at=until, claimed_by=None,
                         claimed_until=None, updated_at=now))
    reseal(conn, [message_id])


#: receipts kept for good: a Twilio inbound message is signed without a time, so only its receipt tells a replay
#: of an old STOP (or START) from a new one, for as long as the message log is kept
KEPT_RECEIPTS = ("twilio_inbound",)


def prune_webhook_receipts(conn: Connection, older_than: datetime) -> int:
    """Providers resend for a few days at most (SendGrid 72 h, and its signed timestamps expire in minutes):
    receipts older than that are dead weight, except the KEPT_RECEIPTS."""
    result = conn.execute(webhook_receipts.delete().where(webhook_receipts.c.received_at < older_than,
                                                          webhook_receipts.c.provider.not_in(KEPT_RECEIPTS)))
    return int(result.rowcount or 0)


def release_enrollments(conn: Connection, ids: Sequence[int], worker: str) -> None:
    """Give back these claimed enrollments (if still ours) without running them."""
    dialect = conn.dialect.name
    for chunk in chunked(sorted(ids), dialect):
        conn.execute(update(enrollments).where(among(enrollments.c.id, chunk, dialect),
                                               enrollments.c.claimed_by == worker)
                     .values(claimed_by=None, claimed_until=None))


def release_foreign_claims(conn: Connection, worker: str) -> int:
    """Every enrollment claim that is not WORKER's: for a process holding the SQLite engine lock, where they can
    only be a dead process's (it had batches claimed ahead for its compose worker). Scans the claimed ones."""
    result = conn.execute(update(enrollments).where(enrollments.c.claimed_by.is_not(None),
                                                    enrollments.c.claimed_by != worker)
                          .values(claimed_by=None, claimed_until=None))
    return int(result.rowcount or 0)


def release_enrollment_claims(conn: Connection, worker: str) -> None:
    conn.execute(update(enrollments).where(enrollments.c.claimed_by == worker)
                 .values(claimed_by=None, claimed_until=None))


def _all_same(values: list[object]) -> bool:
    """Whether every value equals the first and has its type (1 and True are not the same value here)."""
    return values.count(values[0]) == len(values) and len(set(map(type, values))) == 1


# Bound parameters per set-based statement on SQLite: under the limit of old builds (999).
_MAX_PARAMETERS = 900


class BulkWriter:
    def __init__(self, dialect: str) -> None:
        self.sqlite = dialect == "sqlite"
        self.mark = "?" if self.sqlite else "%s"
        self._stored: dict[datetime, object] = {}

    def ts(self, value: datetime | None) -> object:
        """An aware datetime as the UTCDateTime column stores it (naive UTC; text on SQLite)."""
        if value is None:
            return None
        out = self._stored.get(value)
        if out is None:  # a batch stamps most rows with the same few instants
            if len(self._stored) > 4096:
                self._stored.clear()
            naive = value.astimezone(UTC).replace(tzinfo=None)
            out = self._stored[value] = naive.strftime("%Y-%m-%d %H:%M:%S.%f") if self.sqlite else naive
        return out

    def _sql(self, template: str, names: tuple[str, ...]) -> str:
        return template.format(columns=", ".join(names), marks=", ".join([self.mark] * len(names)),
                               sets=", ".join(f"{n} = {self.mark}" for n in names), m=self.mark)

    def _array_type(self, dialect: Dialect, table: str, name: str) -> str:
        """The PostgreSQL array type of column NAME's values, without its length (``VARCHAR[]``): an explicit
        cast to VARCHAR(64) would cut a longer value short, where assigning it to the column rejects it."""
        declared = Base.metadata.tables[table].c[name].type.compile(dialect=dialect)
        return re.sub(r"\(\d+(?:,\s*\d+)?\)", "", declared) + "[]"

    def insert(self, conn: Connection, table: str, names: tuple[str, ...],
               rows: Sequence[Sequence[object]]) -> None:
        """ROWS in the database's form. On PostgreSQL through COPY, in the caller's transaction: constraints
        hold as for INSERT (a duplicate at-most-once key fails the whole batch, as an executemany would)."""
        if not rows:
            return
        if self.sqlite:
            conn.exec_driver_sql(self._sql(f"INSERT INTO {table} ({{columns}}) VALUES ({{marks}})", names), rows)
            return
        cursor: Any = conn.connection.cursor()
        try:
            with cursor.copy(f"COPY {table} ({', '.join(names)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        finally:
            cursor.close()

    def update_by_id(self, conn: Connection, table: str, names: tuple[str, ...],
                     rows: list[tuple[object, ...]], only_if: str = "") -> int:
        """ROWS are (values for NAMES..., id); ONLY_IF is an extra SQL condition (a constant one, no parameters).

        Set-based rather than a statement per row: a column whose value is the same in every row (a batch's
        status, clock, step) is bound once, and the ids, with the columns that do differ (a provider id per
        message), are joined on id: on SQLite from a VALUES list, a few hundred rows per statement; on
        PostgreSQL from ``unnest`` over one array per column. When nothing differs but the id it is a plain
        ``id IN (…)`` (``id = ANY(array)`` on PostgreSQL). Returns the number of rows changed.
        """
        if not rows:
            return 0
        extra = f" AND {only_if}" if only_if else ""
        count = len(names)
        first = rows[0]
        same = [_all_same([r[i] for r in rows]) for i in range(count)]
        varying = [i for i in range(count) if not same[i]]
        fixed = [first[i] for i in range(count) if same[i]]
        sets = ", ".join([f"{names[i]} = {self.mark}" for i in range(count) if same[i]]
                         + [f"{names[i]} = v.c{k}" for k, i in enumerate(varying)])
        if not self.sqlite:
            # Arrays, one parameter per column: the statement is the same text for every batch, so psycopg and
            # the server parse it once, where a list of placeholders is a new statement per batch size.
            ids = [r[count] for r in rows]
            if not varying:
                return _count(conn.exec_driver_sql(f"UPDATE {table} SET {sets} WHERE id = ANY(%s){extra}",
                                                   (*fixed, ids)))
            arrays = ", ".join(["%s::bigint[]"] + [f"%s::{self._array_type(conn.dialect, table, names[i])}"
                                                    for i in varying])
            columns = ", ".join(["v_id"] + [f"c{k}" for k in range(len(varying))])
            return _count(conn.exec_driver_sql(
                f"UPDATE {table} SET {sets} FROM unnest({arrays}) AS v({columns}) WHERE {table}.id = v.v_id{extra}",
                (*fixed, ids, *([r[i] for r in rows] for i in varying))))
        changed = 0
        size = max(1, _MAX_PARAMETERS // (1 + len(varying)))
        for start in range(0, len(rows), size):
            chunk = rows[start:start + size]
            params = list(fixed)
            if not varying:
                sql = f"UPDATE {table} SET {sets} WHERE id IN ({', '.join(['?'] * len(chunk))}){extra}"
                params.extend(r[count] for r in chunk)
            else:
                tuple_marks = "(" + ", ".join(["?"] * (1 + len(varying))) + ")"
                sql = (f"UPDATE {table} SET {sets} FROM (SELECT column1 AS v_id"
                       + "".join(f", column{k + 2} AS c{k}" for k in range(len(varying)))
                       + f" FROM (VALUES {', '.join([tuple_marks] * len(chunk))})) AS v WHERE {table}.id = v.v_id"
                       + extra)
                for r in chunk:
                    params.append(r[count])
                    params.extend([r[i] for i in varying])
            changed += _count(conn.exec_driver_sql(sql, tuple(params)))
        return changed


def _count(result: Any) -> int:
    return max(0, int(result.rowcount or 0))
