"""The send path's shortcuts give exactly what the general code gives: the batch loader on SQLite against
SQLAlchemy's own result processing, the content hash's canonical text against json.dumps, the outbox line
against json.dumps, whole-number formatting against Babel, and the sandbox's dict shortcut against the sandbox."""

from __future__ import annotations

import contextlib
import json
import random
from datetime import UTC, datetime
from pathlib import Path

import jinja2
import pytest
from babel.numbers import format_decimal
from jinja2.sandbox import ImmutableSandboxedEnvironment
from sqlalchemy import bindparam, text

from channels.base import OutgoingMessage
from channels.local import _line, _record
from engine.audit import chain as audit
from engine.rules.formatting import babel_locale_for, grouped, plain_grouping
from engine.rules.templates import Templates
from engine.store.loading import _COLUMNS, load_batch, select_batch
from engine.store.models import UTCDateTime
from engine.testing import REPO, Harness

_CHARS = ["a", "Z", '"', "\\", "\n", "\t", "\r", "\x00", "\x1f", "\x7f", "é", "中", "\u2028", "\U0001f600", " ",
          "<", "&", "/"]


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(_CHARS) for _ in range(rng.randint(0, 24)))


def test_the_batch_loader_reads_what_sqlalchemy_reads(tmp_path: Path, db_url: str) -> None:
    """Members with every kind of value (times with and without microseconds, NULLs, attributes, booleans, dates)
    and an enrollment triggered by an event: the DBAPI loader and the Core query give equal rows."""
    harness = Harness(tmp_path, db_url)
    try:
        harness.members(
            {"id": "m1", "name": "林", "email": "m1@example.com", "birthday": "1990-02-28", "timezone": "Asia/Shanghai",
             "locale": "zh-CN", "signup_at": "2025-01-01T08:00:00+08:00", "last_order_at": "2026-01-15T12:00:00.5Z",
             "email_opt_in": True, "sms_opt_in": False, "total_spend": 800, "points": 12, "vip_note": "x"},
            {"id": "m2", "name": None, "email": None, "email_opt_in": False})
        harness.event("m1", "signup", "2026-03-01T09:00:00+08:00", channel="app")
        with harness.app.store.begin() as conn:
            event_id = conn.execute(text("SELECT id FROM events WHERE type = 'signup'")).scalar_one()
            for number, member_id in enumerate(("m1", "m2"), 1):
                conn.execute(text(
                    "INSERT INTO enrollments (journey_id, journey_version, member_id, trigger_key, event_id, status, "
                    "step, next_run_at, entered_at) VALUES ('j', 1, :m, :k, :e, 'active', 's', "
                    "'2026-03-01 02:00:00.000000', '2026-03-01 02:00:00')"),
                    {"m": member_id, "k": f"t{number}", "e": event_id if member_id == "m1" else None})
            # A time stored without microseconds (another writer's form) still reads as the same instant.
            conn.execute(text("UPDATE members SET created_at = '2026-01-01 00:00:00' WHERE id = 'm2'"))
        with harness.app.store.connect() as conn:
            ids = [int(i) for i in conn.execute(text("SELECT id FROM enrollments")).scalars()]
            fast = load_batch(conn, ids, [])
            core = [dict(r) for r in conn.execute(select_batch(ids, [])).mappings()]
        assert fast == core
        assert [r["enrollment_id"] for r in fast] == sorted(ids)
        assert fast[0]["event_properties"] == {"channel": "app"}
        assert fast[0]["attributes"] == {"vip_note": "x"}
        assert fast[0]["last_order_at"] == datetime(2026, 1, 15, 12, 0, 0, 500000, tzinfo=UTC)
        assert fast[1]["created_at"] == datetime(2026, 1, 1, tzinfo=UTC)
        assert {name for name, _ in _COLUMNS} == set(fast[0])
    finally:
        harness.close()


def test_the_canonical_content_text_is_json_dumps() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        values = [rng.choice([None, _text(rng)]) for _ in audit.CONTENT_FIELDS]
        assert audit._canonical(values) == json.dumps(values, ensure_ascii=False, separators=(",", ":"))
    odd = ["a", 5, None, 1.5, True]
    assert audit._canonical(odd) == json.dumps(odd, ensure_ascii=False, separators=(",", ":"))


