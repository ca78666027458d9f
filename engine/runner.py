"""Running enrollments whose next step is due, and delivering their messages.

Per batch: claim due enrollments (lease), walk each one's steps until it waits
or ends (``engine.composer``; for a large send a second process composes the
next batch meanwhile, ``engine.pipeline``), then in ONE transaction append the
message rows (the at-most-once key is written here, before any channel is
called) and move the enrollments on.
Only after that commit are the channels called; their answers are recorded in
a second transaction. A crash in between leaves rows ``sending``, which the
reaper turns into ``unknown`` — never a second send.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import Connection, func, select

from channels.base import Channel, Outcome, OutgoingMessage, SendResult
from engine import audit, queries
from engine import unsubscribe as unsub
from engine.composer import RENDERED_KEYS, UNSUBSCRIBE_URL, Composed, Composer, Move
from engine.member_updates import save_member_updates
from engine.models import EnrollmentStatus, MessageStatus, members, messages
from engine.pipeline import ComposeWorker
from engine.report import TickReport
from engine.safety import Rails, Reason, Verdict, add_suppressions
from engine.versions import LiveJourney, VersionCache, computed_needed

if TYPE_CHECKING:
    from engine.app import App

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5
PIPELINE_DEPTH = 2  # batches handed to the compose worker at once
#: a tick on a database with at least this many batches' worth of members starts the compose worker first thing
EARLY_START_BATCHES = 10


def _chunk_size(channel: Channel, lease: timedelta) -> int:
    """Messages a channel paced at its rate gets through in half a lease (all of them when unpaced)."""
    limiter = getattr(channel, "limiter", None)
    rate = getattr(limiter, "rate", None)
    if not rate:
        return 10_000
    return max(1, int(rate * lease.total_seconds() / 2))
_TRANSITION_COLUMNS = ("step", "status", "next_run_at", "ended_at", "exit_reason", "variant", "waiting_for",
                       "claimed_by", "claimed_until")
_RESULT_COLUMNS = ("status", "provider_id", "error", "attempts", "sent_at", "next_attempt_at", "reason", "claimed_by",
                   "claimed_until", "updated_at")


class ResultUpdate(NamedTuple):
    """What a channel's answer (or a recheck before a deferred send) changes on a message row."""

    id: int
    status: str
    provider_id: str | None
    error: str | None
    attempts: int
    sent_at: datetime | None
    next_attempt_at: datetime | None
    reason: str | None


def _sent(row: Mapping[str, Any], result: SendResult, now: datetime) -> ResultUpdate:
    """What an accepted message's row becomes."""
    return ResultUpdate(row["id"], MessageStatus.SENT.value, result.provider_id, result.error,
                        int(row.get("attempts") or 0) + 1, now, None, row.get("reason"))


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


def backoff(attempt: int) -> timedelta:
    """Exponential backoff with full jitter: up to 30 s, 60 s, 120 s … capped at one hour."""
    ceiling = min(3600.0, 30.0 * (2 ** max(0, attempt - 1)))
    return timedelta(seconds=random.uniform(ceiling / 2, ceiling))


