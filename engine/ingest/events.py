"""Events in: one at a time (CLI, API) or from a file, with the built-in types' effects on the member.

``purchase`` adds to spend, order count, last order and points (a ledger row,
engine.programme.points) and may raise the tier over the qualification window (engine.programme.tiers),
recording ``tier_changed``; ``points_redeemed`` spends points (refused beyond the balance); ``login`` sets the
last login; the programme's ``points.earn`` table gives points for other types (check-ins, reviews).
A bad row is reported with its line number and skipped.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, bindparam, select, update

from engine.domain.timeutil import parse_instant
from engine.ingest.members import BATCH, ImportReport, RowError, attribute_value, read_rows, text_field
from engine.programme import intelligence, points
from engine.programme.tiers import Purchases, load_purchases, next_review, window_start
from engine.rules.loyalty import Loyalty
from engine.store.database import Store
from engine.store.models import events, members

EVENT_FIELDS = ("member_id", "type", "at", "properties", "id")
EVENT_TYPE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


@dataclass(frozen=True)
class NewEvent:
    member_id: str
    type: str
    at: datetime
    properties: dict[str, Any]
    external_id: str | None = None
    source: str = "api"


def parse_event(row: dict[str, Any], source: str) -> NewEvent:
    member_id = text_field(row.get("member_id"), "member_id", 64)
    if not member_id:
        raise RowError("member_id is missing")
    kind = row.get("type")
    if not isinstance(kind, str) or not EVENT_TYPE.match(kind):
        raise RowError(f"type must be a word of a-z, 0-9 and _ (e.g. purchase), got: {kind!r}")
    try:
        at = parse_instant(row.get("at"))
    except ValueError as exc:
        raise RowError(f"at {exc}") from None
    properties = row.get("properties")
    if properties is None:
        properties = {k: attribute_value(v) for k, v in row.items() if k not in EVENT_FIELDS and v not in (None, "")}
    if not isinstance(properties, dict):
        raise RowError(f"properties must be a JSON object, got: {properties!r}")
    external = row.get("id")
    if kind == "purchase":
        amount = properties.get("amount")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount) or amount <= 0:
            raise RowError(f"a purchase needs properties.amount, a number above 0, got: {amount!r}")
        if external in (None, "") and properties.get("order_id") not in (None, ""):
            external = f"purchase:{properties['order_id']}"
    return NewEvent(member_id, kind, at, dict(properties), None if external in (None, "") else str(external), source)


_EFFECT_COLUMNS = ("total_spend", "order_count", "last_order_at", "points", "tier", "signup_at", "email_opt_in",
                   "sms_opt_in", "last_login_at", "qualifying_spend", "qualifying_orders", "tier_since",
                   "tier_review_at")


class EventRecorder:
    """Stores events and applies the built-in types' effects on the member, in batches.

    Point movements go to the ledger (engine.programme.points) with the event that caused them; purchases are checked
    against the tier table over the qualification window (engine.programme.tiers) and may upgrade the member at once.
    """

    def __init__(self, conn: Connection, loyalty: Loyalty, now: datetime) -> None:
        self.conn = conn
        self.loyalty = loyalty
        self.now = now
        self._history: dict[str, Purchases] = {}
        self._moves: list[tuple[int, points.Movement]] = []  # (index of the causing event in the insert, move)

    def record(self, batch: list[tuple[int, NewEvent]], report: ImportReport) -> None:
        """Store BATCH (line, event) with its effects on the members; each bad event is a skipped line."""
        state = self._members(batch)
        before = {member_id: dict(row) for member_id, row in state.items()}
        inserts, changed = self._apply_all(batch, state, self._recorded_already(batch), report)
        self._insert(inserts)
        self._save_members(state, before, changed)
        points.seal_balances(self.conn, {move.member_id for _, move in self._moves})

    def _members(self, batch: list[tuple[int, NewEvent]]) -> dict[str, dict[str, Any]]:
        """The batch's members as they are now, and (for purchases) their purchases in the qualification window."""
        ids = list({e.member_id for _, e in batch})
        state = {r["id"]: dict(r) for r in self.conn.execute(select(members).where(members.c.id.in_(ids))).mappings()}
        buying = [e for _, e in batch if e.type == "purchase" and e.member_id in state]
        if buying and self.loyalty.qualification.window is not None:
            since = min(e.at for e in buying) - self.loyalty.qualification.window
            self._history = load_purchases(self.conn, {e.member_id for e in buying}, since)
        return state

    def _recorded_already(self, batch: list[tuple[int, NewEvent]]) -> set[str]:
        externals = [e.external_id for _, e in batch if e.external_id]
        if not externals:
            return set()
        return set(self.conn.execute(select(events.c.external_id).where(events.c.external_id.in_(externals)))
                   .scalars())

    def _apply_all(self, batch: list[tuple[int, NewEvent]], state: dict[str, dict[str, Any]], known: set[str],
                   report: ImportReport) -> tuple[list[dict[str, Any]], set[str]]:
        """Each event's effects on its member (in STATE) in order: the event rows to insert (with those the
        events derive, such as tier_changed) and the members changed."""
        self._moves = []
        inserts: list[dict[str, Any]] = []
        changed: set[str] = set()
        for line, event in batch:
            member = state.get(event.member_id)
            if member is None:
                report.skipped.append((line, f"member {event.member_id!r} does not exist; import members first"))
                continue
            if event.external_id and event.external_id in known:
                report.skipped.append((line, f"event {event.external_id!r} was already recorded (duplicate)"))
                continue
            try:
                derived, moves = self._apply(member, event)
            except RowError as exc:
                report.skipped.append((line, str(exc)))
                continue
            if event.external_id:
                known.add(event.external_id)
            changed.add(event.member_id)
            self._moves.extend((len(inserts), move) for move in moves)
            inserts.append(self._row(event))
            for extra in derived:
                inserts.append(self._row(extra))
                report.triggered += 1
                report.tier_changes += extra.type == "tier_changed"
            report.loaded += 1
        return inserts, changed

    def _insert(self, inserts: list[dict[str, Any]]) -> None:
        if inserts and self._moves:  # the ledger rows name the event that caused them
            ids_back = self.conn.execute(events.insert().returning(events.c.id, sort_by_parameter_order=True),
                                         inserts).scalars().all()
            moves = [dataclasses.replace(move, event_id=ids_back[index]) for index, move in self._moves]
            points.write(self.conn, self.loyalty, moves, self.now)
        elif inserts:
            self.conn.execute(events.insert(), inserts)

    def _save_members(self, state: dict[str, dict[str, Any]], before: dict[str, dict[str, Any]],
                      changed: set[str]) -> None:
        # Only members an event really changed (a login changes nothing), in one executemany.
        effects = [{"_id": member_id, **{c: state[member_id][c] for c in _EFFECT_COLUMNS}}
                   for member_id in changed
                   if any(state[member_id][c] != before[member_id][c] for c in _EFFECT_COLUMNS)]
        if effects:
            stmt = update(members).where(members.c.id == bindparam("_id")).values(
                {c: bindparam(c) for c in _EFFECT_COLUMNS} | {"updated_at": self.now})
            self.conn.execute(stmt, effects)
        if changed:
            intelligence.refresh(self.conn, self.loyalty, self.now, changed)

    def _row(self, event: NewEvent) -> dict[str, Any]:
        return {"external_id": event.external_id, "member_id": event.member_id, "type": event.type,
                "occurred_at": event.at, "properties": event.properties, "source": event.source,
                "recorded_at": self.now, "handled_at": None}

    def _earn(self, member: dict[str, Any], event: NewEvent, amount: int, reason: str,
              derived: list[NewEvent]) -> list[points.Movement]:
        if amount <= 0:
            return []
        member["points"] = int(member["points"] or 0) + amount
        derived.append(NewEvent(member["id"], "points_earned", event.at, {
            "points": amount, "balance": member["points"], "reason": reason, "cause": event.type}, None, "engine"))
        return [points.Movement(member["id"], points.Kind.EARN, amount, event.at, reason)]

    def _apply(self, member: dict[str, Any], event: NewEvent) -> tuple[list[NewEvent], list[points.Movement]]:
        kind, props = event.type, event.properties
        derived: list[NewEvent] = []
        if kind == "purchase":
            amount = float(props["amount"])
            member["total_spend"] = float(member["total_spend"] or 0) + amount
            member["order_count"] = int(member["order_count"] or 0) + 1
            last = member["last_order_at"]
            member["last_order_at"] = event.at if last is None or event.at > last else last
            order = props.get("order_id")
            # Points at the tier the member held when buying; an upgrade applies from the next order.
            moves = self._earn(member, event, self.loyalty.points_for(amount, member["tier"]),
                               f"purchase {order}" if order not in (None, "") else "purchase", derived)
            derived.extend(self._tier_change(member, event, amount))
            return derived, moves
        if kind == "signup" and member["signup_at"] is None:
            member["signup_at"] = event.at
        elif kind == "login":
            last = member["last_login_at"]
            member["last_login_at"] = event.at if last is None or event.at > last else last
        elif kind == "points_redeemed":
            wanted = props.get("points")
            if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted <= 0:
                raise RowError(f"points_redeemed needs properties.points, a whole number above 0, got: {wanted!r}")
            if wanted > int(member["points"] or 0):
                raise RowError(f"member {member['id']} has {member['points']} points, cannot redeem {wanted} "
                               "(insufficient balance)")
            member["points"] = int(member["points"]) - wanted
            reward = props.get("reward")
            return [], [points.Movement(member["id"], points.Kind.REDEEM, -wanted, event.at,
                                        f"redeemed for {reward}" if reward not in (None, "") else "redeemed")]
        elif kind == "unsubscribe":
            channel = props.get("channel", "all")
            if channel not in ("email", "sms", "all"):
                raise RowError(f"unsubscribe needs properties.channel email, sms or all, got: {channel!r}")
            if channel in ("email", "all"):
                member["email_opt_in"] = False
            if channel in ("sms", "all"):
                member["sms_opt_in"] = False
        if kind in self.loyalty.points.earn:
            return derived, self._earn(member, event, self.loyalty.points.earn[kind], kind, derived)
        return derived, []

    def _tier_change(self, member: dict[str, Any], event: NewEvent, amount: float) -> list[NewEvent]:
        start = window_start(self.loyalty, event.at)
        if start is None:
            spend, orders = float(member["total_spend"]), int(member["order_count"])
        else:
            history = self._history.setdefault(member["id"], Purchases([]))
            history.add(event.at, amount)
            spend, orders = history.totals(start, event.at)
        member["qualifying_spend"], member["qualifying_orders"] = spend, orders
        old = member["tier"]
        earned = self.loyalty.tier_for(spend, orders)
        # Upgrades are felt at once; downgrades only happen at a review, never on a purchase.
        if self.loyalty.rank(earned.id) <= self.loyalty.rank(old) and old is not None:
            return []
        member["tier"] = earned.id
        member["tier_since"] = event.at
        member["tier_review_at"] = None if self.loyalty.rank(earned.id) == 0 else \
            next_review(event.at, self.loyalty.qualification.review_every)
        if old is None:
            return []
        props = {"from": old, "to": earned.id, "direction": "up", "cause_order_id": event.properties.get("order_id"),
                 "qualifying_spend": round(spend, 2), "qualifying_orders": orders}
        return [NewEvent(member["id"], "tier_changed", event.at, props, None, "engine")]


def record_events(store: Store, rows: Iterable[tuple[int, dict[str, Any] | None, str | None]], loyalty: Loyalty,
                  now: datetime, source: str) -> ImportReport:
    report = ImportReport()
    with store.begin() as conn:
        recorder = EventRecorder(conn, loyalty, now)
        batch: list[tuple[int, NewEvent]] = []
        for line, row, error in rows:
            if error or row is None:
                report.skipped.append((line, error or "empty row"))
                continue
            try:
                batch.append((line, parse_event(row, source)))
            except RowError as exc:
                report.skipped.append((line, str(exc)))
                continue
            if len(batch) >= BATCH:
                recorder.record(batch, report)
                batch = []
        if batch:
            recorder.record(batch, report)
    report.skipped.sort()
    return report


def import_events(store: Store, path: Path, loyalty: Loyalty, now: datetime) -> ImportReport:
    return record_events(store, read_rows(path), loyalty, now, "import")
