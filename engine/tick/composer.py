"""Composing a claimed batch: walk each enrollment's steps and turn its sends into message rows.

Pure work on a loaded batch (members, their enrollments and the safety rails' view of the database): no
writes and no channel calls. The runner composes in its own process, or hands whole batches to a compose
worker (``engine.tick.pipeline``) that runs this same code beside it while the runner writes and delivers the
batch before. Either way the runner alone writes the rows, calls the channels and records their answers.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Connection

from channels import sms
from engine.audit.chain import content_hash
from engine.config import Config
from engine.domain import unsubscribe as unsub
from engine.rules.journey import EndStep, Journey, SendStep, SplitStep, UpdateStep, WaitStep
from engine.rules.loyalty import Loyalty
from engine.rules.templates import Templates
from engine.rules.versions import LiveJourney, VersionCache, VersionUnreadable
from engine.store.computed import computed_columns
from engine.store.loading import load_batch
from engine.store.models import EnrollmentStatus, MessageStatus
from engine.store.quarantine import Failure, Kind, is_systemic
from engine.tick.context import ContextBuilder
from engine.tick.safety import Rails, Reason
from engine.tick.steps import MAX_STEPS_PER_RUN, Transition, advance, apply_update

log = logging.getLogger(__name__)

_UNREACHABLE = (Reason.CONSENT, Reason.INVALID_ADDRESS, Reason.SUPPRESSED_ADDRESS)
#: the keys of a message row that rendering fills; cleared again when a row is suppressed after rendering
RENDERED_KEYS = ("locale", "subject", "body", "html", "segments", "encoding", "claimed_by", "claimed_until",
                 "unsubscribe_url")
#: a message row may carry this key beside its columns: the unsubscribe link its headers need at delivery
UNSUBSCRIBE_URL = "unsubscribe_url"


class Move(NamedTuple):
    """Where one enrollment goes after a batch: written to its row by the runner."""

    enrollment_id: int
    step: str | None
    status: str
    next_run_at: datetime | None
    ended_at: datetime | None
    exit_reason: str | None
    variant: str | None
    waiting_for: str | None


#: (row, the member as updated, journey, ids of the update steps) for every member an update step changed
Changed = tuple[dict[str, Any], dict[str, Any], LiveJourney, list[str]]


@dataclass
class Composed:
    """One batch, composed: what the runner writes (in one transaction) and then delivers."""

    moves: list[Move] = field(default_factory=list)
    outgoing: list[dict[str, Any]] = field(default_factory=list)
    changed: list[Changed] = field(default_factory=list)
    #: claimed enrollments left for a later batch: their member is in a batch not yet written
    deferred: list[int] = field(default_factory=list)
    #: the members of the composed enrollments
    members: set[str] = field(default_factory=set)
    #: enrollments whose step failed (a render error, bad data): nothing of theirs is written but the failure;
    #: they stay where they were and are tried again later, then quarantined (engine.store.quarantine)
    failures: list[Failure] = field(default_factory=list)
    #: enrollments that had failed before and went through this time: their quarantine entries are settled
    recovered: list[int] = field(default_factory=list)


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


class Composer:
    """Walks and renders batches for one worker id. Keeps per-process caches (walks, unsubscribe links)."""

    def __init__(self, config: Config, templates: Templates, secret: bytes, worker: str) -> None:
        self.config = config
        self.templates = templates
        self.secret = secret
        self.worker = worker
        self._links: dict[tuple[str, str], str] = {}
        # Walks that end the same way for every member, by (journey, version, start step, variant) and clock.
        self._walks: dict[tuple[str, int, str | None, str | None], Transition] = {}
        self._walks_at: datetime | None = None

    # ------------------------------------------------------------------ a whole batch

    def load_and_compose(self, conn: Connection, cache: VersionCache, ids: list[int], now: datetime,
                         loyalty: Loyalty, computed: list[str], busy: Collection[str] = ()) -> Composed:
        """Load the claimed enrollments IDS with their members, prepare the rails and compose them.

        Enrollments of a member in BUSY (a batch composed but not yet written) are left out, in ``deferred``:
        what that batch writes (messages counted by frequency caps, member updates) must be seen first.
        """
        rows = load_batch(conn, ids, computed_columns(computed, now, conn.dialect.name))
        deferred: list[int] = []
        if busy:
            kept = [r for r in rows if r["id"] not in busy]
            deferred = [int(r["enrollment_id"]) for r in rows if r["id"] in busy]
            rows = kept
        rails = Rails(self.config)
        rails.prepare(conn, rows, now)
        journeys: dict[tuple[str, int], LiveJourney | None] = {}
        unreadable: dict[tuple[str, int], VersionUnreadable] = {}
        for row in rows:
            key = (row["journey_id"], row["journey_version"])
            if key not in journeys and key not in unreadable:
                try:
                    journeys[key] = cache.get(conn, *key)
                except VersionUnreadable as exc:  # its enrollments wait (then quarantine); the others go on
                    unreadable[key] = exc
        contexts = ContextBuilder(loyalty, self.config.default_locale, self.config.default_timezone, computed)
        readable = [r for r in rows if (r["journey_id"], r["journey_version"]) not in unreadable]
        composed = self.compose(readable, journeys, rails, contexts, now)
        for row in rows:
            key = (row["journey_id"], row["journey_version"])
            if key in unreadable:
                composed.failures.append(Failure.of(unreadable[key], Kind.ENROLLMENT, row["enrollment_id"],
                                                    journey_id=key[0], journey_version=key[1], member_id=row["id"],
                                                    step=row["step"]))
        composed.members = {r["id"] for r in rows}
        composed.deferred = deferred
        return composed

    def compose(self, rows: list[dict[str, Any]], journeys: Mapping[tuple[str, int], LiveJourney | None],
                rails: Rails, contexts: ContextBuilder, now: datetime) -> Composed:
        out = Composed(members={r["id"] for r in rows})
        lease_until = now + timedelta(seconds=self.config.scheduler.lease_seconds)
        for row in rows:
            live = journeys[(row["journey_id"], row["journey_version"])]
            if live is None:
                out.moves.append(Move(row["enrollment_id"], None, EnrollmentStatus.EXITED.value, None, now,
                                      "journey version missing", None, None))
                continue
            try:
                self._compose_one(live, row, now, rails, contexts, lease_until, out)
            except Exception as exc:
                # This enrollment alone: nothing of its step is written, it is tried again later (then
                # quarantined), and the rest of the batch goes on.
                if is_systemic(exc):
                    raise
                log.warning("journey %s step %s, member %s: %s", live.id, row["step"], row["id"], exc)
                out.failures.append(Failure.of(exc, Kind.ENROLLMENT, row["enrollment_id"], journey_id=live.id,
                                               journey_version=live.version, member_id=row["id"], step=row["step"]))
                continue
            if row.get("failures"):
                out.recovered.append(int(row["enrollment_id"]))
        return out

    def _compose_one(self, live: LiveJourney, row: dict[str, Any], now: datetime, rails: Rails,
                     contexts: ContextBuilder, lease_until: datetime, out: Composed) -> None:
        """One enrollment's walk and messages, added to OUT only once all of it is made."""
        event = row.get("event_properties") or {}
        t = self._advance(live, row, now, event)
        move = Move(t.enrollment_id, t.step, t.status, t.next_run_at, t.ended_at, t.exit_reason, t.variant,
                    t.waiting_for)
        changed: Changed | None = None
        if t.updates:
            person = dict(row, variant=t.variant)
            for update_step in t.updates:
                apply_update(person, update_step)
            changed = (row, person, live, [u.id for u in t.updates])
        else:  # the loaded row is ours alone: no copy needed when nothing changes it
            person = row
        rows = []
        for step in t.sends:
            message = self._message_row(live, person, step, now, rails, contexts, event, lease_until, t.variant)
            message["content_hash"] = content_hash(message)  # what the log chains: computed beside the rendering
            rows.append(message)
        for split in t.holdouts:
            message = self._holdout_row(live, person, split, now, t.variant)
            message["content_hash"] = content_hash(message)
            rows.append(message)
        if changed is None:
            row["variant"] = t.variant
        out.moves.append(move)
        out.outgoing += rows
        if changed is not None:
            out.changed.append(changed)

    # ------------------------------------------------------------------ one enrollment

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
        transition = advance(live, start, row, now, row["enrollment_id"], self.config.default_timezone, event,
                             waiting_for=waiting_for, variant=variant)
        if waiting_for is None and member_independent(live.journey, start):
            self._walks[key] = transition
        return transition

    def _holdout_row(self, live: LiveJourney, member: Mapping[str, Any], split: SplitStep,
                     now: datetime, variant: str | None) -> dict[str, Any]:
        """The control group gets nothing, but its members are logged so that lift can be measured."""
        row = self._base_row(live, member, split.id, "none", None, now, variant)
        row.update(status=MessageStatus.SUPPRESSED.value, reason=Reason.HOLDOUT,
                   error=f"holdout: {split.holdout}% control group of split {split.id}")
        return row

    def _base_row(self, live: LiveJourney, member: Mapping[str, Any], step_id: str, channel: str,
                  template: str | None, now: datetime, variant: str | None) -> dict[str, Any]:
        """A message log row with every column, suppressed and empty: the one place its columns are listed."""
        return {
            "enrollment_id": member["enrollment_id"], "member_id": member["id"], "journey": live.id,
            "journey_version": live.version, "step": step_id, "channel": channel, "template": template,
            "locale": None, "variant": variant, "recipient": None, "subject": None, "body": None,
            "html": None, "status": MessageStatus.SUPPRESSED.value, "reason": None, "error": None,
            "provider_id": None, "attempts": 0, "next_attempt_at": None, "created_at": now,
            "sent_at": None, "updated_at": now, "claimed_by": None, "claimed_until": None, "redacted": False,
            "segments": None, "encoding": None, "category": live.journey.category,
        }

    def _message_row(self, live: LiveJourney, member: Mapping[str, Any], step: SendStep, now: datetime,
                     rails: Rails, contexts: ContextBuilder, event: Mapping[str, Any],
                     lease_until: datetime, variant: str | None) -> dict[str, Any]:
        category = live.journey.category
        channel = step.channel
        verdict, address = rails.check(member, channel, now, category)
        note = None
        if step.fallback and verdict.reason in _UNREACHABLE:
            second, second_address = rails.check(member, step.fallback, now, category)
            if second.status is not MessageStatus.SUPPRESSED:
                note = f"{channel} unreachable ({verdict.error}); sent by {step.fallback} instead"
                channel, verdict, address = step.fallback, second, second_address
        row = self._base_row(live, member, step.id, channel, step.template, now, variant)
        row.update(recipient=address, status=verdict.status.value,
                   reason=verdict.reason or ("fallback" if note else None), error=verdict.error or note,
                   next_attempt_at=verdict.not_before)
        if verdict.status is MessageStatus.SUPPRESSED:
            return row
        link = self.unsubscribe_link(member["id"], channel)
        context = contexts.build(member, now, {"id": live.id, "name": live.journey.name, "version": live.version},
                                 event, link)
        # A render error propagates: the enrollment stays at this step and is tried again (Composer.compose).
        rendered = self.templates.render(step.template, channel, member.get("locale"), context)
        row["locale"], row["subject"], row["body"], row["html"] = (rendered.locale, rendered.subject, rendered.text,
                                                                   rendered.html)
        if channel == "email":
            row[UNSUBSCRIBE_URL] = link
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
        hints = self.config.channels.sms.opt_out_hint
        hint = hints.get(locale) or hints.get(locale.split("-")[0]) or next(iter(hints.values()), "")
        return f"{text} {hint}".strip() if hint else text

    def unsubscribe_link(self, member_id: str, channel: str) -> str:
        key = (member_id, channel)
        link = self._links.get(key)
        if link is None:
            if len(self._links) > 50_000:
                self._links.clear()
            token = unsub.make_token(self.secret, member_id, channel)
            link = self._links[key] = unsub.url(self.config.web.public_url, token)
        return link
