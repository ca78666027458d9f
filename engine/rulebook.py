"""Loading everything under rules/ (journeys, segments, loyalty) and checking it against templates/.

``load_rulebook`` never raises on bad rules: it returns what is valid plus
every problem found, so ``validate`` can print them all and the daemon can
keep running the last good version of a broken journey.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import conditions as cond
from engine import loyalty as loyalty_mod
from engine.conditions import Condition
from engine.journey import CHANNELS, IfStep, Journey, parse_journey
from engine.loyalty import Loyalty
from engine.problems import Problem, Problems, did_you_mean
from engine.templates import Templates
from engine.yamlsrc import UNKNOWN, Mark, YamlSyntaxError, YMap, load_yaml, snippet

SEGMENT_KEYS = ("name", "description", "condition")


@dataclass(frozen=True)
class Segment:
    name: str
    condition: Condition
    raw: Any  # the condition as plain data, snapshotted into journey versions
    description: str = ""
    mark: Mark = UNKNOWN


@dataclass
class Rulebook:
    journeys: dict[str, Journey] = field(default_factory=dict)
    segments: dict[str, Segment] = field(default_factory=dict)
    loyalty: Loyalty = loyalty_mod.DEFAULT
    problems: list[Problem] = field(default_factory=list)
    broken_files: set[str] = field(default_factory=set)  # journey files that did not load

    @property
    def segment_conditions(self) -> dict[str, Condition]:
        return {name: s.condition for name, s in self.segments.items()}

    def ok(self) -> bool:
        return not self.problems


def _read(path: Path, problems: Problems) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        problems.add(Mark(1, 1), "file is not UTF-8 text; save it as UTF-8")
        return None
    try:
        return load_yaml(text)
    except YamlSyntaxError as exc:
        problems.add(exc.mark, f"{exc.message}\n{snippet(text, exc.mark.line)}")
        return None


def _parse_segments(path: Path, problems: Problems) -> dict[str, Segment]:
    data = _read(path, problems)
    if data is None:
        return {}
    if not isinstance(data, dict) or set(data) - {"segments"}:
        extra = [k for k in data if k != "segments"] if isinstance(data, dict) else []
        mark = data.key_mark(extra[0]) if extra and isinstance(data, YMap) else getattr(data, "mark", UNKNOWN)
        problems.add(mark, "segments.yaml must hold one key, segments:, mapping names to {condition: ...}"
                     + (f"; unknown key {extra[0]!r}{did_you_mean(extra[0], ['segments'])}" if extra else ""))
        return {}
    raw_segments = data.get("segments") or {}
    if not isinstance(raw_segments, dict):
        problems.add(_value_mark(data, "segments"), "segments: must map segment names to {condition: ...}")
        return {}
    out: dict[str, Segment] = {}
    for name, raw in raw_segments.items():
        mark = raw_segments.key_mark(name) if isinstance(raw_segments, YMap) else UNKNOWN
        if not isinstance(raw, dict):
            problems.add(mark, f"segment {name!r} must be a mapping with condition:")
            continue
        bad = [k for k in raw if k not in SEGMENT_KEYS]
        for key in bad:
            problems.add(raw.key_mark(key) if isinstance(raw, YMap) else mark,
                         f"unknown key {key!r} in segment {name!r}{did_you_mean(key, SEGMENT_KEYS)}")
        if "condition" not in raw:
            if not difflib.get_close_matches("condition", [str(k) for k in bad], n=1, cutoff=0.6):
                problems.add(mark, f"segment {name!r} has no condition:; add one under it, "
                                   "e.g. condition: {tier: {in: [gold, diamond]}}")
            continue
        condition = cond.parse(raw["condition"], _value_mark(raw, "condition"), problems,
                               f"segments.{name}.condition")
        if condition is not None and not bad:
            description = raw.get("description") or raw.get("name") or ""
            out[str(name)] = Segment(str(name), condition, _plain(raw["condition"]), str(description), mark)
    return out


def _value_mark(data: Any, key: str) -> Mark:
    return data.value_mark(key) if isinstance(data, YMap) else UNKNOWN


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _declared_segments(path: Path) -> set[str]:
    """Segment names written in segments.yaml, including ones that failed to load."""
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except (YamlSyntaxError, UnicodeDecodeError):
        return set()
    raw = data.get("segments") if isinstance(data, dict) else None
    return {str(name) for name in raw} if isinstance(raw, dict) else set()


def _unknown_segment(name: str, segments: dict[str, Segment], declared: set[str]) -> str:
    if name in declared:
        return f"segment {name!r} has problems of its own in rules/segments.yaml; fix those first"
    return (f"unknown segment {name!r}{did_you_mean(name, declared | set(segments))}"
            " (segments are defined in rules/segments.yaml)")


def _segment_cycles(segments: dict[str, Segment], problems: Problems, declared: set[str]) -> None:
    graph = {name: [r.name for r in cond.segment_refs(s.condition)] for name, s in segments.items()}
    for name, segment in segments.items():
        for ref in cond.segment_refs(segment.condition):
            if ref.name not in segments:
                problems.add(ref.mark, f"in segment {name!r}: {_unknown_segment(ref.name, segments, declared)}")
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                cycle = " → ".join([*path[path.index(nxt):], nxt]) if nxt in path else f"{node} → {nxt}"
                problems.add(segments[nxt].mark, f"segments refer to each other in a cycle: {cycle}; "
                             "a segment cannot contain itself, remove one of these segment: references")
            elif nxt in graph and state.get(nxt) is None:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in graph:
        if state.get(name) is None:
            visit(name, [name])


def referenced_segments(condition: Condition, segments: dict[str, Segment]) -> dict[str, Any]:
    """Every segment CONDITION uses, directly or through other segments, as plain data."""
    out: dict[str, Any] = {}
    todo = [r.name for r in cond.segment_refs(condition)]
    while todo:
        name = todo.pop()
        if name in out or name not in segments:
            continue
        out[name] = segments[name].raw
        todo.extend(r.name for r in cond.segment_refs(segments[name].condition))
    return out


def journey_conditions(journey: Journey) -> list[Condition]:
    found: list[Condition] = []
    trigger = journey.trigger
    for candidate in (getattr(trigger, "where", None), getattr(trigger, "condition", None)):
        if candidate is not None:
            found.append(candidate)
    if journey.exit_when is not None:
        found += [c for c in (journey.exit_when.where, journey.exit_when.condition) if c is not None]
    if journey.goal is not None and journey.goal.where is not None:
        found.append(journey.goal.where)
    found += [s.condition for s in journey.steps if isinstance(s, IfStep)]
    return found


def snapshot(journey: Journey, segments: dict[str, Segment]) -> tuple[dict[str, Any], str]:
    """The journey's stored definition (with the segments it uses) and its checksum."""
    used: dict[str, Any] = {}
    for condition in journey_conditions(journey):
        used.update(referenced_segments(condition, segments))
    definition = {"journey": journey.definition, "segments": dict(sorted(used.items()))}
    blob = json.dumps(definition, sort_keys=True, ensure_ascii=False, default=str)
    return definition, hashlib.sha256(blob.encode()).hexdigest()


