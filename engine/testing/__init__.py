"""In-memory parts for tests and experiments: a recording channel and a story harness; the provider stand-ins
(``python -m engine.testing.standins``, engine/testing/standins.py) that tests and benches point the real
Twilio and SendGrid clients at.

A test reads as a story::

    h = Harness(tmp_path, db_url)
    h.members({"id": "m1", "email": "a@example.com", "email_opt_in": True, ...})
    h.event("m1", "signup", "2026-03-01T09:00:00+08:00")
    h.tick("2026-03-01T09:05:00+08:00")
    assert [m.step for m in h.sent()] == ["welcome_email"]
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from channels.base import Channel, Outcome, OutgoingMessage, SendResult
from engine.app import App
from engine.audit.chain import verify as verify_chain
from engine.config import load_config
from engine.domain.timeutil import parse_instant
from engine.ingest.events import record_events
from engine.ingest.members import ImportReport, import_members
from engine.programme.points import verify_ledger
from engine.store.models import enrollments, messages
from engine.tick.report import TickReport

REPO = Path(__file__).resolve().parents[2]


class RecordingChannel(Channel):
    """Keeps every message it is given; can be told to answer with given results first."""

    provider = "memory"

    def __init__(self) -> None:
        self.sent: list[OutgoingMessage] = []
        self.script: list[SendResult] = []
        self.calls = 0

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        self.calls += 1
        results = []
        for message in messages:
            result = self.script.pop(0) if self.script else SendResult(Outcome.SENT, f"mem-{message.id}")
            if result.sent:
                self.sent.append(message)
            results.append(result)
        return results


class Harness:
    #: An empty SQLite database at the newest migration: a harness on a SQLite file that does not exist yet starts
    #: from a copy of it (10 ms) instead of running every migration (60 ms). Set once per test session.
    template: Path | None = None

    def __init__(self, tmp_path: Path, db_url: str, *, rules: Path | None = None, templates: Path | None = None,
                 config: dict[str, Any] | None = None, channels: str = "recording") -> None:
        """CHANNELS: "recording" (in memory, the default) or "config" (the adapters config.yaml names)."""
        self.tmp = tmp_path
        settings: dict[str, Any] = {
            "database": {"url": db_url},
            "rules_dir": str(rules or REPO / "rules"),
            "templates_dir": str(templates or REPO / "templates"),
            "var_dir": str(tmp_path / "var"),
            "web": {"public_url": "https://crm.example.com"},
            **(config or {}),
        }
        path = tmp_path / "config.yaml"
        path.write_text(json.dumps(settings), encoding="utf-8")  # JSON is YAML
        self.config = load_config(path)
        database = Path(db_url.removeprefix("sqlite:///"))
        if self.template is not None and db_url.startswith("sqlite:///") and not database.exists():
            shutil.copyfile(self.template, database)
        self.email = RecordingChannel()
        self.sms = RecordingChannel()
        recording: dict[str, Channel] = {"email": self.email, "sms": self.sms}
        self.app = App(self.config, channels=recording if channels == "recording" else None)
        self._lines = 0
        self.verify_on_close = True

    @staticmethod
    def at(when: str | datetime) -> datetime:
        return when if isinstance(when, datetime) else parse_instant(when)

    def members(self, *rows: dict[str, Any], now: str = "2026-01-01T00:00:00Z") -> ImportReport:
        self._lines += 1
        path = self.tmp / f"members-{self._lines}.jsonl"
        path.write_text("\n".join(json.dumps(r, ensure_ascii=False, default=str) for r in rows) + "\n",
                        encoding="utf-8")
        return import_members(self.app.store, path, self.app.loyalty(), self.config.default_region, self.at(now))

    def event(self, member_id: str, kind: str, at: str, **properties: Any) -> ImportReport:
        row = {"member_id": member_id, "type": kind, "at": at, "properties": properties}
        return record_events(self.app.store, [(1, row, None)], self.app.loyalty(), self.at(at), "test")

    def tick(self, now: str | datetime) -> TickReport:
        return self.app.tick(self.at(now))

    def sent(self, channel: str | None = None) -> list[OutgoingMessage]:
        found = [*self.email.sent, *self.sms.sent]
        if channel:
            found = [m for m in found if m.channel == channel]
        return sorted(found, key=lambda m: m.id)

    def steps_sent(self, member_id: str | None = None) -> list[tuple[str, str]]:
        return [(m.journey, m.step) for m in self.sent() if member_id is None or m.member_id == member_id]

    def log(self, **where: Any) -> list[dict[str, Any]]:
        stmt = select(messages).order_by(messages.c.id)
        for key, value in where.items():
            stmt = stmt.where(messages.c[key] == value)
        with self.app.store.connect() as conn:
            return [dict(r) for r in conn.execute(stmt).mappings()]

    def enrollments(self, **where: Any) -> list[dict[str, Any]]:
        stmt = select(enrollments).order_by(enrollments.c.id)
        for key, value in where.items():
            stmt = stmt.where(enrollments.c[key] == value)
        with self.app.store.connect() as conn:
            return [dict(r) for r in conn.execute(stmt).mappings()]

    def close(self) -> None:
        """Close the app; first check that the message log still verifies (every path that changed a message
        sealed it), unless the story tampered with it on purpose (``verify_on_close = False``)."""
        try:
            if self.verify_on_close and not self.app._closed:
                try:
                    with self.app.store.connect() as conn:
                        result = verify_chain(conn)
                        _, ledger = verify_ledger(conn)
                except SQLAlchemyError:  # the story took the database away: nothing to check
                    return
                if not result.ok:
                    raise AssertionError(f"the message log no longer verifies at row {result.first_bad_id}: "
                                         f"{result.problem}")
                if ledger:
                    raise AssertionError(f"the points ledger no longer verifies: {ledger[0]}")
        finally:
            self.app.close()
