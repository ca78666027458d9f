"""Running enrollments whose next step is due, and delivering their messages.

Per batch: claim due enrollments (lease), walk each one's steps until it waits
or ends, then in ONE transaction append the message rows (the at-most-once key
is written here, before any channel is called) and move the enrollments on.
Only after that commit are the channels called; their answers are recorded in
a second transaction. A crash in between leaves rows ``sending``, which the
reaper turns into ``unknown`` — never a second send.
"""

from __future__ import annotations

import gc
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import Connection, select

from channels.base import Channel, Outcome, OutgoingMessage, SendResult
from engine import audit, queries, sms
from engine import unsubscribe as unsub
from engine.computed import computed_columns
from engine.context import ContextBuilder
from engine.exceptions import TemplateRenderError
from engine.journey import EndStep, Journey, SendStep, SplitStep, UpdateStep, WaitStep
from engine.loading import load_batch
from engine.member_updates import save_member_updates
from engine.models import EnrollmentStatus, MessageStatus, members, messages
from engine.report import TickReport
from engine.safety import Rails, Reason, Verdict, add_suppressions
from engine.steps import MAX_STEPS_PER_RUN, Transition, advance, apply_update
from engine.versions import LiveJourney, VersionCache, computed_needed

if TYPE_CHECKING:
    from engine.app import App

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5


def _chunk_size(channel: Channel, lease: timedelta) -> int:
    """Messages a channel paced at its rate gets through in half a lease (all of them when unpaced)."""
    limiter = getattr(channel, "limiter", None)
    rate = getattr(limiter, "rate", None)
    if not rate:
        return 10_000
    return max(1, int(rate * lease.total_seconds() / 2))
_UNREACHABLE = (Reason.CONSENT, Reason.INVALID_ADDRESS, Reason.SUPPRESSED_ADDRESS)
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


