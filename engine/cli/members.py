"""One member: their state and history (``member show``) and erasure (``member forget``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select, update

from engine.exceptions import NotFound
from engine.programme import points
from engine.programme.tiers import load_purchases, window_start
from engine.rules.loyalty import Loyalty
from engine.store import quarantine
from engine.store.models import EnrollmentStatus, enrollments, events, members, messages
from engine.store.seal import reseal


def show(conn: Connection, member_id: str, loyalty: Loyalty, default_locale: str, now: datetime) -> str:
    member = conn.execute(select(members).where(members.c.id == member_id)).mappings().first()
    if member is None:
        raise NotFound(f"member {member_id!r} does not exist")
    m = dict(member)
    locale = m["locale"] or default_locale
    lines = [f"member {m['id']}" + ("  (personal data erased)" if m["forgotten_at"] else "")]
    for key in ("name", "email", "phone", "birthday", "timezone", "locale", "signup_at"):
        lines.append(f"  {key:<14} {_show(m[key])}")
    consent = f"email {'yes' if m['email_opt_in'] else 'no'}, sms {'yes' if m['sms_opt_in'] else 'no'}"
    lines.append(f"  {'opt-in':<14} {consent}")
    lines.extend(_programme(conn, m, loyalty, locale, default_locale, now))
    if m["attributes"]:
        lines.append(f"  {'attributes':<14} {m['attributes']}")
    lines.extend(_ledger(conn, m["id"]))
    lines.append("journeys:")
    rows = conn.execute(select(enrollments).where(enrollments.c.member_id == member_id)
                        .order_by(enrollments.c.entered_at)).mappings().all()
    held = {int(q["ref"]): q for q in quarantine.entries(conn, kinds=[quarantine.Kind.ENROLLMENT], member=member_id)}
    for e in rows:
        detail = f"next step {e['step']} at {_show(e['next_run_at'])}" if e["status"] == "active" else \
            f"{e['status']} {_show(e['ended_at'])}" + (f" ({e['exit_reason']})" if e["exit_reason"] else "")
        if e["status"] == "active" and e["id"] in held:
            q = held[e["id"]]
            when = "quarantined (run.py retry after a fix)" if q["status"] == "quarantined" else \
                f"failed {q['attempts']} time(s), tried again at {_show(q['next_attempt_at'])}"
            detail = f"stuck at step {e['step']}: {when}: {q['error']}"
        conv = f", converted {_show(e['converted_at'])}" if e["converted_at"] else ""
        lines.append(f"  {e['journey_id']} v{e['journey_version']}: entered {_show(e['entered_at'])}, {detail}{conv}")
    if not rows:
        lines.append("  (none)")
    others = [q for q in quarantine.entries(conn, member=member_id) if q["kind"] != quarantine.Kind.ENROLLMENT.value]
    if others:
        lines.append("set aside:")
        for q in others:
            lines.append(f"  {q['kind']} {q['ref']}: {q['status']} after {q['attempts']} failure(s): {q['error']}")
    lines.append("recent messages:")
    recent = conn.execute(select(messages).where(messages.c.member_id == member_id)
                          .order_by(messages.c.id.desc()).limit(10)).mappings().all()
    for msg in recent:
        why = f" ({msg['reason']})" if msg["reason"] else ""
        if msg["reason"] and msg["status"] in ("sent", "delivered"):
            why = f" (after {msg['reason'].replace('_', ' ')})"  # e.g. deferred by quiet hours, then sent
        lines.append(f"  #{msg['id']} {_show(msg['created_at'])} {msg['journey']}/{msg['step']} {msg['channel']} "
                     f"{msg['status']}{why}")
    if not recent:
        lines.append("  (none)")
    return "\n".join(lines)


def _programme(conn: Connection, m: dict[str, Any], loyalty: Loyalty, locale: str, default_locale: str,
               now: datetime) -> list[str]:
    """Tier with progress to the next, points with upcoming expiries, lifecycle, value and churn risk."""
    tier = loyalty.tier(m["tier"])
    review = f", review {_day(m['tier_review_at'])}" if m["tier_review_at"] else ""
    lines = [f"  {'tier':<14} {tier.name(locale, default_locale)} ({tier.id}) since {_day(m['tier_since'])}{review}"]
    start = window_start(loyalty, now)
    if start is None:
        spend, orders, span = float(m["total_spend"] or 0), int(m["order_count"] or 0), "in all"
    else:
        history = load_purchases(conn, [m["id"]], start)
        spend, orders = history[m["id"]].totals(start, now) if m["id"] in history else (0.0, 0)
        span = f"in the last {loyalty.window_days} days"
    lines.append(f"  {'qualifying':<14} {spend:,.2f} spend over {orders} orders {span}")
    upcoming = loyalty.next_tier(tier.id)
    if upcoming is not None:
        needs = [f"{max(0.0, upcoming.min_spend - spend):,.2f} more spend (at {upcoming.min_spend:,.0f})"]
        if upcoming.min_orders > orders:
            needs.append(f"{upcoming.min_orders - orders} more orders (at {upcoming.min_orders})")
        lines.append(f"  {'next tier':<14} {upcoming.name(locale, default_locale)}: {' and '.join(needs)}")
    lines.append(f"  {'spend':<14} {float(m['total_spend'] or 0):,.2f} over {m['order_count']} orders, "
                 f"last {_show(m['last_order_at'])}")
    expiring = points.upcoming_expiries(conn, m["id"], now)
    soon = "; expiring: " + ", ".join(f"{n:,} on {_day(at)}" for at, n in expiring) if expiring else ""
    lines.append(f"  {'points':<14} {int(m['points'] or 0):,}{soon}")
    lines.append(f"  {'lifecycle':<14} {m['lifecycle_stage'] or '-'}, last login {_show(m['last_login_at'])}")
    rfm = (f"RFM {m['rfm_r']}-{m['rfm_f']}-{m['rfm_m']} ({m['rfm_segment']})" if m["rfm_r"] is not None
           else "RFM - (no orders, or not scored yet)")
    aov = f"{m['aov']:,.2f}" if m["aov"] is not None else "-"
    clv = f"{m['predicted_clv']:,.2f}" if m["predicted_clv"] is not None else "-"
    lines.append(f"  {'value':<14} average order {aov}, predicted CLV {clv}, {rfm}")
    lines.append(f"  {'churn risk':<14} " + (f"yes ({m['churn_reasons']})" if m["churn_risk"] else "no"))
    return lines


def _ledger(conn: Connection, member_id: str) -> list[str]:
    rows = points.statement(conn, member_id, limit=5)
    lines = ["points ledger (latest first):"]
    for row in rows:
        expiry = f", expires {_day(row['expires_at'])}" if row["expires_at"] else ""
        lines.append(f"  {_show(row['occurred_at'])} {row['kind']:<6} {row['points']:+,} -> {row['balance']:,}"
                     f"  {row['reason']}{expiry}")
    return lines if rows else []


def _day(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d")


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M UTC")
    return str(value)


def forget(conn: Connection, member_id: str, now: datetime) -> dict[str, int]:
    """Erase personal data; the message log keeps each row's hashes, so the chain still verifies."""
    found = conn.execute(select(members.c.id).where(members.c.id == member_id)).first()
    if found is None:
        raise NotFound(f"member {member_id!r} does not exist")
    conn.execute(update(members).where(members.c.id == member_id).values(
        name=None, email=None, phone=None, birthday=None, attributes={}, email_opt_in=False, sms_opt_in=False,
        forgotten_at=now, updated_at=now))
    ended = conn.execute(update(enrollments).where(enrollments.c.member_id == member_id,
                                                   enrollments.c.status == EnrollmentStatus.ACTIVE.value)
                         .values(status=EnrollmentStatus.EXITED.value, ended_at=now, exit_reason="member forgotten",
                                 next_run_at=None)).rowcount
    erased = list(conn.execute(update(messages).where(messages.c.member_id == member_id).values(
        recipient=None, subject=None, body=None, html=None, redacted=True, updated_at=now)
        .returning(messages.c.id)).scalars())
    reseal(conn, erased)  # the erasure is sealed: an erasure made without the audit key does not verify
    redacted = len(erased)
    cleared = conn.execute(update(events).where(events.c.member_id == member_id).values(properties={})).rowcount
    return {"messages": int(redacted or 0), "events": int(cleared or 0), "enrollments": int(ended or 0)}