def test_the_chain_hash_with_a_stamp_cache_is_the_chain_hash() -> None:
    from datetime import timedelta, timezone

    stamps: dict[tuple[datetime, object], str] = {}
    base = {"id": 1, "member_id": "m", "journey": "j", "journey_version": 1, "step": "s", "channel": "email",
            "content_hash": "c" * 64}
    utc = datetime(2026, 1, 1, 0, 0, tzinfo=UTC)
    for created in (utc, utc.astimezone(timezone(timedelta(hours=8))), utc, utc.replace(microsecond=5)):
        row = dict(base, created_at=created)
        assert audit.chain_hash("p" * 64, row, stamps) == audit.chain_hash("p" * 64, row)


def test_the_outbox_line_is_json_dumps() -> None:
    rng = random.Random(11)
    for _ in range(3000):
        message = OutgoingMessage(
            id=rng.randint(-5, 10**12), channel=_text(rng), recipient=rng.choice([None, _text(rng)]),
            text=_text(rng), member_id=_text(rng), journey=_text(rng), step=_text(rng),
            subject=rng.choice([None, _text(rng)]), html=rng.choice([None, _text(rng)]),
            headers=rng.choice([{}, {_text(rng): _text(rng)}, {_text(rng): _text(rng), "b": _text(rng)}]))
        assert _line(message) == json.dumps(_record(message), ensure_ascii=False)
    for odd in (OutgoingMessage(id=True, channel="x", recipient=None, text="t", member_id="m", journey="j", step="s"),
                OutgoingMessage(id=1, channel="x", recipient=5, text="t", member_id="m", journey="j",  # type: ignore[arg-type]
                                step="s", headers={1: "x"})):  # type: ignore[dict-item]
        assert _line(odd) == json.dumps(_record(odd), ensure_ascii=False)


@pytest.mark.parametrize("locale", ["en", "zh-CN", "de", "fr", "es", "ru", "hi", "en-IN", "ar", "pt-BR", "sv"])
def test_whole_numbers_read_as_babel_writes_them(locale: str) -> None:
    rng = random.Random(locale)
    samples = [0, 1, -1, 999, 1000, 9999, 10000, 123456789, -98765, 10**18, *(rng.randint(-10**9, 10**9)
                                                                             for _ in range(300))]
    symbols = plain_grouping(locale)
    for value in samples:
        expected = str(format_decimal(value, locale=babel_locale_for(locale)))
        if symbols is not None:
            assert grouped(value, *symbols) == expected
    if locale in ("hi", "en-IN"):
        assert symbols is None  # lakh grouping: Babel decides


def test_the_sandbox_shortcut_answers_as_the_sandbox(tmp_path: Path) -> None:
    templates = Templates(REPO / "templates", "zh-CN")
    plain = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined)
    values = {"name": "x", "items": "shadowed", "keys": 1, "__class__": "k", "_private": 2}
    for attribute in ("name", "items", "keys", "get", "__class__", "_private", "missing", "update", "copy"):
        ours, theirs = templates.env.getattr(values, attribute), plain.getattr(values, attribute)
        assert type(ours) is type(theirs)
        if not isinstance(theirs, jinja2.Undefined):
            assert ours == theirs
        else:
            assert str(ours._undefined_hint) == str(theirs._undefined_hint)
            assert ours._undefined_name == theirs._undefined_name


def test_writes_go_on_beside_the_wal_checkpointer_which_stops_cleanly(tmp_path: Path) -> None:
    import sqlite3
    import time

    from engine.store.database import Store

    store = Store(f"sqlite:///{tmp_path / 'engine.db'}")
    try:
        with store.checkpointing():
            with store.begin() as conn:
                conn.execute(text("CREATE TABLE t (x TEXT)"))
                conn.execute(text("INSERT INTO t VALUES (:x)"), [{"x": "y" * 500} for _ in range(2000)])
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with contextlib.closing(sqlite3.connect(tmp_path / "engine.db")) as raw:
                    busy, frames, copied = raw.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                if busy == 0 and frames > 0 and copied == frames:
                    break
                time.sleep(0.1)
        assert frames > 0 and copied == frames
        with store.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM t")).scalar_one() == 2000
    finally:
        store.close()


