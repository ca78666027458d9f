"""Recorded events against the running journeys: triggers enter members, exit rules and goals end or convert
enrollments, and ``wait: until_event`` steps resume. Matching runs through engine.matching (durable-rules); an
event whose matching fails is quarantined and the batch goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from engine.matching.events import Matcher, MatcherCache
from engine.rules.journey import EventTrigger
from engine.rules.versions import LiveJourney, VersionUnreadable, computed_needed
from engine.store import enrollments as enrollment_rows
from engine.store import loading, queries
from engine.store.computed import computed_columns
from engine.store.enrollments import History
from engine.store.quarantine import Failure, Kind, describe, is_systemic
from engine.store.quarantine import record as record_failures
from engine.tick.entry import ACTIVE, capped_per_day, eligible, new_enrollment
from engine.tick.parts import Parts
from engine.tick.report import TickReport

log = logging.getLogger(__name__)


@dataclass
class _Effects:
    """What one event does (EventPhase._effects)."""

    exits: dict[int, str] = field(default_factory=dict)
    conversions: dict[int, datetime] = field(default_factory=dict)
    resumes: dict[int, str | None] = field(default_factory=dict)
    entries: list[tuple[tuple[str, str], dict[str, Any]]] = field(default_factory=list)
    stale: bool = False
    capped: int = 0


@dataclass
class _Matching:
    """A batch of events' effects so far, and what later events of the batch must see of them."""

    now: datetime
    oldest: datetime
    histories: dict[tuple[str, str], History]
    quota: dict[str, int]
    exits: dict[int, str] = field(default_factory=dict)
    conversions: dict[int, datetime] = field(default_factory=dict)
    resumes: dict[int, str | None] = field(default_factory=dict)
    new_rows: list[dict[str, Any]] = field(default_factory=list)

    def apply(self, effects: _Effects, report: TickReport) -> None:
        for key, why in effects.exits.items():
            self.exits.setdefault(key, why)
        for key, at in effects.conversions.items():
            self.conversions.setdefault(key, at)
        for key, step in effects.resumes.items():
            self.resumes.setdefault(key, step)
        if effects.stale:
            report.add("stale")
        report.add("capped", effects.capped)
        for who, row in effects.entries:
            if who[0] in self.quota:
                self.quota[who[0]] -= 1
            self.histories[who] = History(True, self.now)
            self.new_rows.append(row)



