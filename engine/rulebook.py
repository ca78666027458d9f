"""Loading everything under rules/ (journeys, segments, loyalty) and checking it against templates/.

``load_rulebook`` never raises on bad rules: it returns what is valid plus
every problem found, so ``validate`` can print them all and the daemon can
keep running the last good version of a broken journey. Whatever a file holds
(see the limits in engine/yamlsrc.py, engine/durations.py, engine/conditions.py
and engine/journey.py), and even if checking it hits a bug in the engine, the
outcome is problems for that file alone: the other files still load.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import conditions as cond
from engine import loyalty as loyalty_mod
from engine.conditions import MAX_DEPTH, Condition
from engine.journey import CHANNELS, IfStep, Journey, parse_journey
from engine.loyalty import Loyalty
from engine.problems import Problem, Problems, shown
from engine.templates import Templates
from engine.yamlsrc import MAX_BYTES, UNKNOWN, Mark, YamlSyntaxError, YMap, load_yaml, snippet

log = logging.getLogger(__name__)

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


def _segment_names(data: Any) -> set[str]:
    """Segment names written in segments.yaml, including ones that fail to load."""
    raw = data.get("segments") if isinstance(data, dict) else None
    return {str(name) for name in raw} if isinstance(raw, dict) else set()


def _parse_segments(data: Any, problems: Problems) -> tuple[dict[str, Segment], dict[str, cond.Nesting]]:
    """The segments that parse, and how each nests as written (for ``_check_segment_graph``)."""
    nestings: dict[str, cond.Nesting] = {}
    if data is None:
        return {}, nestings
    if not isinstance(data, dict) or set(data) - {"segments"}:
        extra = [k for k in data if k != "segments"] if isinstance(data, dict) else []
        mark = data.key_mark(extra[0]) if extra and isinstance(data, YMap) else getattr(data, "mark", UNKNOWN)
        problems.add(mark, "segments.yaml must hold one key, segments:, mapping names to {condition: ...}"
                     + (f"; unknown key {extra[0]!r}{problems.suggest(extra[0], ['segments'])}" if extra else ""))
        return {}, nestings
    raw_segments = data.get("segments") or {}
    if not isinstance(raw_segments, dict):
        problems.add(_value_mark(data, "segments"), "segments: must map segment names to {condition: ...}")
        return {}, nestings
    out: dict[str, Segment] = {}
    for name, raw in raw_segments.items():
        mark = raw_segments.key_mark(name) if isinstance(raw_segments, YMap) else UNKNOWN
        if not isinstance(raw, dict):
            problems.add(mark, f"segment {name!r} must be a mapping with condition:")
            continue
        bad = [k for k in raw if k not in SEGMENT_KEYS]
        for key in bad:
            problems.add(raw.key_mark(key) if isinstance(raw, YMap) else mark,
                         f"unknown key {key!r} in segment {name!r}{problems.suggest(key, SEGMENT_KEYS)}")
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
            nestings[str(name)] = cond.nesting(raw["condition"])
    return out, nestings


def _value_mark(data: Any, key: str) -> Mark:
    return data.value_mark(key) if isinstance(data, YMap) else UNKNOWN


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _unknown_segment(name: str, segments: dict[str, Segment], declared: set[str], problems: Problems) -> str:
    if name in declared:
        return f"segment {name!r} has problems of its own in rules/segments.yaml; fix those first"
    return (f"unknown segment {name!r}{problems.suggest(name, declared | set(segments))}"
            " (segments are defined in rules/segments.yaml)")


def _check_segment_graph(segments: dict[str, Segment], nestings: dict[str, cond.Nesting], problems: Problems,
                         declared: set[str]) -> tuple[set[str], dict[str, int]]:
    """Unknown references, cycles and nesting too deep between segments. Returns the segments that cannot be used
    (those, and every segment that uses one of them: the rulebook leaves them out, so nothing evaluates them),
    and how deep each segment nests counting the segments it uses (see ``cond.MAX_DEPTH``)."""
    graph = {name: [r.name for r in cond.segment_refs(s.condition)] for name, s in segments.items()}
    unusable: set[str] = set()
    for name, segment in segments.items():
        for ref in cond.segment_refs(segment.condition):
            if ref.name not in segments:
                problems.add(ref.mark, f"in segment {name!r}: "
                             f"{_unknown_segment(ref.name, segments, declared, problems)}")
                unusable.add(name)
    unusable |= _segment_cycles(graph, segments, problems)
    depths = _segment_depths(graph, nestings, unusable)
    for name, (_, refs) in nestings.items():
        for used, level, mark in refs:
            if used in depths and level + 1 + depths[used] > MAX_DEPTH and depths[used] <= MAX_DEPTH:
                # Reported where it crosses the limit; the segments that use this one are told below.
                problems.add(mark, f"in segment {name!r}: "
                             f"{_too_deep(level + 1 + depths[used], used, depths[used])}")
                unusable.add(name)
    # Everything that uses an unusable segment, however indirectly, is unusable too, and says why.
    users: dict[str, list[tuple[str, Mark]]] = {}
    for name, segment in segments.items():
        for ref in cond.segment_refs(segment.condition):
            users.setdefault(ref.name, []).append((name, ref.mark))
    todo = list(unusable)
    while todo:
        broken = todo.pop()
        for user, mark in users.get(broken, []):
            if user not in unusable:
                problems.add(mark, f"in segment {user!r}: segment {broken!r} has problems of its own; fix those "
                             "first")
                unusable.add(user)
                todo.append(user)
    return unusable, depths


def _too_deep(through: int, ref: str, ref_depth: int) -> str:
    return (f"conditions must nest all:, any:, not: and segment: at most {MAX_DEPTH} levels deep, counting the "
            f"segments they use, got: {through} levels through segment {ref!r} here (which itself nests "
            f"{ref_depth}); simplify the condition or the segment")


def _segment_cycles(graph: dict[str, list[str]], segments: dict[str, Segment], problems: Problems) -> set[str]:
    """Each cycle a depth-first search meets, reported where it closes; returns the segments on those cycles
    (at least one of every cycle). Iterative, and linear: a chain of segments may be long."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    on_cycles: set[str] = set()
    for root in graph:
        if root in state:
            continue
        path, at = [root], {root: 0}
        state[root] = 1
        work = [(root, iter(graph[root]))]
        while work:
            node, targets = work[-1]
            nxt = next(targets, None)
            if nxt is None:
                work.pop()
                state[node] = 2
                del at[path.pop()]
            elif state.get(nxt) == 1:
                cycle = [*path[at[nxt]:], nxt]
                on_cycles.update(cycle)
                named = cycle if len(cycle) <= 12 else [*cycle[:5], f"… {len(cycle) - 1} segments …", *cycle[-5:]]
                problems.add(segments[nxt].mark, f"segments refer to each other in a cycle: {' → '.join(named)}; "
                             "a segment cannot contain itself, remove one of these segment: references")
            elif nxt in graph and nxt not in state:
                state[nxt] = 1
                at[nxt] = len(path)
                path.append(nxt)
                work.append((nxt, iter(graph[nxt])))
    return on_cycles


