"""The journey model: frozen values, built from marketer-owned YAML by engine.rules.journey_parse."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import time, timedelta
from typing import Any, Literal

from engine.rules.conditions import Condition

JOURNEY_ID = re.compile(r"^[a-z0-9_]+$")
STEP_ID = re.compile(r"^[a-z0-9_]+$")
HHMM = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$")
CHANNELS = ("email", "sms")
# The widths of the database columns these names are written to (engine/store/models.py): a longer name would pass
# on SQLite, which does not enforce VARCHAR lengths, and fail every write on PostgreSQL.
MAX_ID = 64  # journey, step and split variant ids; event types
MAX_TIER_ID = 32  # members.tier
MAX_TEMPLATE = 200  # messages.template
MAX_POINTS = 1_000_000_000  # update.points, either way: members.points is a 32-bit INTEGER on PostgreSQL
MAX_OFFSET_DAYS = 366  # a date trigger's offset: within a year either side of the date
STATUSES = ("active", "paused", "draft")
END = "end"


@dataclass(frozen=True)
class EventTrigger:
    event: str
    where: Condition | None = None


@dataclass(frozen=True)
class SegmentTrigger:
    condition: Condition
    segment: str | None = None  # the named segment, when one was given


@dataclass(frozen=True)
class DateTrigger:
    attribute: str
    at: time
    offset_days: int = 0  # -3 fires three days before the date


Trigger = EventTrigger | SegmentTrigger | DateTrigger


@dataclass(frozen=True)
class Entry:
    reentry: Literal["never", "always"] | timedelta = "never"
    max_per_day: int | None = None  # new entries per calendar day (default_timezone)


@dataclass(frozen=True)
class ExitRule:
    event: str | None = None
    where: Condition | None = None
    condition: Condition | None = None


@dataclass(frozen=True)
class Goal:
    event: str
    within: timedelta
    where: Condition | None = None


@dataclass(frozen=True)
class SendStep:
    id: str
    channel: str
    template: str
    fallback: str | None = None


@dataclass(frozen=True)
class WaitStep:
    id: str
    duration: timedelta | None = None
    until: time | None = None
    weekdays: tuple[int, ...] = ()  # with until: only on these days (0 = Monday); empty = any day
    until_event: str | None = None  # wait for this event type, at most `timeout`
    timeout: timedelta | None = None
    then: str | None = None  # until_event: where to go when the event comes (None = the next step)
    timeout_then: str | None = None  # until_event: where to go when it does not (None = the next step)


@dataclass(frozen=True)
class Variant:
    name: str
    weight: int  # percent
    then: str | None


@dataclass(frozen=True)
class SplitStep:
    """Members are assigned a variant by a hash of journey and member id: the same member, the same variant."""

    id: str
    variants: tuple[Variant, ...]
    holdout: int = 0  # percent who get nothing but are still measured


@dataclass(frozen=True)
class UpdateStep:
    id: str
    points: int | None = None  # added (negative: deducted, never below zero)
    tier: str | None = None
    add_tags: tuple[str, ...] = ()
    remove_tags: tuple[str, ...] = ()
    attributes: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class IfStep:
    id: str
    condition: Condition
    then: str | None  # step id, END, or None for "the next step"
    otherwise: str | None


@dataclass(frozen=True)
class EndStep:
    id: str


Step = SendStep | WaitStep | IfStep | SplitStep | UpdateStep | EndStep


@dataclass(frozen=True)
class Journey:
    id: str
    name: str
    status: str
    trigger: Trigger
    entry: Entry
    steps: tuple[Step, ...]
    exit_when: ExitRule | None = None
    goal: Goal | None = None
    source: str = ""
    category: str = "marketing"  # transactional messages are exempt from frequency caps and opt-out hints
    definition: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {s.id: i for i, s in enumerate(self.steps)})

    @property
    def first_step(self) -> str | None:
        return self.steps[0].id if self.steps else None

    def step(self, step_id: str) -> Step:
        return self.steps[self._index[step_id]]  # type: ignore[attr-defined]

    def has_step(self, step_id: str) -> bool:
        return step_id in self._index  # type: ignore[attr-defined]

    def following(self, step_id: str) -> str | None:
        """The step after STEP_ID in the list, or None at the end."""
        i = self._index[step_id] + 1  # type: ignore[attr-defined]
        return self.steps[i].id if i < len(self.steps) else None

    def successors(self, step: Step) -> list[str | None]:
        if isinstance(step, EndStep):
            return []
        if isinstance(step, IfStep):
            return [self._resolve(step, step.then), self._resolve(step, step.otherwise)]
        if isinstance(step, WaitStep) and step.until_event:
            return [self._resolve(step, step.then), self._resolve(step, step.timeout_then)]
        if isinstance(step, SplitStep):
            return [self._resolve(step, v.then) for v in step.variants]
        return [self.following(step.id)]

    def _resolve(self, step: Step, target: str | None) -> str | None:
        if target is None:
            return self.following(step.id)
        return None if target == END else target

    def resolve(self, step: Step, target: str | None) -> str | None:
        return self._resolve(step, target)

    @property
    def runs(self) -> bool:
        return self.status == "active"
