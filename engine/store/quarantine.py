"""Fault isolation: a unit of work that fails is retried at later ticks, then quarantined, and never stops the rest.

A unit is one enrollment's due step, one event's matching, one journey's compiled form (entry and exit
conditions) or one queued message's preparation. When handling it raises, the exception is recorded here
against the unit (``quarantine`` table: one row per unit), the unit is set aside and the pass goes on with
everything else. A unit that may succeed later (a template fixed, data corrected) is retried at later ticks
(``RETRY_DELAYS``); when those tries are used up it is quarantined: nothing runs it again until an operator
runs ``run.py retry`` (after a fix) or gives it up (``run.py retry --abandon``). A journey is paused at once:
its other members are not pushed through a compiled form that fails.

Failures of the database itself (it is locked, down, or the connection broke) are not a unit's fault: they
propagate, the tick fails and the next one tries again (``is_systemic``).
"""

from __future__ import annotations

import enum
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy import exc as sa_exc

from engine.store.models import quarantine
from engine.store.seal import AuditKeyMismatch, NoAuditKey

#: after the first and the second failure a unit is tried again this much later; the third quarantines it
RETRY_DELAYS = (timedelta(minutes=1), timedelta(minutes=10))
MAX_ATTEMPTS = len(RETRY_DELAYS) + 1
_ERROR_CHARS = 500
_DETAIL_CHARS = 8000


class Kind(enum.StrEnum):
    ENROLLMENT = "enrollment"
    EVENT = "event"
    JOURNEY = "journey"
    MESSAGE = "message"


class Status(enum.StrEnum):
    RETRYING = "retrying"  # set aside; a later tick tries again by itself
    QUARANTINED = "quarantined"  # tries used up: waits for `run.py retry`
    RESOLVED = "resolved"  # a later try went through
    ABANDONED = "abandoned"  # given up by an operator (`run.py retry --abandon`)


OPEN = (Status.RETRYING.value, Status.QUARANTINED.value)


def is_systemic(exc: BaseException) -> bool:
    """Whether EXC is the database failing as a whole (locked, unreachable, connection lost), not one unit."""
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.TimeoutError
                      | sa_exc.DisconnectionError | MemoryError | AuditKeyMismatch | NoAuditKey)


def describe(exc: BaseException) -> str:
    """One line: the exception's type and message, as an operator reads it in `log` and `/healthz`."""
    text = " ".join(str(exc).split()) or "(no message)"
    line = f"{type(exc).__name__}: {text}"
    return line if len(line) <= _ERROR_CHARS else line[:_ERROR_CHARS - 1] + "…"


@dataclass(frozen=True)
class Failure:
    """One unit that failed, and where (journey, version, member, step) when the unit has them."""

    kind: Kind
    ref: str
    error: str
    detail: str | None = None
    journey_id: str | None = None
    journey_version: int | None = None
    member_id: str | None = None
    step: str | None = None
    #: False: quarantine at once (a journey is paused on its first failure)
    retry: bool = True

    @classmethod
    def of(cls, exc: BaseException, kind: Kind, ref: object, *, retry: bool = True, **where: Any) -> Failure:
        detail = "".join(traceback.format_exception(exc))[-_DETAIL_CHARS:]
        return cls(kind, str(ref), describe(exc), detail, retry=retry, **where)


@dataclass(frozen=True)
class Recorded:
    """What became of a failure: retried at NEXT_ATTEMPT_AT, or quarantined (NEXT_ATTEMPT_AT None)."""

    failure: Failure
    status: Status
    attempts: int
    next_attempt_at: datetime | None

    @property
    def quarantined(self) -> bool:
        return self.status is Status.QUARANTINED


