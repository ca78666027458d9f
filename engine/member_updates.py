"""Persisting `update` steps: the member row changes and each change is recorded as an event."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, update

from engine.loyalty import Loyalty
from engine.models import events, members

if TYPE_CHECKING:
    from engine.versions import LiveJourney


def save_member_updates(conn: Connection, changed: list[tuple[dict[str, Any], dict[str, Any], LiveJourney, list[str]]],
                        loyalty: Loyalty, now: datetime) -> None:
    """CHANGED holds (member before, member after, journey, update step ids) per enrollment."""
    records: list[dict[str, Any]] = []
    for before, after, live, step_ids in changed:
        conn.execute(update(members).where(members.c.id == after["id"]).values(
            points=after["points"], tier=after["tier"], attributes=after["attributes"], updated_at=now))
        diff = {key: {"from": before.get(key), "to": after.get(key)}
                for key in ("points", "tier", "attributes") if before.get(key) != after.get(key)}
        records.append(_event(after["id"], "member_updated", now,
                              {"journey": live.id, "steps": step_ids, "changes": diff}))
        if before.get("tier") != after.get("tier"):
            up = loyalty.rank(after["tier"]) > loyalty.rank(before.get("tier"))
            records.append(_event(after["id"], "tier_changed", now, {
                "from": before.get("tier"), "to": after["tier"], "direction": "up" if up else "down",
                "cause": f"journey {live.id}"}))
    if records:
        conn.execute(events.insert(), records)


def _event(member_id: str, kind: str, now: datetime, properties: dict[str, Any]) -> dict[str, Any]:
    return {"external_id": None, "member_id": member_id, "type": kind, "occurred_at": now,
            "properties": properties, "source": "engine", "recorded_at": now, "handled_at": None}
