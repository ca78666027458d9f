"""The compose worker: a second process composes batch N+1 while the runner writes and delivers batch N.

What a user would notice if it went wrong: a message composed before the batch ahead of it was written (a
frequency cap broken, a points balance shown from before an update step), a message sent twice or lost when
the daemon stops or the worker dies, or different words from what one process would have sent.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from engine.audit import chain as audit
from engine.exceptions import ConfigError
from engine.testing import REPO, Harness

pytestmark = pytest.mark.slow  # the slow tier: runs the compose worker process

CLOCK = "2026-06-15T04:00:00Z"  # 12:00 in Shanghai: outside quiet hours

BONUS_THEN_HELLO = """journey: a_bonus
name: 加积分再问候
trigger:
  segment: lapsed_60d
entry: {reentry: never}
steps:
  - id: bonus
    update: {points: 50}
  - id: hello
    send: email
    template: winback/first_touch
"""

HELLO = """journey: b_hello
name: 问候
trigger:
  segment: lapsed_60d
entry: {reentry: never}
steps:
  - id: hello
    send: email
    template: winback/first_touch
"""


def rules(tmp_path: Path, *journeys: tuple[str, str]) -> Path:
    target = tmp_path / "rules"
    if not target.exists():
        shutil.copytree(REPO / "rules", target)
        for path in (target / "journeys").glob("*.yaml"):
            path.unlink()
        for name, body in journeys:
            (target / "journeys" / f"{name}.yaml").write_text(body, encoding="utf-8")
    return target


def lapsed(count: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"id": f"P{i:04d}", "name": f"会员{i}", "email": f"p{i}@example.com", "email_opt_in": True,
             "timezone": "Asia/Shanghai", "locale": "zh-CN" if i % 2 else "en", "points": 100 + i,
             "total_spend": 300, "last_order_at": "2026-01-01T00:00:00Z"} for i in range(start, start + count)]


def harness(tmp_path: Path, url: str, rules_dir: Path, mode: str, **config: Any) -> Harness:
    settings = {"scheduler": {"batch_size": 20, "compose_worker": mode}, "frequency_caps": [], **config}
    return Harness(tmp_path, url, rules=rules_dir, config=settings)


@pytest.fixture(autouse=True)
def _one_signing_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both modes sign unsubscribe links with the same key, so their messages can be compared word for word."""
    monkeypatch.setenv("ENGINE_UNSUBSCRIBE_SECRET", "pipeline-test-key")


def _pg_schema(base: str) -> Iterator[str]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = create_engine(base)
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield make_url(base).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(False)
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def two_databases(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'one.db'}", f"sqlite:///{tmp_path / 'two.db'}"
        return
    base = request.getfixturevalue("pg_base_url")
    first, second = _pg_schema(base), _pg_schema(base)
    yield next(first), next(second)
    for done in (first, second):
        next(done, None)


def _outcome(h: Harness) -> dict[tuple[str, str, str], tuple[Any, ...]]:
    return {(r["member_id"], r["journey"], r["step"]): (r["status"], r["reason"], r["recipient"], r["subject"],
                                                        r["body"], r["html"], r["content_hash"])
            for r in h.log()}


def _verified(h: Harness) -> audit.Verification:
    with h.app.store.connect() as conn:
        return audit.verify(conn)


def _each_member_sent_once(h: Harness, count: int) -> None:
    """Members P0000.. got one email each, one log row each, no enrollment is left claimed, the chain verifies."""
    assert sorted(m.member_id for m in h.sent()) == [f"P{i:04d}" for i in range(count)]
    assert len(h.log()) == count
    assert all(e["claimed_by"] is None and e["status"] == "completed" for e in h.enrollments())
    assert _verified(h).ok


