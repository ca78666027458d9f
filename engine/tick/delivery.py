"""Handing messages to their channels and recording the answers, so that a crash loses at most the hand-over.

The message rows already exist (the at-most-once key is written before any channel is called). Delivery hands
them over in chunks of at most the channel's in-flight window (``Channel.in_flight``; one write for the local
outbox) and, before each chunk goes, records which rows it is about to hand over (``handovers``: one row per
worker) in the same transaction that records the answers of the chunk before. So after a crash at any moment:

* rows of the recorded hand-over may have reached the channel: the reaper makes them ``unknown`` and
  reconciliation asks the channel what became of them (engine.tick.reconcile);
* every other ``sending`` row of the dead worker was never handed over: it goes back to the queue and is sent
  once at a later tick.

An answer that leaves it open whether the provider acted (a timeout after the request was written: Outcome
UNCERTAIN) makes the row ``unknown`` too; it is reconciled before anything is sent again. Refusals where
nothing was sent (429, 5xx, connection refused) are retried with backoff.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Connection

from channels.base import Channel, Outcome, OutgoingMessage, SendResult
from engine.config import Config
from engine.domain import unsubscribe as unsub
from engine.store import handovers as in_doubt
from engine.store import queries, seal
from engine.store.database import Store
from engine.store.loading import load_queued_messages
from engine.store.models import MessageStatus
from engine.store.quarantine import Failure, Kind, is_systemic
from engine.store.quarantine import record as record_failures
from engine.store.rails import add_suppressions
from engine.tick.composer import UNSUBSCRIBE_URL
from engine.tick.report import TickReport
from engine.tick.safety import Rails, Reason, Verdict

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5
UNPACED_CHUNK = 10_000  # messages per hand-over to a channel that sets no window and no rate

_RESULT_COLUMNS = ("status", "provider_id", "error", "attempts", "sent_at", "next_attempt_at", "reason", "claimed_by",
                   "claimed_until", "updated_at", "state_mac")


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


def sent_update(row: Mapping[str, Any], result: SendResult, now: datetime) -> ResultUpdate:
    """What an accepted message's row becomes."""
    return ResultUpdate(row["id"], MessageStatus.SENT.value, result.provider_id, result.error,
                        int(row.get("attempts") or 0) + 1, now, None, row.get("reason"))


def backoff(attempt: int) -> timedelta:
    """Exponential backoff with full jitter: up to 30 s, 60 s, 120 s … capped at one hour."""
    ceiling = min(3600.0, 30.0 * (2 ** max(0, attempt - 1)))
    return timedelta(seconds=random.uniform(ceiling / 2, ceiling))


def chunk_size(channel: Channel, lease: timedelta) -> int:
    """Messages handed to CHANNEL at once: its in-flight window, and no more than a paced channel gets through in
    half a lease (at its rate, or with every request timing out), so its claims never run out mid-chunk."""
    half_lease = lease.total_seconds() / 2
    size = channel.in_flight or UNPACED_CHUNK
    rate = getattr(getattr(channel, "limiter", None), "rate", None)
    if rate:
        size = min(size, int(rate * half_lease))
    timeout, concurrency = getattr(channel, "timeout", None), getattr(channel, "concurrency", None)
    if timeout and concurrency:
        size = min(size, int(concurrency * half_lease / timeout))
    return max(1, size)


@dataclass
class Chunk:
    """Rows of one channel handed over together, in id order (a hand-over is an id range of one channel)."""

    channel: str
    rows: list[dict[str, Any]]

    @property
    def first_id(self) -> int:
        return int(self.rows[0]["id"])

    @property
    def last_id(self) -> int:
        return int(self.rows[-1]["id"])


