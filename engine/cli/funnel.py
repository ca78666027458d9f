"""Funnel and conversion figures per journey, computed in SQL."""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import Connection, case, func, select

from engine.store import quarantine
from engine.store.models import EnrollmentStatus, enrollments, messages


@dataclass
class StepFigures:
    step: str
    channel: str
    statuses: dict[str, int] = field(default_factory=dict)


@dataclass
class JourneyFigures:
    journey: str
    entered: int = 0
    active: int = 0
    completed: int = 0
    exited: int = 0
    converted: int = 0
    steps: list[StepFigures] = field(default_factory=list)
    #: units set aside after failing, by status (retrying, quarantined); paused: why the journey is paused
    quarantined: dict[str, int] = field(default_factory=dict)
    paused: str | None = None

    @property
    def conversion_rate(self) -> float:
        return self.converted / self.entered if self.entered else 0.0


def figures(conn: Connection, journey: str | None = None) -> list[JourneyFigures]:
    count = func.count()
    stmt = select(
        enrollments.c.journey_id, count,
        func.sum(case((enrollments.c.status == EnrollmentStatus.ACTIVE.value, 1), else_=0)),
        func.sum(case((enrollments.c.status == EnrollmentStatus.COMPLETED.value, 1), else_=0)),
        func.sum(case((enrollments.c.status == EnrollmentStatus.EXITED.value, 1), else_=0)),
        func.sum(case((enrollments.c.converted_at.is_not(None), 1), else_=0)),
    ).group_by(enrollments.c.journey_id).order_by(enrollments.c.journey_id)
    if journey:
        stmt = stmt.where(enrollments.c.journey_id == journey)
    out = {}
    for row in conn.execute(stmt):
        entered, active, completed, exited, converted = (int(v or 0) for v in row[1:])
        out[row[0]] = JourneyFigures(row[0], entered, active, completed, exited, converted)
    steps = select(messages.c.journey, messages.c.step, messages.c.channel, messages.c.status, func.count()) \
        .group_by(messages.c.journey, messages.c.step, messages.c.channel, messages.c.status) \
        .order_by(messages.c.journey, func.min(messages.c.id))
    if journey:
        steps = steps.where(messages.c.journey == journey)
    index: dict[tuple[str, str], StepFigures] = {}
    for journey_id, step, channel, status, n in conn.execute(steps):
        figures_ = out.setdefault(journey_id, JourneyFigures(journey_id))
        key = (journey_id, step)
        if key not in index:
            index[key] = StepFigures(step, channel)
            figures_.steps.append(index[key])
        index[key].statuses[status] = int(n)
    for (journey_id, _kind, status), n in quarantine.open_counts(conn).items():
        if not journey_id or (journey and journey_id != journey):
            continue
        item = out.setdefault(journey_id, JourneyFigures(journey_id))
        item.quarantined[status] = item.quarantined.get(status, 0) + n
    for journey_id, (version, why) in quarantine.paused_journeys(conn).items():
        if journey_id in out:
            out[journey_id].paused = f"version {version}: {why}"
    return list(out.values())


def as_json(items: list[JourneyFigures]) -> str:
    data: list[dict[str, Any]] = []
    for item in items:
        entry = asdict(item)
        entry["conversion_rate"] = round(item.conversion_rate, 4)
        data.append(entry)
    return json.dumps(data, ensure_ascii=False, indent=2)


def as_table(items: list[JourneyFigures]) -> str:
    if not items:
        return "no journey has any members yet"
    lines = []
    for item in items:
        lines.append(f"{item.journey}: entered {item.entered}, active {item.active}, completed {item.completed}, "
                     f"exited {item.exited}, converted {item.converted} ({item.conversion_rate:.1%})")
        if item.paused:
            lines.append(f"  PAUSED ({item.paused}): fix it, then run.py retry --journey {item.journey}")
        if item.quarantined:
            parts = ", ".join(f"{n} {status}" for status, n in sorted(item.quarantined.items()))
            lines.append(f"  set aside after failing: {parts} (run.py log --status quarantined)")
        for step in item.steps:
            parts = ", ".join(f"{k} {v}" for k, v in sorted(step.statuses.items()))
            lines.append(f"  {step.step} ({step.channel}): {parts}")
    return "\n".join(lines)


def as_html(items: list[JourneyFigures]) -> str:
    rows = []
    for item in items:
        rows.append(f"<h2>{html.escape(item.journey)}</h2><p>entered {item.entered} · completed {item.completed} · "
                    f"exited {item.exited} · converted {item.converted} ({item.conversion_rate:.1%})</p>")
        if item.paused:
            rows.append(f"<p><strong>Paused</strong> ({html.escape(item.paused)})</p>")
        if item.quarantined:
            parts = ", ".join(f"{n} {html.escape(status)}" for status, n in sorted(item.quarantined.items()))
            rows.append(f"<p>Set aside after failing: {parts}</p>")
        rows.append("<table><tr><th>step</th><th>channel</th><th>statuses</th></tr>")
        for step in item.steps:
            parts = ", ".join(f"{html.escape(k)} {v}" for k, v in sorted(step.statuses.items()))
            rows.append(f"<tr><td>{html.escape(step.step)}</td><td>{step.channel}</td><td>{parts}</td></tr>")
        rows.append("</table>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Journey report</title>"
            "<style>body{font-family:sans-serif}td,th{padding:4px 10px;text-align:left}</style></head><body>"
            "<h1>Journey report</h1>" + "".join(rows) + "</body></html>")
