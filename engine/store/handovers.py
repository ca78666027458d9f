"""Hand-overs and messages in doubt: what a worker is about to hand a channel (recorded first), what a crash
left stranded (requeued, or marked unknown when it may have reached the channel), and settling unknown messages
with what their channel says."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import (
    Connection,
    bindparam,
    delete,
    func,
    literal,
    or_,
    select,
    update,
)

from engine.store.models import (
    MessageStatus,
    UTCDateTime,
    handovers,
    messages,
)
from engine.store.queries import (
    REQUEUED_EXPLANATION,
    UNKNOWN_EXPLANATION,
    BulkWriter,
    among,
    chunked,
)

# Inline literals, not bound parameters: SQLite only uses a partial index (WHERE status = 'active') when the
# query's own WHERE visibly implies it, and a "status = ?" placeholder does not.
from engine.store.seal import reseal

_IN_DOUBT = (messages.c.id, messages.c.channel, messages.c.recipient, messages.c.body, messages.c.subject,
            messages.c.created_at, messages.c.attempts, messages.c.error)


def messages_in_doubt(conn: Connection, ids: Sequence[int]) -> list[dict[str, Any]]:
    """What reconciliation asks a channel about, for the messages IDS, in id order."""
    return [dict(r) for r in conn.execute(select(*_IN_DOUBT).where(messages.c.id.in_(list(ids)))
                                          .order_by(messages.c.id)).mappings()]


def settle_in_doubt(conn: Connection, worker: str, now: datetime, *, sent: list[dict[str, Any]],
                    again: list[dict[str, Any]], failed: list[dict[str, Any]], still_open: list[dict[str, Any]],
                    sent_reason: str) -> None:
    """Record what the channels said of unknown messages WORKER holds (rows keyed _id, with _error, _provider,
    _at): SENT found (provider id and first sent_at kept), AGAIN queued now, FAILED given up, STILL_OPEN left
    unknown with a new error and time to ask again. Each releases the claim."""
    mine = (messages.c.id == bindparam("_id"), messages.c.status == MessageStatus.UNKNOWN.value,
            messages.c.claimed_by == worker)
    released = {"claimed_by": None, "claimed_until": None, "updated_at": now}
    if sent:
        conn.execute(update(messages).where(*mine).values(
            status=MessageStatus.SENT.value, provider_id=func.coalesce(bindparam("_provider"), messages.c.provider_id),
            sent_at=func.coalesce(messages.c.sent_at, literal(now, UTCDateTime())),
            reason=sent_reason, error=bindparam("_error"), next_attempt_at=None, **released), sent)
    if again:
        conn.execute(update(messages).where(*mine).values(
            status=MessageStatus.QUEUED.value, reason="retry", error=bindparam("_error"),
            next_attempt_at=literal(now, UTCDateTime()), **released), again)
    if failed:
        conn.execute(update(messages).where(*mine).values(
            status=MessageStatus.FAILED.value, error=bindparam("_error"), next_attempt_at=None, **released), failed)
    if still_open:
        conn.execute(update(messages).where(*mine).values(
            error=bindparam("_error"), next_attempt_at=bindparam("_at", type_=UTCDateTime()),
            **released), still_open)
    reseal(conn, [int(r["_id"]) for r in (*sent, *again, *failed, *still_open)])


def set_handover(conn: Connection, worker: str, channel: str, first_id: int, last_id: int, position: str | None,
                 now: datetime) -> None:
    """WORKER is about to hand CHANNEL its `sending` rows with ids FIRST_ID..LAST_ID (engine.store.models.Handover).
    Straight to the driver: it runs once per batch on the send path."""
    w = BulkWriter(conn.dialect.name)
    conn.exec_driver_sql(w._sql(
        "INSERT INTO handovers (worker, channel, first_id, last_id, position, handed_at) VALUES ({marks}) "
        "ON CONFLICT (worker) DO UPDATE SET channel = excluded.channel, first_id = excluded.first_id, "
        "last_id = excluded.last_id, position = excluded.position, handed_at = excluded.handed_at",
        ("worker", "channel", "first_id", "last_id", "position", "handed_at")),
        (worker, channel, first_id, last_id, position, w.ts(now)))


def clear_handover(conn: Connection, worker: str) -> None:
    conn.exec_driver_sql(f"DELETE FROM handovers WHERE worker = {'?' if conn.dialect.name == 'sqlite' else '%s'}",
                         (worker,))


class Stranded(NamedTuple):
    """A `sending` row whose worker is gone, and what its hand-over says about it."""

    id: int
    channel: str
    worker: str
    handed_at: datetime | None  # None: never handed to the channel
    position: str | None


def stranded_messages(conn: Connection, now: datetime, *, other_than: str | None = None,
                      mine: str | None = None) -> list[Stranded]:
    """`sending` rows whose claim has run out, or (OTHER_THAN: on SQLite, where this process holds the only
    engine lock) that any other worker claimed, or (MINE: this worker, between deliveries) that a delivery of
    this worker left behind when it failed; locked until the caller commits. Each is in doubt (within its
    worker's hand-over) or was never handed over."""
    stale = messages.c.claimed_until < now
    if other_than is not None:
        stale = or_(stale, messages.c.claimed_by.is_(None), messages.c.claimed_by != other_than)
    if mine is not None:
        stale = or_(stale, messages.c.claimed_by == mine)
    rows = conn.execute(select(messages.c.id, messages.c.channel, messages.c.claimed_by)
                        .where(messages.c.status == MessageStatus.SENDING.value, stale)
                        .order_by(messages.c.id).with_for_update(skip_locked=True)).all()
    if not rows:
        return []
    workers = sorted({str(r.claimed_by) for r in rows if r.claimed_by})
    handed = {h.worker: h for h in conn.execute(select(handovers).where(handovers.c.worker.in_(workers)))}
    out = []
    for row in rows:
        h = handed.get(str(row.claimed_by))
        inside = h is not None and h.channel == row.channel and h.first_id <= row.id <= h.last_id
        out.append(Stranded(int(row.id), str(row.channel), str(row.claimed_by or ""),
                            h.handed_at if inside and h is not None else None,
                            h.position if inside and h is not None else None))
    return out


def requeue_stranded(conn: Connection, ids: Sequence[int], now: datetime) -> None:
    """Never handed to a channel: back to the queue, to go out once at the next delivery."""
    for chunk in chunked(sorted(ids), conn.dialect.name):
        conn.execute(update(messages).where(among(messages.c.id, chunk, conn.dialect.name),
                                            messages.c.status == MessageStatus.SENDING.value)
                     .values(status=MessageStatus.QUEUED.value, next_attempt_at=now, claimed_by=None,
                             claimed_until=None, error=REQUEUED_EXPLANATION, updated_at=now))
    reseal(conn, ids)


def mark_in_doubt(conn: Connection, rows: Sequence[tuple[int, datetime]], now: datetime) -> None:
    """Handed over, answer never recorded: ``unknown``, to be reconciled from the given time on (never before a
    request still in progress at the provider could have finished)."""
    conn.execute(update(messages).where(messages.c.id == bindparam("_id"),
                                        messages.c.status == MessageStatus.SENDING.value)
                 .values(status=MessageStatus.UNKNOWN.value, error=UNKNOWN_EXPLANATION, claimed_by=None,
                         claimed_until=None, next_attempt_at=bindparam("_at"), updated_at=now),
                 [{"_id": i, "_at": at} for i, at in rows])
    reseal(conn, [i for i, _ in rows])


def clear_handovers(conn: Connection, workers: Collection[str]) -> None:
    if workers:
        conn.execute(delete(handovers).where(handovers.c.worker.in_(sorted(workers))))


def claim_unknown_messages(conn: Connection, worker: str, now: datetime, lease_until: datetime, limit: int, *,
                           all_due: bool = False, after: int = 0) -> list[int]:
    """Unknown messages due for reconciliation with ids above AFTER (ALL_DUE: also those waiting for a webhook or
    an operator, as `run.py reconcile` asks), claimed for it; never one whose hand-over is too recent to look up."""
    due = messages.c.next_attempt_at <= now
    if all_due:
        due = or_(due, messages.c.next_attempt_at.is_(None))
    stmt = (select(messages.c.id)
            .where(messages.c.status == MessageStatus.UNKNOWN.value, due, messages.c.id > after,
                   or_(messages.c.claimed_until.is_(None), messages.c.claimed_until < now))
            .order_by(messages.c.id).limit(limit).with_for_update(skip_locked=True))
    claim = (update(messages).where(messages.c.id.in_(stmt.scalar_subquery()))
             .values(claimed_by=worker, claimed_until=lease_until).returning(messages.c.id))
    return sorted(int(i) for i in conn.execute(claim).scalars())