def test_set_based_updates_write_what_a_statement_per_row_writes(harness: Harness) -> None:
    """BulkWriter.update_by_id binds values shared by every row once and joins the rest on id: 2,000 enrollments
    (more than one statement's worth) moved with shared and differing values, NULLs among them, end up exactly
    as the same moves made one UPDATE per row; rows the extra condition excludes are left alone."""
    from engine.store.queries import BulkWriter

    names = ("step", "status", "next_run_at", "exit_reason", "variant")
    stamp = datetime(2026, 3, 2, 1, 5, tzinfo=UTC)
    with harness.app.store.begin() as conn:
        # Times bound as the engine binds them (not through sqlite3's default adapter, deprecated since 3.12).
        conn.execute(text("INSERT INTO members (id, attributes, created_at, updated_at, email_opt_in, sms_opt_in, "
                          "points, total_spend, order_count) VALUES ('m', '{}', :t, :t, false, false, 0, 0, 0)")
                     .bindparams(bindparam("t", type_=UTCDateTime())), {"t": stamp})
        conn.execute(text(
            "INSERT INTO enrollments (id, journey_id, journey_version, member_id, trigger_key, status, step, "
            "entered_at) VALUES (:id, :j, 1, 'm', :k, 'active', 'first', :t)").bindparams(
                bindparam("t", type_=UTCDateTime())),
            [{"id": i, "j": f"a{i}" if i <= 2000 else f"b{i}", "k": f"k{i}", "t": stamp} for i in range(1, 4001)])
    writer = BulkWriter(harness.app.store.dialect)
    rng = random.Random(7)

    def moves(offset: int, varied: bool) -> list[tuple[object, ...]]:
        out: list[tuple[object, ...]] = []
        for i in range(offset + 1, offset + 2001):
            later = writer.ts(stamp.replace(day=3 + i % 5)) if varied and rng.random() < 0.5 else None
            variant = rng.choice(["a", "b", None]) if varied else "x"
            out.append(("second", "active" if later else "completed", later, None, variant, i))
        return out

    shared = [("second", "completed", None, None, "x", i) for i in range(1, 1001)]  # one value per column
    varied = moves(1000, varied=True)[:1000]
    with harness.app.store.begin() as conn:
        writer.update_by_id(conn, "enrollments", names, shared, only_if="journey_id < 'b'")
        writer.update_by_id(conn, "enrollments", names, varied, only_if="journey_id < 'b'")
        # the reference: the same moves for the b-journey twins (ids + 2000), a statement per row
        sets = ", ".join(f"{n} = :{n}" for n in names)
        for row in [*shared, *varied]:
            conn.execute(text(f"UPDATE enrollments SET {sets} WHERE id = :id"),
                         {**dict(zip(names, row[:-1], strict=True)), "id": int(str(row[-1])) + 2000})
        # excluded by the condition: nothing happens to a b-journey row addressed directly
        writer.update_by_id(conn, "enrollments", names, [("third", "exited", None, "no", None, 2500)],
                            only_if="journey_id < 'b'")
    with harness.app.store.connect() as conn:
        got = {int(r[0]): tuple(r[1:]) for r in conn.execute(text(
            f"SELECT id, {', '.join(names)} FROM enrollments ORDER BY id"))}
    assert len(got) == 4000
    assert [got[i] for i in range(1, 2001)] == [got[i + 2000] for i in range(1, 2001)]
    assert got[1][:2] == ("second", "completed")
    assert any(v[2] is not None for v in got.values()) and any(v[4] is None for v in got.values())
    assert got[2500][0] == "second"


