"""``run.py retry``: run quarantined work again after a fix, or give it up for good.

Retrying gives each unit one more try (``quarantine.rearm``): an enrollment's step, an event's matching, a
queued message's delivery run again now (when this process may run them; otherwise the daemon's next tick
does), a paused journey runs again from its next tick. A unit that fails again goes straight back to the
quarantine, so one call never loops on it. Abandoning ends it: an enrollment leaves its journey with a
``failed`` log row for the step it could not take (the message log's record that it was never sent, and
why), a queued message becomes ``failed``; an event is just closed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update

from engine.app import App
from engine.audit import chain as audit
from engine.audit.chain import content_hash
from engine.rules.journey import SendStep
from engine.store import quarantine
from engine.store.models import EnrollmentStatus, MessageStatus, enrollments, events, messages
from engine.store.models import quarantine as quarantine_table
from engine.store.quarantine import Kind, Status
from engine.store.seal import reseal
from engine.tick.report import TickReport

log = logging.getLogger(__name__)

ABANDONED = "abandoned"  # the reason on the log rows of abandoned units


@dataclass(frozen=True)
class Outcome:
    entry: dict[str, Any]  # the quarantine entry, as it was before
    result: str  # one line for the operator


def _refs(entries: Sequence[dict[str, Any]], kind: Kind) -> list[int]:
    return [int(e["ref"]) for e in entries if e["kind"] == kind.value]


def retry(app: App, entries: Sequence[dict[str, Any]], now: datetime, *, run_now: bool) -> list[Outcome]:
    """One more try for each of ENTRIES; RUN_NOW: run them in this process (else the daemon's next tick does)."""
    ids = [int(e["id"]) for e in entries]
    with app.store.begin() as conn:
        quarantine.rearm(conn, [int(e["id"]) for e in entries if e["kind"] != Kind.JOURNEY.value], now)
        ended = set()
        for ref in _refs(entries, Kind.ENROLLMENT):
            done = conn.execute(update(enrollments).where(enrollments.c.id == ref,
                                                          enrollments.c.status == EnrollmentStatus.ACTIVE.value)
                                .values(next_run_at=now, claimed_by=None, claimed_until=None)).rowcount
            if not done:
                ended.add(ref)
        if ended:  # the member left the journey meanwhile (exit_when, forget): nothing left to retry
            quarantine.settle(conn, Kind.ENROLLMENT, ended, now)
        for ref in _refs(entries, Kind.EVENT):
            conn.execute(update(events).where(events.c.id == ref).values(handled_at=None))
        for ref in _refs(entries, Kind.MESSAGE):
            conn.execute(update(messages).where(messages.c.id == ref,
                                                messages.c.status == MessageStatus.QUEUED.value)
                         .values(next_attempt_at=now))
        journeys = [str(e["ref"]) for e in entries if e["kind"] == Kind.JOURNEY.value]
        quarantine.settle(conn, Kind.JOURNEY, journeys, now)  # paused no more: its next tick runs it
    if run_now:
        _run(app, entries, now)
    with app.store.connect() as conn:
        after = {int(e["id"]): e for e in quarantine.entries(conn, ids=ids, statuses=())}
    out = []
    for entry in entries:
        now_entry = after.get(int(entry["id"]), entry)
        out.append(Outcome(entry, _result(entry, now_entry, run_now)))
    return out


def _run(app: App, entries: Sequence[dict[str, Any]], now: datetime) -> None:
    never = lambda: False  # noqa: E731 - a stop callback that never asks to stop
    report = TickReport(now)
    live = app.live_journeys(now)
    event_ids = _refs(entries, Kind.EVENT)
    if event_ids:
        app.events.handle_events(now, live, report, never, only=event_ids)
    enrollment_ids = _refs(entries, Kind.ENROLLMENT)
    if enrollment_ids:
        app.runner.run_due(now, live, report, never, only=enrollment_ids)
    message_ids = _refs(entries, Kind.MESSAGE)
    if message_ids:
        app.runner.dispatch_queued(now, report, never, only=message_ids)
    # What ran and did not fail again is settled (an enrollment's own step settles it as it goes through).
    with app.store.begin() as conn:
        handled = conn.execute(select(events.c.id).where(events.c.id.in_(event_ids),
                                                         events.c.handled_at.is_not(None))).scalars().all()
        _settle_retrying(conn, Kind.EVENT, handled, now)
        moved = conn.execute(select(messages.c.id).where(messages.c.id.in_(message_ids),
                                                         messages.c.status != MessageStatus.QUEUED.value)
                             ).scalars().all()
        _settle_retrying(conn, Kind.MESSAGE, moved, now)


def _settle_retrying(conn: Any, kind: Kind, refs: Sequence[int], now: datetime) -> None:
    """Settle only entries still waiting on this try (not those that failed again and went back)."""
    keys = [str(r) for r in refs]
    if keys:
        conn.execute(update(quarantine_table).where(
            quarantine_table.c.kind == kind.value, quarantine_table.c.ref.in_(keys),
            quarantine_table.c.status == Status.RETRYING.value)
            .values(status=Status.RESOLVED.value, settled_at=now, next_attempt_at=None))


def _result(before: dict[str, Any], after: dict[str, Any], ran: bool) -> str:
    status = after["status"]
    if before["kind"] == Kind.JOURNEY.value:
        return "resumed: the journey runs again from the next tick"
    if status == Status.RESOLVED.value:
        return "went through" if ran or before["kind"] != Kind.ENROLLMENT.value else "nothing left to retry"
    if status == Status.QUARANTINED.value:
        return f"failed again, quarantined: {after['error']}"
    if ran:
        return "not run now (its journey is not running, or it is not due); the daemon tries it at its next tick"
    return "queued for one more try at the daemon's next tick"


def abandon(app: App, entries: Sequence[dict[str, Any]], now: datetime) -> list[Outcome]:
    """Give ENTRIES up for good (not journeys: pause a journey in its file, or fix it and retry)."""
    out = []
    with app.store.begin() as conn:
        for entry in entries:
            kind, ref = entry["kind"], int(entry["ref"]) if entry["kind"] != Kind.JOURNEY.value else 0
            why = f"abandoned after quarantine: {entry['error']}"
            if kind == Kind.ENROLLMENT.value:
                result = _abandon_enrollment(app, conn, ref, why, now)
            elif kind == Kind.MESSAGE.value:
                conn.execute(update(messages).where(messages.c.id == ref,
                                                    messages.c.status == MessageStatus.QUEUED.value)
                             .values(status=MessageStatus.FAILED.value, reason=ABANDONED, error=why,
                                     next_attempt_at=None, updated_at=now))
                reseal(conn, [ref])
                result = "the message is logged failed"
            elif kind == Kind.EVENT.value:
                result = "closed: the event is not matched again"
            else:
                out.append(Outcome(entry, "not abandoned: a journey is paused, not abandoned; fix it and retry, or set "
                                          "status: paused in its file"))
                continue
            quarantine.settle(conn, Kind(kind), [entry["ref"]], now, Status.ABANDONED)
            out.append(Outcome(entry, result))
    return out


def _abandon_enrollment(app: App, conn: Any, enrollment_id: int, why: str, now: datetime) -> str:
    row = conn.execute(select(enrollments).where(enrollments.c.id == enrollment_id)).mappings().first()
    if row is None or row["status"] != EnrollmentStatus.ACTIVE.value:
        return "nothing to do: the member already left the journey"
    live = app.versions.get(conn, row["journey_id"], row["journey_version"])
    step = live.journey.step(row["step"]) if live is not None and row["step"] and live.journey.has_step(row["step"]) \
        else None
    logged = ""
    if isinstance(step, SendStep):
        message = {"enrollment_id": enrollment_id, "member_id": row["member_id"], "journey": row["journey_id"],
                   "journey_version": row["journey_version"], "step": step.id, "channel": step.channel,
                   "template": step.template, "locale": None, "variant": row["variant"], "recipient": None,
                   "subject": None, "body": None, "html": None, "status": MessageStatus.FAILED.value,
                   "reason": ABANDONED, "error": why, "provider_id": None, "attempts": 0, "next_attempt_at": None,
                   "created_at": now, "sent_at": None, "updated_at": now, "claimed_by": None, "claimed_until": None,
                   "redacted": False, "segments": None, "encoding": None,
                   "category": live.journey.category if live is not None else "marketing"}
        message["content_hash"] = content_hash(message)
        if audit.append(conn, app.store.dialect, [message]):
            logged = f"; its {step.channel} message for step {step.id} is logged failed"
    conn.execute(update(enrollments).where(enrollments.c.id == enrollment_id)
                 .values(status=EnrollmentStatus.EXITED.value, ended_at=now, next_run_at=None,
                         exit_reason="abandoned after quarantine", claimed_by=None, claimed_until=None))
    return f"the member left the journey{logged}"
