"""Loading everything under rules/ (journeys, segments, loyalty) and checking it against templates/.

``load_rulebook`` never raises on bad rules: it returns what is valid plus
every problem found, so ``validate`` can print them all and the daemon can
keep running the last good version of a broken journey. Whatever a file holds
(see the limits in engine/rules/yamlsrc.py, engine/rules/durations.py, engine/rules/conditions.py
and engine/rules/journey.py), and even if checking it hits a bug in the engine, the
outcome is problems for that file alone: the other files still load.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.rules import conditions as cond
from engine.rules import loyalty as loyalty_mod
from engine.rules.conditions import MAX_DEPTH, Condition
from engine.rules.journey import CHANNELS, IfStep, Journey
from engine.rules.journey_parse import parse_journey
from engine.rules.loyalty import Loyalty
from engine.rules.problems import Problem, Problems, shown
from engine.rules.segments import (
    Segment,
    check_segment_graph,
    parse_segments,
    segment_names,
    too_deep,
    unknown_segment,
)
from engine.rules.templates import Templates
from engine.rules.yamlsrc import MAX_BYTES, UNKNOWN, Mark, YamlSyntaxError, YMap, load_yaml, snippet

log = logging.getLogger(__name__)


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
    # At most MAX_BYTES + 1 bytes are read: a file too large is refused without holding it all in memory.
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_BYTES + 1)
    except OSError as exc:
        problems.add(Mark(1, 1), f"the file could not be read ({exc.strerror or exc}); check that it is a file "
                     "you may read")
        return None
    if len(raw) > MAX_BYTES:
        problems.add(Mark(1, 1), f"a rules file must be at most {MAX_BYTES // 1024:,} KiB, got: "
                     f"{path.stat().st_size:,} bytes; split it into smaller files (one journey per file)")
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        problems.add(Mark(1, 1), "file is not UTF-8 text; save it as UTF-8")
        return None
    try:
        return load_yaml(text)
    except YamlSyntaxError as exc:
        problems.add(exc.mark, f"{exc.message}\n{snippet(text, exc.mark.line, col=exc.mark.col)}")
        return None


def _could_not_check(problems: Problems, exc: Exception) -> None:
    """A bug in the engine met while checking one file: a problem for that file, never a crash of the others."""
    # The traceback is for whoever fixes the engine: in the log at debug level (`--debug` shows it), never in the
    # marketer's `validate` output, which gets the one line below.
    log.debug("%s could not be checked", problems.file, exc_info=exc)
    problems.add(Mark(1, 1), f"this file could not be checked: {type(exc).__name__}: {exc}; this is a bug in the "
                 "engine — please report it")


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
        parsed = cond.parse(raw, UNKNOWN, problems, f"segments.{name}", stored=True)
        if parsed is not None:
            segments[name] = Segment(name, parsed, raw)
    # stored=True: the limits added after a version was stored must not stop it from running.
    journey = parse_journey(definition["journey"], problems, source, stored=True)
    if journey is None:
        raise ValueError(f"stored journey version from {source} no longer parses: {problems.items}")
    return journey


def stored_segments(definition: dict[str, Any]) -> dict[str, Condition]:
    out: dict[str, Condition] = {}
    problems = Problems("(stored)")
    for name, raw in definition.get("segments", {}).items():
        parsed = cond.parse(raw, UNKNOWN, problems, f"segments.{name}", stored=True)
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
            problems.add(mark, unknown_segment(name, segments, declared, problems))
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
    ids = set(known)
    for raw in steps if isinstance(steps, list) else []:
        change = raw.get("update") if isinstance(raw, dict) else None
        tier = change.get("tier") if isinstance(change, dict) else None
        if isinstance(tier, str) and tier not in ids:
            mark = change.value_mark("tier") if isinstance(change, YMap) else UNKNOWN
            problems.add(mark, f"unknown tier {shown(tier)}{problems.suggest(tier, known)} (tiers are defined in "
                         "rules/loyalty.yaml)")


def _check_journey_depth(data: Any, depths: dict[str, int], problems: Problems) -> None:
    """Each condition of the journey, with the segments it uses, nests at most MAX_DEPTH levels."""
    if not isinstance(data, dict):
        return
    roots: list[Any] = []
    for key in ("trigger", "exit_when", "goal"):
        part = data.get(key)
        if isinstance(part, dict):
            # `segment: NAME` is read as a condition naming a segment; an inline `segment:` is a condition.
            roots += [part.get("where"), part if isinstance(part.get("segment"), str) else part.get("segment")]
    steps = data.get("steps")
    roots += [raw.get("if") for raw in steps if isinstance(raw, dict)] if isinstance(steps, list) else []
    for root in roots:
        for ref, level, mark in cond.nesting(root)[1]:
            if ref in depths and level + 1 + depths[ref] > MAX_DEPTH:
                problems.add(mark, too_deep(level + 1 + depths[ref], ref, depths[ref]))


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
    depths: dict[str, int] = {}
    if seg_path.exists():
        try:
            data = _read(seg_path, seg_problems)
            declared = segment_names(data)
            segments, nestings = parse_segments(data, seg_problems)
            unusable, depths = check_segment_graph(segments, nestings, seg_problems, declared)
            book.segments = {name: s for name, s in segments.items() if name not in unusable}
        except Exception as exc:  # noqa: BLE001 - one file's failure must not stop the others from loading
            _could_not_check(seg_problems, exc)
            book.segments, depths = {}, {}
    all_problems.append(seg_problems)

    loyalty_path = loyalty_path or rules_dir / "loyalty.yaml"
    if loyalty_path.exists():
        loyalty_problems = Problems(str(loyalty_path))
        try:
            book.loyalty = _load_loyalty(loyalty_path, loyalty_problems)
        except Exception as exc:  # noqa: BLE001 - the built-in programme stays, as for any other problem
            _could_not_check(loyalty_problems, exc)
        all_problems.append(loyalty_problems)

    depths = {name: depth for name, depth in depths.items() if name in book.segments}
    seen: dict[str, str] = {}
    paths = list(dict.fromkeys([*journey_files(rules_dir), *extra_journeys]))
    for path in paths:
        problems = Problems(str(path))
        all_problems.append(problems)
        try:
            journey = _load_journey(path, book, declared, depths, templates, seen, problems)
        except Exception as exc:  # noqa: BLE001 - the file is broken like any other; the others still load
            _could_not_check(problems, exc)
            journey = None
        if problems or journey is None:
            book.broken_files.add(str(path))
            continue
        seen[journey.id] = str(path)
        book.journeys[journey.id] = journey

    if templates is not None:
        try:
            book.problems.extend(templates.syntax_problems())
        except Exception as exc:  # noqa: BLE001 - the rules are still checked and loaded
            template_problems = Problems(str(templates.root))
            _could_not_check(template_problems, exc)
            all_problems.append(template_problems)
    for problems in all_problems:
        book.problems.extend(problems.items)
    return book


def _load_loyalty(path: Path, problems: Problems) -> Loyalty:
    """The programme in PATH, or the built-in one when it has problems."""
    data = _read(path, problems)
    if data is None and not problems:
        problems.add(Mark(1, 1), "loyalty.yaml is empty; list tiers: lowest first, or delete the file to use the "
                     "built-in tiers")
    parsed = loyalty_mod.parse_loyalty(data, problems) if data is not None else None
    return parsed if parsed is not None else loyalty_mod.DEFAULT


def _load_journey(path: Path, book: Rulebook, declared: set[str], depths: dict[str, int],
                  templates: Templates | None, seen: dict[str, str], problems: Problems) -> Journey | None:
    """The journey in PATH checked against the rest of the rules; None (with problems) if it has any."""
    data = _read(path, problems)
    if data is None and not problems:
        problems.add(Mark(1, 1), "the file is empty (or only comments); a journey needs journey:, trigger: and "
                     "steps:, or delete the file")
    journey = parse_journey(data, problems, str(path)) if data is not None else None
    _check_journey_refs(data, book.segments, declared, templates, problems)
    _check_tiers(data, book.loyalty, problems)
    _check_journey_depth(data, depths, problems)
    if journey is not None and journey.id in seen:
        problems.add(data.value_mark("journey"), f"journey id {journey.id!r} is also used by {seen[journey.id]}; "
                     "every journey needs its own id")
    return journey