def test_a_log_row_whose_key_is_already_logged_is_not_appended_again(harness: Harness) -> None:
    """The at-most-once key checked in bulk: of a batch re-appended after a crash, the rows already in the log
    are dropped, the new one goes in, and the hash chain still verifies (1,200 rows: more than one lookup's
    worth on SQLite)."""
    now = datetime(2026, 3, 2, 1, 5, tzinfo=UTC)

    def row(enrollment: int) -> dict[str, object]:
        return {"enrollment_id": enrollment, "member_id": f"m{enrollment}", "journey": "j", "journey_version": 1,
                "step": "s", "channel": "email", "template": "t", "locale": "en", "variant": None,
                "recipient": f"m{enrollment}@example.com", "subject": "hi", "body": "hello", "html": None,
                "status": "sent", "reason": None, "error": None, "provider_id": None, "attempts": 1,
                "next_attempt_at": None, "created_at": now, "sent_at": now, "updated_at": now, "claimed_by": None,
                "claimed_until": None, "redacted": False, "segments": None, "encoding": None,
                "category": "marketing"}

    dialect = harness.app.store.dialect
    with harness.app.store.begin() as conn:
        assert len(audit.append(conn, dialect, [row(i) for i in range(1, 1201)])) == 1200
    with harness.app.store.begin() as conn:
        again = audit.append(conn, dialect, [row(i) for i in range(1, 1202)])
    assert [r["enrollment_id"] for r in again] == [1201]
    with harness.app.store.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM messages")).scalar_one() == 1201
        result = audit.verify(conn)
    assert result.ok and result.rows == 1201


@pytest.mark.slow  # waits for real socket timeouts or a second process
def test_an_outbox_shared_by_two_daemons_is_written_one_batch_at_a_time(tmp_path: Path) -> None:
    """While another process holds the outbox's lock (mid-batch), a batch waits for it instead of writing into
    the middle of the other's lines; once the lock is released its lines follow, whole."""
    import fcntl
    import threading

    from channels.local import OutboxChannel

    path = tmp_path / "outbox" / "email.jsonl"
    channel = OutboxChannel(path)
    other = path.open("a", encoding="utf-8")
    fcntl.flock(other.fileno(), fcntl.LOCK_EX)
    batch = [OutgoingMessage(id=i, channel="email", recipient=f"m{i}@example.com", text="hello " * 50,
                             member_id=f"m{i}", journey="j", step="s", subject="hi") for i in range(1, 201)]
    results: list[object] = []
    sender = threading.Thread(target=lambda: results.extend(channel.send_batch(batch)))
    sender.start()
    sender.join(timeout=0.5)
    assert sender.is_alive() and path.read_text(encoding="utf-8") == ""  # waiting for the lock
    other.write('{"id": 0}\n')
    other.flush()
    fcntl.flock(other.fileno(), fcntl.LOCK_UN)
    sender.join(timeout=10)
    assert not sender.is_alive() and len(results) == 200
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in lines] == list(range(201))
    other.close()
    channel.close()


def test_daemons_starting_together_on_a_fresh_var_dir_share_one_signing_key(tmp_path: Path) -> None:
    """Unsubscribe links signed by one daemon must verify on another: eight starting at once on an empty var/
    all load the same key, kept private, with no stray files left behind."""
    import stat
    import threading

    from engine.domain.unsubscribe import load_secret

    var = tmp_path / "var"
    start = threading.Barrier(8)
    keys: list[bytes] = []
    errors: list[BaseException] = []

    def daemon() -> None:
        start.wait()
        try:
            keys.append(load_secret(var, None))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=daemon) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(keys) == 8 and len(set(keys)) == 1 and len(keys[0]) == 64
    assert [p.name for p in var.iterdir()] == ["secret.key"]
    assert stat.S_IMODE((var / "secret.key").stat().st_mode) == 0o600


def test_a_value_too_long_for_its_column_is_never_stored_cut_short(harness: Harness) -> None:
    """A set-based move with a step id longer than the column allows (64): PostgreSQL rejects it, as it rejects
    the same row written alone, rather than storing the first 64 characters; SQLite keeps it whole."""
    from sqlalchemy.exc import DataError

    from engine.store.queries import BulkWriter

    stamp = datetime(2026, 3, 2, 1, 5, tzinfo=UTC)
    with harness.app.store.begin() as conn:
        conn.execute(text("INSERT INTO members (id, attributes, created_at, updated_at, email_opt_in, sms_opt_in, "
                          "points, total_spend, order_count) VALUES ('m', '{}', :t, :t, false, false, 0, 0, 0)")
                     .bindparams(bindparam("t", type_=UTCDateTime())), {"t": stamp})
        conn.execute(text("INSERT INTO enrollments (id, journey_id, journey_version, member_id, trigger_key, status, "
                          "step, entered_at) VALUES (:id, :j, 1, 'm', 'k', 'active', 'first', :t)")
                     .bindparams(bindparam("t", type_=UTCDateTime())),
                     [{"id": 1, "j": "a", "t": stamp}, {"id": 2, "j": "b", "t": stamp}])
    long_step = "s" * 75
    try:
        with harness.app.store.begin() as conn:
            BulkWriter(harness.app.store.dialect).update_by_id(
                conn, "enrollments", ("step", "status"), [(long_step, "active", 1), ("second", "active", 2)])
    except DataError:
        assert harness.app.store.dialect == "postgresql"
        expected = "first"
    else:
        assert harness.app.store.dialect == "sqlite"
        expected = long_step
    with harness.app.store.connect() as conn:
        assert conn.execute(text("SELECT step FROM enrollments WHERE id = 1")).scalar_one() == expected


