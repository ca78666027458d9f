"""What one tick did, counted, for logs, the CLI and health."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime


@dataclass
class TickReport:
    now: datetime
    counts: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    #: units of work set aside (one line each: which, and what went wrong)
    problems: list[str] = field(default_factory=list)
    #: phases that failed as a whole (a bug, not one unit's fault): the tick went on without them
    errors: list[str] = field(default_factory=list)

    def add(self, key: str, n: int = 1) -> None:
        if n:
            self.counts[key] += n

    def merge(self, other: TickReport) -> None:
        self.counts.update(other.counts)
        self.seconds += other.seconds
        self.problems += other.problems
        self.errors += other.errors

    @property
    def ok(self) -> bool:
        """Every phase ran (units set aside are not a failed tick: the rest went on)."""
        return not self.errors

    def summary(self) -> str:
        order = ("requeued", "reconciled", "points_expired", "tier_down", "events", "stale", "enrolled", "exited",
                 "completed", "converted", "sent", "queued", "suppressed", "failed", "unknown", "retrying",
                 "quarantined", "paused")
        parts = [f"{key}={self.counts[key]}" for key in order if self.counts.get(key)]
        if self.errors:
            parts.append(f"errors={len(self.errors)}")
        return " ".join(parts) or "nothing to do"
