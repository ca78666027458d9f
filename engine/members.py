"""One member: their state and history (``member show``) and erasure (``member forget``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select, update

from engine.exceptions import NotFound
from engine.loyalty import Loyalty
from engine.models import EnrollmentStatus, enrollments, events, members, messages


def show(conn: Connection, member_id: str, loyalty: Loyalty, default_locale: str) -> str:
    member = conn.execute(select(members).where(members.c.id == member_id)).mappings().first()
    if member is None:
        raise NotFound(f"member {member_id!r} does not exist")
    m = dict(member)
    locale = m["locale"] or default_locale
    tier = loyalty.tier(m["tier"])
    lines = [f"member {m['id']}" + ("  (personal data erased)" if m["forgotten_at"] else "")]
    for key in ("name", "email", "phone", "birthday", "timezone", "locale", "signup_at"):
        lines.append(f"  {key:<14} {_show(m[key])}")
    consent = f"email {'yes' if m['email_opt_in'] else 'no'}, sms {'yes' if m['sms_opt_in'] else 'no'}"
    lines.append(f"  {'opt-in':<14} {consent}")
    lines.append(f"  {'tier':<14} {tier.name(locale, default_locale)} ({tier.id})")
    upcoming = loyalty.next_tier(tier.id)
    if upcoming is not None:
        needed = max(0.0, upcoming.min_spend - float(m["total_spend"] or 0))
        lines.append(f"  {'next tier':<14} {upcoming.name(locale, default_locale)}: {needed:,.2f} more spend "
                     f"(at {upcoming.min_spend:,.0f})")
    lines.append(f"  {'spend':<14} {float(m['total_spend'] or 0):,.2f} over {m['order_count']} orders, "
                 f"last {_show(m['last_order_at'])}")
    lines.append(f"  {'points':<14} {m['points']}")
    if m["attributes"]:
        lines.append(f"  {'attributes':<14} {m['attributes']}")
    lines.append("journeys:")
    rows = conn.execute(select(enrollments).where(enrollments.c.member_id == member_id)
                        .order_by(enrollments.c.entered_at)).mappings().all()
    for e in rows:
        detail = f"next step {e['step']} at {_show(e['next_run_at'])}" if e["status"] == "active" else \
            f"{e['status']} {_show(e['ended_at'])}" + (f" ({e['exit_reason']})" if e["exit_reason"] else "")
        conv = f", converted {_show(e['converted_at'])}" if e["converted_at"] else ""
        lines.append(f"  {e['journey_id']} v{e['journey_version']}: entered {_show(e['entered_at'])}, {detail}{conv}")
    if not rows:
        lines.append("  (none)")
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
    redacted = conn.execute(update(messages).where(messages.c.member_id == member_id).values(
        recipient=None, subject=None, body=None, html=None, redacted=True, updated_at=now)).rowcount
    cleared = conn.execute(update(events).where(events.c.member_id == member_id).values(properties={})).rowcount
    return {"messages": int(redacted or 0), "events": int(cleared or 0), "enrollments": int(ended or 0)}
