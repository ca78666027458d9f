"""The message log's hash chain.

Every row carries ``content_hash`` (what was said, to whom) and ``hash`` =
HMAC(audit key; prev_hash, the row's identity, content_hash), and a seal over its
state (``state_mac``, engine.store.seal). Appends lock the chain's head row, so
several daemons append one chain in one order; the head (last row and hash) is
itself MACed. ``member forget`` blanks personal fields but keeps
``content_hash``, and reseals the row as erased, so the chain still verifies
after an erasure. Without the key (kept outside the database), a changed row
cannot be given links or a seal that verify accepts; truncation back to an
earlier head is caught against an anchor kept elsewhere (engine.audit.anchors).
"""

from __future__ import annotations

import hashlib
import hmac
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
from engine.store.seal import AuditKeyMismatch, key_of, mac, row_state_mac

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


def chain_hash(prev: str, row: dict[str, Any], stamps: dict[tuple[datetime, Any], str] | None = None,
               key: bytes | None = None) -> str:
    """The link of ROW after PREV: an HMAC under KEY (None: the unkeyed SHA-256 of rows logged before migration
    0007). STAMPS: a cache of created_at texts for a batch, whose rows share a few instants."""
    created: datetime = row["created_at"]
    if stamps is None:
        stamp = _stamp(created)
    else:
        instant = (created, created.utcoffset())  # the text shows local fields: equal instants may differ
        stamp = stamps.get(instant) or stamps.setdefault(instant, _stamp(created))
    parts = (prev, str(row["id"]), row["member_id"], row["journey"], str(row["journey_version"]), row["step"],
             row["channel"], stamp, row["content_hash"])
    data = "|".join(parts).encode()
    if key is None:
        return hashlib.sha256(data).hexdigest()
    return hmac.digest(key, data, "sha256").hex()


def head_mac(key: bytes, last_seq: int, last_hash: str, keyed_from: int | None) -> str:
    return mac(key, f"head|{last_seq}|{last_hash}|{keyed_from if keyed_from is not None else ''}")


def _lock_head(conn: Connection, dialect: str, key: bytes) -> tuple[int, str, int]:
    """The head, locked for this transaction: (last seq, last hash, first keyed row)."""
    insert = insert_for(dialect)
    conn.execute(insert(audit_head).values(id=1, last_seq=0, last_hash=GENESIS, keyed_from=1,
                                           mac=head_mac(key, 0, GENESIS, 1)).on_conflict_do_nothing())
    row = conn.execute(select(audit_head.c.last_seq, audit_head.c.last_hash, audit_head.c.keyed_from,
                              audit_head.c.mac).where(audit_head.c.id == 1).with_for_update()).one()
    if row.mac is not None and not hmac.compare_digest(
            row.mac, head_mac(key, int(row.last_seq), str(row.last_hash), row.keyed_from)):
        raise AuditKeyMismatch(
            "the message log's head does not verify under this process's audit key: every daemon writing one "
            "database must use the same key (copy var/audit.key from the first daemon, or set ENGINE_AUDIT_KEY "
            "alike on all of them); if the key is right, the head was altered: run `run.py audit verify`. "
            "Nothing is sent until this is resolved.")
    keyed_from = int(row.keyed_from) if row.keyed_from is not None else int(row.last_seq) + 1
    return int(row.last_seq), str(row.last_hash), keyed_from


