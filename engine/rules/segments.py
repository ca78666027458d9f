"""rules/segments.yaml: named conditions, parsed with their positions, and checked as a graph (unknown names,
cycles, nesting too deep once segments are expanded)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from engine.rules import conditions as cond
from engine.rules.conditions import MAX_DEPTH, Condition
from engine.rules.problems import Problems
from engine.rules.yamlsrc import UNKNOWN, Mark, YMap

SEGMENT_KEYS = ("name", "description", "condition")


@dataclass(frozen=True)
class Segment:
    name: str
    condition: Condition
    raw: Any  # the condition as plain data, snapshotted into journey versions
    description: str = ""
    mark: Mark = UNKNOWN


def segment_names(data: Any) -> set[str]:
    """Segment names written in segments.yaml, including ones that fail to load."""
    raw = data.get("segments") if isinstance(data, dict) else None
    return {str(name) for name in raw} if isinstance(raw, dict) else set()


def parse_segments(data: Any, problems: Problems) -> tuple[dict[str, Segment], dict[str, cond.Nesting]]:
    """The segments that parse, and how each nests as written (for ``check_segment_graph``)."""
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


def unknown_segment(name: str, segments: dict[str, Segment], declared: set[str], problems: Problems) -> str:
    if name in declared:
        return f"segment {name!r} has problems of its own in rules/segments.yaml; fix those first"
    return (f"unknown segment {name!r}{problems.suggest(name, declared | set(segments))}"
            " (segments are defined in rules/segments.yaml)")


def check_segment_graph(segments: dict[str, Segment], nestings: dict[str, cond.Nesting], problems: Problems,
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
                             f"{unknown_segment(ref.name, segments, declared, problems)}")
                unusable.add(name)
    unusable |= _segment_cycles(graph, segments, problems)
    depths = _segment_depths(graph, nestings, unusable)
    for name, (_, refs) in nestings.items():
        for used, level, mark in refs:
            if used in depths and level + 1 + depths[used] > MAX_DEPTH and depths[used] <= MAX_DEPTH:
                # Reported where it crosses the limit; the segments that use this one are told below.
                problems.add(mark, f"in segment {name!r}: "
                             f"{too_deep(level + 1 + depths[used], used, depths[used])}")
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


def too_deep(through: int, ref: str, ref_depth: int) -> str:
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
