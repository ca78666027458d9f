"""The audit key, and the seal every message row's state carries.

The message log is tamper-evident against someone who can write to the database but does not hold the audit
key (kept outside the database: ``var/audit.key``, mode 0600, or ``ENGINE_AUDIT_KEY``; see
engine.domain.unsubscribe.load_secret). The chain links (engine.audit.chain) are HMACs under this key, and so
is each row's ``state_mac``: its status, reason, error, provider id, sent time and erasure flag. Every statement
that changes those columns reseals the rows it changed, in the same transaction; a row changed any other way
fails ``audit verify``.

The key is registered per database engine by the application (engine.app.App) before anything is written.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from weakref import WeakKeyDictionary

from sqlalchemy import Connection, Engine, bindparam, select, update

from engine.store.models import messages

_KEYS: WeakKeyDictionary[Engine, bytes] = WeakKeyDictionary()

#: the columns a row's seal covers (with its id)
STATE_COLUMNS = ("status", "reason", "error", "provider_id", "sent_at", "redacted")


class NoAuditKey(RuntimeError):
    """Something tried to write the message log without an audit key registered for its database."""


class AuditKeyMismatch(RuntimeError):
    """The chain's head does not verify under this process's audit key: another key wrote the log (a daemon
    started with its own var/audit.key), or the head was altered. Nothing is appended until that is resolved."""


def use_key(engine: Engine, key: bytes) -> None:
    _KEYS[engine] = key


def key_of(conn: Connection) -> bytes:
    try:
        return _KEYS[conn.engine]
    except KeyError:
        raise NoAuditKey("no audit key is registered for this database (engine.store.seal.use_key): the message "
                         "log cannot be written or verified without it") from None


def mac(key: bytes, text: str) -> str:
    # hmac.digest: OpenSSL's one-shot HMAC, several times faster than an hmac.new object per message.
    return hmac.digest(key, text.encode(), "sha256").hex()


def _instant(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")


def state_mac(key: bytes, message_id: int, status: str, reason: str | None, error: str | None,
              provider_id: str | None, sent_at: datetime | None, redacted: bool) -> str:
    """The seal over one row's state. Each field is length-prefixed, so no value can pass for two."""
    fields = (str(message_id), status, reason or "", error or "", provider_id or "", _instant(sent_at),
              "1" if redacted else "0")
    return mac(key, "state|" + "|".join(f"{len(f)}:{f}" for f in fields))


def row_state_mac(key: bytes, row: Mapping[str, Any]) -> str:
    return state_mac(key, int(row["id"]), row["status"], row.get("reason"), row.get("error"), row.get("provider_id"),
                     row.get("sent_at"), bool(row.get("redacted")))


def reseal(conn: Connection, ids: Iterable[int]) -> None:
    """Recompute the seal of the rows IDS from what they now hold (after a statement changed their state)."""
    wanted = sorted(set(ids))
    if not wanted:
        return
    key = key_of(conn)
    for start in range(0, len(wanted), 900):  # under SQLite's 999 bound parameters
        rows = conn.execute(select(messages.c.id, *(messages.c[c] for c in STATE_COLUMNS))
                            .where(messages.c.id.in_(wanted[start:start + 900]))).mappings().all()
        seal(conn, [(int(r["id"]), row_state_mac(key, dict(r))) for r in rows])


def seal(conn: Connection, macs: Sequence[tuple[int, str]]) -> None:
    """Write computed seals: (message id, state_mac) pairs."""
    if macs:
        conn.execute(update(messages).where(messages.c.id == bindparam("_id")).values(state_mac=bindparam("_mac")),
                     [{"_id": i, "_mac": m} for i, m in macs])


def _fields(*values: object) -> str:
    return "|".join(f"{len(t)}:{t}" for t in ("" if v is None else _instant(v) if isinstance(v, datetime) else str(v)
                                              for v in values))


def ledger_mac(key: bytes, prev: str, row: Mapping[str, Any]) -> str:
    """The seal of one points-ledger row, chained to the member's previous row (PREV: its seal, "" for the first):
    a row changed, removed from the middle, copied or slipped in breaks the member's chain."""
    return mac(key, "ledger|" + _fields(prev, row["member_id"], row["kind"], row["points"], row["occurred_at"],
                                        row["expires_at"], row["reason"], row["event_id"]))


def balance_mac(key: bytes, member_id: str, points: int, last: str) -> str:
    """The seal of a member's cached balance, bound to their last ledger row's seal (LAST)."""
    return mac(key, "balance|" + _fields(member_id, points, last))
