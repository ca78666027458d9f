"""Anchors: the chain's head (row count, last hash, time) written down outside the database.

The keyed chain stops anyone without the audit key from rewriting rows, but not from deleting the newest rows
and putting back a head they saw earlier. An anchor kept elsewhere (printed by ``run.py audit anchor``, appended
to ``audit.anchor_file`` by the daemon) catches that: ``audit verify --anchor FILE`` requires every anchored row
to be there with the hash it had.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import Connection, select

from engine.store.models import audit_head, messages


@dataclass(frozen=True)
class Anchor:
    rows: int
    hash: str
    at: str

    def line(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class BadAnchor(ValueError):
    """An anchor file line that is not an anchor."""


def take(conn: Connection, now: datetime) -> Anchor:
    """The head as it is now: rows in the chain and the last row's hash."""
    head = conn.execute(select(audit_head.c.last_seq, audit_head.c.last_hash).where(audit_head.c.id == 1)).first()
    if head is None:
        return Anchor(0, "0" * 64, now.isoformat())
    return Anchor(int(head.last_seq), str(head.last_hash), now.isoformat())


def append(path: Path, anchor: Anchor) -> None:
    """Add ANCHOR as one line to PATH, synced (the file may be a mount an auditor controls)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as file:
        file.write(anchor.line() + "\n")
        file.flush()
        os.fsync(file.fileno())


def read(path: Path) -> list[Anchor]:
    """The anchors in PATH, one JSON object per line (blank lines skipped)."""
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            out.append(Anchor(int(data["rows"]), str(data["hash"]), str(data["at"])))
        except (ValueError, KeyError, TypeError):
            raise BadAnchor(f"{path}:{number}: not an anchor (expected a line such as "
                            '{"at": "…", "hash": "…", "rows": 123} from `run.py audit anchor`)') from None
    return out


def check(conn: Connection, anchors: Iterable[Anchor]) -> str | None:
    """None when every anchored row is in the log with its anchored hash; else what is wrong with the first
    anchor that is not."""
    for anchor in anchors:
        if anchor.rows == 0:
            continue
        found = conn.execute(select(messages.c.hash).where(messages.c.id == anchor.rows)).scalar()
        if found is None:
            last = conn.execute(select(messages.c.id).order_by(messages.c.id.desc()).limit(1)).scalar() or 0
            return (f"the anchor taken at {anchor.at} records {anchor.rows} rows, but the log ends at row {last}: "
                    "rows were deleted from the end and the head rolled back")
        if found != anchor.hash:
            return (f"row {anchor.rows} does not have the hash the anchor taken at {anchor.at} recorded: the log "
                    "was rewritten up to there")
    return None
