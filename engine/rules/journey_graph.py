"""A journey's step graph checked: every target names a step, every step is reachable, no loop without a wait."""

from __future__ import annotations

from typing import Any

from engine.rules.journey import (
    END,
    Journey,
    WaitStep,
)
from engine.rules.journey_steps import (
    STEP_KINDS,
    TARGET_KEYS,
    ParseContext,
    vmark,
)
from engine.rules.problems import shown
from engine.rules.yamlsrc import UNKNOWN, Mark


def _raw_step_ids(raw_steps: list[Any]) -> list[str]:
    """Step ids as written (or defaulted), so jumps can be checked even when a step is otherwise wrong."""
    ids = []
    for index, raw in enumerate(raw_steps):
        kinds = [k for k in STEP_KINDS if isinstance(raw, dict) and k in raw]
        if len(kinds) == 1:
            step_id = raw.get("id", f"{kinds[0]}_{index + 1}")
            if isinstance(step_id, str):
                ids.append(step_id)
    return ids


def check_targets(ctx: ParseContext, raw_steps: Any) -> None:
    if not isinstance(raw_steps, list):
        return
    ids = _raw_step_ids(raw_steps)
    known, choices = set(ids), [*ids, END]
    for index, raw in enumerate(raw_steps):
        if not isinstance(raw, dict):
            continue
        places = [(raw, key, f"steps[{index}].{key}") for key in TARGET_KEYS]
        if isinstance(raw.get("split"), list):
            places += [(item, "then", f"steps[{index}].split[{i}].then")
                       for i, item in enumerate(raw["split"]) if isinstance(item, dict)]
        for container, key, where in places:
            target = container.get(key)
            if isinstance(target, str) and target != END and target not in known:
                ctx.add(vmark(container, key), f"{where} names step {shown(target)}, which does not exist"
                        f"{ctx.problems.suggest(target, choices)}")


def check_graph(ctx: ParseContext, journey: Journey, raw_steps: Any) -> None:
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


def _check_loops(ctx: ParseContext, journey: Journey, marks: dict[int, Mark]) -> None:
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
