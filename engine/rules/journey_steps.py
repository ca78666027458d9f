"""Parsing a journey's steps (send, wait, if, split, update, end) with their positions, and the parse context
engine.rules.journey_parse and engine.rules.journey_graph share."""

from __future__ import annotations

import re
from datetime import time, timedelta
from typing import Any

from engine.rules import conditions as cond
from engine.rules.conditions import Condition
from engine.rules.durations import parse_duration
from engine.rules.journey import (
    CHANNELS,
    HHMM,
    MAX_ID,
    MAX_POINTS,
    MAX_TEMPLATE,
    MAX_TIER_ID,
    STEP_ID,
    EndStep,
    IfStep,
    SendStep,
    SplitStep,
    Step,
    UpdateStep,
    Variant,
    WaitStep,
)
from engine.rules.problems import Problems, shown
from engine.rules.yamlsrc import UNKNOWN, Mark, YMap

_MISSING_HINTS = {
    "journey": "; add journey: followed by an id such as welcome_series",
    "trigger": "; add trigger: with one of event:, segment: or date:",
    "steps": "; add steps: with at least one step such as - {id: first_touch, send: email, template: ...}",
}


class ParseContext:
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


def id_suggestion(value: Any) -> str:
    if not isinstance(value, str):
        return ""
    fixed = re.sub(r"[^a-z0-9]+", "_", value.strip().lower()).strip("_")[:MAX_ID].strip("_")
    return f"; for example {fixed!r}" if fixed else ""


def plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def hhmm(ctx: ParseContext, data: Any, key: str, where: str) -> time | None:
    value = data.get(key)
    match = HHMM.match(value) if isinstance(value, str) else None
    if match is None:
        ctx.add(vmark(data, key), f'{where}.{key} must be a quoted 24-hour time such as "10:00", got: {value!r}')
        return None
    return time(int(match.group(1)), int(match.group(2)))


STEP_KINDS = ("send", "wait", "if", "split", "update", "end")


_STEP_KEYS = {
    "send": ("id", "send", "template", "fallback"),
    "wait": ("id", "wait", "then", "timeout_then"),
    "if": ("id", "if", "then", "else"),
    "split": ("id", "split", "holdout"),
    "update": ("id", "update"),
    "end": ("id", "end"),
}


TARGET_KEYS = ("then", "else", "timeout_then")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def parse_steps(ctx: ParseContext, data: Any, mark: Mark) -> list[Step]:
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
        kinds = [k for k in STEP_KINDS if k in raw]
        if len(kinds) != 1:
            found = f" (found {', '.join(kinds)})" if kinds else ""
            unknown = [k for k in raw if k not in {k for v in _STEP_KEYS.values() for k in v}]
            hint = "".join(f"; unknown key {k!r}{ctx.problems.suggest(k, STEP_KINDS)}" for k in unknown)
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


def _step(ctx: ParseContext, kind: str, step_id: str, raw: Any, where: str) -> Step | None:
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


def _wait(ctx: ParseContext, step_id: str, raw: Any, where: str) -> WaitStep | None:
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
    at = hhmm(ctx, value, "until", f"{where}.wait")
    days = value.get("weekdays", [])
    if not isinstance(days, list) or (not days and "weekdays" in value) or any(d not in WEEKDAYS for d in days):
        ctx.add(vmark(value, "weekdays"), f"{where}.wait.weekdays must be a list of {', '.join(WEEKDAYS)}, "
                f"got: {days!r}")
        return None
    return WaitStep(step_id, until=at, weekdays=tuple(WEEKDAYS.index(d) for d in days)) if at else None


def _split(ctx: ParseContext, step_id: str, raw: Any, where: str) -> SplitStep | None:
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


def _update(ctx: ParseContext, step_id: str, raw: Any, where: str) -> UpdateStep | None:
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