def test_a_pipelined_send_says_what_one_process_says(tmp_path: Path, two_databases: tuple[str, str]) -> None:
    """30 lapsed members enter two journeys at once; a_bonus adds 50 points before its email, b_hello's email
    shows the points. With batches of 20 the members' second enrollments fall in the batch after their first:
    the worker must wait for the first to be written, so every b_hello email shows the bonus, as it does when
    one process does everything. Rows, words and hashes are the same either way; nothing is left claimed."""
    rules_dir = rules(tmp_path, ("a_bonus", BONUS_THEN_HELLO), ("b_hello", HELLO))
    outcomes = []
    for mode, url in zip(("off", "on"), two_databases, strict=True):
        (tmp_path / mode).mkdir()
        h = harness(tmp_path / mode, url, rules_dir, mode)
        try:
            h.members(*lapsed(30))
            report = h.tick(CLOCK)
            assert report.counts["sent"] == 60
            if mode == "on":
                assert h.app.runner.worker_batches >= 3 and h.app.runner.worker_deferred > 0
            else:
                assert h.app.runner.worker_batches == 0
            assert all(e["claimed_by"] is None and e["status"] == "completed" for e in h.enrollments())
            assert _verified(h).ok
            bodies = {m.member_id: m.text for m in h.sent() if m.journey == "b_hello"}
            assert len(bodies) == 30
            for number in range(30):
                body = bodies[f"P{number:04d}"]
                assert f"You have {150 + number} points" in body or f"当前积分 {150 + number}，" in body
            outcomes.append(_outcome(h))
        finally:
            h.close()
    assert outcomes[0] == outcomes[1]


def test_frequency_caps_count_the_batch_still_being_written(tmp_path: Path, db_url: str) -> None:
    """At most one marketing message per member and week: each member gets one of the two journeys' emails and
    the other is logged suppressed (frequency_cap), though the second enrollment was composed while the first
    batch was being written."""
    rules_dir = rules(tmp_path, ("a_bonus", BONUS_THEN_HELLO), ("b_hello", HELLO))
    h = harness(tmp_path, db_url, rules_dir, "on", frequency_caps=[{"channel": "any", "max": 1, "per": "7d"}])
    try:
        h.members(*lapsed(30))
        h.tick(CLOCK)
        assert h.app.runner.worker_batches >= 3
        by_member: dict[str, list[str]] = {}
        for row in h.log():
            by_member.setdefault(row["member_id"], []).append(
                "sent" if row["status"] == "sent" else f"{row['status']}:{row['reason']}")
        assert len(by_member) == 30
        assert all(sorted(v) == ["sent", "suppressed:frequency_cap"] for v in by_member.values())
        assert len({m.recipient for m in h.sent()}) == len(h.sent()) == 30
    finally:
        h.close()


def test_a_stop_gives_back_the_batch_in_flight_and_nothing_goes_twice(tmp_path: Path, db_url: str) -> None:
    """SIGTERM while the worker composes the next batch: that batch is released unsent, and the next tick sends
    it; every member gets exactly one email."""
    rules_dir = rules(tmp_path, ("b_hello", HELLO))
    h = harness(tmp_path, db_url, rules_dir, "on")
    try:
        h.members(*lapsed(70))
        first_batch_out: Callable[[], bool] = lambda: len(h.email.sent) > 0  # noqa: E731
        h.app.tick(h.at(CLOCK), stop=first_batch_out)
        assert len(h.email.sent) == 20
        assert all(e["claimed_by"] is None for e in h.enrollments())
        assert len(h.enrollments(status="active")) == 50
        h.tick("2026-06-15T04:01:00Z")
        assert sorted(m.member_id for m in h.sent()) == [f"P{i:04d}" for i in range(70)]
        assert len(h.log()) == 70
    finally:
        h.close()


