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
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from channels.base import Channel
from engine.config import Config
from engine.domain.unsubscribe import load_secret
from engine.exceptions import RulesError
from engine.providers import build_channel
from engine.rules.loyalty import Loyalty
from engine.rules.rulebook import Rulebook, journey_files, load_rulebook
from engine.rules.templates import Templates
from engine.rules.versions import LiveJourney, VersionCache, last_good_templates, register_templates, sync
from engine.store import quarantine, queries, seal
from engine.store.database import Store
from engine.tick import reconcile
from engine.tick.entry import EntryPhase
from engine.tick.events import EventPhase
from engine.tick.programme import ProgrammePhase
from engine.tick.reconcile import Reconciliation
from engine.tick.report import TickReport
from engine.tick.runner import Runner

log = logging.getLogger(__name__)


class App:
    def __init__(self, config: Config, *, channels: dict[str, Channel] | None = None, migrate: bool = True) -> None:
        self.config = config
        self.store = Store(config.database_url)
        if migrate:
            self.store.migrate()
        # The message log's audit key: outside the database, so whoever can write to it cannot re-seal it.
        seal.use_key(self.store.engine, load_secret(config.var_path, os.environ.get("ENGINE_AUDIT_KEY"),
                                                    "audit.key", "ENGINE_AUDIT_KEY"))
        self.templates = Templates(config.templates_path, config.default_locale, config.currency)
        self.versions = VersionCache()
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._channels: dict[str, Channel] = dict(channels or {})
        self._rules: Rulebook | None = None
        self._rules_stamp: tuple[tuple[str, float], ...] = ()
        self._secret: bytes | None = None
        # Good template sources seen by this process (path -> source, since when), and those not stored yet.
        self._good_templates: dict[str, tuple[str, datetime]] = {}
        self._templates_to_store: dict[str, str] = {}
        self.runner = Runner(self, self.worker)
        #: messages settled by reconciliation in this process, by (channel, outcome): for /metrics
        self.reconciled: Counter[tuple[str, str]] = Counter()
        self._ticked = False  # close() frees enrollment claims only when a tick may have made some
        self._closed = False
        self._recovered_once = False  # a dead process's enrollment claims were freed (SQLite, engine lock held)
        self.events = EventPhase(self)
        self.entry = EntryPhase(self)
        self.programme = ProgrammePhase(self.store, config.rules_path)

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
        """The rulebook, reloaded when any file under rules/ or templates/ changed.

        Templates are rules too: one saved broken keeps its last good version in use (from this process, else
        the newest stored in ``template_versions``), and its problem says so.
        """
        stamp = self._stamp()
        if self._rules is None or reload or stamp != self._rules_stamp:
            self._load_templates()
            self._rules = load_rulebook(self.config.rules_path, self.templates)
            self._rules_stamp = stamp
            for problem in self._rules.problems:
                log.error("%s", problem)
        return self._rules

    def _load_templates(self) -> None:
        now = datetime.now(UTC)
        good = self.templates.load()
        self._templates_to_store = good
        for path, source in good.items():
            if self._good_templates.get(path, ("",))[0] != source:
                self._good_templates[path] = (source, now)
        missing = [p for p in self.templates.broken if p not in self._good_templates]
        if missing:
            with self.store.connect() as conn:
                self._good_templates.update(last_good_templates(conn, missing))
        for path in self.templates.broken:
            kept = self._good_templates.get(path)
            if kept is None:
                self.templates.note_no_good_version(path)
                continue
            self.templates.keep(path, kept[0], "still using its last good version, from "
                                f"{kept[1].astimezone(UTC):%Y-%m-%d %H:%M} UTC, until it is fixed")
            log.warning("template %s has a problem: its last good version stays in use", path)

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
        """Every journey that should run, by id: paused ones (their compiled form failed at run time, see
        engine.store.quarantine) are left out until the journey changes or `run.py retry` lifts the pause."""
        book = book or self.rules()
        with self.store.begin() as conn:
            live = sync(conn, self.store.dialect, book, self.versions, now)
            if self._templates_to_store:  # good versions read since the last tick: stored for later restarts
                register_templates(conn, self.store.dialect, self._templates_to_store, now)
                self._templates_to_store = {}
            paused = quarantine.paused_journeys(conn)
            for journey_id, (version, error) in paused.items():
                current = live.get(journey_id)
                if current is None:
                    continue
                if version is not None and current.version != version:  # fixed: a new version runs again
                    quarantine.settle(conn, quarantine.Kind.JOURNEY, [journey_id], now)
                    log.info("journey %s: version %s replaces the paused version %s", journey_id,
                             current.version, version)
                    continue
                del live[journey_id]
                log.warning("journey %s is paused: %s (fix it, then run.py retry --journey %s)", journey_id, error,
                            journey_id)
        return live

    def pause(self, journey: LiveJourney, exc: BaseException, what: str, now: datetime, report: TickReport) -> None:
        """A journey whose compiled form failed at run time: paused with the reason, the others go on."""
        failure = quarantine.Failure.of(exc, quarantine.Kind.JOURNEY, journey.id, retry=False, journey_id=journey.id,
                                        journey_version=journey.version)
        failure = quarantine.Failure(failure.kind, failure.ref, f"{what}: {failure.error}", failure.detail,
                                     failure.journey_id, failure.journey_version, retry=False)
        with self.store.begin() as conn:
            quarantine.record(conn, [failure], now)
        report.add("paused")
        report.problems.append(f"journey {journey.id} (version {journey.version}) paused: {failure.error}")
        log.error("journey %s (version %s) paused: %s", journey.id, journey.version, failure.error)

    # ------------------------------------------------------------------ the engine

    def tick(self, now: datetime, stop: Callable[[], bool] = lambda: False) -> TickReport:
        """One full evaluation pass at NOW: crash recovery and reconciliation, programme upkeep, events, exits,
        entries, due steps, deferred messages. A phase that fails as a whole (a bug) is reported in the tick's
        ``errors`` and the others still run; a failure of the database itself ends the tick (the next retries)."""
        started = time.perf_counter()
        report = TickReport(now)
        self._ticked = True
        self.runner.start_worker_early()  # its start-up overlaps what comes before the sends
        self._phase("recovery", report, lambda: self.recover(now, report))
        book = self.rules()
        self._phase("programme", report, lambda: self.programme.run(now, report, book))
        live = self.live_journeys(now, book)
        self._phase("events", report, lambda: self.events.handle_events(now, live, report, stop))
        if not stop():
            self._phase("exits", report, lambda: self.entry.exit_by_condition(now, live, report))
        if not stop():
            self._phase("entries", report, lambda: self.entry.enter(now, live, report))
        if not stop():
            self._phase("due steps", report, lambda: self.runner.run_due(now, live, report, stop))
        if not stop():
            self._phase("queued messages", report, lambda: self.runner.dispatch_queued(now, report, stop))
        report.seconds = time.perf_counter() - started
        return report

    def _phase(self, name: str, report: TickReport, run: Callable[[], object]) -> None:
        try:
            run()
        except Exception as exc:
            if quarantine.is_systemic(exc):
                raise
            log.exception("tick at %s: the %s phase failed; the other phases go on", report.now.isoformat(), name)
            report.errors.append(f"{name}: {quarantine.describe(exc)}")

    def recover(self, now: datetime, report: TickReport, *, everything: bool = False) -> Reconciliation:
        """Settle what a crash or a lost answer left open: requeue what was never handed over, mark the hand-over
        in progress unknown, and reconcile unknown messages with their channels (engine.tick.reconcile)."""
        exclusive = self.store.holds_process_lock
        recovered = reconcile.recover(self.store, self.channel, self.worker, now, exclusive=exclusive,
                                      enrollments=exclusive and not self._recovered_once)
        self._recovered_once = self._recovered_once or exclusive
        report.add("requeued", recovered.requeued)
        report.add("unknown", recovered.in_doubt)
        with self.store.begin() as conn:
            queries.prune_webhook_receipts(conn, now - timedelta(days=30))
        settled = reconcile.reconcile(self.store, self.channel, self.worker, now,
                                      max_attempts=self.runner.delivery.max_attempts,
                                      lease=timedelta(seconds=self.config.scheduler.lease_seconds),
                                      everything=everything, hints=recovered.hints)
        report.add("reconciled", settled.resolved)
        self.reconciled.update(settled.by_channel)
        return settled

    def close(self) -> None:
        """Stop the compose worker and the matchers, close the channels, free this process's enrollment claims
        (only if it ticked: a read-only command does not write) and the database. A second call does nothing."""
        if self._closed:
            return
        self._closed = True
        self.runner.close()
        self.events.matchers.close()
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        if self._ticked:
            with self.store.begin() as conn:
                queries.release_enrollment_claims(conn, self.worker)
        self.store.close()

    @property
    def var_path(self) -> Path:
        return self.config.var_path
