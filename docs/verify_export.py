#!/usr/bin/env python3
"""Verify an export of the message log (`run.py audit export --format jsonl`) offline, with nothing but Python.

    python docs/verify_export.py EXPORT.jsonl [--key var/audit.key] [--unkeyed-until N] [--anchor ANCHORS.jsonl]

Independent of the engine's code on purpose: it is the algorithm of README "The audit trail", written out.
Without the key it checks what anyone can (ids without gaps, each row's prev_hash is the previous row's hash,
content hashes, erased rows empty); with the key (the text of var/audit.key, or ENGINE_AUDIT_KEY's value) also
every link's HMAC and every row's state seal. An export that starts after row 1 (--since) is checked from its
first row on, whose prev_hash is taken as given. Rows logged before the chain was keyed (the first N, as
`run.py audit verify` reports them) have plain SHA-256 links and no seal: pass --unkeyed-until N. Exit 0 when
everything checks out, 1 naming the first problem.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

CONTENT_FIELDS = ("recipient", "subject", "body", "html", "template", "locale", "variant")


def stamp(value: str | None) -> str:
    """An exported ISO 8601 time as the chain writes it: UTC, microseconds, no offset."""
    if not value:
        return ""
    return datetime.fromisoformat(value).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")


def content_hash(row: dict) -> str:
    blob = json.dumps([row.get(f) for f in CONTENT_FIELDS], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def link(key: bytes | None, prev: str, row: dict) -> str:
    """The row's hash: an HMAC under KEY, or plain SHA-256 (KEY None) for rows from before the keyed chain."""
    parts = (prev, str(row["id"]), row["member_id"], row["journey"], str(row["journey_version"]), row["step"],
             row["channel"], stamp(row["created_at"]), row["content_hash"])
    data = "|".join(parts).encode()
    return hmac.new(key, data, hashlib.sha256).hexdigest() if key else hashlib.sha256(data).hexdigest()


def seal(key: bytes, row: dict) -> str:
    fields = (str(row["id"]), row["status"], row.get("reason") or "", row.get("error") or "",
              row.get("provider_id") or "", stamp(row.get("sent_at")), "1" if row.get("redacted") else "0")
    text = "state|" + "|".join(f"{len(f)}:{f}" for f in fields)
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def problem_with(row: dict, prev: str | None, expected_id: int | None, key: bytes | None,
                 unkeyed: bool = False) -> str | None:
    if expected_id is not None and row["id"] != expected_id:
        return f"row {expected_id} is missing (the next row is {row['id']})"
    if prev is not None and row["prev_hash"] != prev:
        return "prev_hash does not match the row before it"
    if row.get("redacted"):
        if any(row.get(f) is not None for f in ("recipient", "subject", "body", "html")):
            return "marked erased but still holds content"
    elif content_hash(row) != row["content_hash"]:
        return "content (recipient, subject, body…) does not match its content_hash"
    if unkeyed:
        if link(None, row["prev_hash"], row) != row["hash"]:
            return "hash does not match the row's fields"
    elif key is not None:
        if link(key, row["prev_hash"], row) != row["hash"]:
            return "hash does not match the row's fields under this key (rows before the keyed chain: use no key)"
        if row.get("state_mac") is None:
            return "no state seal"
        if seal(key, row) != row["state_mac"]:
            return "status, reason, error, provider id, sent time or erasure flag does not match its seal"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path)
    parser.add_argument("--key", type=Path, help="the audit key file (var/audit.key)")
    parser.add_argument("--unkeyed-until", type=int, default=0, help="rows up to this id predate the keyed chain")
    parser.add_argument("--anchor", type=Path, help="anchors from `run.py audit anchor`")
    args = parser.parse_args()
    key = args.key.read_text().strip().encode() if args.key else None
    prev: str | None = None
    expected: int | None = None
    hashes: dict[int, str] = {}
    count = 0
    with args.export.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            row = json.loads(line)
            problem = problem_with(row, prev, expected, key, row["id"] <= args.unkeyed_until)
            if problem:
                print(f"{args.export}:{number}: row {row['id']}: {problem}", file=sys.stderr)
                return 1
            prev, expected = row["hash"], row["id"] + 1
            hashes[row["id"]] = row["hash"]
            count += 1
    if args.anchor:
        for line in args.anchor.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            anchor = json.loads(line)
            seen = hashes.get(anchor["rows"])
            if anchor["rows"] and seen is None and expected is not None and anchor["rows"] >= expected:
                print(f"anchor taken at {anchor['at']} records {anchor['rows']} rows; the export ends at row "
                      f"{expected - 1}", file=sys.stderr)
                return 1
            if seen is not None and seen != anchor["hash"]:
                print(f"row {anchor['rows']} does not have the hash anchored at {anchor['at']}", file=sys.stderr)
                return 1
    print(f"ok: {count} rows" + ("" if key else " (links and seals not checked: no --key)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
