"""Whether the daemon is doing its job, for ``/healthz`` and ``/metrics``: not only "the database answers".

The daemon records every tick here (when, how long, whether it failed and why, how much work is quarantined).
``/healthz`` answers 503 with the reasons when the last tick failed, when no tick has succeeded for three
intervals, or when quarantined work grew in the last tick: a load balancer or an operator's probe then sees
what the log says, instead of ``ok`` while every tick fails.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from engine.tick.report import TickReport

#: ticks in a row without a success after which the daemon is unhealthy, even if none has failed outright
STALE_INTERVALS = 3


@dataclass
class TickHealth:
    """Shared by the daemon's thread (writes) and the HTTP service's (reads); every access holds the lock."""

    interval: float
    started_at: datetime
    #: messages settled by reconciliation, by (channel, outcome): the tick App's own counter
    reconciled: Counter[tuple[str, str]] = field(default_factory=Counter)
    ticks: int = 0
    failures: int = 0
    last_tick_at: datetime | None = None
    last_seconds: float | None = None
    last_error: str | None = None
    last_success_at: datetime | None = None
    quarantined: int | None = None
    quarantined_before: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, at: datetime, seconds: float, report: TickReport | None, error: str | None,
               quarantined: int | None) -> None:
        """One tick: REPORT when it ran to the end (its phases may still have failed), ERROR when it did not."""
        if error is None and report is not None and report.errors:
            error = "; ".join(report.errors)
        with self._lock:
            self.ticks += 1
            self.last_tick_at, self.last_seconds, self.last_error = at, seconds, error
            if error is None:
                self.last_success_at = at
            else:
                self.failures += 1
            if quarantined is not None:
                self.quarantined_before, self.quarantined = self.quarantined, quarantined

    def problems(self, now: datetime) -> list[str]:
        """Why the daemon is not healthy at NOW; empty when it is."""
        with self._lock:
            found = []
            if self.last_error is not None and self.last_tick_at is not None:
                found.append(f"the last tick (at {self.last_tick_at.isoformat(timespec='seconds')}) failed: "
                             f"{self.last_error}")
            since = self.last_success_at or self.started_at
            quiet = (now - since).total_seconds()
            if quiet > STALE_INTERVALS * self.interval:
                what = "no tick has succeeded" if self.last_success_at else "no tick has succeeded since the start"
                found.append(f"{what} for {quiet:.0f}s ({STALE_INTERVALS} intervals of {self.interval:g}s)")
            if (self.quarantined is not None and self.quarantined_before is not None
                    and self.quarantined > self.quarantined_before):
                found.append(f"quarantined work grew from {self.quarantined_before} to {self.quarantined} units in "
                             "the last tick (run.py log --status quarantined; run.py retry after a fix)")
            return found

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {"ticks": self.ticks, "failures": self.failures,
                    "last_tick_at": self.last_tick_at.isoformat() if self.last_tick_at else None,
                    "last_tick_seconds": round(self.last_seconds, 3) if self.last_seconds is not None else None,
                    "last_success_at": self.last_success_at.isoformat() if self.last_success_at else None,
                    "last_error": self.last_error, "quarantined": self.quarantined}


class HealthCollector:
    """The daemon's tick figures as Prometheus metrics (this process's; the database's figures are collected
    from the database, so that every daemon's and web process's numbers agree)."""

    def __init__(self, health: TickHealth) -> None:
        self.health = health

    def collect(self) -> Iterator[Metric]:
        h = self.health
        with h._lock:
            success = h.last_success_at.timestamp() if h.last_success_at else 0.0
            seconds, ticks, failures = h.last_seconds, h.ticks, h.failures
            reconciled = dict(h.reconciled)
        yield GaugeMetricFamily("engine_last_successful_tick_timestamp_seconds",
                                "When the last tick that ran all its phases ended (Unix time; 0: none yet)",
                                value=success)
        if seconds is not None:
            yield GaugeMetricFamily("engine_tick_duration_seconds", "How long the last tick took", value=seconds)
        yield CounterMetricFamily("engine_ticks", "Ticks run by this daemon", value=ticks)
        yield CounterMetricFamily("engine_tick_failures", "Ticks that failed or had a phase fail", value=failures)
        family = CounterMetricFamily("engine_reconciled_messages",
                                     "Messages in doubt settled by reconciliation with their channel",
                                     labels=["channel", "outcome"])
        for (channel, outcome), count in sorted(reconciled.items()):
            family.add_metric([channel, outcome], count)
        yield family
