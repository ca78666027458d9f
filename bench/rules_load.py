"""Benchmark, not a test: how long checking rules files takes, the large and the hostile ones.

    python bench/rules_load.py [--repeat N]

Each case writes one journey file (or segments.yaml) into a fresh temporary rules folder beside the
repository's segments.yaml and loyalty.yaml, then times ``validate_paths`` (what ``run.py validate`` does:
every rules file, the templates and config.yaml) and prints the best of N runs, the number of problems
found, and the peak of memory allocated by Python in one more run (tracemalloc). Nothing is asserted;
tests/test_rules_limits.py checks the behaviour, without timings.

Cases: journeys of 3,000 and 10,000 steps (a send, a wait and an if in turn); a journey whose condition nests
32 levels (the limit); a "billion laughs" file (ten levels of aliases, 10^10 values if expanded); a file of
100,000 nested lists; a valid journey of about 1 MiB (the size limit) and one just over it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.cli.validate import validate_paths  # noqa: E402 - the repository root is put on the path first

HEAD = "journey: bench\ntrigger: {event: signup}\nsteps:\n"
SEND = "  - id: hello\n    send: email\n    template: welcome/welcome_email\n"


def steps_journey(steps: int) -> str:
    lines = [HEAD.rstrip("\n")]
    for i in range(steps):
        if i % 3 == 0:
            lines += [f"  - id: s{i}", "    send: email", "    template: welcome/welcome_email"]
        elif i % 3 == 1:
            lines += [f"  - id: s{i}", "    wait: 1d"]
        else:
            lines += [f"  - id: s{i}", "    if: {tier: gold}", f"    then: s{max(0, i - 2)}",
                      f"    else: s{i + 1}" if i + 1 < steps else "    else: end"]
    return "\n".join(lines) + "\n"


def deep_condition(levels: int) -> str:
    condition = "{not: " * (levels - 1) + "{all: [{tier: gold}, {points: {gte: 5}}]}" + "}" * (levels - 1)
    return HEAD + f"  - id: c\n    if: {condition}\n    then: end\n" + SEND


def billion_laughs() -> str:
    return HEAD + SEND + "".join(
        f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 10 if i else ['"lol"'] * 10) + "]\n" for i in range(10))


def nested_lists(levels: int) -> str:
    return HEAD + SEND + "description: " + "[" * levels + "]" * levels + "\n"


def about_one_mebibyte(over: bool) -> str:
    """Send steps with a long description each, up to just under (or just over) 1 MiB."""
    text, i = HEAD, 0
    limit = 1024 * 1024 + (100 if over else -200)
    while len(text.encode()) < limit - 300:
        text += (f"  - id: s{i}\n    send: email\n    template: welcome/welcome_email\n"
                 f"  # {'x' * 200}\n")
        i += 1
    return text + "#" * max(0, limit - len(text.encode()) - 1) + "\n"


def run(name: str, build: Callable[[], str], repeat: int) -> None:
    text = build()
    best, problems, peak = float("inf"), [], 0
    for attempt in range(repeat + 1):
        root = Path(tempfile.mkdtemp(prefix="rules-bench-"))
        try:
            (root / "rules" / "journeys").mkdir(parents=True)
            for name_ in ("segments.yaml", "loyalty.yaml"):
                shutil.copyfile(REPO / "rules" / name_, root / "rules" / name_)
            (root / "rules" / "journeys" / "bench.yaml").write_text(text, encoding="utf-8")
            config = root / "config.yaml"
            config.write_text(f"rules_dir: rules\ntemplates_dir: {REPO / 'templates'}\n", encoding="utf-8")
            if attempt < repeat:  # timed runs
                started = time.perf_counter()
                problems, _ = validate_paths(str(config), None, True, ())
                best = min(best, time.perf_counter() - started)
            else:  # one more run for the memory peak: tracemalloc slows allocation down two or three times
                tracemalloc.start()
                validate_paths(str(config), None, True, ())
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
        finally:
            shutil.rmtree(root)
    first = problems[0].message.splitlines()[0][:90] if problems else ""
    print(f"{name:44s} {len(text.encode()) / 1024:8.0f} KiB {best:8.3f} s {peak / 2**20:7.1f} MiB "
          f"{len(problems):4d} problem(s)  {first}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the best is shown (default 3)")
    args = parser.parse_args()
    print(f"{'case':44s} {'size':>12s} {'validate':>10s} {'peak':>11s}  outcome (best of {args.repeat})")
    run("an empty journey file (the floor)", lambda: "", args.repeat)
    run("journey of 3,000 steps", lambda: steps_journey(3_000), args.repeat)
    run("journey of 10,000 steps", lambda: steps_journey(10_000), args.repeat)
    run("condition nested 32 levels (the limit)", lambda: deep_condition(32), args.repeat)
    run("condition nested 33 levels", lambda: deep_condition(33), args.repeat)
    run("billion laughs (10^10 values if expanded)", billion_laughs, args.repeat)
    run("100,000 nested lists", lambda: nested_lists(100_000), args.repeat)
    run("journey of about 1 MiB (valid)", lambda: about_one_mebibyte(over=False), args.repeat)
    run("journey just over 1 MiB", lambda: about_one_mebibyte(over=True), args.repeat)


if __name__ == "__main__":
    main()
