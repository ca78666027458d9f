"""Running enrollments whose next step is due, and writing their messages.

Per batch: claim due enrollments (lease), walk each one's steps until it waits
or ends (``engine.tick.composer``; for a large send a second process composes the
next batch meanwhile, ``engine.tick.pipeline``), then write the batch in ONE
transaction and deliver it (``engine.tick.writer``, ``engine.tick.delivery``). A
crash leaves ``unknown`` only the rows of the hand-over in progress; the others
go back to the queue (engine.tick.reconcile) — never a second send.

One enrollment whose step fails (a template that does not render, data that
breaks a step) is set aside (engine.store.quarantine) and the batch goes on.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from datetime import datetime, timedelta

from engine.rules.versions import LiveJourney, VersionCache, computed_needed
from engine.store import queries
from engine.tick.composer import Composed, Composer
from engine.tick.delivery import Delivery
from engine.tick.parts import Parts
from engine.tick.pipeline import ComposeWorker
from engine.tick.report import TickReport
from engine.tick.writer import BatchWriter

log = logging.getLogger(__name__)

PIPELINE_DEPTH = 2  # batches handed to the compose worker at once
#: a tick on a database with at least this many batches' worth of members starts the compose worker first thing
EARLY_START_BATCHES = 10


_relaxed = 0  # run_due calls inside fewer_collections() in this process (threads may overlap)
_relaxed_lock = threading.Lock()
_relaxed_restore: list[tuple[int, ...]] = []  # the thresholds to put back when the last one leaves


@contextmanager
def fewer_collections(young: int = 20_000) -> Iterator[None]:
    """While a large send runs: the objects that existed before it are frozen out of the cyclic collector, and
    a collection of young objects waits for YOUNG new containers instead of 700.

    A batch allocates many short-lived dicts (rows, contexts) and no cycles to speak of, so the default
    thresholds spent 5-8 % of a send re-examining the same live objects. Cycles made meanwhile are still
    collected, just less often. The first send in (of any overlapping in this process) changes the settings,
    the last one out restores them; nothing changes when the collector is off.
    """
    global _relaxed
    with _relaxed_lock:
        first = _relaxed == 0
        _relaxed += 1
        threshold = gc.get_threshold()
        if first and gc.isenabled() and threshold[0] > 0:
            gc.freeze()
            gc.set_threshold(max(young, threshold[0]), *threshold[1:])
            _relaxed_restore.append(threshold)
    try:
        yield
    finally:
        with _relaxed_lock:
            _relaxed -= 1
            if _relaxed == 0 and _relaxed_restore:
                gc.set_threshold(*_relaxed_restore.pop())
                gc.unfreeze()  # every frozen object: nothing else in the engine freezes any


class Runner:
    def __init__(self, app: Parts, worker: str) -> None:
        self.app = app
        self.worker = worker
        self.cache: VersionCache = app.versions
        self._composer: Composer | None = None
        self._compose_worker: ComposeWorker | None = None
        self._compose_worker_failed = False
        self.worker_batches = 0  # batches the compose worker composed for this runner
        self.worker_deferred = 0  # enrollments it left for a later batch (their member's batch was unwritten)
        self._live: dict[str, LiveJourney] = {}
        self.delivery = Delivery(app.store, app.config, worker, app.channel,
                                 lambda member_id, channel: self.composer.unsubscribe_link(member_id, channel))
        self.writer = BatchWriter(app.store, self.delivery, lambda: app.rules().loyalty)

    @property
    def composer(self) -> Composer:
        if self._composer is None:  # made on first use: the signing key is read (or created) then
            self._composer = Composer(self.app.config, self.app.templates, self.app.secret, self.worker)
        return self._composer

    # ------------------------------------------------------------------ enrollments

    def run_due(self, now: datetime, live: dict[str, LiveJourney], report: TickReport,
                stop: Callable[[], bool], *, only: Sequence[int] | None = None) -> None:
        """Run every due enrollment of the running journeys (ONLY: just these ids, once, as `run.py retry`)."""
        running = [j.id for j in live.values() if j.journey.runs]
        self._live = live
        config = self.app.config
        lease = now + timedelta(seconds=config.scheduler.lease_seconds)
        computed = sorted(computed_needed(live.values()))  # loaded with each member, shown to templates
        remaining = None if only is None else list(only)

        def claim() -> list[int]:
            nonlocal remaining
            if remaining is not None and not remaining:
                return []
            with self.app.store.begin() as conn:
                ids = queries.claim_due_enrollments(conn, self.worker, now, lease, config.scheduler.batch_size,
                                                    running, only=remaining)
            if remaining is not None:  # each once: what it did not claim now is not due, or not running
                remaining = []
            return ids

        with self.app.store.checkpointing(), fewer_collections():
            ids = [] if stop() else claim()
            if ids and len(ids) >= config.scheduler.batch_size and only is None:  # more to come: a second process
                worker = self._worker()
                if worker is not None:
                    ids = self._run_pipelined(worker, ids, claim, now, computed, report, stop)
                    if ids and stop():  # the worker failed as the daemon was asked to stop
                        self._release(ids)
                        return
            while ids:
                self._run_batch(ids, now, computed, report, stop)
                ids = [] if stop() else claim()

    def _worker(self) -> ComposeWorker | None:
        """The compose worker, started on first use; None where it is off, or has failed in this process."""
        if not self._worker_allowed():
            return None
        if self._compose_worker is None:
            self._compose_worker = ComposeWorker(self.app.config, self.app.secret, self.worker)
        return self._compose_worker

    def _worker_allowed(self) -> bool:
        setting = self.app.config.scheduler.compose_worker
        if setting == "off" or self._compose_worker_failed:
            return False
        return setting == "on" or (os.cpu_count() or 1) >= 2

    def start_worker_early(self) -> None:
        """Start the compose worker now if this database is large enough that a tick's sends will likely use it.

        Its start-up (a new interpreter importing the engine: about a second of CPU) then runs on the second
        core while this process upkeeps the programme and enrolls members, instead of holding up the first
        batch of the send. Large means at least EARLY_START_BATCHES batches' worth of members, counted no
        further than that. Once started the worker stays for the App's life, as it does after a large send.
        """
        if self._compose_worker is not None or not self._worker_allowed():
            return
        enough = self.app.config.scheduler.batch_size * EARLY_START_BATCHES
        with self.app.store.connect() as conn:
            large = queries.members_at_least(conn, enough)
        if large:
            worker = self._worker()
            if worker is not None:
                worker.start()

    @property
    def compose_worker(self) -> ComposeWorker | None:
        return self._compose_worker

    def close(self) -> None:
        if self._compose_worker is not None:
            self._compose_worker.close()
            self._compose_worker = None

    def _run_batch(self, ids: list[int], now: datetime, computed: list[str], report: TickReport,
                   stop: Callable[[], bool]) -> None:
        """One batch in this process: load and compose it, then write and deliver it."""
        with self.app.store.connect() as conn:
            composed = self.composer.load_and_compose(conn, self.cache, ids, now, self.app.rules().loyalty, computed)
        self.writer.write_and_deliver(composed, now, report, stop)

    def _run_pipelined(self, worker: ComposeWorker, ids: list[int], claim: Callable[[], list[int]],
                       now: datetime, computed: list[str], report: TickReport,
                       stop: Callable[[], bool]) -> list[int]:
        """Batches composed by the worker while this process writes and delivers the batch before.

        The worker holds up to PIPELINE_DEPTH batches: while this process writes batch N, the worker composes
        N+1 and has N+2 waiting, so neither process waits for the other when one batch takes a little longer.
        Returns claimed ids still to run here, one batch at a time: empty unless the worker failed.
        """
        book = self.app.rules()
        worker.begin(self._live, book.loyalty, computed, self.app.rules_stamp, self.app.templates.sources)
        written = worker.last_number
        carry: list[int] = []  # claimed, deferred by the worker: their member was in a batch not yet written
        pending = ids  # claimed, not yet handed to the worker
        in_flight: deque[tuple[int, Future[Composed], list[int]]] = deque()
        ready: tuple[int, Composed] | None = None  # composed, to be written

        def held() -> list[int]:
            return [i for _, _, batch in in_flight for i in batch]

        while True:
            while len(in_flight) < PIPELINE_DEPTH and (carry or pending) and not stop():
                batch, carry, pending = carry + pending, [], []
                try:
                    number, future = worker.submit(batch, now, written)
                except BrokenProcessPool as exc:
                    if ready is not None:  # composed before the worker died: written as any other
                        self.writer.write_and_deliver(ready[1], now, report, stop, recheck=True)
                    return self._worker_failed(exc, [*held(), *batch])
                in_flight.append((number, future, batch))
                if len(in_flight) < PIPELINE_DEPTH:
                    pending = claim()
            if ready is not None:
                self.writer.write_and_deliver(ready[1], now, report, stop, recheck=True)
                written, ready = ready[0], None
            if stop():
                for _, future, _ in in_flight:
                    future.cancel()
                self._release([*carry, *pending, *held()])
                return []
            if not in_flight:
                return []
            number, future, claimed = in_flight.popleft()
            try:
                composed = future.result(timeout=self._compose_timeout)
            except (BrokenProcessPool, FutureTimeout) as exc:
                if isinstance(exc, FutureTimeout):  # alive but stuck, or gone without a word: not waited on for good
                    exc = FutureTimeout(f"no batch from it within {self._compose_timeout:g}s")
                return self._worker_failed(exc, [*claimed, *held(), *carry, *pending])
            except BaseException:
                self._release([*claimed, *held(), *carry, *pending])
                raise
            self.worker_batches += 1
            carry = composed.deferred
            self.worker_deferred += len(carry)
            ready = (number, composed)
            if not pending:
                pending = claim()

    @property
    def _compose_timeout(self) -> float:
        """How long to wait for a batch from the compose worker before composing it here: half a lease, the time
        a batch may take before its claims are at risk."""
        return max(10.0, self.app.config.scheduler.lease_seconds / 2)

    def _worker_failed(self, exc: BaseException, claimed: list[int]) -> list[int]:
        """The worker died or hung: CLAIMED (in the order they were claimed) are composed here instead."""
        log.warning("the compose worker stopped (%s); composing in this process from now on", exc)
        self._compose_worker_failed = True
        if self._compose_worker is not None:
            self._compose_worker.close(wait=False)
            self._compose_worker = None
        return claimed

    def _release(self, ids: list[int]) -> None:
        """Give back claimed enrollments that were not run: another pass (or daemon) takes them up."""
        if ids:
            with self.app.store.begin() as conn:
                queries.release_enrollments(conn, ids, self.worker)

    # ------------------------------------------------------------------ queued messages (deferred, retries)

    def dispatch_queued(self, now: datetime, report: TickReport, stop: Callable[[], bool], *,
                        only: Sequence[int] | None = None) -> None:
        self.delivery.dispatch_queued(now, report, stop, only=only)
