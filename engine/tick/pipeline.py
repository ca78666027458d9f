"""A compose worker: a second process that loads and composes batch N+1 while the runner writes batch N.

A large send is two kinds of work: loading a batch and rendering its messages (CPU in Python), and writing
the log rows, calling the channels and recording their answers (mostly the database). One process does them
one after the other; here a worker process does the first kind for the next batch while the runner does the
second for the batch before, so a machine with two cores does both at once. The runner keeps two batches with
the worker (``runner.PIPELINE_DEPTH``): one being composed and one queued, so the worker never waits for the
runner to finish a batch before it can start the next.

What stays the same:

* The runner alone writes: it claims the batches, appends the message rows (the at-most-once key is still
  committed before any channel is called), moves the enrollments, calls the channels and records answers.
  The worker only reads the database and computes; it holds no lease and sends nothing.
* A batch is composed against what the database says once every earlier batch is written, as it would be
  one batch at a time: the worker leaves out (defers) enrollments whose member is in a batch the runner has
  not written yet, so frequency caps and member updates see that batch's rows; the runner puts the deferred
  enrollments (still claimed) into a later batch. Suppressions that the batch before added from its channel
  answers are applied by the runner before it writes (``BatchWriter._recheck_listed``).

The worker is started with ``spawn`` (no threads or connections are inherited), once per App, on the first
send large enough to use it, or at the start of a tick on a large database (``Runner.start_worker_early``),
and lives until the App closes. If it dies, the runner composes in its own
process again and says so in the log; nothing claimed is lost.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime

from engine.config import Config
from engine.rules.loyalty import Loyalty
from engine.rules.templates import Templates
from engine.rules.versions import LiveJourney, VersionCache
from engine.store.database import Store
from engine.tick.composer import Composed, Composer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Session:
    """What a run of due enrollments shares: journeys in play, the programme, the computed attributes and the
    rules' file stamp (templates are re-read when it changes)."""

    number: int
    live: tuple[LiveJourney, ...]
    loyalty: Loyalty
    computed: tuple[str, ...]
    stamp: tuple[tuple[str, float], ...]
    templates: dict[str, str]  # the sources the daemon renders with (last good versions included)


@dataclass(frozen=True)
class Job:
    number: int
    ids: list[int]
    now: datetime
    written: int  # every batch numbered up to this one is written (or was never composed)
    session: Session | None  # sent with a session's first job


class _Worker:
    """The worker process's side: its own database engine, version cache, templates and composer."""

    def __init__(self, config: Config, secret: bytes, worker: str) -> None:
        self.store = Store(config.database_url, page_cache_mb=4)  # it reads members in order, once
        self.cache = VersionCache()
        self.templates = Templates(config.templates_path, config.default_locale, config.currency)
        self.composer = Composer(config, self.templates, secret, worker)
        self.session: Session | None = None
        self.stamp: tuple[tuple[str, float], ...] = ()
        self.pending: dict[int, set[str]] = {}  # batch number -> its members, until the runner has written it

    def run(self, job: Job) -> Composed:
        if job.session is not None:
            self.session = job.session
            if job.session.stamp != self.stamp:
                self.templates.use(job.session.templates)  # never its own reading of the files
                self.stamp = job.session.stamp
            for live in job.session.live:
                self.cache.put(live)
        session = self.session
        if session is None:
            raise RuntimeError("compose worker: a job arrived before its session")
        for number in [n for n in self.pending if n <= job.written]:
            del self.pending[number]
        busy: set[str] = set().union(*self.pending.values()) if self.pending else set()
        with self.store.connect() as conn:
            composed = self.composer.load_and_compose(conn, self.cache, job.ids, job.now, session.loyalty,
                                                      list(session.computed), busy)
        self.pending[job.number] = composed.members
        composed.members = set()  # the runner does not need them back
        return composed


_worker: _Worker | None = None
#: how often the worker checks that the process that started it is still there
PARENT_CHECK_SECONDS = 0.5


