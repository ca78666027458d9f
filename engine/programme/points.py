"""The points ledger: every earn, redemption, adjustment and expiry is a row; balances are sums.

Positive rows are *lots* that expire ``points.expire_after`` after they were earned. Negative rows (redeemed,
expired, taken away) consume lots soonest-expiring first. Because lots are consumed in that order, how much of
the lots expiring by a time H is still held has a closed form, with E(H) the points of lots expiring by H and
D all points ever taken::

    held(H) = max(0, E(H) - D)

(the remaining amounts of a prefix of lots telescope). Expiry, ``points_expiring_N_days`` and the upcoming
expiries of ``member show`` all use it, so they agree with each other, in SQL and in Python.

``members.points`` caches the balance and ``members.points_next_expiry_at`` / ``points_next_expiry`` the next
expiry (computed in Python by the same formula); both are written in the same transaction as the ledger rows.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, func, select, update

from engine.rules.loyalty import Loyalty
from engine.store.computed import held_by
from engine.store.models import events, members, points_ledger


class Kind(enum.StrEnum):
    EARN = "earn"
    REDEEM = "redeem"
    ADJUST = "adjust"
    EXPIRE = "expire"


class InsufficientPoints(ValueError):
    pass


@dataclass(frozen=True)
class Movement:
    member_id: str
    kind: Kind
    points: int  # signed: positive adds a lot, negative takes points away
    at: datetime
    reason: str
    event_id: int | None = None


def expiry_of(loyalty: Loyalty, movement: Movement) -> datetime | None:
    if movement.points <= 0 or loyalty.points.expire_after is None:
        return None
    return movement.at + loyalty.points.expire_after


def write(conn: Connection, loyalty: Loyalty, movements: Sequence[Movement], now: datetime) -> None:
    """Append MOVEMENTS (their balances were checked by the caller) and refresh the members' expiry cache."""
    if not movements:
        return
    conn.execute(points_ledger.insert(), [
        {"member_id": m.member_id, "kind": m.kind.value, "points": m.points, "occurred_at": m.at,
         "expires_at": expiry_of(loyalty, m), "reason": m.reason[:200], "event_id": m.event_id, "created_at": now}
        for m in movements if m.points != 0])
    refresh_next_expiry(conn, {m.member_id for m in movements}, now)


def apply_deltas(conn: Connection, deltas: dict[str, int], now: datetime) -> None:
    """Add DELTAS to the cached balances (members.points), one executemany."""
    rows = [{"_id": member_id, "_delta": delta} for member_id, delta in deltas.items() if delta]
    if rows:
        conn.execute(update(members).where(members.c.id == bindparam("_id"))
                     .values(points=members.c.points + bindparam("_delta"), updated_at=now), rows)


# ---------------------------------------------------------------------------------------------- SQL forms
# Aliases are built once: building them per statement costs more than running the statement.
_DUE_LOT = points_ledger.alias("due_lot")

def refresh_next_expiry(conn: Connection, member_ids: Iterable[str], now: datetime) -> None:
    """Recompute members.points_next_expiry_at / points_next_expiry for MEMBER_IDS (one read per 500)."""
    ids = sorted(set(member_ids))
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        rows: dict[str, list[tuple[int, datetime | None]]] = {m: [] for m in chunk}
        for member_id, amount, expires in conn.execute(
                select(points_ledger.c.member_id, points_ledger.c.points, points_ledger.c.expires_at)
                .where(points_ledger.c.member_id.in_(chunk))):
            rows[member_id].append((amount, expires))
        values = []
        for member_id, movements in rows.items():
            upcoming = _expiries(movements, now)
            when, amount = upcoming[0] if upcoming else (None, None)
            values.append({"_id": member_id, "_at": when, "_n": amount})
        conn.execute(update(members).where(members.c.id == bindparam("_id")).values(
            points_next_expiry_at=bindparam("_at"), points_next_expiry=bindparam("_n")), values)


