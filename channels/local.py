"""Local channels that need no credentials: ``console`` prints, ``outbox`` appends JSON lines to a file."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from channels.base import Channel, Outcome, OutgoingMessage, SendResult


class ConsoleChannel(Channel):
    provider = "console"

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        for m in messages:
            head = f"--- {m.channel} #{m.id} to {m.recipient} ({m.journey}/{m.step})"
            lines = [head] + ([f"Subject: {m.subject}"] if m.subject else []) + [m.text, ""]
            self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
        return [SendResult(Outcome.SENT, f"console-{m.id}") for m in messages]


class OutboxChannel(Channel):
    """Appends one JSON object per message to a JSONL file, one write and fsync per batch."""

    provider = "outbox"

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = path.open("a", encoding="utf-8")

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        if not messages:
            return []
        lines = []
        for m in messages:
            record = {"id": m.id, "channel": m.channel, "to": m.recipient, "member_id": m.member_id,
                      "journey": m.journey, "step": m.step, "subject": m.subject, "text": m.text, "html": m.html,
                      "headers": m.headers}
            lines.append(json.dumps(record, ensure_ascii=False))
        self._handle.write("\n".join(lines) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        return [SendResult(Outcome.SENT, f"outbox-{m.id}") for m in messages]

    def close(self) -> None:
        self._handle.close()
