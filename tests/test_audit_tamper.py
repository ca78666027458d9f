"""The tamper corpus: each way someone with write access to the database (but not the audit key) might alter the
message log, one at a time, on SQLite and PostgreSQL. `audit verify` must pass the untouched log and catch every
case, naming the row; each case pins one check of engine.audit.chain.verify (remove that check and its case
fails here).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, select, text, update

from engine.audit import anchors
from engine.audit import chain as audit
from engine.cli import members as member_ops
from engine.store import seal
from engine.store.models import audit_head, messages
from engine.testing import Harness

LAPSED = "2026-01-15T12:00:00+08:00"
NOW = "2026-04-01T12:00:00+08:00"


def member(member_id: str, **extra: Any) -> dict[str, Any]:
    return {"id": member_id, "name": f"Member {member_id}", "email": f"{member_id}@example.com",
            "phone": "13800138000", "timezone": "Asia/Shanghai", "locale": "zh-CN", "total_spend": 800,
            "order_count": 3, "last_order_at": LAPSED, "email_opt_in": True, "sms_opt_in": True, **extra}


@pytest.fixture
def world(tmp_path: Path, db_url: str) -> Iterator[Harness]:
    """Six win-back emails: sent ones, one suppressed for consent, one member erased by `member forget`."""
    h = Harness(tmp_path, db_url)
    h.members(*(member(f"m{i}") for i in range(1, 5)), member("m5", email_opt_in=False), member("m6"))
    h.tick(NOW)
    with h.app.store.begin() as conn:
        member_ops.forget(conn, "m6", datetime.now(UTC))
    h.verify_on_close = False  # the cases tamper with it
    yield h
    h.close()


def verify(h: Harness) -> audit.Verification:
    with h.app.store.connect() as conn:
        return audit.verify(conn)


def row_of(conn: Connection, member_id: str) -> dict[str, Any]:
    return dict(conn.execute(select(messages).where(messages.c.member_id == member_id)).mappings().one())


def change(member_id: str, **values: Any) -> Callable[[Connection], None]:
    def apply(conn: Connection) -> None:
        conn.execute(update(messages).where(messages.c.member_id == member_id).values(**values))
    return apply


def delete_last_and_roll_back_the_head(conn: Connection) -> None:
    last = conn.execute(select(messages).order_by(messages.c.id.desc()).limit(1)).mappings().one()
    conn.execute(messages.delete().where(messages.c.id == last["id"]))
    conn.execute(update(audit_head).values(last_seq=last["id"] - 1, last_hash=last["prev_hash"]))


def rehash_without_the_key(conn: Connection) -> None:
    """Rewrite m2's body and recompute its content hash and every link from there on, as one would knowing the
    algorithm but not the key (plain SHA-256 links, as before migration 0007). The head is left alone: its MAC
    would give it away (a case of its own)."""
    conn.execute(update(messages).where(messages.c.member_id == "m2").values(body="forged body"))
    rows = [dict(r) for r in conn.execute(select(messages).order_by(messages.c.id)).mappings()]
    prev = audit.GENESIS
    for row in rows:
        row["content_hash"] = audit.content_hash(row) if not row["redacted"] else row["content_hash"]
        row["prev_hash"] = prev
        row["hash"] = prev = audit.chain_hash(prev, row)
        conn.execute(update(messages).where(messages.c.id == row["id"]).values(
            content_hash=row["content_hash"], prev_hash=row["prev_hash"], hash=row["hash"]))


def swap_two_rows(conn: Connection) -> None:
    a, b = row_of(conn, "m1"), row_of(conn, "m2")
    fields = ("member_id", "recipient", "subject", "body", "html", "content_hash", "hash", "prev_hash")
    conn.execute(update(messages).where(messages.c.id == a["id"]).values(**{f: b[f] for f in fields}))
    conn.execute(update(messages).where(messages.c.id == b["id"]).values(**{f: a[f] for f in fields}))


def borrow_a_seal(conn: Connection) -> None:
    """m5's suppressed row made sent, with the seal of m1's sent row (same status, other row)."""
    sent = row_of(conn, "m1")
    conn.execute(update(messages).where(messages.c.member_id == "m5").values(
        status="sent", reason=None, error=None, provider_id=sent["provider_id"], sent_at=sent["sent_at"],
        state_mac=sent["state_mac"]))


def claim_the_rows_predate_the_key(conn: Connection) -> None:
    conn.execute(update(audit_head).values(keyed_from=1000))


def unseal_a_row(conn: Connection) -> None:
    conn.execute(update(messages).where(messages.c.member_id == "m1").values(state_mac=None))


def forge_the_head_mac(conn: Connection) -> None:
    head = conn.execute(select(audit_head)).mappings().one()
    conn.execute(update(audit_head).values(
        mac=hashlib.sha256(f"head|{head['last_seq']}|{head['last_hash']}".encode()).hexdigest()))


CASES: dict[str, tuple[Callable[[Connection], None], str]] = {
    "a changed body": (change("m1", body="changed"), "content"),
    "a changed recipient": (change("m1", recipient="attacker@example.com"), "content"),
    "a changed body passed off as erased": (change("m2", body="changed", redacted=True), "marked erased"),
    "an erasure made outside the engine": (change("m3", recipient=None, subject=None, body=None, html=None,
                                                  redacted=True), "erasure flag"),
    "an erased row un-erased": (change("m6", redacted=False), "content"),
    "a suppressed message shown as sent": (change("m5", status="sent"), "status"),
    "a reason changed": (change("m5", reason="quiet_hours"), "reason"),
    "an error rewritten": (change("m5", error="member asked us to"), "reason"),
    "a sent time moved": (change("m1", sent_at=datetime(2026, 1, 1, tzinfo=UTC)), "sent time"),
    "a provider id changed": (change("m1", provider_id="other-provider-id"), "provider id"),
    "a seal removed": (unseal_a_row, "seal is missing"),
    "a seal borrowed from another row": (borrow_a_seal, "status"),
    "a row's prev_hash rewritten": (change("m2", prev_hash="f" * 64), "prev_hash"),
    "the last row deleted": (lambda conn: conn.execute(text("DELETE FROM messages WHERE id = 6")),
                             "deleted from the end"),
    "a middle row deleted": (lambda conn: conn.execute(text("DELETE FROM messages WHERE id = 2")), "row 2 is missing"),
    "two rows swapped": (swap_two_rows, "row"),
    "the chain recomputed without the key": (rehash_without_the_key, "hash does not match"),
    "the last row deleted, the head rolled back": (delete_last_and_roll_back_the_head, "head"),
    "rows claimed to predate the keyed chain": (claim_the_rows_predate_the_key, "head"),
    "the head's MAC forged": (forge_the_head_mac, "head"),
    "the head removed": (lambda conn: conn.execute(audit_head.delete()), "head is missing"),
}


def test_the_untouched_log_verifies(world: Harness) -> None:
    result = verify(world)
    assert result.ok, result.problem
    assert (result.rows, result.redacted, result.unkeyed) == (6, 1, 0)
    statuses = sorted(r["status"] for r in world.log())
    assert statuses == ["sent"] * 5 + ["suppressed"]


@pytest.mark.parametrize("case", list(CASES))
def test_each_kind_of_tampering_is_caught(world: Harness, case: str) -> None:
    tamper, words = CASES[case]
    with world.app.store.begin() as conn:
        tamper(conn)
    result = verify(world)
    assert not result.ok, f"{case}: passed verification"
    assert words in (result.problem or ""), f"{case}: {result.problem}"


def test_a_rollback_to_an_earlier_head_is_caught_by_an_anchor(world: Harness) -> None:
    """Someone who kept a copy of the head (and its MAC) from before the last row can put it back after deleting
    that row: the chain then verifies on its own, and only an anchor kept elsewhere tells."""
    with world.app.store.connect() as conn:
        anchor = anchors.take(conn, datetime.now(UTC))
    with world.app.store.begin() as conn:
        last = conn.execute(select(messages).order_by(messages.c.id.desc()).limit(1)).mappings().one()
        conn.execute(messages.delete().where(messages.c.id == last["id"]))
        conn.execute(update(audit_head).values(
            last_seq=last["id"] - 1, last_hash=last["prev_hash"],
            mac=audit.head_mac(seal.key_of(conn), last["id"] - 1, last["prev_hash"], 1)))
    assert verify(world).ok  # the copied head checks out: this is what anchors are for
    with world.app.store.connect() as conn:
        problem = anchors.check(conn, [anchor])
    assert problem is not None and "deleted from the end" in problem


def test_an_anchor_passes_while_the_log_only_grows(world: Harness) -> None:
    with world.app.store.connect() as conn:
        anchor = anchors.take(conn, datetime.now(UTC))
    world.members(member("m7"))
    world.tick("2026-04-02T12:00:00+08:00")
    with world.app.store.connect() as conn:
        assert anchors.check(conn, [anchor]) is None
        assert anchors.take(conn, datetime.now(UTC)).rows > anchor.rows
    assert verify(world).ok


def test_a_log_written_before_the_keyed_chain_verifies_and_says_how_much_of_it_is_unkeyed(
        tmp_path: Path, db_url: str) -> None:
    """A database at migration 0006 with two rows linked by plain SHA-256: after the upgrade they verify as
    unkeyed, and what is appended from then on is keyed."""
    from alembic import command

    from engine.store.database import Store, alembic_config

    store = Store(db_url)
    with store.engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0006")
    prev = audit.GENESIS
    created = datetime(2026, 3, 1, tzinfo=UTC)
    with store.engine.begin() as conn:
        for i in (1, 2):
            row: dict[str, Any] = {
                "id": i, "enrollment_id": i, "member_id": f"old{i}", "journey": "retired", "journey_version": 1,
                "step": "first_touch", "channel": "email", "template": "winback/first_touch", "locale": "en",
                "variant": None, "recipient": f"old{i}@example.com", "subject": "s", "body": "b", "html": None,
                "status": "sent", "reason": None, "error": None, "provider_id": f"p{i}", "attempts": 1,
                "next_attempt_at": None, "created_at": created, "sent_at": created, "updated_at": created,
                "claimed_by": None, "claimed_until": None, "redacted": False, "segments": None, "encoding": None,
                "category": "marketing"}
            row["content_hash"] = audit.content_hash(row)
            row["prev_hash"] = prev
            row["hash"] = prev = audit.chain_hash(prev, row)
            conn.execute(messages.insert().values(**row))
        conn.execute(text("INSERT INTO audit_head (id, last_seq, last_hash) VALUES (1, 2, :h)"), {"h": prev})
    store.close()
    h = Harness(tmp_path, db_url)  # migrates to the newest revision
    result = verify(h)
    assert result.ok and (result.rows, result.unkeyed) == (2, 2), result.problem
    h.members(member("m1"))
    h.tick(NOW)
    result = verify(h)
    assert result.ok and (result.rows, result.unkeyed) == (3, 2), result.problem
    with h.app.store.begin() as conn:
        conn.execute(update(messages).where(messages.c.id == 3).values(status="failed"))
    assert "status" in (verify(h).problem or "")
    h.verify_on_close = False
    h.close()


def test_an_export_verifies_offline_with_the_documented_script_and_an_edit_to_it_does_not(
        world: Harness, tmp_path: Path) -> None:
    """docs/verify_export.py (standard library only) checks an `audit export` against the audit key: the export
    passes; one status edited in it fails naming the row; without the key the links are not checked."""
    import io
    import json
    import subprocess
    import sys

    from engine.audit import messagelog
    from engine.testing import REPO

    out = io.StringIO()
    with world.app.store.connect() as conn:
        assert messagelog.write_proofs(out, messagelog.rows(conn, messagelog.LogFilter()), "jsonl") == 6
    export = tmp_path / "export.jsonl"
    export.write_text(out.getvalue(), encoding="utf-8")
    key = Path(world.config.var_path) / "audit.key"
    assert key.stat().st_mode & 0o777 == 0o600

    def check(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(REPO / "docs" / "verify_export.py"), str(export), *extra],
                              capture_output=True, text=True, check=False)

    ok = check("--key", str(key))
    assert ok.returncode == 0 and "ok: 6 rows" in ok.stdout, ok.stderr
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    suppressed = next(r for r in rows if r["status"] == "suppressed")
    suppressed.update(status="sent", reason=None)
    export.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    bad = check("--key", str(key))
    assert bad.returncode == 1 and f"row {suppressed['id']}" in bad.stderr and "seal" in bad.stderr
    keyless = check()
    assert keyless.returncode == 0 and "not checked" in keyless.stdout  # what no key cannot see


def test_a_member_forgotten_while_their_message_is_in_flight_still_verifies(tmp_path: Path, db_url: str) -> None:
    """`member forget` runs while the provider is answering for that member's message: the answer is recorded
    on the erased row, sealed as erased, and the log verifies."""
    from channels.base import OutgoingMessage, SendResult

    h = Harness(tmp_path, db_url)
    real = h.email.send_batch

    def forget_meanwhile(batch: list[OutgoingMessage]) -> list[SendResult]:
        with h.app.store.begin() as conn:
            member_ops.forget(conn, "m1", datetime.now(UTC))
        return real(batch)

    h.email.send_batch = forget_meanwhile  # type: ignore[method-assign]
    h.members(member("m1"), member("m2"))
    h.tick(NOW)
    rows = {r["member_id"]: r for r in h.log()}
    assert rows["m1"]["status"] == "sent" and rows["m1"]["redacted"] and rows["m1"]["body"] is None
    assert rows["m2"]["status"] == "sent" and not rows["m2"]["redacted"]
    result = verify(h)
    assert result.ok and result.redacted == 1, result.problem
    h.close()


# --------------------------------------------------------------------------- the points ledger


@pytest.fixture
def ledger_world(tmp_path: Path, db_url: str) -> Iterator[Harness]:
    """Two members with an opening balance and two purchases each: three sealed ledger rows per member."""
    h = Harness(tmp_path, db_url)
    h.members(member("p1", points=100), member("p2", points=50))
    for who in ("p1", "p2"):
        h.event(who, "purchase", "2026-03-01T10:00:00+08:00", amount=300, order_id=f"{who}-a")
        h.event(who, "purchase", "2026-03-02T10:00:00+08:00", amount=500, order_id=f"{who}-b")
    h.verify_on_close = False
    yield h
    h.close()


def ledger_problems(h: Harness) -> list[str]:
    from engine.programme import points

    with h.app.store.connect() as conn:
        return points.verify_ledger(conn)[1]


def ledger_rows(conn: Connection, member_id: str) -> list[dict[str, Any]]:
    from engine.store.models import points_ledger

    return [dict(r) for r in conn.execute(select(points_ledger).where(points_ledger.c.member_id == member_id)
                                          .order_by(points_ledger.c.id)).mappings()]


def _ledger_case(which: str) -> Callable[[Connection], None]:
    from engine.store.models import members, points_ledger

    def move_balance(conn: Connection, delta: int) -> None:
        conn.execute(update(members).where(members.c.id == "p1").values(points=members.c.points + delta))

    def apply(conn: Connection) -> None:
        rows = ledger_rows(conn, "p1")
        if which == "row and balance changed together":
            conn.execute(update(points_ledger).where(points_ledger.c.id == rows[1]["id"])
                         .values(points=rows[1]["points"] + 1000))
            move_balance(conn, 1000)
        elif which == "middle row removed, balance lowered":
            conn.execute(points_ledger.delete().where(points_ledger.c.id == rows[1]["id"]))
            move_balance(conn, -rows[1]["points"])
        elif which == "last row removed, balance lowered":
            conn.execute(points_ledger.delete().where(points_ledger.c.id == rows[-1]["id"]))
            move_balance(conn, -rows[-1]["points"])
        elif which == "row slipped in, balance raised":
            conn.execute(points_ledger.insert().values(
                member_id="p1", kind="adjust", points=5000, occurred_at=rows[-1]["occurred_at"], expires_at=None,
                reason="goodwill", event_id=None, created_at=rows[-1]["created_at"]))
            move_balance(conn, 5000)
        elif which == "a sealed row copied, balance raised":
            copy = {k: v for k, v in rows[-1].items() if k != "id"}
            conn.execute(points_ledger.insert().values(**copy))
            move_balance(conn, rows[-1]["points"])
        elif which == "balance changed alone":
            move_balance(conn, 10)
        elif which == "balance seal removed":
            conn.execute(update(members).where(members.c.id == "p1").values(points_mac=None))
    return apply


LEDGER_CASES = {
    "row and balance changed together": "or a row before it removed",
    "middle row removed, balance lowered": "or a row before it removed",
    "last row removed, balance lowered": "rows removed from the end",
    "row slipped in, balance raised": "no seal after sealed rows",
    "a sealed row copied, balance raised": "or a row before it removed",
    "balance changed alone": "the ledger sums to",
    "balance seal removed": "has no seal",
}


def test_the_untouched_ledger_verifies(ledger_world: Harness) -> None:
    assert ledger_problems(ledger_world) == []
    with ledger_world.app.store.connect() as conn:
        rows = ledger_rows(conn, "p1")
    assert len(rows) == 3 and all(r["mac"] for r in rows)


@pytest.mark.parametrize("case", list(LEDGER_CASES))
def test_each_kind_of_ledger_tampering_is_caught(ledger_world: Harness, case: str) -> None:
    with ledger_world.app.store.begin() as conn:
        _ledger_case(case)(conn)
    problems = ledger_problems(ledger_world)
    assert problems and problems[0].startswith("member p1") and LEDGER_CASES[case] in problems[0], (case, problems)
