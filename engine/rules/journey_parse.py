"""Parsing a journey's YAML into the model of engine.rules.journey.

Parsing collects every problem (FILE:LINE:COL with a fix) instead of stopping
at the first; a journey with problems is never returned half-built.
"""

from __future__ import annotations

import re
from typing import Any

from engine.domain.attributes import DATE_ATTRIBUTES
from engine.rules import conditions as cond
from engine.rules.durations import DurationTooLong, parse_duration
from engine.rules.journey import (
    JOURNEY_ID,
    MAX_ID,
    MAX_OFFSET_DAYS,
    STATUSES,
    DateTrigger,
    Entry,
    EventTrigger,
    ExitRule,
    Goal,
    Journey,
    SegmentTrigger,
    Trigger,
)
from engine.rules.journey_graph import check_graph, check_targets
from engine.rules.journey_steps import (
    ParseContext,
    hhmm,
    id_suggestion,
    kmark,
    parse_steps,
    plain,
    vmark,
)
from engine.rules.problems import Problems, shown
from engine.rules.yamlsrc import UNKNOWN, Mark

_TOP = ("journey", "name", "description", "status", "category", "trigger", "entry", "exit_when", "goal", "steps")


CATEGORIES = ("marketing", "transactional")


def parse_journey(data: Any, problems: Problems, source: str = "", *, stored: bool = False) -> Journey | None:
    """Build a Journey from parsed YAML; None (with problems added) if anything is wrong.

    STORED: DATA is a journey version stored in the database; it was valid when stored, so the limits added
    since (lengths, number and duration bounds, condition depth) do not apply to it.
    """
    ctx = ParseContext(problems, stored)
    before = len(problems.items)
    if _not_a_journey(ctx, data):
        return None
    if not ctx.keys(data, "the journey", _TOP, ("journey", "trigger", "steps")) and not isinstance(data, dict):
        return None
    journey_id = data.get("journey")
    if "journey" in data and (not isinstance(journey_id, str) or not JOURNEY_ID.match(journey_id)):
        ctx.add(vmark(data, "journey"), f"journey id must use only a-z, 0-9 and _, got: {shown(journey_id)}"
                f"{id_suggestion(journey_id)}")
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
    steps = parse_steps(ctx, data.get("steps"), vmark(data, "steps")) if "steps" in data else []
    check_targets(ctx, data.get("steps"))
    if len(problems.items) > before or trigger is None:
        return None
    journey = Journey(
        id=str(journey_id), name=str(name), status=str(status), trigger=trigger, entry=entry,
        steps=tuple(steps), exit_when=exit_rule, goal=goal, source=source, category=str(category),
        definition=plain(data),
    )
    check_graph(ctx, journey, data.get("steps"))
    return None if len(problems.items) > before else journey
_CONFIG_KEYS = {"database", "channels", "scheduler", "quiet_hours", "frequency_caps", "rules_dir", "templates_dir"}


def _not_a_journey(ctx: ParseContext, data: Any) -> bool:
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


def _trigger(ctx: ParseContext, data: Any, mark: Mark) -> Trigger | None:
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
    at = hhmm(ctx, data, "at", "trigger")
    offset = _offset(ctx, data) if "offset" in data else 0
    return None if at is None or offset is None else DateTrigger(str(attribute), at, offset)


def _offset(ctx: ParseContext, data: Any) -> int | None:
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


def _entry(ctx: ParseContext, data: Any) -> Entry:
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


def _exit(ctx: ParseContext, data: Any) -> ExitRule | None:
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


def _goal(ctx: ParseContext, data: Any) -> Goal | None:
    if not ctx.keys(data, "goal", ("event", "within", "where"), ("event", "within")):
        return None
    event = ctx.text(data, "event", "goal", MAX_ID)
    within = ctx.duration(data, "within", "goal")
    where = ctx.condition(data, "where", "goal", allow_event=True) if "where" in data else None
    if event is None or within is None:
        return None
    return Goal(event, within, where)