class Delivery:
    """One worker's hand-overs and answers. CHANNEL gives the adapter for "email"/"sms"; LINK an unsubscribe
    link for (member, channel) when a row does not carry its own (rows queued by an earlier tick)."""

    def __init__(self, store: Store, config: Config, worker: str, channel: Callable[[str], Channel],
                 link: Callable[[str, str], str]) -> None:
        self.store, self.config, self.worker = store, config, worker
        self.channel, self.link = channel, link
        self._new_suppressions: list[tuple[str, str, str]] = []
        # (channel, address) listed from channel answers since the runner last looked: a batch composed beside
        # that delivery could not see them yet (BatchWriter._recheck_listed).
        self.listed: set[tuple[str, str]] = set()

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self.config.scheduler.lease_seconds)

    # ------------------------------------------------------------------ hand-overs

    def plan(self, rows: Sequence[dict[str, Any]]) -> list[Chunk]:
        """ROWS (all ``sending``, claimed by this worker, in id order: as written, or as loaded ordered by id) as
        hand-over chunks, per channel. A hand-over is an id range of one channel: the order is what makes it
        name exactly the rows handed over."""
        by_channel: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_channel.setdefault(row["channel"], []).append(row)
        chunks: list[Chunk] = []
        for name, group in by_channel.items():
            size = chunk_size(self.channel(name), self.lease)
            chunks += [Chunk(name, group[start:start + size]) for start in range(0, len(group), size)]
        return chunks

    def hand_over(self, conn: Connection, chunk: Chunk, now: datetime) -> None:
        """Record, in the caller's transaction, that CHUNK is about to be handed to its channel."""
        in_doubt.set_handover(conn, self.worker, chunk.channel, chunk.first_id, chunk.last_id,
                             self.channel(chunk.channel).position(), now)

    # ------------------------------------------------------------------ delivering

    def deliver(self, chunks: list[Chunk], now: datetime, report: TickReport, stop: Callable[[], bool] = lambda: False,
                *, handed: bool = False) -> None:
        """Hand CHUNKS to their channels one after the other, recording each chunk's answers (and the next
        chunk's hand-over) in one transaction. HANDED: the first chunk's hand-over is already recorded (in the
        transaction that wrote the batch). On a stop request the rows not yet handed over go back to the queue:
        they were never attempted, so nothing is lost."""
        chunks = [c for c in chunks if c.rows]
        if not chunks:
            return
        started = time.monotonic()
        if not handed:
            with self.store.begin() as conn:
                chunks = self._still_ours(conn, chunks, now + self.lease)
                if chunks:
                    self.hand_over(conn, chunks[0], now)
        while chunks:
            chunk, chunks = chunks[0], chunks[1:]
            if stop():
                with self.store.begin() as conn:
                    queries.requeue_messages(conn, [r["id"] for c in [chunk, *chunks] for r in c.rows],
                                             self.worker, now)
                    in_doubt.clear_handover(conn, self.worker)
                return
            channel = self.channel(chunk.channel)
            results = self._send(channel, [self._outgoing(r) for r in chunk.rows])
            if all(result.outcome is Outcome.SENT for result in results):  # the common answer, recorded in bulk
                updates = [sent_update(row, result, now) for row, result in zip(chunk.rows, results, strict=True)]
                report.add(MessageStatus.SENT.value, len(updates))
            else:
                updates = [self._result_update(row, result, now, report, channel)
                           for row, result in zip(chunk.rows, results, strict=True)]
            clock = now + timedelta(seconds=time.monotonic() - started)
            with self.store.begin() as conn:
                self.save_results(conn, updates, now)
                if chunks:
                    chunks = self._still_ours(conn, chunks, clock + self.lease)
                if chunks:
                    self.hand_over(conn, chunks[0], clock)
                else:
                    in_doubt.clear_handover(conn, self.worker)

    def _still_ours(self, conn: Connection, chunks: list[Chunk], lease_until: datetime) -> list[Chunk]:
        """Extend the claim on the rows still to go, and drop any whose claim ran out and that a reaper (of
        another daemon) took meanwhile: they are no longer this worker's to hand over."""
        ids = [r["id"] for c in chunks for r in c.rows]
        kept = queries.extend_message_leases(conn, ids, self.worker, lease_until)
        if len(kept) == len(ids):
            return chunks
        log.warning("%d message(s) claimed by this worker were taken over elsewhere (its claim ran out); "
                    "not handing them over", len(ids) - len(kept))
        out = [Chunk(c.channel, [r for r in c.rows if r["id"] in kept]) for c in chunks]
        return [c for c in out if c.rows]

    def _outgoing(self, row: Mapping[str, Any]) -> OutgoingMessage:
        headers: dict[str, str] = {}
        if row["channel"] == "email":
            link = row.get(UNSUBSCRIBE_URL) or self.link(row["member_id"], "email")
            headers = unsub.headers(link)
        return OutgoingMessage(id=row["id"], channel=row["channel"], recipient=row["recipient"], text=row["body"],
                               member_id=row["member_id"], journey=row["journey"], step=row["step"],
                               subject=row.get("subject"), html=row.get("html"), headers=headers)

    def _send(self, channel: Channel, outgoing: list[OutgoingMessage]) -> list[SendResult]:
        try:
            results = channel.send_batch(outgoing)
        except Exception as exc:
            log.exception("channel %s failed for a whole batch", channel.provider)
            return [SendResult(Outcome.UNCERTAIN, error=f"{channel.provider} failed for the whole batch: {exc!r}")
                    for _ in outgoing]
        if len(results) != len(outgoing):
            return [SendResult(Outcome.UNCERTAIN, error=f"{channel.provider} returned {len(results)} answers for "
                                                        f"{len(outgoing)} messages") for _ in outgoing]
        return results

    # ------------------------------------------------------------------ answers

    def _result_update(self, row: Mapping[str, Any], result: SendResult, now: datetime, report: TickReport,
                       channel: Channel) -> ResultUpdate:
        attempts = int(row.get("attempts") or 0) + 1
        if result.sent:
            update = sent_update(row, result, now)
        elif result.suppress_reason:
            update = ResultUpdate(row["id"], MessageStatus.SUPPRESSED.value, result.provider_id, result.error,
                                  attempts, None, None, result.suppress_reason)
            self._new_suppressions.append((row["channel"], row["recipient"], result.suppress_reason))
        elif result.outcome is Outcome.UNCERTAIN:
            # Never retried blindly: reconciled with the channel first, once a request still in progress there
            # would have finished (Channel.reconcile_after).
            update = ResultUpdate(row["id"], MessageStatus.UNKNOWN.value, result.provider_id, result.error, attempts,
                                  None, now + timedelta(seconds=channel.reconcile_after), row.get("reason"))
        elif result.outcome is Outcome.TRANSIENT and attempts < self.max_attempts(row["channel"]):
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

    def max_attempts(self, channel: str) -> int:
        settings = getattr(self.config.channels, channel, None)
        return int(settings.max_attempts) if settings is not None else MAX_ATTEMPTS

    def save_results(self, conn: Connection, updates: Sequence[ResultUpdate], now: datetime) -> None:
        if self._new_suppressions:
            add_suppressions(conn, self.store.dialect, self._new_suppressions, "provider", now)
            self.listed.update((channel, address) for channel, address, _ in self._new_suppressions)
            self._new_suppressions = []
        w = queries.BulkWriter(self.store.dialect)
        stamp = w.ts(now)
        key = seal.key_of(conn)
        changed = w.update_by_id(conn, "messages", _RESULT_COLUMNS, [
            (u.status, u.provider_id, u.error, u.attempts, w.ts(u.sent_at), w.ts(u.next_attempt_at), u.reason,
             None, None, stamp,
             seal.state_mac(key, u.id, u.status, u.reason, u.error, u.provider_id, u.sent_at, False), u.id)
            for u in updates],
            # A provider's webhook may already have moved the row on (delivered): never overwrite that. Rows
            # `member forget` erased while in flight are sealed as not erased above: written below instead.
            only_if="status = 'sending' AND NOT redacted")
        if changed < len(updates):
            # Some callbacks overtook their answers: keep what only the answer knows (provider id, attempts).
            queries.merge_answers(conn, [(u.id, u.provider_id, u.attempts, u.sent_at or now) for u in updates
                                         if u.status == MessageStatus.SENT.value])
            erased = set(queries.erased_among(conn, [u.id for u in updates]))
            if erased:
                w.update_by_id(conn, "messages", _RESULT_COLUMNS, [
                    (u.status, u.provider_id, u.error, u.attempts, w.ts(u.sent_at), w.ts(u.next_attempt_at), u.reason,
                     None, None, stamp, None, u.id) for u in updates if u.id in erased], only_if="status = 'sending'")
                seal.reseal(conn, erased)

    # ------------------------------------------------------------------ queued messages (deferred, retries)

    def dispatch_queued(self, now: datetime, report: TickReport, stop: Callable[[], bool], *,
                        only: Sequence[int] | None = None) -> None:
        """Queued messages that are due (deferred by quiet hours, retries, crash recovery): rechecked, then
        delivered. ONLY: just these ids, once (`run.py retry`)."""
        config = self.config
        lease = now + self.lease
        while not stop():
            with self.store.begin() as conn:
                ids = queries.claim_queued_messages(conn, self.worker, now, lease, config.scheduler.batch_size,
                                                    only=only)
            if not ids:
                return
            with self.store.connect() as conn:
                rows = load_queued_messages(conn, ids)
                rails = Rails(config)
                rails.prepare(conn, [{"id": r["member_id"], "email": r["m_email"], "phone": r["m_phone"]}
                                     for r in rows], now)
            ready: list[dict[str, Any]] = []
            blocked: list[tuple[dict[str, Any], Verdict]] = []
            broken: list[Failure] = []
            for row in rows:
                verdict = self._recheck(row, rails)
                if verdict is not None:
                    blocked.append((row, verdict))
                    continue
                try:
                    self._outgoing(row)  # what delivery will need of it: a row that cannot give it waits aside
                except Exception as exc:
                    if is_systemic(exc):
                        raise
                    broken.append(Failure.of(exc, Kind.MESSAGE, row["id"], journey_id=row["journey"],
                                             journey_version=row["journey_version"], member_id=row["member_id"],
                                             step=row["step"]))
                    continue
                ready.append(row)
            if blocked or broken:
                with self.store.begin() as conn:
                    self.save_results(conn, [
                        ResultUpdate(r["id"], v.status.value, None, v.error, r["attempts"], None, None, v.reason)
                        for r, v in blocked], now)
                    report.add("suppressed", len(blocked))
                    self._set_aside(conn, broken, now, report)
            self.deliver(self.plan(ready), now, report, stop)
            if only is not None:
                return

    def _set_aside(self, conn: Connection, failures: list[Failure], now: datetime, report: TickReport) -> None:
        """Queued messages that could not be prepared: they wait (retried later, then quarantined), never lost."""
        for outcome in record_failures(conn, failures, now):
            queries.park_message(conn, int(outcome.failure.ref), self.worker, outcome.next_attempt_at, now)
            report.add("quarantined" if outcome.quarantined else "retrying")
            log.error("message %s could not be prepared for delivery (%s): %s", outcome.failure.ref,
                      "quarantined" if outcome.quarantined else f"tried again at {outcome.next_attempt_at}",
                      outcome.failure.error)

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
