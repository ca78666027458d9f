"""What one tick did, counted, for logs and the CLI."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime


@dataclass
class TickReport:
    now: datetime
    counts: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def add(self, key: str, n: int = 1) -> None:
        if n:
            self.counts[key] += n

    def merge(self, other: TickReport) -> None:
        self.counts.update(other.counts)
        self.seconds += other.seconds

    def summary(self) -> str:
        order = ("points_expired", "tier_down", "events", "stale", "enrolled", "exited", "completed", "converted",
                 "sent", "queued", "suppressed", "failed", "unknown")
        parts = [f"{key}={self.counts[key]}" for key in order if self.counts.get(key)]
        return " ".join(parts) or "nothing to do"
