"""/healthz and /metrics tell the truth about the daemon's ticks (issue 13, item 8)."""

from __future__ import annotations

import warnings
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import text
from support import Provider, member, project

from engine.cli.daemon import Daemon
from engine.http.app import create_app
from engine.store.models import quarantine
from engine.testing import Harness

with warnings.catch_warnings():
    # starlette 1.10 asks for httpx2 in its TestClient; the dev dependencies pin httpx, which still works.
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


def serving(h: Harness, clock: Clock) -> tuple[Daemon, TestClient]:
    daemon = Daemon(h.app, clock=clock)
    return daemon, TestClient(create_app(h.app, clock=clock, health=daemon.health))


def metric(client: TestClient, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_healthz_is_503_while_every_tick_fails_and_200_once_one_succeeds(harness: Harness) -> None:
    clock = Clock(harness.at("2026-03-02T04:00:00Z"))
    daemon, client = serving(harness, clock)
    daemon.tick()
    assert client.get("/healthz").status_code == 200
    first_success = metric(client, "engine_last_successful_tick_timestamp_seconds")
    assert first_success == clock.now.timestamp()

    with harness.app.store.begin() as conn:  # the database loses a table: every tick now fails
        conn.execute(text("DROP TABLE quarantine"))
    for _ in range(2):
        clock.now += timedelta(seconds=60)
        daemon.tick()
    answer = client.get("/healthz")
    assert answer.status_code == 503
    body = answer.json()
    assert body["status"] == "error" and body["error"].startswith("the last tick (at 2026-03-02T04:02:00+00:00) failed")
    assert "quarantine" in body["error"]
    assert body["ticks"]["failures"] == 2
    assert metric(client, "engine_tick_failures_total") == 2
    assert metric(client, "engine_last_successful_tick_timestamp_seconds") == first_success

    with harness.app.store.begin() as conn:
        quarantine.create(conn)
    clock.now += timedelta(seconds=60)
    daemon.tick()
    assert client.get("/healthz").status_code == 200
    assert metric(client, "engine_last_successful_tick_timestamp_seconds") == clock.now.timestamp()


def test_healthz_is_503_when_no_tick_has_succeeded_for_three_intervals(harness: Harness) -> None:
    clock = Clock(harness.at("2026-03-02T04:00:00Z"))
    daemon, client = serving(harness, clock)  # the scheduler interval is 60 s
    clock.now += timedelta(seconds=179)
    assert client.get("/healthz").status_code == 200  # starting: not yet three intervals
    clock.now += timedelta(seconds=2)
    answer = client.get("/healthz")
    assert answer.status_code == 503 and "no tick has succeeded since the start for 181s" in answer.json()["error"]
    daemon.tick()
    assert client.get("/healthz").status_code == 200
    clock.now += timedelta(seconds=200)  # the scheduler stalled: ticks stopped coming
    assert "no tick has succeeded for 200s" in client.get("/healthz").json()["error"]


def test_healthz_is_503_while_quarantined_work_grows(tmp_path: Path, db_url: str) -> None:
    rules, templates = project(tmp_path)
    h = Harness(tmp_path, db_url, rules=rules, templates=templates)
    h.members(member("ok", 30), member("bad", "abc"))
    clock = Clock(h.at("2026-03-02T04:00:00Z"))
    daemon, client = serving(h, clock)
    for minutes in (0, 1, 11):  # third failure: quarantined
        clock.now = h.at("2026-03-02T04:00:00Z") + timedelta(minutes=minutes)
        daemon.tick()
        if minutes < 11:
            assert client.get("/healthz").status_code == 200  # retrying is not unhealthy
    answer = client.get("/healthz")
    assert answer.status_code == 503
    assert "quarantined work grew from 0 to 1 units" in answer.json()["error"]
    assert 'engine_quarantined{journey="coupon",kind="enrollment",status="quarantined"} 1.0' in client.get(
        "/metrics").text
    clock.now += timedelta(minutes=1)
    daemon.tick()  # no longer growing: healthy, and the figure stays visible
    assert client.get("/healthz").status_code == 200
    assert client.get("/healthz").json()["ticks"]["quarantined"] == 1
    h.close()


def test_metrics_show_unknown_and_reconciled_messages(harness: Harness) -> None:
    from channels.base import Outcome

    provider = Provider(in_flight=100)
    provider.answer = Outcome.UNCERTAIN
    harness.app._channels["email"] = provider
    harness.members({"id": "w", "email": "w@example.com", "email_opt_in": True, "timezone": "Asia/Shanghai",
                     "last_order_at": "2025-06-01T00:00:00Z"})
    clock = Clock(harness.at("2026-03-02T04:00:00Z"))
    daemon, client = serving(harness, clock)
    daemon.tick()
    assert metric(client, "engine_messages_unknown") == 1
    clock.now += timedelta(seconds=61)
    daemon.tick()
    assert metric(client, "engine_messages_unknown") == 0
    assert 'engine_reconciled_messages_total{channel="email",outcome="sent"} 1.0' in client.get("/metrics").text