def test_when_the_worker_dies_the_runner_composes_itself(tmp_path: Path, db_url: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """The worker process is killed between ticks: the next large send says so in the log, composes in the
    daemon's own process, and still sends each message once."""
    rules_dir = rules(tmp_path, ("b_hello", HELLO))
    h = harness(tmp_path, db_url, rules_dir, "on")
    try:
        h.members(*lapsed(50))
        h.tick(CLOCK)
        assert h.app.runner.worker_batches > 0 and len(h.sent()) == 50
        worker = h.app.runner.compose_worker
        assert worker is not None
        for pid in worker.pids():
            os.kill(pid, signal.SIGKILL)
        h.members(*lapsed(50, start=50), now="2026-06-16T00:00:00Z")
        with caplog.at_level(logging.WARNING, logger="engine.tick.runner"):
            h.tick("2026-06-16T04:00:00Z")
        assert "composing in this process" in caplog.text
        _each_member_sent_once(h, 100)
    finally:
        h.close()


def test_a_tick_on_a_large_database_starts_the_worker_before_anything_is_due(tmp_path: Path, db_url: str) -> None:
    """From 10 batches' worth of members (200 with batches of 20) the worker is started at the start of a tick, so
    that its start-up overlaps the entry phase; below that, and with nothing to send, no second process."""
    rules_dir = rules(tmp_path, ("b_hello", HELLO))
    h = harness(tmp_path, db_url, rules_dir, "on")
    try:
        recent = [dict(m, last_order_at="2026-06-01T00:00:00Z") for m in lapsed(200)]  # in no journey's audience
        h.members(*recent[:199])
        h.tick(CLOCK)
        assert h.app.runner.compose_worker is None
        h.members(recent[199])
        h.tick(CLOCK)
        worker = h.app.runner.compose_worker
        assert worker is not None and h.app.runner.worker_batches == 0 and not h.sent()
        deadline = time.monotonic() + 30
        while not worker.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.pids(), "the worker process was not started"
        h.members(*lapsed(40, start=200))  # two full batches now due: composed by the worker already up
        h.tick(CLOCK)
        assert h.app.runner.worker_batches >= 1 and len(h.sent()) == 40
    finally:
        h.close()


def test_a_small_send_stays_in_one_process(tmp_path: Path, db_url: str) -> None:
    """A tick with less than a batch due starts no second process."""
    rules_dir = rules(tmp_path, ("b_hello", HELLO))
    h = harness(tmp_path, db_url, rules_dir, "on")
    try:
        h.members(*lapsed(5))
        h.tick(CLOCK)
        assert len(h.sent()) == 5
        assert h.app.runner.compose_worker is None and h.app.runner.worker_batches == 0
    finally:
        h.close()


def test_compose_worker_accepts_only_auto_on_off(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("scheduler:\n  compose_worker: yes please\n", encoding="utf-8")
    from engine.config import load_config
    with pytest.raises(ConfigError, match="compose_worker"):
        load_config(path)


def test_ctrl_c_to_the_process_group_leaves_the_worker_to_the_daemon(tmp_path: Path, db_url: str,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """SIGINT and SIGTERM sent to every process of the group (Ctrl-C in a terminal, a service manager) are the
    daemon's to handle: the worker survives them and goes on composing."""
    rules_dir = rules(tmp_path, ("b_hello", HELLO))
    h = harness(tmp_path, db_url, rules_dir, "on")
    try:
        h.members(*lapsed(50))
        h.tick(CLOCK)
        worker = h.app.runner.compose_worker
        assert worker is not None
        before = h.app.runner.worker_batches
        for pid in worker.pids():
            os.kill(pid, signal.SIGINT)
            os.kill(pid, signal.SIGTERM)
        h.members(*lapsed(50, start=50), now="2026-06-16T00:00:00Z")
        with caplog.at_level(logging.WARNING, logger="engine.tick.runner"):
            h.tick("2026-06-16T04:00:00Z")
        assert "compose worker stopped" not in caplog.text
        assert h.app.runner.worker_batches > before
        assert sorted(m.member_id for m in h.sent()) == [f"P{i:04d}" for i in range(100)]
    finally:
        h.close()


def test_a_worker_killed_mid_send_loses_nothing_and_sends_nothing_twice(tmp_path: Path, db_url: str,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """The worker dies after the first batch went out, holding a composed batch the daemon has not written yet
    and the next ones: the composed batch is written, the rest are composed by the daemon, and every member gets
    one email in the same tick, with nothing left claimed."""
    rules_dir = rules(tmp_path, ("b_hello", HELLO))
    h = harness(tmp_path, db_url, rules_dir, "on")
    killed: list[int] = []

    def kill_after_second_batch_composed() -> bool:
        worker = h.app.runner.compose_worker
        if not killed and h.email.sent and h.app.runner.worker_batches >= 2 and worker is not None:
            for pid in worker.pids():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            # Until the pool has noticed, a submit would still be accepted and fail later instead.
            deadline = time.monotonic() + 10
            while not getattr(worker._pool, "_broken", False) and time.monotonic() < deadline:
                time.sleep(0.01)
        return False

    try:
        h.members(*lapsed(120))
        with caplog.at_level(logging.WARNING, logger="engine.tick.runner"):
            h.app.tick(h.at(CLOCK), stop=kill_after_second_batch_composed)
        assert killed
        assert "composing in this process" in caplog.text
        _each_member_sent_once(h, 120)
    finally:
        h.close()
