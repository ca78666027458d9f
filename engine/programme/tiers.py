"""Tier qualification over a rolling window, and the periodic review that may take a member down.

Qualifying spend and orders are the member's purchases within ``qualification.window`` (or their lifetime
totals with ``window: lifetime``). Spend that arrives through a member import rather than as purchase events
is recorded as a ``spend_imported`` event at the member's last order time, so it counts like a purchase made
then.

- Upgrade: on the purchase that qualifies, at once (engine.ingest.members).
- Review: ``review.every`` after the member reached their tier (then every period), the tier their window
  earns is compared with the one they hold; a member goes down at most ``review.max_drop`` tiers per review
  (the grace rule). Each change records a ``tier_changed`` event with ``direction`` up or down.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, select, update

from engine.rules.loyalty import Loyalty
from engine.store.models import events, members

SPEND_TYPES = ("purchase", "spend_imported")


@dataclass
class Purchases:
    """One member's qualifying purchases, (time, amount, orders) each, kept in time order as they arrive."""

    items: list[tuple[datetime, float, int]]

    def totals(self, start: datetime | None, end: datetime) -> tuple[float, int]:
        spend, orders = 0.0, 0
        for at, amount, count in self.items:
            if (start is None or at > start) and at <= end:
                spend += amount
                orders += count
        return spend, orders

    def add(self, at: datetime, amount: float, orders: int = 1) -> None:
        self.items.append((at, amount, orders))


def _amount(kind: str, properties: dict[str, Any]) -> tuple[float, int]:
    amount = properties.get("amount")
    value = float(amount) if isinstance(amount, (int, float)) and not isinstance(amount, bool) else 0.0
    if kind == "purchase":
        return value, 1
    orders = properties.get("orders")
    return value, int(orders) if isinstance(orders, int) and not isinstance(orders, bool) else 0


def load_purchases(conn: Connection, member_ids: Iterable[str], since: datetime | None) -> dict[str, Purchases]:
    """Qualifying purchases after SINCE (all when None) of MEMBER_IDS, read in one query per 500 members."""
    ids = sorted(set(member_ids))
    out: dict[str, Purchases] = defaultdict(lambda: Purchases([]))
    for start in range(0, len(ids), 500):
        stmt = select(events.c.member_id, events.c.type, events.c.occurred_at, events.c.properties).where(
            events.c.member_id.in_(ids[start:start + 500]), events.c.type.in_(SPEND_TYPES))
        if since is not None:
            stmt = stmt.where(events.c.occurred_at > since)
        for member_id, kind, at, props in conn.execute(stmt.order_by(events.c.occurred_at)):
            amount, orders = _amount(kind, props or {})
            out[member_id].add(at, amount, orders)
    return out


def window_start(loyalty: Loyalty, at: datetime) -> datetime | None:
    window = loyalty.qualification.window
    return None if window is None else at - window


@dataclass(frozen=True)
class Change:
    member_id: str
    old: str
    new: str
    spend: float
    orders: int


def review_due(conn: Connection, loyalty: Loyalty, now: datetime, limit: int = 1000) -> tuple[int, list[Change]]:
    """Review up to LIMIT members whose review is due at NOW; return (reviewed, tier changes)."""
    stmt = (select(members.c.id, members.c.tier, members.c.total_spend, members.c.order_count)
            .where(members.c.tier_review_at <= now).order_by(members.c.tier_review_at).limit(limit))
    if conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    due = conn.execute(stmt).all()
    if not due:
        return 0, []
    start = window_start(loyalty, now)
    history = load_purchases(conn, [r.id for r in due], start) if start is not None else {}
    every = loyalty.qualification.review_every
    changes: list[Change] = []
    updates: list[dict[str, Any]] = []
    for row in due:
        if start is None:
            spend, orders = float(row.total_spend or 0), int(row.order_count or 0)
        else:
            spend, orders = history[row.id].totals(start, now) if row.id in history else (0.0, 0)
        held = loyalty.rank(row.tier)
        earned = loyalty.rank(loyalty.tier_for(spend, orders).id)
        rank = earned if earned >= held else max(earned, held - loyalty.qualification.max_drop)
        new = loyalty.tiers[rank].id
        changed = new != row.tier
        if changed:
            changes.append(Change(row.id, row.tier or loyalty.tiers[0].id, new, spend, orders))
        lowest = rank == 0
        updates.append({"_id": row.id, "tier": new, "qualifying_spend": spend, "qualifying_orders": orders,
                        "tier_since_": now if changed else None, "changed": changed,
                        "tier_review_at": None if lowest else next_review(now, every)})
    _save(conn, updates, now)
    return len(due), changes


def next_review(at: datetime, every: timedelta) -> datetime:
    return at + every


def _save(conn: Connection, updates: Sequence[dict[str, Any]], now: datetime) -> None:
    moved = [u for u in updates if u["changed"]]
    kept = [u for u in updates if not u["changed"]]
    columns = {"tier": bindparam("tier"), "qualifying_spend": bindparam("qualifying_spend"),
               "qualifying_orders": bindparam("qualifying_orders"), "tier_review_at": bindparam("tier_review_at"),
               "updated_at": now}
    if moved:
        conn.execute(update(members).where(members.c.id == bindparam("_id"))
                     .values(columns | {"tier_since": bindparam("tier_since_")}),
                     [{k: v for k, v in u.items() if k != "changed"} for u in moved])
    if kept:
        conn.execute(update(members).where(members.c.id == bindparam("_id")).values(columns),
                     [{k: v for k, v in u.items() if k not in ("changed", "tier_since_")} for u in kept])


def change_event(change: Change, loyalty: Loyalty, at: datetime, cause: str) -> dict[str, Any]:
    up = loyalty.rank(change.new) > loyalty.rank(change.old)
    return {"external_id": None, "member_id": change.member_id, "type": "tier_changed", "occurred_at": at,
            "properties": {"from": change.old, "to": change.new, "direction": "up" if up else "down",
                           "cause": cause, "qualifying_spend": round(change.spend, 2),
                           "qualifying_orders": change.orders},
            "source": "engine", "recorded_at": at, "handled_at": None}


def record_changes(conn: Connection, changes: Sequence[Change], loyalty: Loyalty, at: datetime, cause: str) -> None:
    """A ``tier_changed`` event for each change, for the event phase to match."""
    if changes:
        conn.execute(events.insert(), [change_event(c, loyalty, at, cause) for c in changes])
