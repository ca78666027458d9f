"""Querying and exporting the message log (table, CSV, JSONL), streamed in batches."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any

from sqlalchemy import Connection, select

from engine.store.models import MessageStatus, messages

#: the export fields every log export starts with, in this order (the auditors' contract), then ours
FIELDS = ("id", "member_id", "journey", "step", "channel", "template", "variant", "recipient", "subject", "body",
          "status", "provider_id", "error", "created_at", "sent_at", "hash", "prev_hash")
EXTRA_FIELDS = ("reason", "journey_version", "enrollment_id", "locale", "attempts", "next_attempt_at")
TABLE_FIELDS = ("id", "created_at", "member_id", "journey", "step", "channel", "status", "reason", "recipient")
STATUSES = tuple(s.value for s in MessageStatus)
#: `audit export`: every field the chain, the content hash and the state seal are computed from, and the proofs
PROOF_FIELDS = ("id", "member_id", "journey", "journey_version", "step", "channel", "template", "locale", "variant",
                "recipient", "subject", "body", "html", "status", "reason", "error", "provider_id", "created_at",
                "sent_at", "redacted", "content_hash", "prev_hash", "hash", "state_mac")


@dataclass(frozen=True)
class LogFilter:
    member: str | None = None
    journey: str | None = None
    status: str | None = None
    since: datetime | None = None
    until: datetime | None = None


def rows(conn: Connection, f: LogFilter, batch: int = 2000) -> Iterator[dict[str, Any]]:
    last = 0
    while True:
        stmt = select(messages).where(messages.c.id > last).order_by(messages.c.id).limit(batch)
        if f.member:
            stmt = stmt.where(messages.c.member_id == f.member)
        if f.journey:
            stmt = stmt.where(messages.c.journey == f.journey)
        if f.status:
            stmt = stmt.where(messages.c.status == f.status)
        if f.since:
            stmt = stmt.where(messages.c.created_at >= f.since)
        if f.until:
            stmt = stmt.where(messages.c.created_at < f.until)
        chunk = conn.execute(stmt).mappings().all()
        if not chunk:
            return
        yield from (dict(r) for r in chunk)
        last = int(chunk[-1]["id"])


def _value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def record(row: dict[str, Any]) -> dict[str, Any]:
    return {k: _value(row.get(k)) for k in (*FIELDS, *EXTRA_FIELDS)}


def write_proofs(out: IO[str], items: Iterator[dict[str, Any]], fmt: str) -> int:
    """The log with its proofs (PROOF_FIELDS), as JSON lines (what docs/verify_export.py checks) or CSV (for
    reading: CSV cannot tell an empty text from none, so content hashes are checked on JSON lines)."""
    count = 0
    writer = csv.DictWriter(out, fieldnames=list(PROOF_FIELDS)) if fmt == "csv" else None
    if writer is not None:
        writer.writeheader()
    for row in items:
        item = {k: _value(row.get(k)) for k in PROOF_FIELDS}
        if writer is not None:
            writer.writerow(item)
        else:
            out.write(json.dumps(item, ensure_ascii=False) + "\n")
        count += 1
    return count


def write(out: IO[str], items: Iterator[dict[str, Any]], fmt: str) -> int:
    count = 0
    if fmt == "jsonl":
        for row in items:
            out.write(json.dumps(record(row), ensure_ascii=False) + "\n")
            count += 1
        return count
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=[*FIELDS, *EXTRA_FIELDS])
        writer.writeheader()
        for row in items:
            writer.writerow(record(row))
            count += 1
        return count
    buffer: list[list[str]] = []
    for row in items:
        values = []
        for key in TABLE_FIELDS:
            value = row.get(key)
            if isinstance(value, datetime):
                value = value.strftime("%Y-%m-%d %H:%M")
            values.append("" if value is None else str(value))
        buffer.append(values)
        count += 1
        if len(buffer) >= 1000:
            _table(out, buffer, header=count <= 1000)
            buffer = []
    if buffer or count == 0:
        _table(out, buffer, header=count <= 1000)
    return count


def _width(text: str) -> int:
    # East Asian characters take two columns in a terminal.
    return sum(2 if ord(ch) > 0x2E80 else 1 for ch in text)


def _table(out: IO[str], body: list[list[str]], header: bool) -> None:
    lines = ([list(TABLE_FIELDS)] if header else []) + body
    widths = [max(_width(line[i]) for line in lines) for i in range(len(TABLE_FIELDS))]
    for line in lines:
        out.write("  ".join(cell + " " * (w - _width(cell)) for cell, w in zip(line, widths, strict=True)).rstrip()
                  + "\n")



#: the fields of a quarantine entry as `log --status quarantined` shows them
QUARANTINE_FIELDS = ("id", "kind", "ref", "journey_id", "journey_version", "step", "member_id", "status", "attempts",
                     "error", "first_failed_at", "last_failed_at", "next_attempt_at")
_QUARANTINE_TABLE = ("id", "last_failed_at", "kind", "ref", "journey_id", "step", "member_id", "status", "attempts",
                     "error")


def write_quarantine(out: IO[str], entries: list[dict[str, Any]], fmt: str) -> int:
    """The units of work set aside after failing (engine.store.quarantine), in the log's formats."""
    records = [{k: _value(e.get(k)) for k in QUARANTINE_FIELDS} for e in entries]
    if fmt == "jsonl":
        for item in records:
            out.write(json.dumps(item, ensure_ascii=False) + "\n")
    elif fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=list(QUARANTINE_FIELDS))
        writer.writeheader()
        writer.writerows(records)
    else:
        lines = [list(_QUARANTINE_TABLE)]
        for e in entries:
            cells = []
            for key in _QUARANTINE_TABLE:
                value = e.get(key)
                if isinstance(value, datetime):
                    value = value.strftime("%Y-%m-%d %H:%M")
                cells.append("" if value is None else str(value))
            lines.append(cells)
        widths = [max(_width(line[i]) for line in lines) for i in range(len(_QUARANTINE_TABLE) - 1)]
        for line in lines:
            head = "  ".join(cell + " " * (w - _width(cell)) for cell, w in zip(line, widths, strict=False))
            out.write(f"{head}  {line[-1]}".rstrip() + "\n")
    return len(entries)
