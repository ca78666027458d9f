"""After a crash, and for answers that never came: settle every message whose fate is not known.

Two steps, run at the start of every tick (and on demand by ``run.py reconcile``):

1. **Recover** the ``sending`` rows of workers that are gone (their claim ran out; on SQLite, where this process
   holds the only engine lock, any other worker's). A row inside its worker's recorded hand-over
   (engine.tick.delivery) may have reached the channel: it becomes ``unknown``. Any other was never handed over:
   it goes back to the queue and is sent once.
2. **Reconcile** ``unknown`` rows with their channel (``Channel.reconcile``), once a request still in progress
   at the provider would have finished: the channel has it → ``sent`` (reason ``reconciled``); the channel has
   no record of it → queued and sent again; the channel cannot tell → left ``unknown`` with the reason, asked
   again later or left to a delivery webhook (SendGrid's event webhook settles its own) or an operator.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection

from channels.base import Channel, Found, InDoubt, Reconciled
from engine.store import handovers as in_doubt
from engine.store import queries
from engine.store.database import Store

log = logging.getLogger(__name__)

BATCH = 500  # unknown rows asked about at once


@dataclass
class Hint:
    """What the hand-over said about a recovered row: when it was handed over, and the channel's position."""

    handed_at: datetime
    position: str | None


@dataclass
class Recovered:
    requeued: int = 0  # never handed over: queued again
    in_doubt: int = 0  # handed over, answer never recorded: unknown
    hints: dict[int, Hint] = field(default_factory=dict)


def recover(store: Store, channel: Callable[[str], Channel], worker: str, now: datetime, *,
            exclusive: bool = False, enrollments: bool = False) -> Recovered:
    """Step 1. EXCLUSIVE: this process holds the database's only engine lock (SQLite), so every other worker's
    claim is a dead process's, whatever its lease says; ENROLLMENTS: then also free the enrollments such a
    process had claimed (once per process is enough: no other can claim while the lock is held)."""
    out = Recovered()
    if exclusive and enrollments:
        with store.begin() as conn:
            freed = queries.release_foreign_claims(conn, worker)
        if freed:
            log.warning("freed %d enrollment(s) claimed by a stopped engine process", freed)
    with store.begin() as conn:
        # This worker's own `sending` rows too: recovery runs before any delivery of the tick, so any left are
        # from a delivery that failed (its answers could not be recorded), and its hand-over says which may
        # have reached the channel, before the next delivery records another.
        stranded = in_doubt.stranded_messages(conn, now, other_than=worker if exclusive else None, mine=worker)
        if not stranded:
            return out
        never = [s.id for s in stranded if s.handed_at is None]
        doubt = [s for s in stranded if s.handed_at is not None]
        in_doubt.requeue_stranded(conn, never, now)
        marks = []
        for s in doubt:
            assert s.handed_at is not None
            due = s.handed_at + timedelta(seconds=channel(s.channel).reconcile_after)
            marks.append((s.id, due))
            out.hints[s.id] = Hint(s.handed_at, s.position)
        if marks:
            in_doubt.mark_in_doubt(conn, marks, now)
        in_doubt.clear_handovers(conn, {s.worker for s in stranded if s.worker})
    out.requeued, out.in_doubt = len(never), len(doubt)
    log.warning("recovered %d message(s) left sending by a stopped worker or a failed delivery: %d never handed "
                "to a channel (queued again), %d in doubt (unknown until reconciled)", len(stranded), out.requeued,
                out.in_doubt)
    return out


@dataclass
class Reconciliation:
    sent: int = 0  # the channel has it
    resent: int = 0  # the channel has no record of it: queued again
    failed: int = 0  # no record, and its attempts are used up
    unresolved: int = 0  # the channel cannot tell (yet)
    by_channel: Counter[tuple[str, str]] = field(default_factory=Counter)  # (channel, outcome) -> count
    reasons: Counter[str] = field(default_factory=Counter)  # why the unresolved are unresolved

    @property
    def resolved(self) -> int:
        return self.sent + self.resent + self.failed



