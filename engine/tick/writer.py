"""Writing one composed batch and handing its messages to delivery (engine.tick.runner claims and composes).

In ONE transaction: the message rows (the at-most-once key is written here, before any channel is called), the
enrollment moves, member updates, the steps that failed and the first hand-over; then engine.tick.delivery hands
the messages to their channels chunk by chunk. If the batch's write fails because of one enrollment's data, the
batch is written enrollment by enrollment and the one that fails is set aside (engine.store.quarantine).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from engine.audit import chain as audit
from engine.programme.updates import save_member_updates
from engine.rules.loyalty import Loyalty
from engine.store import quarantine as faults
from engine.store import queries
from engine.store.database import Store
from engine.store.models import EnrollmentStatus, MessageStatus
from engine.store.quarantine import Failure, Kind, is_systemic
from engine.tick.composer import RENDERED_KEYS, Composed, Move
from engine.tick.delivery import Delivery
from engine.tick.report import TickReport
from engine.tick.safety import Reason

log = logging.getLogger(__name__)

_TRANSITION_COLUMNS = ("step", "status", "next_run_at", "ended_at", "exit_reason", "variant", "waiting_for",
                       "claimed_by", "claimed_until", "failures")


class BatchWriter:
    def __init__(self, store: Store, delivery: Delivery, loyalty: Callable[[], Loyalty]) -> None:
        self.store = store
        self.delivery = delivery
        self.loyalty = loyalty  # the programme as currently loaded (member updates recompute tiers with it)

    def write_and_deliver(self, composed: Composed, now: datetime, report: TickReport, stop: Callable[[], bool],
                           recheck: bool = False) -> None:
        """Write a composed batch in ONE transaction (message rows with their at-most-once keys, enrollment
        moves, member updates, the steps that failed, the first hand-over), then deliver its messages."""
        if recheck:
            self._recheck_listed(composed.outgoing)
        self.delivery.listed = set()
        handed = True
        try:
            with self.store.begin() as conn:
                inserted = self._write(conn, composed, now, report)
                chunks = self.delivery.plan([r for r in inserted if r["status"] == MessageStatus.SENDING.value])
                if chunks:
                    self.delivery.hand_over(conn, chunks[0], now)
            moves = composed.moves
        except Exception as exc:
            if is_systemic(exc):
                raise
            log.warning("writing a batch of %d enrollments failed (%s); writing them one by one",
                        len(composed.moves) + len(composed.failures), faults.describe(exc))
            inserted, moves = self._write_each(composed, now, report)
            chunks = self.delivery.plan([r for r in inserted if r["status"] == MessageStatus.SENDING.value])
            handed = False
        completed, exited = EnrollmentStatus.COMPLETED.value, EnrollmentStatus.EXITED.value
        for move in moves:
            if move.status == completed:
                report.add("completed")
            elif move.status == exited:
                report.add("exited")
        sending = MessageStatus.SENDING.value
        for row in inserted:
            if row["status"] != sending:
                report.add(row["status"])
        self.delivery.deliver(chunks, now, report, stop, handed=handed)

    def _write(self, conn: Connection, composed: Composed, now: datetime, report: TickReport) -> list[dict[str, Any]]:
        inserted = audit.append(conn, self.store.dialect, composed.outgoing)
        self._save_transitions(conn, composed.moves)
        if composed.changed:
            save_member_updates(conn, composed.changed, self.loyalty(), now)
        if composed.failures:
            self._set_aside(conn, composed.failures, now, report)
        if composed.recovered:
            faults.settle(conn, Kind.ENROLLMENT, composed.recovered, now)
        return inserted

    def _write_each(self, composed: Composed, now: datetime,
                    report: TickReport) -> tuple[list[dict[str, Any]], list[Move]]:
        """The batch enrollment by enrollment, each in its own transaction; one whose write fails is set aside.
        Returns the rows inserted and the moves written."""
        inserted: list[dict[str, Any]] = []
        written: list[Move] = []
        if composed.failures:
            with self.store.begin() as conn:
                self._set_aside(conn, composed.failures, now, report)
        rows: dict[int, list[dict[str, Any]]] = {}
        for row in composed.outgoing:
            rows.setdefault(row["enrollment_id"], []).append(row)
        changed = {c[0]["enrollment_id"]: c for c in composed.changed}
        recovered = set(composed.recovered)
        for move in composed.moves:
            enrollment_id = move.enrollment_id
            part = Composed(moves=[move], outgoing=rows.get(enrollment_id, []),
                            changed=[changed[enrollment_id]] if enrollment_id in changed else [],
                            recovered=[enrollment_id] if enrollment_id in recovered else [])
            try:
                with self.store.begin() as conn:
                    inserted += self._write(conn, part, now, report)
                written.append(move)
            except Exception as exc:
                if is_systemic(exc):
                    raise
                log.error("enrollment %s could not be written: %s", enrollment_id, faults.describe(exc))
                with self.store.begin() as conn:
                    where = queries.enrollment_place(conn, enrollment_id)
                    self._set_aside(conn, [Failure.of(exc, Kind.ENROLLMENT, enrollment_id, journey_id=where[0],
                                                      journey_version=where[1], member_id=where[2],
                                                      step=where[3])], now, report)
        return inserted, written

    def _set_aside(self, conn: Connection, failures: Sequence[Failure], now: datetime, report: TickReport) -> None:
        """Enrollments whose step failed stay at that step: tried again at a later tick, or quarantined."""
        recorded = faults.record(conn, failures, now)
        w = queries.BulkWriter(self.store.dialect)
        w.update_by_id(conn, "enrollments", ("next_run_at", "failures", "claimed_by", "claimed_until"), [
            (w.ts(r.next_attempt_at), r.attempts, None, None, int(r.failure.ref)) for r in recorded])
        for r in recorded:
            report.add("quarantined" if r.quarantined else "retrying")
            report.problems.append(f"journey {r.failure.journey_id} step {r.failure.step}, member "
                                   f"{r.failure.member_id}: {r.failure.error}"
                                   + (" (quarantined: run.py retry after a fix)" if r.quarantined else
                                      f" (tried again at {r.next_attempt_at:%Y-%m-%d %H:%M} UTC)"))

    def _recheck_listed(self, rows: list[dict[str, Any]]) -> None:
        """Suppress messages to addresses that channel answers put on the suppression list while this batch was
        being composed, as the rails would have had they seen the list then."""
        if not self.delivery.listed:
            return
        going = (MessageStatus.SENDING.value, MessageStatus.QUEUED.value)
        for row in rows:
            channel = row["channel"]
            if row["status"] in going and (channel, row["recipient"]) in self.delivery.listed:
                for key in RENDERED_KEYS:
                    row[key] = None
                row.update(status=MessageStatus.SUPPRESSED.value, reason=Reason.SUPPRESSED_ADDRESS,
                           error=f"{channel} address is on the suppression list", next_attempt_at=None)
                row["content_hash"] = audit.content_hash(row)

    def _save_transitions(self, conn: Connection, moves: Sequence[Move]) -> None:
        w = queries.BulkWriter(self.store.dialect)
        w.update_by_id(conn, "enrollments", _TRANSITION_COLUMNS, [
            (step, status, w.ts(next_run_at), w.ts(ended_at), exit_reason, variant, waiting_for, None, None, 0,
             enrollment_id)
            for enrollment_id, step, status, next_run_at, ended_at, exit_reason, variant, waiting_for in moves])
