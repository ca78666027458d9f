"""Walking an enrollment through its journey's steps: pure logic, no database.

``advance`` starts at the enrollment's current step and goes on until the
enrollment waits or ends, collecting what the runner must then do: messages
to send, holdout rows to log, member updates to apply.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from typing import Any

from engine.domain.timeutil import zone
from engine.rules.conditions import evaluate
from engine.rules.journey import EndStep, IfStep, SendStep, SplitStep, UpdateStep, WaitStep
from engine.rules.versions import LiveJourney
from engine.store.models import EnrollmentStatus

log = logging.getLogger(__name__)

MAX_STEPS_PER_RUN = 100  # validation rejects loops without a wait; this is the belt to those braces
HOLDOUT = "holdout"


@dataclass
class Transition:
    enrollment_id: int
    step: str | None
    status: str
    next_run_at: datetime | None
    ended_at: datetime | None = None
    exit_reason: str | None = None
    sends: list[SendStep] = field(default_factory=list)
    holdouts: list[SplitStep] = field(default_factory=list)
    updates: list[UpdateStep] = field(default_factory=list)
    variant: str | None = None
    waiting_for: str | None = None


def next_local_time(now: datetime, at: time | None, tz_name: str | None, default_tz: str,
                    weekdays: tuple[int, ...] = ()) -> datetime:
    """The first AT (member-local) after NOW, on one of WEEKDAYS if given."""
    tz = zone(tz_name, default_tz)
    local = now.astimezone(tz)
    day = local.date()
    for _ in range(8):
        candidate = datetime.combine(day, at or time(0, 0), tzinfo=tz)
        if candidate > local and (not weekdays or candidate.weekday() in weekdays):
            return candidate.astimezone(now.tzinfo)
        day += timedelta(days=1)
    raise AssertionError("no allowed weekday within a week")


def assign_variant(journey_id: str, member_id: str, step: SplitStep) -> str:
    """Deterministic per member and journey: a stable hash picks a point in [0, 100)."""
    digest = hashlib.sha256(f"{journey_id}\x1f{member_id}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") % 10_000 / 100
    if point < step.holdout:
        return HOLDOUT
    edge = float(step.holdout)
    for variant in step.variants:
        edge += variant.weight
        if point < edge:
            return variant.name
    return step.variants[-1].name


def apply_update(member: dict[str, Any], step: UpdateStep) -> None:
    """Apply an update step to the in-memory member, so later `if` steps in the same run see it."""
    if step.points is not None:
        member["points"] = max(0, int(member.get("points") or 0) + step.points)
    if step.tier is not None:
        member["tier"] = step.tier
    attributes = dict(member.get("attributes") or {})
    if step.add_tags or step.remove_tags:
        tags = [t for t in attributes.get("tags", []) if t not in step.remove_tags]
        tags += [t for t in step.add_tags if t not in tags]
        attributes["tags"] = tags
    attributes.update(dict(step.attributes))
    member["attributes"] = attributes


def advance(live: LiveJourney, start: str | None, member: Mapping[str, Any], now: datetime, enrollment_id: int,
            default_tz: str, event: Mapping[str, Any] | None = None, *, waiting_for: str | None = None,
            variant: str | None = None) -> Transition:
    """Walk from step START until the enrollment waits or ends; collect the work on the way."""
    journey = live.journey
    person = dict(member)
    out = Transition(enrollment_id, None, EnrollmentStatus.COMPLETED.value, None, now, variant=variant)
    current = start
    for _ in range(MAX_STEPS_PER_RUN):
        if current is None or not journey.has_step(current):
            return out
        step = journey.step(current)
        if isinstance(step, WaitStep) and step.until_event and current == start and waiting_for:
            current = journey.resolve(step, step.timeout_then)  # woken by the timeout, not the event
            waiting_for = None
        elif isinstance(step, WaitStep):
            return _wait(out, journey, step, person, now, default_tz)
        elif isinstance(step, SendStep):
            out.sends.append(step)
            current = journey.following(step.id)
        elif isinstance(step, IfStep):
            matched = evaluate(step.condition, person, now, live.segments, event)
            current = journey.resolve(step, step.then if matched else step.otherwise)
        elif isinstance(step, SplitStep):
            out.variant = assign_variant(journey.id, str(person["id"]), step)
            if out.variant == HOLDOUT:
                out.holdouts.append(step)
                return out
            chosen = next(v for v in step.variants if v.name == out.variant)
            current = journey.resolve(step, chosen.then)
        elif isinstance(step, UpdateStep):
            out.updates.append(step)
            apply_update(person, step)
            current = journey.following(step.id)
        elif isinstance(step, EndStep):
            current = None
    log.error("journey %s enrollment %s: more than %s steps without a wait; stopped", journey.id, enrollment_id,
              MAX_STEPS_PER_RUN)
    out.status, out.exit_reason = EnrollmentStatus.EXITED.value, "too many steps without a wait"
    return out


def _wait(out: Transition, journey: Any, step: WaitStep, member: Mapping[str, Any], now: datetime,
          default_tz: str) -> Transition:
    out.status, out.ended_at = EnrollmentStatus.ACTIVE.value, None
    if step.until_event:
        assert step.timeout is not None
        out.step, out.next_run_at, out.waiting_for = step.id, now + step.timeout, step.until_event
        return out
    out.step = journey.following(step.id)
    if step.duration is not None:
        out.next_run_at = now + step.duration
    else:
        out.next_run_at = next_local_time(now, step.until, member.get("timezone"), default_tz, step.weekdays)
    return out
