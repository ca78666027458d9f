"""The message log's hash chain.

Every row carries ``content_hash`` (what was said, to whom) and ``hash`` =
H(prev_hash, the row's identity, content_hash). Appends lock the chain's head
row, so several daemons append one chain in one order. ``member forget``
blanks personal fields but keeps ``content_hash``, so the chain still
verifies after an erasure.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection, select, update

from engine.store.database import insert_for
from engine.store.models import UTCDateTime, audit_head, messages
from engine.store.queries import BulkWriter, among, chunked

GENESIS = "0" * 64
MESSAGE_COLUMNS = tuple(c.name for c in messages.columns)
_TIME_INDEXES = tuple(i for i, c in enumerate(messages.columns) if isinstance(c.type, UTCDateTime))
_ALL_VALUES = itemgetter(*MESSAGE_COLUMNS)
CONTENT_FIELDS = ("recipient", "subject", "body", "html", "template", "locale", "variant")


def _canonical(values: list[Any]) -> str:
    """json.dumps(VALUES, ensure_ascii=False, separators=(",", ":")) for a list of strings and Nones.

    The same text by construction (json.dumps writes each string with this very encode_basestring), without
    setting up an encoder per row; anything else goes through json.dumps itself.
    """
    parts = []
    for value in values:
        if value is None:
            parts.append("null")
        elif type(value) is str:
            parts.append(encode_basestring(value))
        else:
            return json.dumps(values, ensure_ascii=False, separators=(",", ":"))
    return "[" + ",".join(parts) + "]"


def content_hash(row: dict[str, Any]) -> str:
    blob = _canonical([row.get(f) for f in CONTENT_FIELDS])
    return hashlib.sha256(blob.encode()).hexdigest()


def _stamp(created: datetime) -> str:
    return created.strftime("%Y-%m-%dT%H:%M:%S.%f")


def chain_hash(prev: str, row: dict[str, Any], stamps: dict[tuple[datetime, Any], str] | None = None) -> str:
    """STAMPS: a cache of created_at texts for a batch, whose rows share a few instants."""
    created: datetime = row["created_at"]
    if stamps is None:
        stamp = _stamp(created)
    else:
        key = (created, created.utcoffset())  # the text shows local fields: equal instants may differ
        stamp = stamps.get(key) or stamps.setdefault(key, _stamp(created))
    parts = (prev, str(row["id"]), row["member_id"], row["journey"], str(row["journey_version"]), row["step"],
             row["channel"], stamp, row["content_hash"])
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _lock_head(conn: Connection, dialect: str) -> tuple[int, str]:
    insert = insert_for(dialect)
    conn.execute(insert(audit_head).values(id=1, last_seq=0, last_hash=GENESIS).on_conflict_do_nothing())
    row = conn.execute(select(audit_head.c.last_seq, audit_head.c.last_hash).where(audit_head.c.id == 1)
                       .with_for_update()).one()
    return int(row.last_seq), str(row.last_hash)


def append(conn: Connection, dialect: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Insert message rows, chaining them; rows whose (journey, enrollment, step) exists are dropped.

    Returns the rows actually inserted, with ``id`` and hashes set. Must run in
    the caller's transaction: the head lock is held until it commits.
    """
    if not rows:
        return []
    seq, prev = _lock_head(conn, dialect)
    keys = [(r["journey"], r["enrollment_id"], r["step"]) for r in rows]
    existing = _existing_keys(conn, keys)
    inserted: list[dict[str, Any]] = []
    stamps: dict[tuple[datetime, Any], str] = {}
    writer = BulkWriter(dialect)
    conn_rows = []
    for row, key in zip(rows, keys, strict=True):
        if key in existing:
            continue
        existing.add(key)
        seq += 1
        row["id"] = seq
        if "content_hash" not in row:  # composed rows come with theirs
            row["content_hash"] = content_hash(row)
        row["prev_hash"] = prev
        row["hash"] = prev = chain_hash(prev, row, stamps)
        inserted.append(row)
        values = list(_ALL_VALUES(row))
        for index in _TIME_INDEXES:
            if values[index] is not None:
                values[index] = writer.ts(values[index])
        conn_rows.append(tuple(values))
    if inserted:
        writer.insert(conn, "messages", MESSAGE_COLUMNS, conn_rows)
        conn.execute(update(audit_head).where(audit_head.c.id == 1).values(last_seq=seq, last_hash=prev))
    return inserted


def _existing_keys(conn: Connection, keys: list[tuple[str, int, str]]) -> set[tuple[str, int, str]]:
    """Which at-most-once keys are already logged (only after a crash mid-batch are there any)."""
    by_journey: dict[str, set[int]] = {}
    for journey, enrollment_id, _ in keys:
        by_journey.setdefault(journey, set()).add(enrollment_id)
    existing: set[tuple[str, int, str]] = set()
    dialect = conn.dialect.name
    for journey, enrollment_ids in by_journey.items():
        for chunk in chunked(sorted(enrollment_ids), dialect):
            # The unique key's own index (journey, enrollment_id, step): one probe per enrollment.
            found = conn.execute(
                select(messages.c.journey, messages.c.enrollment_id, messages.c.step)
                .where(messages.c.journey == journey, among(messages.c.enrollment_id, chunk, dialect))
            ).all()
            existing.update((j, int(e), s) for j, e, s in found)
    return existing


@dataclass(frozen=True)
class Verification:
    rows: int
    first_bad_id: int | None = None
    problem: str | None = None
    redacted: int = 0

    @property
    def ok(self) -> bool:
        return self.first_bad_id is None and self.problem is None


def _rows(conn: Connection, batch: int = 5000) -> Iterator[dict[str, Any]]:
    last = 0
    while True:
        chunk = conn.execute(select(messages).where(messages.c.id > last).order_by(messages.c.id).limit(batch)) \
            .mappings().all()
        if not chunk:
            return
        for row in chunk:
            yield dict(row)
        last = int(chunk[-1]["id"])


def verify(conn: Connection) -> Verification:
    """Walk the chain from the first row; stop at the first row that does not check out."""
    prev, expected_id, count, redacted = GENESIS, 1, 0, 0
    for row in _rows(conn):
        count += 1
        if row["id"] != expected_id:
            return Verification(count, row["id"], f"row {expected_id} is missing (the next row is {row['id']})")
        if row["prev_hash"] != prev:
            return Verification(count, row["id"], "prev_hash does not match the row before it")
        if row["redacted"]:
            redacted += 1
        elif content_hash(row) != row["content_hash"]:
            return Verification(count, row["id"], "content (recipient, subject, body…) was changed after it was logged")
        if chain_hash(prev, row) != row["hash"]:
            return Verification(count, row["id"], "hash does not match the row's fields")
        prev = row["hash"]
        expected_id += 1
    head = conn.execute(select(audit_head.c.last_seq, audit_head.c.last_hash).where(audit_head.c.id == 1)).first()
    if head is not None and (int(head.last_seq) != expected_id - 1 or head.last_hash != prev):
        return Verification(count, None, f"the chain ends at row {expected_id - 1} but the head records row "
                                          f"{head.last_seq}: rows were deleted from the end")
    return Verification(count, redacted=redacted)
