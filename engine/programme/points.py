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
from engine.store import seal
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
    """Append MOVEMENTS (their balances were checked by the caller) and refresh the members' expiry cache. Each row
    is sealed, chained to the member's previous row (engine.store.seal); the caller seals the balances once they
    are final (seal_balances)."""
    moving = [m for m in movements if m.points != 0]
    if not moving:
        return
    key = seal.key_of(conn)
    last = last_seals(conn, {m.member_id for m in moving})
    rows = []
    for m in moving:
        row = {"member_id": m.member_id, "kind": m.kind.value, "points": m.points, "occurred_at": m.at,
               "expires_at": expiry_of(loyalty, m), "reason": m.reason[:200], "event_id": m.event_id,
               "created_at": now}
        row["mac"] = last[m.member_id] = seal.ledger_mac(key, last.get(m.member_id, ""), row)
        rows.append(row)
    conn.execute(points_ledger.insert(), rows)  # in this order: ids rise with it, and so does each chain
    refresh_next_expiry(conn, {m.member_id for m in movements}, now)


def last_seals(conn: Connection, member_ids: Iterable[str]) -> dict[str, str]:
    """Each member's newest ledger row's seal ("" for a row from before the ledger was sealed)."""
    ids = sorted(set(member_ids))
    out: dict[str, str] = {}
    for start in range(0, len(ids), 900):
        newest = (select(func.max(points_ledger.c.id)).where(points_ledger.c.member_id.in_(ids[start:start + 900]))
                  .group_by(points_ledger.c.member_id))
        out.update((str(m), str(s or "")) for m, s in conn.execute(
            select(points_ledger.c.member_id, points_ledger.c.mac).where(points_ledger.c.id.in_(newest))))
    return out


def seal_balances(conn: Connection, member_ids: Iterable[str]) -> None:
    """Seal the cached balances of MEMBER_IDS as they now are, bound to their newest ledger row."""
    ids = sorted(set(member_ids))
    if not ids:
        return
    key = seal.key_of(conn)
    last = last_seals(conn, ids)
    for start in range(0, len(ids), 900):
        rows = conn.execute(select(members.c.id, members.c.points).where(members.c.id.in_(ids[start:start + 900])))
        conn.execute(update(members).where(members.c.id == bindparam("_id")).values(points_mac=bindparam("_mac")),
                     [{"_id": m, "_mac": seal.balance_mac(key, m, int(p or 0), last.get(m, ""))} for m, p in rows])


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


def verify_ledger(conn: Connection, limit: int = 5, batch: int = 1000) -> tuple[int, list[str]]:
    """(members checked, up to LIMIT problems): each member's ledger rows must chain (engine.store.seal.ledger_mac)
    and their cached balance must equal the rows' sum and carry its seal. Rows from before the ledger was sealed
    (no seal) may only come before a member's first sealed row. Reads members a batch at a time."""
    key = seal.key_of(conn)
    problems: list[str] = []
    checked, after = 0, None
    while len(problems) < limit:
        stmt = select(members.c.id, members.c.points, members.c.points_mac).order_by(members.c.id).limit(batch)
        if after is not None:
            stmt = stmt.where(members.c.id > after)
        people = conn.execute(stmt).all()
        if not people:
            break
        after = people[-1].id
        ledgers: dict[str, list[Any]] = {}
        for row in conn.execute(select(points_ledger).where(points_ledger.c.member_id.in_([p.id for p in people]))
                                .order_by(points_ledger.c.id)).mappings():
            ledgers.setdefault(row["member_id"], []).append(row)
        for person in people:
            checked += 1
            problem = _member_problem(key, person, ledgers.get(person.id, []))
            if problem:
                problems.append(problem)
    return checked, problems[:limit]


def _member_problem(key: bytes, person: Any, rows: list[Any]) -> str | None:
    prev, total, sealed = "", 0, False
    for row in rows:
        total += int(row["points"])
        if row["mac"] is None:
            if sealed:
                return (f"member {person.id}: ledger row {row['id']} has no seal after sealed rows: it was added "
                        "outside the engine")
            continue
        sealed = True
        if seal.ledger_mac(key, prev, row) != row["mac"]:
            return (f"member {person.id}: ledger row {row['id']} was changed, or a row before it removed or added, "
                    "outside the engine")
        prev = row["mac"]
    if int(person.points or 0) != total:
        return f"member {person.id} shows {person.points} points but the ledger sums to {total}"
    if person.points_mac is None:
        return (f"member {person.id}: the points balance has no seal although the ledger is sealed" if sealed else
                None)
    if seal.balance_mac(key, str(person.id), int(person.points or 0), prev) != person.points_mac:
        return (f"member {person.id}: the points balance or the newest ledger row was changed outside the engine "
                "(rows removed from the end?)")
    return None


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
    seal_balances(conn, [m for m, _ in rows])
    return rows
