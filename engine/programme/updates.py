"""Persisting `update` steps: the member row changes and each change is recorded as an event."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, update

from engine.programme import points
from engine.rules.loyalty import Loyalty
from engine.rules.versions import LiveJourney
from engine.store.models import events, members


def save_member_updates(conn: Connection, changed: list[tuple[dict[str, Any], dict[str, Any], LiveJourney, list[str]]],
                        loyalty: Loyalty, now: datetime) -> None:
    """CHANGED holds (member before, member after, journey, update step ids) per enrollment."""
    records: list[dict[str, Any]] = []
    moves: list[points.Movement] = []
    for before, after, live, step_ids in changed:
        delta = int(after.get("points") or 0) - int(before.get("points") or 0)
        values: dict[str, Any] = {"points": members.c.points + delta, "tier": after["tier"],
                                  "attributes": after["attributes"], "updated_at": now}
        if before.get("tier") != after.get("tier"):
            values |= {"tier_since": now, "tier_review_at": None if loyalty.rank(after["tier"]) == 0 else
                       now + loyalty.qualification.review_every}
        conn.execute(update(members).where(members.c.id == after["id"]).values(values))
        if delta:
            reason = f"journey {live.id} step {', '.join(step_ids)}"
            moves.append(points.Movement(after["id"], points.Kind.ADJUST, delta, now, reason))
            if delta > 0:
                records.append(_event(after["id"], "points_earned", now, {
                    "points": delta, "balance": after.get("points"), "reason": reason, "cause": "journey"}))
        diff = {key: {"from": before.get(key), "to": after.get(key)}
                for key in ("points", "tier", "attributes") if before.get(key) != after.get(key)}
        records.append(_event(after["id"], "member_updated", now,
                              {"journey": live.id, "steps": step_ids, "changes": diff}))
        if before.get("tier") != after.get("tier"):
            up = loyalty.rank(after["tier"]) > loyalty.rank(before.get("tier"))
            records.append(_event(after["id"], "tier_changed", now, {
                "from": before.get("tier"), "to": after["tier"], "direction": "up" if up else "down",
                "cause": f"journey {live.id}"}))
    points.write(conn, loyalty, moves, now)
    points.seal_balances(conn, [m.member_id for m in moves])
    if records:
        conn.execute(events.insert(), records)


def _event(member_id: str, kind: str, now: datetime, properties: dict[str, Any]) -> dict[str, Any]:
    return {"external_id": None, "member_id": member_id, "type": kind, "occurred_at": now,
            "properties": properties, "source": "engine", "recorded_at": now, "handled_at": None}