def _watch_parent(parent: int) -> None:
    """Exit as soon as the process that started this worker is gone, however it died (kill -9 included).

    Waiting for the pool to tell us is not enough: this process holds its own copy of the write end of the
    pool's call queue, so its read never ends when the parent dies, and it lived on with a database connection
    (seen: 105 of 112 workers outlived a kill -9 of their daemon). When the parent dies this process is
    re-parented, and os.getppid() changes.
    """
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(0)  # no clean-up to do: it writes nothing, and the OS closes its connection


def _start(config: Config, secret: bytes, worker: str, parent: int) -> None:
    """The worker's start-up; PARENT: the daemon's process id, as the daemon saw it (not os.getppid() here: a
    daemon that dies while this process is still starting up would leave it watching its new parent)."""
    global _worker
    threading.Thread(target=_watch_parent, args=(parent,), name="parent-watch", daemon=True).start()
    # Ctrl-C and a SIGTERM to the whole process group are the daemon's to handle: it finishes or gives back the
    # batch in hand and then closes this worker. Left to their defaults they would kill the worker mid-batch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING)
    _worker = _Worker(config, secret, worker)
    # As the runner does during a large send (runner.fewer_collections), for this process's whole life: what
    # start-up made is frozen out of the cyclic collector, and young collections wait for 20,000 new containers
    # instead of 700. A batch makes many short-lived dicts and few cycles; the defaults spent about 5 % of the
    # worker's time re-examining the same objects.
    gc.freeze()
    young, *older = gc.get_threshold()
    if young > 0:
        gc.set_threshold(max(young, 20_000), *older)


def _started() -> None:
    """A job that only makes the pool start its process (running _start there)."""


def _compose(job: Job) -> Composed:
    if _worker is None:
        raise RuntimeError("compose worker was not started")
    return _worker.run(job)


class ComposeWorker:
    """The runner's handle on its compose worker process."""

    def __init__(self, config: Config, secret: bytes, worker: str) -> None:
        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start, initargs=(config, secret, worker, os.getpid()))
        self._session: Session | None = None
        self._sent_session: int | None = None
        self._number = 0

    def start(self) -> None:
        """Start the process now rather than at the first job (the pool starts it on a submit)."""
        self._pool.submit(_started)

    def begin(self, live: dict[str, LiveJourney], loyalty: Loyalty, computed: list[str],
              stamp: tuple[tuple[str, float], ...], templates: dict[str, str]) -> None:
        """A new run of due enrollments: its session goes with the next job."""
        number = (self._session.number + 1) if self._session else 1
        self._session = Session(number, tuple(live.values()), loyalty, tuple(computed), stamp, dict(templates))

    def submit(self, ids: list[int], now: datetime, written: int) -> tuple[int, Future[Composed]]:
        """Compose IDS (claimed); WRITTEN: the number of the last batch written. Returns the batch's number."""
        self._number += 1
        session = None
        if self._session is not None and self._session.number != self._sent_session:
            session, self._sent_session = self._session, self._session.number
        future: Future[Composed] = self._pool.submit(_compose, Job(self._number, ids, now, written, session))
        return self._number, future

    def pids(self) -> list[int]:
        """The worker's process id (none before its first job)."""
        return list(getattr(self._pool, "_processes", None) or {})

    @property
    def last_number(self) -> int:
        return self._number

    def close(self, wait: bool = True, timeout: float = 10.0) -> None:
        """Stop the worker. WAIT: give it up to TIMEOUT seconds to finish the batch in hand, then end it; never
        an unbounded wait (a stuck worker would otherwise also hang this process's exit, which joins the pool)."""
        processes = [p for p in (getattr(self._pool, "_processes", None) or {}).values() if p is not None]
        self._pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + (timeout if wait else 0.0)
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                if wait:
                    log.warning("the compose worker (pid %s) did not stop within %gs; ending it", process.pid,
                                timeout)
                process.terminate()
                process.join(2.0)
                if process.is_alive():
                    process.kill()
                    process.join(2.0)