def test_the_collector_settings_come_back_after_a_send_however_it_ends() -> None:
    """fewer_collections() changes process-wide settings: after overlapping sends, and after one that fails,
    the thresholds are the caller's again and nothing stays frozen; with the collector off it changes nothing."""
    import gc

    from engine.tick.runner import fewer_collections

    before = gc.get_threshold()
    with fewer_collections():
        assert gc.get_threshold()[0] == 20_000 and gc.get_freeze_count() > 0
        with fewer_collections():
            pass
        assert gc.get_threshold()[0] == 20_000  # the inner send leaving does not restore early
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), fewer_collections():
        raise RuntimeError("the channel broke")
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    gc.disable()
    try:
        with fewer_collections():
            assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    finally:
        gc.enable()


def test_log_rows_with_awkward_text_are_stored_exactly(harness: Harness) -> None:
    """Message text with tabs, newlines, backslashes, quotes, \\N, emoji and Chinese is stored exactly as
    rendered (on PostgreSQL the rows go in through COPY) and the hash chain over it verifies."""
    rng = random.Random(11)
    awkward = [c for c in _CHARS if c != "\x00"] + ["\\N", "\t\\", "\\."]  # PostgreSQL text cannot hold NUL
    now = datetime(2026, 3, 2, 1, 5, 0, 123456, tzinfo=UTC)

    def text_(n: int) -> str:
        return "".join(rng.choice(awkward) for _ in range(n))

    rows = [{"enrollment_id": i, "member_id": f"m{i}", "journey": "j", "journey_version": 1, "step": "s",
             "channel": "email", "template": "t", "locale": "zh-CN", "variant": None,
             "recipient": f"m{i}@example.com", "subject": text_(12), "body": text_(80), "html": text_(40),
             "status": "sending", "reason": None, "error": None, "provider_id": None, "attempts": 0,
             "next_attempt_at": None, "created_at": now, "sent_at": None, "updated_at": now, "claimed_by": "w",
             "claimed_until": now, "redacted": False, "segments": 2, "encoding": "UCS-2", "category": "marketing"}
            for i in range(1, 301)]
    expected = {r["enrollment_id"]: (r["subject"], r["body"], r["html"]) for r in rows}
    with harness.app.store.begin() as conn:
        assert len(audit.append(conn, harness.app.store.dialect, rows)) == 300
    with harness.app.store.connect() as conn:
        stored = {int(e): (s, b, h) for e, s, b, h in conn.execute(text(
            "SELECT enrollment_id, subject, body, html FROM messages"))}
        created = conn.execute(text("SELECT created_at FROM messages WHERE enrollment_id = 1")).scalar_one()
        result = audit.verify(conn)
    assert stored == expected
    assert str(created).startswith("2026-03-02 01:05:00.123456")
    assert result.ok and result.rows == 300