class Runner:
    def __init__(self, app: App, worker: str) -> None:
        self.app = app
        self.worker = worker
        self.cache: VersionCache = app.versions
        self._composer: Composer | None = None
        self._compose_worker: ComposeWorker | None = None
        self._compose_worker_failed = False
        self.worker_batches = 0  # batches the compose worker composed for this runner
        self.worker_deferred = 0  # enrollments it left for a later batch (their member's batch was unwritten)
        self._new_suppressions: list[tuple[str, str, str]] = []
        # (channel, address) listed from channel answers since the last batch was written: a batch composed
        # beside that delivery could not see them yet
        self._listed: set[tuple[str, str]] = set()
        self._live: dict[str, LiveJourney] = {}

    @property
    def composer(self) -> Composer:
        if self._composer is None:  # made on first use: the signing key is read (or created) then
            self._composer = Composer(self.app.config, self.app.templates, self.app.secret, self.worker)
        return self._composer

    # ------------------------------------------------------------------ enrollments

    def run_due(self, now: datetime, live: dict[str, LiveJourney], report: TickReport,
                stop: Callable[[], bool]) -> None:
        running = [j.id for j in live.values() if j.journey.runs]
        self._live = live
        config = self.app.config
        lease = now + timedelta(seconds=config.scheduler.lease_seconds)
        computed = sorted(computed_needed(live.values()))  # loaded with each member, shown to templates

        def claim() -> list[int]:
            with self.app.store.begin() as conn:
                return queries.claim_due_enrollments(conn, self.worker, now, lease, config.scheduler.batch_size,
                                                     running)

        with self.app.store.checkpointing(), fewer_collections():
            ids = [] if stop() else claim()
            if ids and len(ids) >= config.scheduler.batch_size:  # more to come: worth a second process
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
            counted = conn.execute(select(func.count()).select_from(
                select(members.c.id).limit(enough).subquery())).scalar_one()
        if counted >= enough:
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
        self._write_and_deliver(composed, now, report, stop)

    def _run_pipelined(self, worker: ComposeWorker, ids: list[int], claim: Callable[[], list[int]],
                       now: datetime, computed: list[str], report: TickReport,
                       stop: Callable[[], bool]) -> list[int]:
        """Batches composed by the worker while this process writes and delivers the batch before.

        The worker holds up to PIPELINE_DEPTH batches: while this process writes batch N, the worker composes
        N+1 and has N+2 waiting, so neither process waits for the other when one batch takes a little longer.
        Returns claimed ids still to run here, one batch at a time: empty unless the worker failed.
        """
        book = self.app.rules()
        worker.begin(self._live, book.loyalty, computed, self.app.rules_stamp)
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
                        self._write_and_deliver(ready[1], now, report, stop, recheck=True)
                    return self._worker_failed(exc, [*held(), *batch])
                in_flight.append((number, future, batch))
                if len(in_flight) < PIPELINE_DEPTH:
                    pending = claim()
            if ready is not None:
                self._write_and_deliver(ready[1], now, report, stop, recheck=True)
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
                composed = future.result()
            except BrokenProcessPool as exc:
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

    def _worker_failed(self, exc: BaseException, claimed: list[int]) -> list[int]:
        """The worker died: CLAIMED (in the order they were claimed) are composed here instead."""
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

    def _write_and_deliver(self, composed: Composed, now: datetime, report: TickReport, stop: Callable[[], bool],
                           recheck: bool = False) -> None:
        """Write a composed batch in ONE transaction (message rows with their at-most-once keys, enrollment
        moves, member updates), then hand its messages to the channels."""
        app = self.app
        outgoing = composed.outgoing
        if recheck:
            self._recheck_listed(outgoing)
        self._listed = set()
        with app.store.begin() as conn:
            inserted = audit.append(conn, app.store.dialect, outgoing)
            self._save_transitions(conn, composed.moves)
            if composed.changed:
                save_member_updates(conn, composed.changed, app.rules().loyalty, now)
        completed, exited = EnrollmentStatus.COMPLETED.value, EnrollmentStatus.EXITED.value
        for move in composed.moves:
            if move[2] == completed:
                report.add("completed")
            elif move[2] == exited:
                report.add("exited")
        sending = MessageStatus.SENDING.value
        for row in inserted:
            if row["status"] != sending:
                report.add(row["status"])
        self._deliver([r for r in inserted if r["status"] == sending], now, report, stop)

    def _recheck_listed(self, rows: list[dict[str, Any]]) -> None:
        """Suppress messages to addresses that channel answers put on the suppression list while this batch was
        being composed, as the rails would have had they seen the list then."""
        if not self._listed:
            return
        going = (MessageStatus.SENDING.value, MessageStatus.QUEUED.value)
        for row in rows:
            channel = row["channel"]
            if row["status"] in going and (channel, row["recipient"]) in self._listed:
                for key in RENDERED_KEYS:
                    row[key] = None
                row.update(status=MessageStatus.SUPPRESSED.value, reason=Reason.SUPPRESSED_ADDRESS,
                           error=f"{channel} address is on the suppression list", next_attempt_at=None)
                row["content_hash"] = audit.content_hash(row)

    def _save_transitions(self, conn: Connection, moves: Sequence[Move]) -> None:
        w = queries.BulkWriter(self.app.store.dialect)
        w.update_by_id(conn, "enrollments", _TRANSITION_COLUMNS, [
            (step, status, w.ts(next_run_at), w.ts(ended_at), exit_reason, variant, waiting_for, None, None,
             enrollment_id)
            for enrollment_id, step, status, next_run_at, ended_at, exit_reason, variant, waiting_for in moves])

    # ------------------------------------------------------------------ delivery

    def _deliver(self, rows: list[dict[str, Any]], now: datetime, report: TickReport,
                 stop: Callable[[], bool] = lambda: False) -> None:
        """Hand rows to their channels in chunks a paced channel gets through well within the lease.

        After each chunk its answers are recorded and the lease of the rows still waiting is extended, so a
        slow, rate-limited provider never lets another daemon's reaper mark them unknown. On a stop request
        the rows not yet handed over go back to ``queued``: they were never attempted, so nothing is lost.
        """
        started = time.monotonic()
        lease = timedelta(seconds=self.app.config.scheduler.lease_seconds)
        pending = list(rows)
        by_channel: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_channel.setdefault(row["channel"], []).append(row)
        for channel_name, group in by_channel.items():
            channel = self.app.channel(channel_name)
            size = _chunk_size(channel, lease)
            for start in range(0, len(group), size):
                if stop():
                    self._requeue(pending, now)
                    return
                chunk = group[start:start + size]
                results = self._send(channel, [self._outgoing(r) for r in chunk])
                if all(result.outcome is Outcome.SENT for result in results):  # the common answer, recorded in bulk
                    updates = [_sent(row, result, now) for row, result in zip(chunk, results, strict=True)]
                    report.add(MessageStatus.SENT.value, len(updates))
                else:
                    updates = [self._result_update(row, result, now, report)
                               for row, result in zip(chunk, results, strict=True)]
                if len(chunk) == len(pending):
                    pending = []
                else:
                    done = {row["id"] for row in chunk}
                    pending = [row for row in pending if row["id"] not in done]
                clock = now + timedelta(seconds=time.monotonic() - started)
                with self.app.store.begin() as conn:
                    self._save_results(conn, updates, now)
                    if pending:
                        queries.extend_message_leases(conn, [r["id"] for r in pending], self.worker, clock + lease)

    def _requeue(self, rows: list[dict[str, Any]], now: datetime) -> None:
        if rows:
            with self.app.store.begin() as conn:
                queries.requeue_messages(conn, [r["id"] for r in rows], self.worker, now)

    def _outgoing(self, row: Mapping[str, Any]) -> OutgoingMessage:
        headers: dict[str, str] = {}
        if row["channel"] == "email":
            link = row.get(UNSUBSCRIBE_URL) or self.composer.unsubscribe_link(row["member_id"], "email")
            headers = unsub.headers(link)
        return OutgoingMessage(id=row["id"], channel=row["channel"], recipient=row["recipient"], text=row["body"],
                               member_id=row["member_id"], journey=row["journey"], step=row["step"],
                               subject=row.get("subject"), html=row.get("html"), headers=headers)

    def _send(self, channel: Channel, outgoing: list[OutgoingMessage]) -> list[SendResult]:
        try:
            results = channel.send_batch(outgoing)
        except Exception as exc:
            log.exception("channel %s failed for a whole batch", channel.provider)
            return [SendResult(Outcome.PERMANENT, error=f"unknown: channel error {exc!r}") for _ in outgoing]
        if len(results) != len(outgoing):
            return [SendResult(Outcome.PERMANENT, error="unknown: channel returned the wrong number of results")
                    for _ in outgoing]
        return results

    def _result_update(self, row: Mapping[str, Any], result: SendResult, now: datetime,
                       report: TickReport) -> ResultUpdate:
        attempts = int(row.get("attempts") or 0) + 1
        if result.sent:
            update = _sent(row, result, now)
        elif result.suppress_reason:
            update = ResultUpdate(row["id"], MessageStatus.SUPPRESSED.value, result.provider_id, result.error,
                                  attempts, None, None, result.suppress_reason)
            self._new_suppressions.append((row["channel"], row["recipient"], result.suppress_reason))
        elif result.error and result.error.startswith("unknown:"):
            update = ResultUpdate(row["id"], MessageStatus.UNKNOWN.value, result.provider_id, result.error, attempts,
                                  None, None, row.get("reason"))
        elif result.outcome is Outcome.TRANSIENT and attempts < self._max_attempts(row["channel"]):
            delay = timedelta(seconds=result.retry_after) if result.retry_after else backoff(attempts)
            update = ResultUpdate(row["id"], MessageStatus.QUEUED.value, result.provider_id, result.error, attempts,
                                  None, now + delay, "retry")
        elif result.outcome is Outcome.TRANSIENT:
            update = ResultUpdate(row["id"], MessageStatus.FAILED.value, result.provider_id,
                                  f"gave up after {attempts} attempts: {result.error}", attempts, None, None,
                                  row.get("reason"))
        else:
            update = ResultUpdate(row["id"], MessageStatus.FAILED.value, result.provider_id, result.error, attempts,
                                  None, None, row.get("reason"))
        report.add(update.status)
        return update

    def _max_attempts(self, channel: str) -> int:
        settings = getattr(self.app.config.channels, channel, None)
        return int(settings.max_attempts) if settings is not None else MAX_ATTEMPTS

    def _save_results(self, conn: Connection, updates: Sequence[ResultUpdate], now: datetime) -> None:
        if self._new_suppressions:
            add_suppressions(conn, self.app.store.dialect, self._new_suppressions, "provider", now)
            self._listed.update((channel, address) for channel, address, _ in self._new_suppressions)
            self._new_suppressions = []
        w = queries.BulkWriter(self.app.store.dialect)
        stamp = w.ts(now)
        w.update_by_id(conn, "messages", _RESULT_COLUMNS, [
            (u.status, u.provider_id, u.error, u.attempts, w.ts(u.sent_at), w.ts(u.next_attempt_at), u.reason,
             None, None, stamp, u.id) for u in updates],
            # A provider's webhook may already have moved the row on (delivered): never overwrite that.
            only_if="status = 'sending'")

    # ------------------------------------------------------------------ queued messages (deferred, retries)

    def dispatch_queued(self, now: datetime, report: TickReport, stop: Callable[[], bool]) -> None:
        config = self.app.config
        lease = now + timedelta(seconds=config.scheduler.lease_seconds)
        while not stop():
            with self.app.store.begin() as conn:
                ids = queries.claim_queued_messages(conn, self.worker, now, lease, config.scheduler.batch_size)
            if not ids:
                return
            with self.app.store.connect() as conn:
                rows = [dict(r) for r in conn.execute(
                    select(messages, members.c.email_opt_in, members.c.sms_opt_in, members.c.email.label("m_email"),
                           members.c.phone.label("m_phone"))
                    .select_from(messages.join(members, members.c.id == messages.c.member_id))
                    .where(messages.c.id.in_(ids))).mappings()]
                rails = Rails(config)
                rails.prepare(conn, [{"id": r["member_id"], "email": r["m_email"], "phone": r["m_phone"]}
                                     for r in rows], now)
            ready: list[tuple[dict[str, Any], Verdict | None]] = []
            blocked: list[tuple[dict[str, Any], Verdict | None]] = []
            for row in rows:
                verdict = self._recheck(row, rails)
                (ready if verdict is None else blocked).append((row, verdict))
            if blocked:
                with self.app.store.begin() as conn:
                    self._save_results(conn, [
                        ResultUpdate(r["id"], v.status.value, None, v.error, r["attempts"], None, None, v.reason)
                        for r, v in blocked if v is not None], now)
                    report.add("suppressed", len(blocked))
            self._deliver([r for r, _ in ready], now, report, stop)

    def _recheck(self, row: Mapping[str, Any], rails: Rails) -> Verdict | None:
        """Consent can be withdrawn while a message waits: check it again before it goes."""
        channel = row["channel"]
        opted = row["email_opt_in"] if channel == "email" else row["sms_opt_in"]
        if not opted:
            return Verdict(MessageStatus.SUPPRESSED, Reason.CONSENT,
                           f"member withdrew {channel} consent before the deferred message went out")
        if (channel, row["recipient"]) in rails.suppressed:
            return Verdict(MessageStatus.SUPPRESSED, Reason.SUPPRESSED_ADDRESS,
                           f"{channel} address was added to the suppression list")
        return None