class EventPhase:
    def __init__(self, app: Parts) -> None:
        self.app = app
        self.matchers = MatcherCache()

    def handle_events(self, now: datetime, live: dict[str, LiveJourney], report: TickReport,
                      stop: Callable[[], bool], *, only: Sequence[int] | None = None) -> None:
        """Match unhandled events (ONLY: just these, as `run.py retry` asks) against triggers, exits, goals and
        waits. An event whose matching fails is quarantined and marked handled; the batch goes on. If the
        batch's writes fail because of one event, the batch is matched again one event at a time."""
        running = [j for j in live.values() if j.journey.runs]
        size = self.app.config.scheduler.batch_size
        while not stop():
            ids: list[int] = []
            try:
                with self.app.store.begin() as conn:
                    ids = queries.claim_unhandled_events(conn, now, size, only=only)
                    if not ids:
                        return
                    self._match_and_mark(conn, ids, now, running, report)
            except Exception as exc:
                if is_systemic(exc) or not ids:
                    raise
                log.warning("matching a batch of %d events failed (%s); matching them one by one", len(ids),
                            describe(exc))
                for event_id in ids:
                    self._match_one(event_id, now, running, report)
            report.add("events", len(ids))
            if only is not None:
                return

    def _match_and_mark(self, conn: Connection, ids: list[int], now: datetime, running: list[LiveJourney],
                        report: TickReport) -> None:
        failures = self._match(conn, ids, now, running, report)
        queries.mark_events_handled(conn, ids, now)
        self._quarantine_events(conn, failures, now, report)

    def _match_one(self, event_id: int, now: datetime, running: list[LiveJourney], report: TickReport) -> None:
        try:
            with self.app.store.begin() as conn:
                ids = queries.claim_unhandled_events(conn, now, 1, only=[event_id])
                if ids:
                    self._match_and_mark(conn, ids, now, running, report)
        except Exception as exc:
            if is_systemic(exc):
                raise
            with self.app.store.begin() as conn:
                member = loading.event_member(conn, event_id)
                queries.mark_events_handled(conn, [event_id], now)
                self._quarantine_events(conn, [Failure.of(exc, Kind.EVENT, event_id, member_id=member)], now,
                                        report)

    def _quarantine_events(self, conn: Connection, failures: list[Failure], now: datetime,
                           report: TickReport) -> None:
        """Events whose matching failed: marked handled (a later tick would fail the same way), kept in the
        quarantine until `run.py retry` matches them again."""
        for outcome in record_failures(conn, [Failure(f.kind, f.ref, f.error, f.detail, member_id=f.member_id,
                                                      retry=False) for f in failures], now):
            report.add("quarantined")
            report.problems.append(f"event {outcome.failure.ref} of member {outcome.failure.member_id}: "
                                   f"{outcome.failure.error} (quarantined: run.py retry after a fix)")
            log.error("event %s of member %s quarantined: %s", outcome.failure.ref, outcome.failure.member_id,
                      outcome.failure.error)

    def _match(self, conn: Connection, ids: list[int], now: datetime, running: list[LiveJourney],
               report: TickReport) -> list[Failure]:
        """Match the events IDS in time order and write their effects; the events whose matching failed."""
        batch = loading.load_events(conn, ids)
        member_ids = list({e["member_id"] for e in batch})
        people = self._people(conn, member_ids, now)
        by_member = enrollment_rows.open_by_member(conn, member_ids)
        triggered = [j for j in running if isinstance(j.journey.trigger, EventTrigger)]
        versions = self._versions(conn, {(r["journey_id"], r["journey_version"])
                                         for rows in by_member.values() for r in rows}, report)
        matcher = self.matchers.get([*triggered, *versions.values()])
        state = _Matching(
            now=now, oldest=now - self.app.config.scheduler.trigger_age,
            histories=enrollment_rows.histories(conn, [j.id for j in triggered], member_ids),
            quota=enrollment_rows.entries_left_today(conn, capped_per_day(triggered), now,
                                                   self.app.config.default_timezone))
        failures: list[Failure] = []
        for event in batch:
            member = people.get(event["member_id"])
            if member is None:
                continue
            try:
                effects = self._effects(event, member, by_member.get(member["id"], []), versions, triggered, matcher,
                                        state)
            except Exception as exc:
                if is_systemic(exc):
                    raise
                failures.append(Failure.of(exc, Kind.EVENT, event["id"], member_id=member["id"]))
                continue
            state.apply(effects, report)
        self._write_effects(conn, state, now, report)
        return failures

    def _people(self, conn: Connection, member_ids: list[str], now: datetime) -> dict[str, dict[str, Any]]:
        """The members (not forgotten) with the computed attributes the live journeys' conditions read."""
        extra = computed_columns(computed_needed(self.app.versions.all_live()), now, self.app.store.dialect)
        return loading.load_members(conn, member_ids, extra)

    def _versions(self, conn: Connection, keys: set[tuple[str, int]],
                  report: TickReport) -> dict[tuple[str, int], LiveJourney]:
        """The journey versions members are in; one that cannot be read is left out (its exits, goals and waits
        wait) with the reason in the tick's problems, instead of failing every event."""
        out: dict[tuple[str, int], LiveJourney] = {}
        for key in sorted(keys):
            try:
                version = self.app.versions.get(conn, *key)
            except VersionUnreadable as exc:
                report.problems.append(str(exc))
                continue
            if version is not None:
                out[key] = version
        return out

    def _effects(self, event: dict[str, Any], member: dict[str, Any], rows: list[dict[str, Any]],
                 versions: dict[tuple[str, int], LiveJourney], triggered: list[LiveJourney], matcher: Matcher,
                 state: _Matching) -> _Effects:
        """What one event does, computed against the batch so far without changing anything: applied only if
        all of it could be worked out."""
        now = state.now
        effects = _Effects()
        props = event["properties"] or {}
        keys = matcher.matches(event["id"], event["type"], props, member, now)
        for row in rows:
            version = versions.get((row["journey_id"], row["journey_version"]))
            if version is None:
                continue
            self._goal_and_exit(version, row, event, keys, effects.exits, effects.conversions,
                                state.exits, state.conversions)
            if row["waiting_for"] == event["type"] and row["status"] == ACTIVE and row["id"] not in state.resumes \
                    and row["id"] not in effects.resumes and event["occurred_at"] >= row["entered_at"] \
                    and version.journey.has_step(row["step"]):
                wait = version.journey.step(row["step"])
                effects.resumes[row["id"]] = version.journey.resolve(wait, getattr(wait, "then", None))
        if event["occurred_at"] < state.oldest:
            effects.stale = True
            return effects
        taken: dict[str, int] = {}
        for live in triggered:
            if f"trigger:{live.id}:{live.version}" not in keys:
                continue
            key = (live.id, member["id"])
            if not eligible(live.journey, state.histories.get(key), now):
                continue
            if live.id in state.quota:
                if state.quota[live.id] - taken.get(live.id, 0) <= 0:
                    effects.capped += 1
                    continue
                taken[live.id] = taken.get(live.id, 0) + 1
            effects.entries.append((key, new_enrollment(live, member["id"], f"event:{event['id']}", now, event["id"])))
        return effects

    def _write_effects(self, conn: Connection, state: _Matching, now: datetime, report: TickReport) -> None:
        exits = state.exits
        enrollment_rows.convert(conn, state.conversions)
        report.add("converted", len(state.conversions))
        # A member whose event both ends a wait and exits the journey leaves it: no resume to write for them.
        enrollment_rows.resume(conn, {k: v for k, v in state.resumes.items() if k not in exits}, now)
        enrollment_rows.exit_with_reasons(conn, exits, now)
        report.add("exited", len(exits))
        if state.new_rows:
            report.add("enrolled", enrollment_rows.insert_skipping_duplicates(conn, self.app.store.dialect,
                                                                              state.new_rows))

    @staticmethod
    def _goal_and_exit(live: LiveJourney, row: dict[str, Any], event: Mapping[str, Any], keys: set[str],
                       exits: dict[int, str], conversions: dict[int, datetime], exited: Mapping[int, str],
                       converted: Mapping[int, datetime]) -> None:
        """KEYS: the rules the event matched (engine.matching.events); here only the time windows are
        checked. EXITED and CONVERTED: what earlier events of the batch already did."""
        tag, at, goal = f"{live.id}:{live.version}", event["occurred_at"], live.journey.goal
        if (goal is not None and f"goal:{tag}" in keys and row["converted_at"] is None
                and row["id"] not in converted and row["id"] not in conversions
                and row["entered_at"] <= at <= row["entered_at"] + goal.within):
            conversions[row["id"]] = at
        if f"exit:{tag}" in keys and row["status"] == ACTIVE and at >= row["entered_at"] and row["id"] not in exited:
            exits.setdefault(row["id"], f"exit_when: {event['type']} event")

    # ------------------------------------------------------------------ condition exits