def reconcile(store: Store, channel: Callable[[str], Channel], worker: str, now: datetime, *,
              max_attempts: Callable[[str], int], lease: timedelta, everything: bool = False,
              hints: dict[int, Hint] | None = None) -> Reconciliation:
    """Step 2, for the unknown rows due (EVERYTHING: also those left to a webhook or an operator)."""
    report = Reconciliation()
    hints = hints or {}
    after = 0  # in id order, each row once per call: one the channel cannot settle stays unknown
    while True:
        with store.begin() as conn:
            ids = in_doubt.claim_unknown_messages(conn, worker, now, now + lease, BATCH, all_due=everything,
                                                 after=after)
        if not ids:
            return report
        after = ids[-1]
        with store.connect() as conn:
            rows = in_doubt.messages_in_doubt(conn, ids)
        by_channel: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_channel.setdefault(row["channel"], []).append(row)
        for name, group in by_channel.items():
            answers = _ask(channel(name), group, hints)
            with store.begin() as conn:
                _apply(conn, worker, name, group, answers, now, max_attempts(name), report)
        if len(ids) < BATCH:
            return report


def _ask(channel: Channel, rows: Sequence[dict[str, Any]], hints: dict[int, Hint]) -> list[Reconciled]:
    doubts = []
    for row in rows:
        hint = hints.get(row["id"])
        doubts.append(InDoubt(row["id"], row["recipient"] or "", row["body"] or "", row["subject"],
                              hint.handed_at if hint else row["created_at"], hint.position if hint else None))
    try:
        answers = channel.reconcile(doubts)
    except Exception as exc:  # one channel's failure must not stop the others' reconciliation (nor the tick)
        log.exception("reconciling with %s failed", channel.provider)
        return [Reconciled(Found.UNKNOWN, detail=f"{channel.provider} look-up failed: {exc!r}", retry_after=300)
                for _ in rows]
    if len(answers) != len(rows):
        return [Reconciled(Found.UNKNOWN, detail=f"{channel.provider} answered {len(answers)} look-ups for "
                                                 f"{len(rows)} messages", retry_after=300) for _ in rows]
    return answers


_SENT_NOTE = "reconciled"
_SEPARATOR = " — reconciliation: "


def _apply(conn: Connection, worker: str, channel: str, rows: Sequence[dict[str, Any]],
           answers: Sequence[Reconciled], now: datetime, max_attempts: int, report: Reconciliation) -> None:
    sent, again, failed, open_ = [], [], [], []
    for row, answer in zip(rows, answers, strict=True):
        if answer.found is Found.SENT:
            sent.append({"_id": row["id"], "_provider": answer.provider_id,
                         "_error": f"reconciled with {channel}: {answer.detail}" if answer.detail else None})
        elif answer.found is Found.ABSENT and int(row["attempts"] or 0) >= max_attempts:
            failed.append({"_id": row["id"], "_error": f"gave up after {row['attempts']} attempts: {answer.detail}"})
        elif answer.found is Found.ABSENT:
            again.append({"_id": row["id"], "_error": f"{answer.detail}; sent again" if answer.detail
                          else f"{channel} has no record of it; sent again"})
        else:
            retry = now + timedelta(seconds=answer.retry_after) if answer.retry_after is not None else None
            # Why it is in doubt (the crash, the timeout) stays; what the channel said replaces the last answer.
            cause = (row["error"] or "in doubt").split(_SEPARATOR)[0]
            open_.append({"_id": row["id"], "_error": f"{cause}{_SEPARATOR}{answer.detail}", "_at": retry})
            report.reasons[answer.detail] += 1
    in_doubt.settle_in_doubt(conn, worker, now, sent=sent, again=again, failed=failed, still_open=open_,
                            sent_reason=_SENT_NOTE)
    report.sent += len(sent)
    report.resent += len(again)
    report.failed += len(failed)
    report.unresolved += len(open_)
    for outcome, items in (("sent", sent), ("resent", again), ("failed", failed), ("unresolved", open_)):
        if items:
            report.by_channel[(channel, outcome)] += len(items)
