"""The loyalty programme's scheduled work, run at the start of every tick.

- points expiry (every tick): lots past ``expires_at`` become ``expire`` rows and ``points_expired`` events;
- tier reviews (every tick): members whose ``tier_review_at`` has come (engine.programme.tiers);
- member intelligence (every ``intelligence.refresh_every``): lifecycle, value, churn flags and RFM for
  everyone (engine.programme.intelligence).

Each task's row in ``programme_state`` records when it last ran and, locked for the task's transaction, keeps
two daemons from doing the same work (on SQLite only one daemon runs). Events recorded here are handled by the
same tick's event phase, so a ``tier_changed`` or ``points_expired`` journey starts at once.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from pathlib import Path

from engine.programme import intelligence, points, tiers
from engine.rules.loyalty import Loyalty
from engine.rules.rulebook import Rulebook
from engine.store import queries
from engine.store.database import Store
from engine.tick.report import TickReport

log = logging.getLogger(__name__)


class ProgrammePhase:
    def __init__(self, store: Store, rules_path: Path) -> None:
        self.store = store
        self.rules_path = rules_path

    def run(self, now: datetime, report: TickReport, book: Rulebook) -> None:
        path = str(self.rules_path / "loyalty.yaml")
        if any(p.file == path for p in book.problems):
            log.error("%s has problems: points expiry, tier reviews and member intelligence wait until it is fixed",
                      path)
            return
        loyalty = book.loyalty
        with self.store.begin() as conn:
            due, since = queries.claim_task(conn, "points_expiry", now, timedelta(0))
            if due and (since is None or since < now):
                report.add("points_expired", len(points.expire_due(conn, loyalty, since, now)))
        while True:
            with self.store.begin() as conn:
                reviewed, changes = tiers.review_due(conn, loyalty, now)
                if changes:
                    tiers.record_changes(conn, changes, loyalty, now, "review")
                    intelligence.refresh(conn, loyalty, now, [c.member_id for c in changes])
            report.add("reviewed", reviewed)
            report.add("tier_down", sum(1 for c in changes if loyalty.rank(c.new) < loyalty.rank(c.old)))
            if reviewed == 0:
                break
        self.refresh(loyalty, now, report)

    def refresh(self, loyalty: Loyalty, now: datetime, report: TickReport, *, force: bool = False) -> None:
        with self.store.begin() as conn:
            every = timedelta(0) if force else loyalty.intelligence.refresh_every
            due, _ = queries.claim_task(conn, "intelligence", now, every)
            if due:
                intelligence.refresh(conn, loyalty, now)
                report.add("rfm_scored", intelligence.refresh_rfm(conn))