def append(conn: Connection, dialect: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Insert message rows, chaining them; rows whose (journey, enrollment, step) exists are dropped.

    Returns the rows actually inserted, with ``id`` and hashes set. Must run in
    the caller's transaction: the head lock is held until it commits.
    """
    if not rows:
        return []
    audit_key = key_of(conn)
    seq, prev, keyed_from = _lock_head(conn, dialect, audit_key)
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
        row["hash"] = prev = chain_hash(prev, row, stamps, audit_key)
        row["state_mac"] = row_state_mac(audit_key, row)
        inserted.append(row)
        values = list(_ALL_VALUES(row))
        for index in _TIME_INDEXES:
            if values[index] is not None:
                values[index] = writer.ts(values[index])
        conn_rows.append(tuple(values))
    if inserted:
        writer.insert(conn, "messages", MESSAGE_COLUMNS, conn_rows)
        conn.execute(update(audit_head).where(audit_head.c.id == 1).values(
            last_seq=seq, last_hash=prev, keyed_from=keyed_from, mac=head_mac(audit_key, seq, prev, keyed_from)))
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
    #: rows logged before the chain was keyed (migration 0007): linked by plain SHA-256, so their links prove
    #: order and content only against someone who did not also recompute every later link
    unkeyed: int = 0
    head: tuple[int, str] = (0, GENESIS)

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


_ERASED_FIELDS = ("recipient", "subject", "body", "html")


def _row_problem(row: dict[str, Any], prev: str, key: bytes, keyed: bool) -> str | None:
    """What is wrong with one row given the link before it; None when it checks out."""
    if row["prev_hash"] != prev:
        return "prev_hash does not match the row before it"
    if row["redacted"]:
        if any(row[f] is not None for f in _ERASED_FIELDS):
            return "the row is marked erased but still holds content (recipient, subject, body…)"
    elif content_hash(row) != row["content_hash"]:
        return "content (recipient, subject, body…) was changed after it was logged"
    if chain_hash(prev, row, key=key if keyed else None) != row["hash"]:
        return "hash does not match the row's fields" + ("" if keyed else " (a row from before the keyed chain)")
    if row["state_mac"] is None:
        if keyed:
            return "the row's state seal is missing: its status, reason or error were written without the audit key"
    elif row_state_mac(key, row) != row["state_mac"]:
        return ("its status, reason, error, provider id, sent time or erasure flag was changed outside the engine "
                f"(now: status {row['status']}, reason {row['reason']})")
    return None


def verify(conn: Connection) -> Verification:
    """Walk the chain from the first row; stop at the first row that does not check out; then check the head."""
    key = key_of(conn)
    head = conn.execute(select(audit_head.c.last_seq, audit_head.c.last_hash, audit_head.c.keyed_from,
                               audit_head.c.mac).where(audit_head.c.id == 1)).first()
    # A head without a MAC is one migration 0007 left and nothing has been appended since: every row predates
    # the key (verify says so). Any other head must carry its MAC.
    legacy = head is not None and head.mac is None and head.keyed_from == int(head.last_seq) + 1
    if head is not None and not legacy and (head.mac is None or not hmac.compare_digest(
            head.mac, head_mac(key, int(head.last_seq), str(head.last_hash), head.keyed_from))):
        # First: keyed_from in the head says which rows are checked with the key.
        return Verification(0, None, "the chain's head (last row, last hash, first keyed row) was changed outside "
                                     "the engine, or the audit key is not the one the log was written with")
    keyed_from = 1 if head is None or head.keyed_from is None else int(head.keyed_from)
    prev, expected_id, count, redacted = GENESIS, 1, 0, 0
    for row in _rows(conn):
        count += 1
        if row["id"] != expected_id:
            return Verification(count, row["id"], f"row {expected_id} is missing (the next row is {row['id']})")
        problem = _row_problem(row, prev, key, expected_id >= keyed_from)
        if problem:
            return Verification(count, row["id"], problem)
        redacted += bool(row["redacted"])
        prev = row["hash"]
        expected_id += 1
    last = expected_id - 1
    unkeyed = max(0, min(keyed_from - 1, last))
    if head is not None:
        if int(head.last_seq) != last or head.last_hash != prev:
            return Verification(count, None, f"the chain ends at row {last} but the head records row "
                                              f"{head.last_seq}: rows were deleted from the end")
    elif count:
        return Verification(count, None, "the chain's head is missing")
    return Verification(count, redacted=redacted, unkeyed=unkeyed, head=(last, prev))