def _expiries(movements: Sequence[tuple[int, datetime | None]], now: datetime) -> list[tuple[datetime, int]]:
    """(expiry, points) still held, soonest first: held(H) = max(0, E(H) - D) taken lot by lot."""
    taken = sum(-p for p, _ in movements if p < 0)
    lots: dict[datetime, int] = {}
    for p, expires in movements:
        if p > 0 and expires is not None:
            lots[expires] = lots.get(expires, 0) + p
    out: list[tuple[datetime, int]] = []
    earned = held_before = 0
    for expires in sorted(lots):
        earned += lots[expires]
        held = max(0, earned - taken)
        if expires > now and held > held_before:
            out.append((expires, held - held_before))
        held_before = held
    return out


# ---------------------------------------------------------------------------------------------- reading

def balance(conn: Connection, member_id: str) -> int:
    return int(conn.execute(select(func.coalesce(func.sum(points_ledger.c.points), 0))
                            .where(points_ledger.c.member_id == member_id)).scalar_one())


def upcoming_expiries(conn: Connection, member_id: str, now: datetime, limit: int = 5) -> list[tuple[datetime, int]]:
    """(expiry time, points) of the points the member holds, soonest first."""
    rows = conn.execute(select(points_ledger.c.points, points_ledger.c.expires_at)
                        .where(points_ledger.c.member_id == member_id)).all()
    return _expiries([(p, e) for p, e in rows], now)[:limit]


def statement(conn: Connection, member_id: str, limit: int = 10) -> list[dict[str, Any]]:
    """The member's latest ledger rows, newest first, each with the balance after it."""
    running = func.sum(points_ledger.c.points).over(order_by=points_ledger.c.id).label("balance")
    inner = select(points_ledger, running).where(points_ledger.c.member_id == member_id).subquery()
    rows = conn.execute(select(inner).order_by(inner.c.id.desc()).limit(limit)).mappings().all()
    return [dict(r) for r in rows]


def mismatches(conn: Connection, limit: int = 5) -> tuple[int, list[tuple[str, int, int]]]:
    """(members checked, up to LIMIT (member, cached balance, ledger sum) that disagree)."""
    sums = select(points_ledger.c.member_id, func.sum(points_ledger.c.points).label("total")).group_by(
        points_ledger.c.member_id).subquery()
    total = func.coalesce(sums.c.total, 0)
    checked = int(conn.execute(select(func.count()).select_from(members)).scalar_one())
    rows = conn.execute(select(members.c.id, members.c.points, total)
                        .select_from(members.outerjoin(sums, sums.c.member_id == members.c.id))
                        .where(members.c.points != total).order_by(members.c.id).limit(limit)).all()
    return checked, [(str(m), int(p), int(t)) for m, p, t in rows]


# ---------------------------------------------------------------------------------------------- expiry

def expire_due(conn: Connection, loyalty: Loyalty, since: datetime | None, now: datetime) -> list[tuple[str, int]]:
    """Write an ``expire`` row for every member holding points whose lots expired by NOW; return who lost what.

    Only members with a lot expiring after SINCE (the previous run) can hold expired points: earlier lots were
    settled by earlier runs, and later debits only lower what is held.
    """
    lot = _DUE_LOT
    window = [lot.c.points > 0, lot.c.expires_at <= now]
    if since is not None:
        window.append(lot.c.expires_at > since)
    candidates = select(lot.c.member_id).where(*window).distinct().subquery()
    held = held_by(candidates.c.member_id, now).label("held")
    rows = [(str(m), int(h)) for m, h in conn.execute(select(candidates.c.member_id, held)) if int(h) > 0]
    if not rows:
        return []
    moves = [Movement(member_id, Kind.EXPIRE, -points, now, "points expired") for member_id, points in rows]
    apply_deltas(conn, {m.member_id: m.points for m in moves}, now)
    balances = dict(conn.execute(select(members.c.id, members.c.points)
                                 .where(members.c.id.in_([m for m, _ in rows]))).all())
    conn.execute(events.insert(), [
        {"external_id": None, "member_id": member_id, "type": "points_expired", "occurred_at": now,
         "properties": {"points": points, "balance": int(balances.get(member_id, 0))}, "source": "engine",
         "recorded_at": now, "handled_at": None} for member_id, points in rows])
    write(conn, loyalty, moves, now)
    return rows
