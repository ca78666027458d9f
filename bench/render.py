"""Benchmark, not a test: microseconds to render one message of the repository's real templates.

    python bench/render.py [--repo PATH] [--messages N] [--runs R]

Each case renders N messages (members alternating zh-CN / en, tiers cycling) through ``Templates.render`` with
contexts made by ``engine.tick.context.ContextBuilder``, as the composer does; the figure is the fastest of R runs, in
microseconds per message. Building the contexts is timed apart ("context") and not included in the render figures.

``--repo`` imports the engine and reads rules/ and templates/ from another checkout (default: this one), so one
script compares two versions on the same machine:

    cd /work/base && /work/main/.venv/bin/python /work/main/bench/render.py --repo .
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

CASES = (  # (template, channel): the win-back email the 1M-member bench sends first, then one of each shape
    ("winback/first_touch", "email"),   # no loop; `join` filter, `date` and `number`
    ("winback/sms_offer", "sms"),       # no loop, one variable
    ("birthday/offer", "email"),        # if/elif, `money` and `discount`
    ("welcome/welcome_email", "email"),  # an html part with a loop over the tier's perks
    ("tier_upgrade/congrats", "email"),  # a loop over the perks in the text part
)
TIERS = ("regular", "silver", "gold", "diamond")
NOW = datetime(2026, 6, 15, 4, 0, tzinfo=UTC)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    repo = args.repo.resolve()
    sys.path.insert(0, str(repo))

    import engine.rules.templates
    from engine.rules.rulebook import load_rulebook
    from engine.rules.templates import Templates
    from engine.tick.context import MEMBER_COLUMNS, ContextBuilder

    loyalty = load_rulebook(repo / "rules", None).loyalty
    templates = Templates(repo / "templates", "zh-CN")
    contexts = ContextBuilder(loyalty, "zh-CN", "Asia/Shanghai", computed=[])
    members = [_member(i, MEMBER_COLUMNS) for i in range(args.messages)]
    journey = {"id": "bench", "name": "bench", "version": 1}

    started = time.perf_counter()
    built = [contexts.build(m, NOW, journey, None, f"https://crm.example.com/unsubscribe/{m['id']}")
             for m in members]
    context_us = (time.perf_counter() - started) / len(members) * 1e6
    print(f"{engine.rules.templates.__file__}; {args.messages:,} messages per run, fastest of {args.runs} runs")
    print(f"  {'context (ContextBuilder.build)':44} {context_us:7.2f} µs/message")
    for name, channel in CASES:
        pairs = [(m.get("locale"), c) for m, c in zip(members, built, strict=True)]
        for locale, context in pairs[:8]:  # compile and cache before timing
            templates.render(name, channel, locale, context)
        best = float("inf")
        for _ in range(args.runs):
            gc.collect()
            started = time.perf_counter()
            for locale, context in pairs:
                templates.render(name, channel, locale, context)
            best = min(best, time.perf_counter() - started)
        print(f"  {name + ' (' + channel + ')':44} {best / len(pairs) * 1e6:7.2f} µs/message")


def _member(i: int, columns: tuple[str, ...]) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(columns)
    row.update(id=f"m{i}", name=f"会员{i}" if i % 2 else f"Member {i}", email=f"m{i}@example.com",
               timezone="Asia/Shanghai", locale="zh-CN" if i % 2 else "en", tier=TIERS[i % len(TIERS)],
               points=(i * 37) % 20_000, total_spend=float((i * 113) % 150_000),
               last_order_at=NOW - timedelta(days=90 + i % 300), email_opt_in=True, sms_opt_in=True, attributes={})
    return row


if __name__ == "__main__":
    main()