def _segment_depths(graph: dict[str, list[str]], nestings: dict[str, cond.Nesting], skip: set[str]) -> dict[str, int]:
    """How deep each segment nests, counting each segment: as one level plus the depth of that segment.
    Post-order without recursion; references to SKIP (cycles, unknown segments) count as nothing."""
    depths: dict[str, int] = {}
    entered: set[str] = set()
    for root in graph:
        work = [(root, False)]
        while work:
            name, ready = work.pop()
            if name in depths:
                continue
            if not ready:
                if name in entered:  # still on the stack: a cycle, reported by _segment_cycles
                    continue
                entered.add(name)
                work.append((name, True))
                work.extend((r, False) for r, _, _ in nestings[name][1] if r in graph and r not in skip)
                continue
            deepest, refs = nestings[name]
            depths[name] = max([deepest, *(level + 1 + depths[r] for r, level, _ in refs if r in depths)])
    return depths


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
            problems.add(mark, _unknown_segment(name, segments, declared, problems))
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
                problems.add(mark, _too_deep(level + 1 + depths[ref], ref, depths[ref]))


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
            declared = _segment_names(data)
            segments, nestings = _parse_segments(data, seg_problems)
            unusable, depths = _check_segment_graph(segments, nestings, seg_problems, declared)
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