def member_independent(journey: Journey, start: str | None) -> bool:
    """Whether walking from START ends the same way for every member: only sends, updates, waits of a fixed
    length or until an event, and ends on the way (no ``if``, ``split`` or local-time wait)."""
    current = start
    for _ in range(MAX_STEPS_PER_RUN):
        if current is None or not journey.has_step(current):
            return True
        step = journey.step(current)
        if isinstance(step, WaitStep):
            return bool(step.until_event) or step.duration is not None
        if isinstance(step, EndStep):
            return True
        if not isinstance(step, SendStep | UpdateStep):
            return False
        current = journey.following(step.id)
    return False


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
        self._links: dict[tuple[str, str], str] = {}
        self._new_suppressions: list[tuple[str, str, str]] = []
        self._live: dict[str, LiveJourney] = {}
        # Walks that end the same way for every member, by (journey, version, start step, variant) and clock.
        self._walks: dict[tuple[str, int, str | None, str | None], Transition] = {}
        self._walks_at: datetime | None = None

    # ------------------------------------------------------------------ enrollments

    def run_due(self, now: datetime, live: dict[str, LiveJourney], report: TickReport,
                stop: Callable[[], bool]) -> None:
        running = [j.id for j in live.values() if j.journey.runs]
        self._live = live
        config = self.app.config
        lease = now + timedelta(seconds=config.scheduler.lease_seconds)
        with self.app.store.checkpointing(), fewer_collections():
            while not stop():
                with self.app.store.begin() as conn:
                    ids = queries.claim_due_enrollments(conn, self.worker, now, lease, config.scheduler.batch_size,
                                                        running)
                if not ids:
                    return
                self._run_batch(ids, now, report, stop)

    def _load(self, conn: Connection, ids: list[int], now: datetime, computed: list[str]) -> list[dict[str, Any]]:
        return load_batch(conn, ids, computed_columns(computed, now, self.app.store.dialect))

    def _advance(self, live: LiveJourney, row: dict[str, Any], now: datetime,
                 event: Mapping[str, Any]) -> Transition:
        """advance(), computed once per batch clock for walks that end the same way for every member."""
        waiting_for, variant, start = row.get("waiting_for"), row.get("variant"), row["step"]
        key = (live.id, live.version, start, variant)
        if waiting_for is None:
            if self._walks_at != now:
                self._walks.clear()
                self._walks_at = now
            known = self._walks.get(key)
            if known is not None:
                return Transition(row["enrollment_id"], known.step, known.status, known.next_run_at,
                                  known.ended_at, known.exit_reason, known.sends, known.holdouts, known.updates,
                                  known.variant, known.waiting_for)
        transition = advance(live, start, row, now, row["enrollment_id"], self.app.config.default_timezone, event,
                             waiting_for=waiting_for, variant=variant)
        if waiting_for is None and member_independent(live.journey, start):
            self._walks[key] = transition
        return transition

    def _run_batch(self, ids: list[int], now: datetime, report: TickReport, stop: Callable[[], bool]) -> None:
        app = self.app
        rails = Rails(app.config)
        computed = sorted(computed_needed(self._live.values()))  # loaded with each member, shown to templates
        with app.store.connect() as conn:
            rows = self._load(conn, ids, now, computed)
            rails.prepare(conn, rows, now)
            journeys = {}
            for row in rows:
                key = (row["journey_id"], row["journey_version"])
                if key not in journeys:
                    journeys[key] = self.cache.get(conn, *key)
        transitions: list[Transition] = []
        outgoing: list[dict[str, Any]] = []
        changed: list[tuple[dict[str, Any], dict[str, Any], LiveJourney, list[str]]] = []
        contexts = ContextBuilder(app.rules().loyalty, app.config.default_locale, app.config.default_timezone,
                                  computed)
        lease_until = now + timedelta(seconds=app.config.scheduler.lease_seconds)
        for row in rows:
            live = journeys[(row["journey_id"], row["journey_version"])]
            if live is None:
                transitions.append(Transition(row["enrollment_id"], None, EnrollmentStatus.EXITED.value, None, now,
                                              "journey version missing"))
                continue
            event = row.get("event_properties") or {}
            transition = self._advance(live, row, now, event)
            transitions.append(transition)
            if transition.updates:
                person = dict(row, variant=transition.variant)
                for update_step in transition.updates:
                    apply_update(person, update_step)
                changed.append((row, person, live, [u.id for u in transition.updates]))
            else:  # the loaded row is ours alone: no copy needed when nothing changes it
                row["variant"] = transition.variant
                person = row
            for step in transition.sends:
                outgoing.append(self._message_row(live, person, step, now, rails, contexts, event, lease_until))
            for split in transition.holdouts:
                outgoing.append(self._holdout_row(live, person, split, now))
        with app.store.begin() as conn:
            inserted = audit.append(conn, app.store.dialect, outgoing)
            self._save_transitions(conn, transitions)
            if changed:
                save_member_updates(conn, changed, app.rules().loyalty, now)
        for t in transitions:
            if t.status == EnrollmentStatus.COMPLETED.value:
                report.add("completed")
            elif t.status == EnrollmentStatus.EXITED.value:
                report.add("exited")
        sending = MessageStatus.SENDING.value
        for row in inserted:
            if row["status"] != sending:
                report.add(row["status"])
        self._deliver([r for r in inserted if r["status"] == sending], now, report, stop)

    def _holdout_row(self, live: LiveJourney, member: Mapping[str, Any], split: SplitStep,
                     now: datetime) -> dict[str, Any]:
        """The control group gets nothing, but its members are logged so that lift can be measured."""
        row = self._base_row(live, member, split.id, "none", None, now)
        row.update(status=MessageStatus.SUPPRESSED.value, reason=Reason.HOLDOUT,
                   error=f"holdout: {split.holdout}% control group of split {split.id}")
        return row

    def _base_row(self, live: LiveJourney, member: Mapping[str, Any], step_id: str, channel: str,
                  template: str | None, now: datetime) -> dict[str, Any]:
        return {
            "enrollment_id": member["enrollment_id"], "member_id": member["id"], "journey": live.id,
            "journey_version": live.version, "step": step_id, "channel": channel, "template": template,
            "locale": None, "variant": member.get("variant"), "recipient": None, "subject": None, "body": None,
            "html": None, "status": MessageStatus.SUPPRESSED.value, "reason": None, "error": None,
            "provider_id": None, "attempts": 0, "next_attempt_at": None, "created_at": now,
            "sent_at": None, "updated_at": now, "claimed_by": None, "claimed_until": None, "redacted": False,
            "segments": None, "encoding": None, "category": live.journey.category,
        }

    def _message_row(self, live: LiveJourney, member: Mapping[str, Any], step: SendStep, now: datetime,
                     rails: Rails, contexts: ContextBuilder, event: Mapping[str, Any],
                     lease_until: datetime) -> dict[str, Any]:
        category = live.journey.category
        channel = step.channel
        verdict, address = rails.check(member, channel, now, category)
        note = None
        if step.fallback and verdict.reason in _UNREACHABLE:
            second, second_address = rails.check(member, step.fallback, now, category)
            if second.status is not MessageStatus.SUPPRESSED:
                note = f"{channel} unreachable ({verdict.error}); sent by {step.fallback} instead"
                channel, verdict, address = step.fallback, second, second_address
        row: dict[str, Any] = {
            "enrollment_id": member["enrollment_id"], "member_id": member["id"], "journey": live.id,
            "journey_version": live.version, "step": step.id, "channel": channel, "template": step.template,
            "locale": None, "variant": member.get("variant"), "recipient": address, "subject": None, "body": None,
            "html": None, "status": verdict.status.value, "reason": verdict.reason or ("fallback" if note else None),
            "error": verdict.error or note,
            "provider_id": None, "attempts": 0, "next_attempt_at": verdict.not_before, "created_at": now,
            "sent_at": None, "updated_at": now, "claimed_by": None, "claimed_until": None, "redacted": False,
            "segments": None, "encoding": None, "category": category,
        }
        if verdict.status is MessageStatus.SUPPRESSED:
            return row
        link = self._unsubscribe_link(member["id"], channel)
        context = contexts.build(member, now, {"id": live.id, "name": live.journey.name, "version": live.version},
                                 event, link)
        try:
            rendered = self.app.templates.render(step.template, channel, member.get("locale"), context)
        except TemplateRenderError as exc:
            row.update(status=MessageStatus.FAILED.value, reason=Reason.TEMPLATE_ERROR, error=str(exc),
                       next_attempt_at=None)
            log.warning("journey %s step %s: %s", live.id, step.id, exc)
            return row
        row["locale"], row["subject"], row["body"], row["html"] = (rendered.locale, rendered.subject, rendered.text,
                                                                   rendered.html)
        if channel == "sms" and category == "marketing":
            row["body"] = self._with_opt_out_hint(rendered.text, rendered.locale)
        if channel == "sms":
            row["segments"], row["encoding"] = sms.segments(row["body"])
        if verdict.status is MessageStatus.SENDING:
            row["claimed_by"] = self.worker
            row["claimed_until"] = lease_until
        return row

    def _with_opt_out_hint(self, text: str, locale: str) -> str:
        """Marketing SMS must tell people how to opt out: append the programme's hint unless the text has one."""
        if sms.has_opt_out_hint(text):
            return text
        hints = self.app.config.channels.sms.opt_out_hint
        hint = hints.get(locale) or hints.get(locale.split("-")[0]) or next(iter(hints.values()), "")
        return f"{text} {hint}".strip() if hint else text

    def _unsubscribe_link(self, member_id: str, channel: str) -> str:
        key = (member_id, channel)
        link = self._links.get(key)
        if link is None:
            if len(self._links) > 50_000:
                self._links.clear()
            token = unsub.make_token(self.app.secret, member_id, channel)
            link = self._links[key] = unsub.url(self.app.config.web.public_url, token)
        return link

    def _save_transitions(self, conn: Connection, transitions: Sequence[Transition]) -> None:
        w = queries.BulkWriter(self.app.store.dialect)
        w.update_by_id(conn, "enrollments", _TRANSITION_COLUMNS, [
            (t.step, t.status, w.ts(t.next_run_at), w.ts(t.ended_at), t.exit_reason, t.variant, t.waiting_for,
             None, None, t.enrollment_id) for t in transitions])

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
            headers = unsub.headers(self._unsubscribe_link(row["member_id"], "email"))
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
            update = ResultUpdate(row["id"], MessageStatus.SENT.value, result.provider_id, result.error, attempts,
                                  now, None, row.get("reason"))
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
