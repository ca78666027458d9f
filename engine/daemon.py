"""``run.py serve``: APScheduler as the clock, calling the same tick every scheduler.interval seconds.

APScheduler keeps no state of ours (its 3.x job stores must not be shared
between processes); all state lives in our tables, and each tick catches up
from the database. SIGTERM/SIGINT stop gracefully: the tick in progress stops
after the batch in hand, its claims are released, then the process exits.
"""

from __future__ import annotations

import logging
import signal
import threading
from datetime import UTC, datetime
from types import FrameType

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from engine.app import App

log = logging.getLogger("engine.daemon")


class Daemon:
    def __init__(self, app: App) -> None:
        self.app = app
        self.stopping = threading.Event()
        self.ticks = 0

    def tick(self) -> None:
        now = datetime.now(UTC)
        try:
            report = self.app.tick(now, stop=self.stopping.is_set)
        except Exception:
            log.exception("tick at %s failed; the next tick will retry", now.isoformat(timespec="seconds"))
            return
        self.ticks += 1
        log.info("tick %s: %s (%.2fs)", now.isoformat(timespec="seconds"), report.summary(), report.seconds)

    def _signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: finishing the batch in hand, then stopping", signal.Signals(signum).name)
        self.stopping.set()

    def run(self) -> None:
        self.app.store.acquire_process_lock("serve")
        interval = self.app.config.scheduler.interval
        scheduler = BackgroundScheduler(timezone=UTC, job_defaults={
            "coalesce": True, "max_instances": 1,
            # APScheduler's default grace is 1 s: a late tick would be dropped. Ours must always run.
            "misfire_grace_time": None,
        })
        scheduler.add_job(self.tick, IntervalTrigger(seconds=interval, timezone=UTC), id="tick",
                          next_run_time=datetime.now(UTC))
        previous = {sig: signal.signal(sig, self._signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        book = self.app.rules()
        log.info("serving %d journeys from %s every %ss on %s (worker %s)", len(book.journeys),
                 self.app.config.rules_path, interval, self.app.store.dialect, self.app.worker)
        scheduler.start()
        try:
            self.stopping.wait()
        finally:
            scheduler.shutdown(wait=True)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            log.info("stopped after %d ticks", self.ticks)
