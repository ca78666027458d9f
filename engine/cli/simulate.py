"""Ticks over a window on a virtual clock: everything recorded carries the virtual time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timedelta

from engine.app import App
from engine.tick.report import TickReport


def clock(start: datetime, end: datetime, every: timedelta) -> Iterator[datetime]:
    """START, START+EVERY, … up to and including END."""
    if every <= timedelta(0):
        raise ValueError("--every must be longer than zero")
    if end < start:
        raise ValueError("--to must not be before --from")
    now = start
    while now <= end:
        yield now
        now += every


def simulate(app: App, start: datetime, end: datetime, every: timedelta,
             before_tick: Callable[[datetime], None] | None = None,
             after_tick: Callable[[TickReport], None] | None = None,
             stop: Callable[[], bool] = lambda: False) -> TickReport:
    total = TickReport(start)
    for now in clock(start, end, every):
        if stop():
            break
        if before_tick is not None:
            before_tick(now)
        report = app.tick(now, stop)
        if after_tick is not None:
            after_tick(report)
        total.merge(report)
    return total