def journey_from_definition(definition: dict[str, Any], source: str) -> Journey:
    """Rebuild a stored journey version; it was valid when stored, so problems here are bugs."""
    problems = Problems(source)
    segments: dict[str, Segment] = {}
    for name, raw in definition.get("segments", {}).items():
        parsed = cond.parse(raw, UNKNOWN, problems, f"segments.{name}")
        if parsed is not None:
            segments[name] = Segment(name, parsed, raw)
    journey = parse_journey(definition["journey"], problems, source)
    if journey is None:
        raise ValueError(f"stored journey version from {source} no longer parses: {problems.items}")
    return journey


def stored_segments(definition: dict[str, Any]) -> dict[str, Condition]:
    out: dict[str, Condition] = {}
    problems = Problems("(stored)")
    for name, raw in definition.get("segments", {}).items():
        parsed = cond.parse(raw, UNKNOWN, problems, f"segments.{name}")
        if parsed is not None:
            out[name] = parsed
    return out


def _raw_segment_refs(value: Any) -> list[tuple[str, Mark]]:
    """Every `segment: NAME` in a condition as written, whether or not the rest of it parsed."""
    found: list[tuple[str, Mark]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "segment" and isinstance(item, str):
                found.append((item, value.value_mark(key) if isinstance(value, YMap) else UNKNOWN))
            else:
                found.extend(_raw_segment_refs(item))
    elif isinstance(value, list):
        for item in value:
            found.extend(_raw_segment_refs(item))
    return found


def _check_journey_refs(data: Any, segments: dict[str, Segment], declared: set[str], templates: Templates | None,
                        problems: Problems) -> None:
    """Segments and templates a journey names; checked from the file as written, so that they are
    reported together with any other mistake in the same journey."""
    if not isinstance(data, dict):
        return
    steps = data.get("steps")
    raw_steps: list[Any] = steps if isinstance(steps, list) else []
    places = [data.get("trigger"), data.get("exit_when"), data.get("goal"),
              *(raw.get("if") for raw in raw_steps if isinstance(raw, dict))]
    for name, mark in _raw_segment_refs(places):
        if name not in segments:
            problems.add(mark, _unknown_segment(name, segments, declared))
    if templates is None:
        return
    for raw in raw_steps:
        if not isinstance(raw, dict) or raw.get("send") not in CHANNELS:
            continue
        template, channel, fallback = raw.get("template"), raw["send"], raw.get("fallback")
        if not isinstance(template, str) or not template.strip():
            continue
        mark = raw.value_mark("template") if isinstance(raw, YMap) else UNKNOWN
        for message in templates.check(template, channel):
            problems.add(mark, message)
        if fallback in CHANNELS and fallback != channel:
            for message in templates.check(template, fallback):
                problems.add(mark, f"fallback {fallback}: {message}")


def _check_tiers(data: Any, loyalty: Loyalty, problems: Problems) -> None:
    """`update: {tier: ...}` must name a tier of the loyalty programme."""
    steps = data.get("steps") if isinstance(data, dict) else None
    known = [t.id for t in loyalty.tiers]
    for raw in steps if isinstance(steps, list) else []:
        change = raw.get("update") if isinstance(raw, dict) else None
        tier = change.get("tier") if isinstance(change, dict) else None
        if isinstance(tier, str) and tier not in known:
            mark = change.value_mark("tier") if isinstance(change, YMap) else UNKNOWN
            problems.add(mark, f"unknown tier {tier!r}{did_you_mean(tier, known)} (tiers are defined in "
                         "rules/loyalty.yaml)")


def journey_files(rules_dir: Path) -> list[Path]:
    folder = rules_dir / "journeys"
    if not folder.is_dir():
        return []
    return sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])