def test_a_large_entry_on_postgresql_refreshes_the_planners_view_of_enrollments(tmp_path: Path,
                                                                                pg_url: str) -> None:
    """After 10,000 lapsed members enter the win-back journey in one tick, PostgreSQL's statistics count them
    (without it the planner believed the journey had a handful of active enrollments and read and sorted all of
    them for every batch claimed: at a million members, 755 messages/s on average instead of 1,610)."""
    from engine.store.models import members
    from engine.tick.report import TickReport

    harness = Harness(tmp_path, pg_url)
    try:
        now = datetime(2026, 6, 15, 4, 0, tzinfo=UTC)
        lapsed = now.replace(year=2025)
        with harness.app.store.begin() as conn:
            conn.execute(members.insert(), [
                {"id": f"L{i:05d}", "email": f"l{i}@example.com", "email_opt_in": True, "sms_opt_in": False,
                 "last_order_at": lapsed, "total_spend": 100.0, "order_count": 1, "points": 0, "attributes": {},
                 "created_at": lapsed, "updated_at": lapsed} for i in range(10_000)])

        def counted() -> float:
            with harness.app.store.connect() as conn:
                return float(conn.execute(text(
                    "SELECT reltuples FROM pg_class WHERE oid = 'enrollments'::regclass")).scalar_one())

        assert counted() < 10_000  # never analyzed (-1) or analyzed while nearly empty
        report = TickReport(now)
        harness.app.entry.enter(now, harness.app.live_journeys(now), report)
        with harness.app.store.connect() as conn:
            stored = conn.execute(text("SELECT count(*) FROM enrollments WHERE journey_id = 'winback'")).scalar_one()
        assert stored == 10_000
        assert report.counts["enrolled"] == 10_000  # the tick's summary counts them (it said 0 on PostgreSQL)
        assert counted() >= 10_000
    finally:
        harness.close()


@pytest.mark.slow
def test_an_empty_signing_key_file_is_reported_not_used(tmp_path: Path) -> None:
    """A key file left empty by a crash mid-creation: unsubscribe links are never signed with an empty key; the
    error names the file and the fix."""
    from engine.domain.unsubscribe import load_secret
    from engine.exceptions import ConfigError

    var = tmp_path / "var"
    var.mkdir()
    (var / "secret.key").write_text("")
    with pytest.raises(ConfigError, match=r"secret\.key is empty .*delete it"):
        load_secret(var, None)
    assert load_secret(var, "configured-secret") == b"configured-secret"


def test_a_broad_segment_audience_on_sqlite_is_read_in_member_order_a_narrow_one_through_its_index(
        tmp_path: Path) -> None:
    """SQLite has no statistics to tell a broad range of last_order_at from a narrow one. Looking up every member
    of a broad audience through that index (then sorting them by id) took three times as long at a million
    members, and a tick that found them all enrolled already twelve times as long; a narrow audience is still
    found through the index. Either way exactly the lapsed members are enrolled."""
    from sqlalchemy import event

    from engine.store.models import members
    from engine.tick.report import TickReport

    now = datetime(2026, 6, 15, 4, 0, tzinfo=UTC)
    recent, lapsed = now.replace(month=6, day=1), now.replace(year=2025)
    for name, lapsed_every in (("broad", 1), ("narrow", 100)):
        (tmp_path / name).mkdir()
        harness = Harness(tmp_path / name, f"sqlite:///{tmp_path / name}.db")
        try:
            with harness.app.store.begin() as conn:
                conn.execute(members.insert(), [
                    {"id": f"L{i:05d}", "email": f"l{i}@example.com", "email_opt_in": True, "sms_opt_in": False,
                     "last_order_at": lapsed if i % lapsed_every == 0 else recent, "total_spend": 100.0,
                     "order_count": 1, "points": 0, "attributes": {}, "created_at": lapsed, "updated_at": lapsed}
                    for i in range(2_000)])
            entries: list[tuple[str, object]] = []

            def seen(_conn: object, _cursor: object, statement: str, parameters: object, *_: object) -> None:
                if statement.startswith("INSERT INTO enrollments") and "winback" in list(parameters):  # type: ignore[call-overload]
                    entries.append((statement, parameters))  # noqa: B023 - read before the next loop

            event.listen(harness.app.store.engine, "before_cursor_execute", seen)
            harness.app.entry.enter(now, harness.app.live_journeys(now), TickReport(now))
            event.remove(harness.app.store.engine, "before_cursor_execute", seen)
            (statement, parameters), = entries
            with harness.app.store.connect() as conn:
                plan = " / ".join(row[3] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}",
                                                                         parameters))
                enrolled = set(conn.execute(text(
                    "SELECT member_id FROM enrollments WHERE journey_id = 'winback'")).scalars())
            assert enrolled == {f"L{i:05d}" for i in range(0, 2_000, lapsed_every)}
            if name == "broad":
                assert "ix_members_last_order_at" not in plan and "TEMP B-TREE" not in plan, plan
            else:
                assert "USING INDEX ix_members_last_order_at" in plan, plan
        finally:
            harness.close()
