"""``report --programme``: members per tier and lifecycle stage, points liability, tier movements, in SQL."""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, func, select

from engine.domain.attributes import STAGES
from engine.programme.intelligence import SEGMENT_NAMES
from engine.rules.loyalty import Loyalty
from engine.store.computed import expiring_sql
from engine.store.models import events, members, points_ledger


@dataclass
class ProgrammeFigures:
    since: str
    until: str
    members: int = 0
    tiers: dict[str, int] = field(default_factory=dict)
    stages: dict[str, int] = field(default_factory=dict)
    rfm_segments: dict[str, int] = field(default_factory=dict)
    churn_risk: int = 0
    points_balance: int = 0
    points_expiring_30_days: int = 0
    points_expiring_90_days: int = 0
    points_earned: int = 0
    points_redeemed: int = 0
    points_expired: int = 0
    movements: list[dict[str, Any]] = field(default_factory=list)


def figures(conn: Connection, loyalty: Loyalty, since: datetime, until: datetime) -> ProgrammeFigures:
    out = ProgrammeFigures(since.isoformat(), until.isoformat())
    tiers: dict[str | None, int] = {t: int(n) for t, n in conn.execute(
        select(members.c.tier, func.count()).group_by(members.c.tier))}
    out.tiers = {t.id: int(tiers.get(t.id, 0)) for t in loyalty.tiers}
    out.members = sum(tiers.values())
    stages: dict[str | None, int] = {s: int(n) for s, n in conn.execute(
        select(members.c.lifecycle_stage, func.count()).group_by(members.c.lifecycle_stage))}
    out.stages = {s: int(stages.get(s, 0)) for s in STAGES} | ({"unknown": int(stages[None])} if None in stages else {})
    segments: dict[str | None, int] = {s: int(n) for s, n in conn.execute(
        select(members.c.rfm_segment, func.count()).where(members.c.rfm_segment.is_not(None))
        .group_by(members.c.rfm_segment))}
    out.rfm_segments = {s: int(segments[s]) for s in SEGMENT_NAMES if s in segments}
    out.churn_risk = int(conn.execute(select(func.count()).where(members.c.churn_risk.is_(True))).scalar_one())
    out.points_balance = int(conn.execute(select(func.coalesce(func.sum(points_ledger.c.points), 0))).scalar_one())
    for days in (30, 90):
        total = select(func.coalesce(func.sum(expiring_sql(until + timedelta(days=days))), 0))
        setattr(out, f"points_expiring_{days}_days", int(conn.execute(total).scalar_one()))
    moved = dict(conn.execute(
        select(points_ledger.c.kind, func.sum(points_ledger.c.points))
        .where(points_ledger.c.occurred_at > since, points_ledger.c.occurred_at <= until)
        .group_by(points_ledger.c.kind)).all())
    out.points_earned = int(moved.get("earn", 0) or 0) + max(0, int(moved.get("adjust", 0) or 0))
    out.points_redeemed = -int(moved.get("redeem", 0) or 0)
    out.points_expired = -int(moved.get("expire", 0) or 0)
    frm, to, direction = (events.c.properties[k].as_string() for k in ("from", "to", "direction"))
    rows = conn.execute(select(frm, to, direction, func.count()).where(
        events.c.type == "tier_changed", events.c.occurred_at > since, events.c.occurred_at <= until)
        .group_by(frm, to, direction)).all()
    rank = {t.id: i for i, t in enumerate(loyalty.tiers)}
    out.movements = sorted(({"from": f, "to": t, "direction": d, "members": int(n)} for f, t, d, n in rows),
                           key=lambda m: (m["direction"] != "up", rank.get(m["from"], 0), rank.get(m["to"], 0)))
    return out


def as_json(item: ProgrammeFigures) -> str:
    return json.dumps(asdict(item), ensure_ascii=False, indent=2)


def as_table(item: ProgrammeFigures, loyalty: Loyalty, locale: str) -> str:
    def share(n: int) -> str:
        return f"{n:,} ({n / item.members:.1%})" if item.members else f"{n:,}"

    lines = [f"members: {item.members:,}", "per tier:"]
    for tier in loyalty.tiers:
        lines.append(f"  {tier.name(locale, locale)} ({tier.id}): {share(item.tiers.get(tier.id, 0))}")
    lines.append("per lifecycle stage:")
    lines.extend(f"  {stage}: {share(n)}" for stage, n in item.stages.items())
    if item.rfm_segments:
        lines.append("per RFM segment:")
        lines.extend(f"  {name}: {share(n)}" for name, n in item.rfm_segments.items())
    lines.append(f"churn risk: {share(item.churn_risk)}")
    lines.append(f"points liability: {item.points_balance:,} held; {item.points_expiring_30_days:,} expire within "
                 f"30 days, {item.points_expiring_90_days:,} within 90 days")
    lines.append(f"{item.since[:10]} to {item.until[:10]}: points earned {item.points_earned:,}, redeemed "
                 f"{item.points_redeemed:,}, expired {item.points_expired:,}")
    lines.append("tier movements:" if item.movements else "tier movements: none")
    lines.extend(f"  {m['direction']:<4} {m['from']} -> {m['to']}: {m['members']:,}" for m in item.movements)
    return "\n".join(lines)


def as_html(item: ProgrammeFigures, loyalty: Loyalty, locale: str) -> str:
    body = html.escape(as_table(item, loyalty, locale))
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Programme report</title></head><body>"
            f"<h1>Programme report</h1><pre>{body}</pre></body></html>")