def record(conn: Connection, failures: Sequence[Failure], now: datetime) -> list[Recorded]:
    """Count each failure against its unit; in the caller's transaction (with whatever sets the unit aside)."""
    failures = list({(f.kind, f.ref): f for f in failures}.values())  # a unit failing twice in one call counts once
    if not failures:
        return []
    existing = {(r.kind, r.ref): r for r in conn.execute(
        select(quarantine.c.id, quarantine.c.kind, quarantine.c.ref, quarantine.c.status, quarantine.c.attempts)
        .where(quarantine.c.ref.in_(sorted({f.ref for f in failures}))))}
    out: list[Recorded] = []
    for failure in failures:
        row = existing.get((failure.kind.value, failure.ref))
        still_open = row is not None and row.status in OPEN
        attempts = (int(row.attempts) + 1) if row is not None and still_open else 1
        status = Status.RETRYING if failure.retry and attempts < MAX_ATTEMPTS else Status.QUARANTINED
        retry_at = now + RETRY_DELAYS[attempts - 1] if status is Status.RETRYING else None
        values: dict[str, Any] = {
            "journey_id": failure.journey_id, "journey_version": failure.journey_version,
            "member_id": failure.member_id, "step": failure.step, "status": status.value, "error": failure.error,
            "detail": failure.detail, "attempts": attempts, "last_failed_at": now, "next_attempt_at": retry_at,
            "settled_at": None}
        if row is None:
            conn.execute(insert(quarantine).values(kind=failure.kind.value, ref=failure.ref, first_failed_at=now,
                                                   **values))
        else:
            if not still_open:
                values["first_failed_at"] = now
            conn.execute(update(quarantine).where(quarantine.c.id == row.id).values(**values))
        out.append(Recorded(failure, status, attempts, retry_at))
    return out


def settle(conn: Connection, kind: Kind, refs: Iterable[object], now: datetime,
           status: Status = Status.RESOLVED) -> int:
    """Close the open entries of these units (a later try went through, or an operator gave them up)."""
    keys = sorted({str(r) for r in refs})
    done = 0
    for start in range(0, len(keys), 500):
        result = conn.execute(update(quarantine).where(
            quarantine.c.kind == kind.value, quarantine.c.ref.in_(keys[start:start + 500]),
            quarantine.c.status.in_(OPEN)).values(status=status.value, settled_at=now, next_attempt_at=None))
        done += int(result.rowcount or 0)
    return done


def entries(conn: Connection, *, kinds: Sequence[Kind] = (), journey: str | None = None, member: str | None = None,
            statuses: Sequence[str] = OPEN, ids: Sequence[int] = ()) -> list[dict[str, Any]]:
    """Quarantine entries, oldest first."""
    stmt = select(quarantine).order_by(quarantine.c.id)
    if statuses:
        stmt = stmt.where(quarantine.c.status.in_(list(statuses)))
    if kinds:
        stmt = stmt.where(quarantine.c.kind.in_([k.value for k in kinds]))
    if journey:
        stmt = stmt.where(quarantine.c.journey_id == journey)
    if member:
        stmt = stmt.where(quarantine.c.member_id == member)
    if ids:
        stmt = stmt.where(quarantine.c.id.in_(list(ids)))
    return [dict(r) for r in conn.execute(stmt).mappings()]


def open_counts(conn: Connection) -> dict[tuple[str, str, str], int]:
    """Open entries by (journey or "", kind, status): for /metrics, `report` and health."""
    stmt = (select(func.coalesce(quarantine.c.journey_id, ""), quarantine.c.kind, quarantine.c.status, func.count())
            .where(quarantine.c.status.in_(OPEN))
            .group_by(quarantine.c.journey_id, quarantine.c.kind, quarantine.c.status))
    return {(str(j), str(k), str(s)): int(n) for j, k, s, n in conn.execute(stmt)}


def quarantined_total(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(quarantine)
                            .where(quarantine.c.status == Status.QUARANTINED.value)).scalar_one())


def paused_journeys(conn: Connection) -> dict[str, tuple[int | None, str]]:
    """Journeys paused because their compiled form failed: id -> (the version that failed, why)."""
    stmt = select(quarantine.c.ref, quarantine.c.journey_version, quarantine.c.error).where(
        quarantine.c.kind == Kind.JOURNEY.value, quarantine.c.status.in_(OPEN))
    return {str(ref): (version, str(error)) for ref, version, error in conn.execute(stmt)}


def rearm(conn: Connection, entry_ids: Sequence[int], now: datetime) -> None:
    """`run.py retry`: these entries get one more try; failing again quarantines them again at once."""
    for start in range(0, len(entry_ids), 500):
        conn.execute(update(quarantine).where(quarantine.c.id.in_(list(entry_ids[start:start + 500])),
                                              quarantine.c.status.in_(OPEN))
                     .values(status=Status.RETRYING.value, attempts=MAX_ATTEMPTS - 1, next_attempt_at=now))
