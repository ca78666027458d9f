"""The application object: configuration, database, rules, templates and channels, wired once.

Everything the CLI, the daemon, the demo and the tests do goes through an App,
so that a test reads like a story: import members, record an event, tick,
look at what was sent.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from channels import Channel, build_channel
from engine import queries
from engine.config import Config
from engine.entry import EntryPhase
from engine.exceptions import RulesError
from engine.loyalty import Loyalty
from engine.programme import ProgrammePhase
from engine.report import TickReport
from engine.rulebook import Rulebook, journey_files, load_rulebook
from engine.runner import Runner
from engine.store import Store
from engine.templates import Templates
from engine.unsubscribe import load_secret
from engine.versions import LiveJourney, VersionCache, sync

log = logging.getLogger(__name__)


class App:
    def __init__(self, config: Config, *, channels: dict[str, Channel] | None = None, migrate: bool = True) -> None:
        self.config = config
        self.store = Store(config.database_url)
        if migrate:
            self.store.migrate()
        self.templates = Templates(config.templates_path, config.default_locale, config.currency)
        self.versions = VersionCache()
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._channels: dict[str, Channel] = dict(channels or {})
        self._rules: Rulebook | None = None
        self._rules_stamp: tuple[tuple[str, float], ...] = ()
        self._secret: bytes | None = None
        self.runner = Runner(self, self.worker)
        self.entry = EntryPhase(self)
        self.programme = ProgrammePhase(self)

    # ------------------------------------------------------------------ parts

    @property
    def secret(self) -> bytes:
        if self._secret is None:
            self._secret = load_secret(self.config.var_path, os.environ.get("ENGINE_UNSUBSCRIBE_SECRET"))
        return self._secret

    def channel(self, name: str) -> Channel:
        if name not in self._channels:
            self._channels[name] = build_channel(name, self.config)
        return self._channels[name]

    def _stamp(self) -> tuple[tuple[str, float], ...]:
        paths = [*journey_files(self.config.rules_path), self.config.rules_path / "segments.yaml",
                 self.config.rules_path / "loyalty.yaml"]
        templates = sorted(self.config.templates_path.rglob("*.j2")) if self.config.templates_path.is_dir() else []
        return tuple((str(p), p.stat().st_mtime) for p in [*paths, *templates] if p.exists())

    def rules(self, *, reload: bool = False) -> Rulebook:
        """The rulebook, reloaded when any file under rules/ or templates/ changed."""
        stamp = self._stamp()
        if self._rules is None or reload or stamp != self._rules_stamp:
            self.templates.refresh()
            self._rules = load_rulebook(self.config.rules_path, self.templates)
            self._rules_stamp = stamp
            for problem in self._rules.problems:
                log.error("%s", problem)
        return self._rules

    @property
    def rules_stamp(self) -> tuple[tuple[str, float], ...]:
        """The modification times of the rules and templates the loaded rulebook was read from."""
        return self._rules_stamp

    def require_valid_rules(self) -> Rulebook:
        book = self.rules()
        if book.problems:
            raise RulesError(book.problems)
        return book

    def loyalty(self) -> Loyalty:
        """The loyalty programme; imports and events need it valid, but not every journey."""
        book = self.rules()
        path = str(self.config.rules_path / "loyalty.yaml")
        problems = [p for p in book.problems if p.file == path]
        if problems:
            raise RulesError(problems, f"{path} has problems; fix them before recording members or events")
        return book.loyalty

    def live_journeys(self, now: datetime, book: Rulebook | None = None) -> dict[str, LiveJourney]:
        book = book or self.rules()
        with self.store.begin() as conn:
            return sync(conn, self.store.dialect, book, self.versions, now)

    # ------------------------------------------------------------------ the engine

    def tick(self, now: datetime, stop: Callable[[], bool] = lambda: False) -> TickReport:
        """One full evaluation pass at NOW: programme upkeep, events, exits, entries, due steps, deferred messages."""
        started = time.perf_counter()
        report = TickReport(now)
        self.runner.start_worker_early()  # its start-up overlaps what comes before the sends
        with self.store.begin() as conn:
            report.add("unknown", queries.reap_unknown(conn, now))
            queries.prune_webhook_receipts(conn, now - timedelta(days=30))
        book = self.rules()
        self.programme.run(now, report, book)
        live = self.live_journeys(now, book)
        self.entry.handle_events(now, live, report, stop)
        if not stop():
            self.entry.exit_by_condition(now, live, report)
        if not stop():
            self.entry.enter(now, live, report)
        if not stop():
            self.runner.run_due(now, live, report, stop)
        if not stop():
            self.runner.dispatch_queued(now, report, stop)
        report.seconds = time.perf_counter() - started
        return report

    def close(self) -> None:
        self.runner.close()
        self.entry.matchers.close()
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        with self.store.begin() as conn:
            queries.release_enrollment_claims(conn, self.worker)
        self.store.close()

    @property
    def var_path(self) -> Path:
        return self.config.var_path