def load_rulebook(rules_dir: Path, templates: Templates | None, extra_journeys: Iterable[Path] = (), *,
                  segments_path: Path | None = None, loyalty_path: Path | None = None) -> Rulebook:
    """Everything under RULES_DIR, plus EXTRA_JOURNEYS; the segments or loyalty file can be swapped for another."""
    book = Rulebook()
    all_problems: list[Problems] = []

    seg_path = segments_path or rules_dir / "segments.yaml"
    seg_problems = Problems(str(seg_path))
    declared: set[str] = set()
    if seg_path.exists():
        book.segments = _parse_segments(seg_path, seg_problems)
        declared = _declared_segments(seg_path) if seg_problems else set(book.segments)
        _segment_cycles(book.segments, seg_problems, declared)
    all_problems.append(seg_problems)

    loyalty_path = loyalty_path or rules_dir / "loyalty.yaml"
    if loyalty_path.exists():
        loyalty_problems = Problems(str(loyalty_path))
        data = _read(loyalty_path, loyalty_problems)
        if data is None and not loyalty_problems:
            loyalty_problems.add(Mark(1, 1), "loyalty.yaml is empty; list tiers: lowest first, or delete the file "
                                 "to use the built-in tiers")
        if data is not None:
            parsed = loyalty_mod.parse_loyalty(data, loyalty_problems)
            if parsed is not None:
                book.loyalty = parsed
        all_problems.append(loyalty_problems)

    seen: dict[str, str] = {}
    paths = list(dict.fromkeys([*journey_files(rules_dir), *extra_journeys]))
    for path in paths:
        problems = Problems(str(path))
        all_problems.append(problems)
        data = _read(path, problems)
        if data is None and not problems:
            problems.add(Mark(1, 1), "the file is empty (or only comments); a journey needs journey:, trigger: and "
                         "steps:, or delete the file")
        journey = parse_journey(data, problems, str(path)) if data is not None else None
        _check_journey_refs(data, book.segments, declared, templates, problems)
        _check_tiers(data, book.loyalty, problems)
        if journey is not None and journey.id in seen:
            problems.add(data.value_mark("journey"), f"journey id {journey.id!r} is also used by {seen[journey.id]}; "
                         "every journey needs its own id")
        if problems or journey is None:
            book.broken_files.add(str(path))
            continue
        seen[journey.id] = str(path)
        book.journeys[journey.id] = journey

    if templates is not None:
        book.problems.extend(templates.syntax_problems())
    for problems in all_problems:
        book.problems.extend(problems.items)
    return book
