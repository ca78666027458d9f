"""The journey model: frozen values parsed from marketer-owned YAML.

Parsing collects every problem (FILE:LINE:COL with a fix) instead of stopping
at the first; a journey with problems is never returned half-built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import time, timedelta
from typing import Any, Literal

from engine import conditions as cond
from engine.attributes import DATE_ATTRIBUTES
from engine.conditions import Condition
from engine.durations import DurationTooLong, parse_duration
from engine.problems import Problems, shown
from engine.yamlsrc import UNKNOWN, Mark, YMap

JOURNEY_ID = re.compile(r"^[a-z0-9_]+$")
STEP_ID = re.compile(r"^[a-z0-9_]+$")
HHMM = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$")
CHANNELS = ("email", "sms")
# The widths of the database columns these names are written to (engine/models.py): a longer name would pass
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


# --------------------------------------------------------------------------- parsing


class _Ctx:
    def __init__(self, problems: Problems, stored: bool = False) -> None:
        self.problems = problems
        # A stored journey version was valid when stored: the limits added since do not apply to it.
        self.stored = stored

    def add(self, mark: Mark, message: str) -> None:
        self.problems.add(mark, message)

    def keys(self, data: Any, where: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> bool:
        if not isinstance(data, dict):
            self.add(getattr(data, "mark", UNKNOWN), f"{where} must be a mapping, got: {data!r}")
            return False
        ok = True
        for key in data:
            if key not in allowed:
                mark = data.key_mark(key) if isinstance(data, YMap) else UNKNOWN
                self.add(mark, f"unknown key {key!r} in {where}{self.problems.suggest(key, allowed)}")
                ok = False
        for key in required:
            if key not in data:
                mark = data.mark if isinstance(data, YMap) else UNKNOWN
                self.add(mark, f"{where} is missing {key!r}{_MISSING_HINTS.get(key, f'; add {key}:')}")
                ok = False
        return ok

    def text(self, data: Any, key: str, where: str, longest: int | None = None) -> str | None:
        value = data.get(key)
        if not isinstance(value, str) or not value.strip():
            self.add(vmark(data, key), f"{where}.{key} must be text, got: {shown(value)}")
            return None
        if longest is not None and not self.fits(value, longest, vmark(data, key), f"{where}.{key}"):
            return None
        return value

    def fits(self, value: str, longest: int, mark: Mark, what: str) -> bool:
        """VALUE fits the database column it is written to (or is from a stored version, which fitted then)."""
        if len(value) <= longest or self.stored:
            return True
        self.add(mark, f"{what} must be at most {longest} characters (the database holds no more), got: "
                       f"{len(value):,} characters; shorten it")
        return False

    def duration(self, data: Any, key: str, where: str) -> timedelta | None:
        try:
            return parse_duration(data.get(key), bounded=not self.stored)
        except ValueError as exc:
            self.add(vmark(data, key), f"{where}.{key}: {exc}")
            return None

    def condition(self, data: Any, key: str, where: str, *, allow_event: bool = False) -> Condition | None:
        return cond.parse(data.get(key), vmark(data, key), self.problems, f"{where}.{key}", allow_event=allow_event,
                          stored=self.stored)


def vmark(data: Any, key: str) -> Mark:
    if isinstance(data, YMap):
        return data.value_mark(key)
    return UNKNOWN


def kmark(data: Any, key: str) -> Mark:
    if isinstance(data, YMap):
        return data.key_mark(key)
    return UNKNOWN


_MISSING_HINTS = {
    "journey": "; add journey: followed by an id such as welcome_series",
    "trigger": "; add trigger: with one of event:, segment: or date:",
    "steps": "; add steps: with at least one step such as - {id: first_touch, send: email, template: ...}",
}
_TOP = ("journey", "name", "description", "status", "category", "trigger", "entry", "exit_when", "goal", "steps")
CATEGORIES = ("marketing", "transactional")


def parse_journey(data: Any, problems: Problems, source: str = "", *, stored: bool = False) -> Journey | None:
    """Build a Journey from parsed YAML; None (with problems added) if anything is wrong.

    STORED: DATA is a journey version stored in the database; it was valid when stored, so the limits added
    since (lengths, number and duration bounds, condition depth) do not apply to it.
    """
    ctx = _Ctx(problems, stored)
    before = len(problems.items)
    if _not_a_journey(ctx, data):
        return None
    if not ctx.keys(data, "the journey", _TOP, ("journey", "trigger", "steps")) and not isinstance(data, dict):
        return None
    journey_id = data.get("journey")
    if "journey" in data and (not isinstance(journey_id, str) or not JOURNEY_ID.match(journey_id)):
        ctx.add(vmark(data, "journey"), f"journey id must use only a-z, 0-9 and _, got: {shown(journey_id)}"
                f"{_id_suggestion(journey_id)}")
    elif "journey" in data:
        ctx.fits(journey_id, MAX_ID, vmark(data, "journey"), "journey id")
    name = data.get("name", journey_id)
    if "name" in data and not isinstance(name, str):
        ctx.add(vmark(data, "name"), f"name must be text, got: {name!r}")
    status = data.get("status", "active")
    if status not in STATUSES:
        ctx.add(vmark(data, "status"), f"status must be one of active, paused, draft, got: {status!r}")
    category = data.get("category", "marketing")
    if category not in CATEGORIES:
        ctx.add(vmark(data, "category"), "category must be marketing (counts against frequency caps, gets an SMS "
                f"opt-out hint) or transactional (exempt from both), got: {category!r}")
    trigger = _trigger(ctx, data.get("trigger"), vmark(data, "trigger")) if "trigger" in data else None
    entry = _entry(ctx, data.get("entry", {}))
    exit_rule = _exit(ctx, data["exit_when"]) if "exit_when" in data else None
    goal = _goal(ctx, data["goal"]) if "goal" in data else None
    steps = _steps(ctx, data.get("steps"), vmark(data, "steps")) if "steps" in data else []
    _check_targets(ctx, data.get("steps"))
    if len(problems.items) > before or trigger is None:
        return None
    journey = Journey(
        id=str(journey_id), name=str(name), status=str(status), trigger=trigger, entry=entry,
        steps=tuple(steps), exit_when=exit_rule, goal=goal, source=source, category=str(category),
        definition=_plain(data),
    )
    _check_graph(ctx, journey, data.get("steps"))
    return None if len(problems.items) > before else journey


_CONFIG_KEYS = {"database", "channels", "scheduler", "quiet_hours", "frequency_caps", "rules_dir", "templates_dir"}


def _not_a_journey(ctx: _Ctx, data: Any) -> bool:
    """A segments, loyalty or config file passed as a journey gets one clear message, not one per missing key."""
    if not isinstance(data, dict) or "journey" in data:
        return False
    mark = getattr(data, "mark", UNKNOWN)
    if "segments" in data or "tiers" in data:
        segments = "segments" in data
        what, home = ("segments", "rules/segments.yaml") if segments else ("loyalty tiers", "rules/loyalty.yaml")
        ctx.add(mark, f"this file holds {what}, not a journey; {what} are read only from {home}")
        return True
    if _CONFIG_KEYS & set(data):
        ctx.add(mark, "this file looks like a config.yaml, not a journey; check it with "
                      "`python run.py --config FILE validate`")
        return True
    return False


def _id_suggestion(value: Any) -> str:
    if not isinstance(value, str):
        return ""
    fixed = re.sub(r"[^a-z0-9]+", "_", value.strip().lower()).strip("_")[:MAX_ID].strip("_")
    return f"; for example {fixed!r}" if fixed else ""


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _trigger(ctx: _Ctx, data: Any, mark: Mark) -> Trigger | None:
    kinds = [k for k in ("event", "segment", "date") if isinstance(data, dict) and k in data]
    if not isinstance(data, dict) or len(kinds) != 1:
        if len(kinds) > 1:
            ctx.add(kmark(data, sorted(kinds, key=lambda k: kmark(data, k).line)[1]),
                    f"trigger must have exactly one of event:, segment: or date: (found {', '.join(kinds)}); "
                    "keep one, and make a second journey for the other way in")
        else:
            ctx.add(mark, "trigger must have exactly one of event:, segment: or date:")
        if isinstance(data, dict):
            ctx.keys(data, "trigger", ("event", "where", "segment", "date", "offset", "at"))
        return None
    kind = kinds[0]
    if kind == "event":
        if not ctx.keys(data, "trigger", ("event", "where")):
            return None
        event = ctx.text(data, "event", "trigger", MAX_ID)
        where = ctx.condition(data, "where", "trigger", allow_event=True) if "where" in data else None
        if event is None or ("where" in data and where is None):
            return None
        return EventTrigger(event, where)
    if kind == "segment":
        if not ctx.keys(data, "trigger", ("segment",)):
            return None
        value = data["segment"]
        if isinstance(value, str):
            return SegmentTrigger(cond.SegmentRef(value, vmark(data, "segment")), segment=value)
        condition = ctx.condition(data, "segment", "trigger")
        return None if condition is None else SegmentTrigger(condition)
    if not ctx.keys(data, "trigger", ("date", "offset", "at"), ("at",)):
        return None
    attribute = data.get("date")
    if attribute not in DATE_ATTRIBUTES:
        ctx.add(vmark(data, "date"), f"trigger.date must be one of {', '.join(DATE_ATTRIBUTES)}, "
                f"got: {shown(attribute)}")
        return None
    at = _hhmm(ctx, data, "at", "trigger")
    offset = _offset(ctx, data) if "offset" in data else 0
    return None if at is None or offset is None else DateTrigger(str(attribute), at, offset)


def _offset(ctx: _Ctx, data: Any) -> int | None:
    raw = data["offset"]
    match = re.match(r"^([+-]?)(\d+)d$", raw) if isinstance(raw, str) else None
    if match is None:
        ctx.add(vmark(data, "offset"), f"trigger.offset must be whole days such as -3d or 1d, got: {shown(raw)}")
        return None
    digits = match.group(2).lstrip("0") or "0"
    # Digits first: int() refuses more than 4,300 of them, and dates a huge offset away overflow.
    if (len(digits) > 3 or int(digits) > MAX_OFFSET_DAYS) and not ctx.stored:
        ctx.add(vmark(data, "offset"), f"trigger.offset must be at most {MAX_OFFSET_DAYS}d either way "
                f"(within a year of the date), got: {shown(raw)}")
        return None
    if len(digits) > 9:  # a stored version: still no more than timedelta holds
        ctx.add(vmark(data, "offset"), f"trigger.offset must be at most 999999999d, got: {shown(raw)}")
        return None
    return int(digits) * (-1 if match.group(1) == "-" else 1)


def _hhmm(ctx: _Ctx, data: Any, key: str, where: str) -> time | None:
    value = data.get(key)
    match = HHMM.match(value) if isinstance(value, str) else None
    if match is None:
        ctx.add(vmark(data, key), f'{where}.{key} must be a quoted 24-hour time such as "10:00", got: {value!r}')
        return None
    return time(int(match.group(1)), int(match.group(2)))


def _entry(ctx: _Ctx, data: Any) -> Entry:
    if not ctx.keys(data, "entry", ("reentry", "max_per_day")):
        return Entry()
    cap = data.get("max_per_day")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0):
        ctx.add(vmark(data, "max_per_day"), f"entry.max_per_day must be a whole number above 0, got: {cap!r}")
        cap = None
    value = data.get("reentry", "never")
    if value in ("never", "always"):
        return Entry(value, cap)
    try:
        return Entry(parse_duration(value, bounded=not ctx.stored), cap)
    except DurationTooLong as exc:
        ctx.add(vmark(data, "reentry"), f"entry.reentry: {exc}")
    except ValueError:
        ctx.add(vmark(data, "reentry"),
                f"entry.reentry must be never, always or a cooldown such as 180d, got: {shown(value)}")
    return Entry(max_per_day=cap)


def _exit(ctx: _Ctx, data: Any) -> ExitRule | None:
    if not ctx.keys(data, "exit_when", ("event", "where", "segment")):
        return None
    if ("event" in data) == ("segment" in data):
        ctx.add(getattr(data, "mark", UNKNOWN), "exit_when must have exactly one of event: or segment:")
        return None
    if "event" in data:
        event = ctx.text(data, "event", "exit_when", MAX_ID)
        where = ctx.condition(data, "where", "exit_when", allow_event=True) if "where" in data else None
        return ExitRule(event=event, where=where) if event else None
    if "where" in data:
        ctx.add(kmark(data, "where"), "exit_when.where only applies to exit_when.event")
        return None
    value = data["segment"]
    if isinstance(value, str):
        return ExitRule(condition=cond.SegmentRef(value, vmark(data, "segment")))
    condition = ctx.condition(data, "segment", "exit_when")
    return ExitRule(condition=condition) if condition else None


def _goal(ctx: _Ctx, data: Any) -> Goal | None:
    if not ctx.keys(data, "goal", ("event", "within", "where"), ("event", "within")):
        return None
    event = ctx.text(data, "event", "goal", MAX_ID)
    within = ctx.duration(data, "within", "goal")
    where = ctx.condition(data, "where", "goal", allow_event=True) if "where" in data else None
    if event is None or within is None:
        return None
    return Goal(event, within, where)


_STEP_KINDS = ("send", "wait", "if", "split", "update", "end")
_STEP_KEYS = {
    "send": ("id", "send", "template", "fallback"),
    "wait": ("id", "wait", "then", "timeout_then"),
    "if": ("id", "if", "then", "else"),
    "split": ("id", "split", "holdout"),
    "update": ("id", "update"),
    "end": ("id", "end"),
}
_TARGET_KEYS = ("then", "else", "timeout_then")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _steps(ctx: _Ctx, data: Any, mark: Mark) -> list[Step]:
    if not isinstance(data, list) or not data:
        ctx.add(mark, "steps must be a non-empty list")
        return []
    steps: list[Step] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(data):
        where = f"steps[{index}]"
        item_mark = data.item_mark(index) if hasattr(data, "item_mark") else UNKNOWN
        if not isinstance(raw, dict):
            ctx.add(item_mark, f"{where} must be a mapping such as {{send: email, template: ...}}, got: {raw!r}")
            continue
        kinds = [k for k in _STEP_KINDS if k in raw]
        if len(kinds) != 1:
            found = f" (found {', '.join(kinds)})" if kinds else ""
            unknown = [k for k in raw if k not in {k for v in _STEP_KEYS.values() for k in v}]
            hint = "".join(f"; unknown key {k!r}{ctx.problems.suggest(k, _STEP_KINDS)}" for k in unknown)
            at = kmark(raw, unknown[0]) if unknown and not kinds else item_mark
            ctx.add(at, f"{where} must have exactly one of send:, wait:, if:, split:, update:, end:{found}{hint}")
            continue
        kind = kinds[0]
        if not ctx.keys(raw, where, _STEP_KEYS[kind]):
            continue
        step_id = raw.get("id", f"{kind}_{index + 1}")
        if not isinstance(step_id, str) or not STEP_ID.match(step_id):
            ctx.add(vmark(raw, "id"), f"{where}.id must use only a-z, 0-9 and _, got: {shown(step_id)}")
            continue
        if not ctx.fits(step_id, MAX_ID, vmark(raw, "id"), f"{where}.id"):
            continue
        if kind in ("send", "if", "split") and "id" not in raw:
            ctx.add(item_mark, f"{where} needs an id (e.g. id: first_touch): the message log is keyed by step id")
            continue
        if step_id in seen:
            ctx.add(vmark(raw, "id"), f"step id {step_id!r} is used twice (first at steps[{seen[step_id]}]); "
                    "give each step its own id")
            continue
        seen[step_id] = index
        step = _step(ctx, kind, step_id, raw, where)
        if step is not None:
            steps.append(step)
    return steps


def _step(ctx: _Ctx, kind: str, step_id: str, raw: Any, where: str) -> Step | None:
    if kind == "send":
        channel = raw.get("send")
        if channel not in CHANNELS:
            hint = "; one channel per step (use fallback: for the other)" if isinstance(channel, list) else ""
            ctx.add(vmark(raw, "send"), f"{where}.send must be email or sms, got: {channel!r}{hint}")
            return None
        if "template" not in raw:
            ctx.add(vmark(raw, "send"), f"{where} needs template: naming the message to send, "
                    "e.g. template: welcome/welcome_email (a file under templates/<locale>/)")
            return None
        template = ctx.text(raw, "template", where, MAX_TEMPLATE)
        fallback = raw.get("fallback")
        if fallback is not None and (fallback not in CHANNELS or fallback == channel):
            ctx.add(vmark(raw, "fallback"), f"{where}.fallback must be the other channel, got: {fallback!r}")
            return None
        return SendStep(step_id, channel, template, fallback) if template else None
    if kind == "wait":
        return _wait(ctx, step_id, raw, where)
    if kind == "split":
        return _split(ctx, step_id, raw, where)
    if kind == "update":
        return _update(ctx, step_id, raw, where)
    if kind == "if":
        condition = ctx.condition(raw, "if", where)
        targets = []
        for key in ("then", "else"):
            target = raw.get(key)
            if target is not None and not isinstance(target, str):
                ctx.add(vmark(raw, key), f"{where}.{key} must be a step id or end, got: {target!r}")
                return None
            targets.append(target)
        return IfStep(step_id, condition, targets[0], targets[1]) if condition else None
    if raw.get("end") not in (None, True):
        ctx.add(vmark(raw, "end"), f"{where}.end takes no value (write `- end: true`), got: {raw.get('end')!r}")
        return None
    return EndStep(step_id)


def _wait(ctx: _Ctx, step_id: str, raw: Any, where: str) -> WaitStep | None:
    value = raw.get("wait")
    if not isinstance(value, dict):
        for key in ("then", "timeout_then"):
            if key in raw:
                ctx.add(kmark(raw, key), f"{where}.{key} only applies to wait: {{until_event: ..., timeout: ...}}")
                return None
        duration = ctx.duration(raw, "wait", where)
        return WaitStep(step_id, duration=duration) if duration else None
    if "until_event" in value:
        if not ctx.keys(value, f"{where}.wait", ("until_event", "timeout"), ("until_event", "timeout")):
            return None
        event = ctx.text(value, "until_event", f"{where}.wait", MAX_ID)
        timeout = ctx.duration(value, "timeout", f"{where}.wait")
        targets = [raw.get(k) for k in ("then", "timeout_then")]
        for key, target in zip(("then", "timeout_then"), targets, strict=True):
            if target is not None and not isinstance(target, str):
                ctx.add(vmark(raw, key), f"{where}.{key} must be a step id or end, got: {target!r}")
                return None
        if event is None or timeout is None:
            return None
        return WaitStep(step_id, until_event=event, timeout=timeout, then=targets[0], timeout_then=targets[1])
    for key in ("then", "timeout_then"):
        if key in raw:
            ctx.add(kmark(raw, key), f"{where}.{key} only applies to wait: {{until_event: ..., timeout: ...}}")
            return None
    if not ctx.keys(value, f"{where}.wait", ("until", "weekdays"), ("until",)):
        return None
    at = _hhmm(ctx, value, "until", f"{where}.wait")
    days = value.get("weekdays", [])
    if not isinstance(days, list) or (not days and "weekdays" in value) or any(d not in WEEKDAYS for d in days):
        ctx.add(vmark(value, "weekdays"), f"{where}.wait.weekdays must be a list of {', '.join(WEEKDAYS)}, "
                f"got: {days!r}")
        return None
    return WaitStep(step_id, until=at, weekdays=tuple(WEEKDAYS.index(d) for d in days)) if at else None


def _split(ctx: _Ctx, step_id: str, raw: Any, where: str) -> SplitStep | None:
    items = raw.get("split")
    if not isinstance(items, list) or not items:
        ctx.add(vmark(raw, "split"), f"{where}.split must be a list of variants such as "
                "{variant: a, weight: 50, then: email_a}")
        return None
    holdout = raw.get("holdout", 0)
    if isinstance(holdout, bool) or not isinstance(holdout, int) or not 0 <= holdout < 100:
        ctx.add(vmark(raw, "holdout"), f"{where}.holdout must be a whole percentage from 0 to 99, got: {holdout!r}")
        return None
    variants: list[Variant] = []
    for index, item in enumerate(items):
        at = f"{where}.split[{index}]"
        if not ctx.keys(item, at, ("variant", "weight", "then"), ("variant", "weight")):
            return None
        name, weight, then = item.get("variant"), item.get("weight"), item.get("then")
        if not isinstance(name, str) or not STEP_ID.match(name) or name == "holdout":
            ctx.add(vmark(item, "variant"), f"{at}.variant must be a name of a-z, 0-9 and _ (not holdout), "
                    f"got: {shown(name)}")
            return None
        if not ctx.fits(name, MAX_ID, vmark(item, "variant"), f"{at}.variant"):
            return None
        if isinstance(weight, bool) or not isinstance(weight, int) or weight <= 0:
            ctx.add(vmark(item, "weight"), f"{at}.weight must be a whole percentage above 0, got: {weight!r}")
            return None
        if then is not None and not isinstance(then, str):
            ctx.add(vmark(item, "then"), f"{at}.then must be a step id or end, got: {then!r}")
            return None
        variants.append(Variant(name, weight, then))
    total = sum(v.weight for v in variants) + holdout
    if total != 100:
        ctx.add(vmark(raw, "split"), f"{where}: variant weights plus holdout must add up to 100, got: {total} "
                f"({' + '.join(str(v.weight) for v in variants)}{f' + holdout {holdout}' if holdout else ''})")
        return None
    if len({v.name for v in variants}) != len(variants):
        ctx.add(vmark(raw, "split"), f"{where}: each variant needs its own name")
        return None
    return SplitStep(step_id, tuple(variants), holdout)


_UPDATE_KEYS = ("points", "tier", "add_tags", "remove_tags", "attributes")


def _update(ctx: _Ctx, step_id: str, raw: Any, where: str) -> UpdateStep | None:
    value = raw.get("update")
    if not ctx.keys(value, f"{where}.update", _UPDATE_KEYS) or not value:
        if isinstance(value, dict) and not value:
            ctx.add(vmark(raw, "update"), f"{where}.update needs at least one of {', '.join(_UPDATE_KEYS)}")
        return None
    points, tier = value.get("points"), value.get("tier")
    if points is not None and (isinstance(points, bool) or not isinstance(points, int) or points == 0):
        ctx.add(vmark(value, "points"), f"{where}.update.points must be a whole number (negative to deduct), "
                f"got: {shown(points)}")
        return None
    if points is not None and abs(points) > MAX_POINTS and not ctx.stored:
        ctx.add(vmark(value, "points"), f"{where}.update.points must be between -{MAX_POINTS:,} and "
                f"{MAX_POINTS:,}, got: {points:,}")
        return None
    if tier is not None and (not isinstance(tier, str) or not STEP_ID.match(tier)):
        ctx.add(vmark(value, "tier"), f"{where}.update.tier must be a tier id from rules/loyalty.yaml, "
                f"got: {shown(tier)}")
        return None
    if tier is not None and not ctx.fits(tier, MAX_TIER_ID, vmark(value, "tier"), f"{where}.update.tier"):
        return None
    tags = []
    for key in ("add_tags", "remove_tags"):
        items = value.get(key, [])
        if not isinstance(items, list) or not all(isinstance(t, str) and t for t in items):
            ctx.add(vmark(value, key), f"{where}.update.{key} must be a list of tags, got: {items!r}")
            return None
        tags.append(tuple(items))
    attributes = value.get("attributes", {})
    if not isinstance(attributes, dict) or not all(isinstance(v, (str, int, float, bool)) for v in attributes.values()):
        ctx.add(vmark(value, "attributes"), f"{where}.update.attributes must map names to plain values")
        return None
    return UpdateStep(step_id, points, tier, tags[0], tags[1], tuple(sorted(attributes.items())))


def _raw_step_ids(raw_steps: list[Any]) -> list[str]:
    """Step ids as written (or defaulted), so jumps can be checked even when a step is otherwise wrong."""
    ids = []
    for index, raw in enumerate(raw_steps):
        kinds = [k for k in _STEP_KINDS if isinstance(raw, dict) and k in raw]
        if len(kinds) == 1:
            step_id = raw.get("id", f"{kinds[0]}_{index + 1}")
            if isinstance(step_id, str):
                ids.append(step_id)
    return ids


def _check_targets(ctx: _Ctx, raw_steps: Any) -> None:
    if not isinstance(raw_steps, list):
        return
    ids = _raw_step_ids(raw_steps)
    known, choices = set(ids), [*ids, END]
    for index, raw in enumerate(raw_steps):
        if not isinstance(raw, dict):
            continue
        places = [(raw, key, f"steps[{index}].{key}") for key in _TARGET_KEYS]
        if isinstance(raw.get("split"), list):
            places += [(item, "then", f"steps[{index}].split[{i}].then")
                       for i, item in enumerate(raw["split"]) if isinstance(item, dict)]
        for container, key, where in places:
            target = container.get(key)
            if isinstance(target, str) and target != END and target not in known:
                ctx.add(vmark(container, key), f"{where} names step {shown(target)}, which does not exist"
                        f"{ctx.problems.suggest(target, choices)}")


def _check_graph(ctx: _Ctx, journey: Journey, raw_steps: Any) -> None:
    marks = {}
    for index in range(len(raw_steps or [])):
        marks[index] = raw_steps.item_mark(index) if hasattr(raw_steps, "item_mark") else UNKNOWN
    reachable: set[str] = set()
    todo: list[str | None] = [journey.first_step] if journey.first_step else []
    while todo:
        current = todo.pop()
        if current is None or current in reachable:
            continue
        reachable.add(current)
        todo.extend(journey.successors(journey.step(current)))
    for index, step in enumerate(journey.steps):
        if step.id not in reachable:
            ctx.add(marks.get(index, UNKNOWN), f"step {step.id!r} can never be reached: no step leads to it "
                    "(an earlier step ends the journey or jumps past it); delete it, or point a then:/else: at it")
    _check_loops(ctx, journey, marks)


def _check_loops(ctx: _Ctx, journey: Journey, marks: dict[int, Mark]) -> None:
    """A loop is fine only if it waits somewhere; otherwise a tick would spin forever.

    The steps that are not waits, with the jumps between them, form a graph; a loop without a wait is one of its
    strongly connected components with more than one step, or a step that jumps to itself. Each such loop is
    reported once, at its first step in the file. Linear in steps and jumps (iterative Tarjan).
    """
    for component in _wait_free_loops(journey):
        first = min(component)
        ctx.add(marks.get(first, UNKNOWN), f"steps loop back to {journey.steps[first].id!r} without a wait: "
                "add a wait step inside the loop")


def _wait_free_loops(journey: Journey) -> list[list[int]]:
    steps = journey.steps
    position = {s.id: i for i, s in enumerate(steps)}
    jumps: list[list[int]] = [[] for _ in steps]
    for i, step in enumerate(steps):
        if isinstance(step, WaitStep):
            continue
        for target in journey.successors(step):
            if target is not None and not isinstance(steps[position[target]], WaitStep):
                jumps[i].append(position[target])
    order = [-1] * len(steps)  # when each step was first reached; -1: not yet
    low = [0] * len(steps)
    on_stack = [False] * len(steps)
    stack: list[int] = []
    loops: list[list[int]] = []
    counter = 0
    for root in range(len(steps)):
        if order[root] != -1 or isinstance(steps[root], WaitStep):
            continue
        order[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack[root] = True
        work = [(root, 0)]
        while work:
            v, next_jump = work[-1]
            if next_jump < len(jumps[v]):
                work[-1] = (v, next_jump + 1)
                w = jumps[v][next_jump]
                if order[w] == -1:
                    order[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack[w] = True
                    work.append((w, 0))
                elif on_stack[w]:
                    low[v] = min(low[v], order[w])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
            if low[v] == order[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack[w] = False
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1 or v in jumps[v]:
                    loops.append(component)
    return sorted(loops, key=min)
