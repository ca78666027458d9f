"""The HTTP API as a client uses it: authenticate, send events and members, see them acted on; health and metrics.

Every test runs on SQLite and PostgreSQL (the db_url fixture); the service runs in-process through
starlette's TestClient, with a fixed clock so that ticks and events line up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from engine.cli.daemon import WebThread, listen_address
from engine.domain.timeutil import parse_instant
from engine.exceptions import ConfigError, EngineError
from engine.http.app import create_app
from engine.store.models import events, members
from engine.testing import REPO, Harness

with warnings.catch_warnings():
    # starlette 1.10 asks for httpx2 in its TestClient; the dev dependencies pin httpx, which still works.
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NOW = "2026-03-02T10:00:00+08:00"  # 18:00 in London, 10:00 in Shanghai: outside quiet hours for both
LIN = {"id": "m1", "name": "林小雨", "email": "lin@example.com", "phone": "13800138000", "timezone": "Asia/Shanghai",
       "locale": "zh-CN", "email_opt_in": True, "sms_opt_in": True}


class Clock:
    def __init__(self, when: str) -> None:
        self.now = parse_instant(when)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def web(tmp_path: Path, db_url: str) -> Iterator[tuple[Harness, TestClient]]:
    harness = Harness(tmp_path, db_url, config={"web": {"public_url": "https://crm.example.com",
                                                        "api_token": TOKEN}})
    harness.members(LIN)
    with TestClient(create_app(harness.app, clock=Clock(NOW))) as client:
        yield harness, client
    harness.close()


def count_events(harness: Harness, **where: Any) -> int:
    stmt = select(func.count()).select_from(events)
    for key, value in where.items():
        stmt = stmt.where(events.c[key] == value)
    with harness.app.store.connect() as conn:
        return int(conn.execute(stmt).scalar_one())


def member_row(harness: Harness, member_id: str) -> dict[str, Any]:
    """The member's row, or {} if there is none."""
    with harness.app.store.connect() as conn:
        row = conn.execute(select(members).where(members.c.id == member_id)).mappings().first()
    return {} if row is None else dict(row)


# --------------------------------------------------------------------------- authentication


def test_the_api_answers_503_until_a_token_is_configured(harness: Harness) -> None:
    with TestClient(create_app(harness.app)) as client:
        answer = client.post("/v1/events", json={"member_id": "m1", "type": "login"}, headers=AUTH)
        member = client.put("/v1/members/m9", json={"name": "x"}, headers=AUTH)
    assert answer.status_code == 503 and "web.api_token" in answer.json()["error"]
    assert member.status_code == 503


def test_a_missing_or_wrong_token_is_401_and_stores_nothing(web: tuple[Harness, TestClient]) -> None:
    harness, client = web
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN}, {"Authorization": f"Bearer {TOKEN}x"}):
        answer = client.post("/v1/events", json={"member_id": "m1", "type": "login", "at": NOW}, headers=headers)
        assert answer.status_code == 401 and answer.headers["WWW-Authenticate"] == "Bearer"
        assert client.put("/v1/members/m9", json={"name": "x"}, headers=headers).status_code == 401
    assert count_events(harness) == 0 and member_row(harness, "m9") == {}
    assert client.post("/v1/events", json={"member_id": "m1", "type": "login"}, headers=AUTH).status_code == 202


# --------------------------------------------------------------------------- events


def test_a_signup_through_the_api_is_stored_before_the_answer_and_welcomed_on_the_next_tick(
        web: tuple[Harness, TestClient]) -> None:
    harness, client = web
    answer = client.post("/v1/events", json={"member_id": "m1", "type": "signup", "at": NOW}, headers=AUTH)
    assert answer.status_code == 202
    assert answer.json() == {"accepted": 1, "duplicates": [], "triggered": 0}
    assert count_events(harness, type="signup", source="api") == 1  # committed by the time we were answered
    harness.tick("2026-03-02T10:05:00+08:00")
    assert harness.steps_sent("m1") == [("welcome", "welcome_email")]


def test_all_three_shapes_are_accepted_and_a_missing_at_means_now(web: tuple[Harness, TestClient]) -> None:
    harness, client = web
    single = client.post("/v1/events", json={"member_id": "m1", "type": "login"}, headers=AUTH)
    listed = client.post("/v1/events", json=[{"member_id": "m1", "type": "login", "at": NOW}], headers=AUTH)
    wrapped = client.post("/v1/events", json={"events": [{"member_id": "m1", "type": "app_open", "at": NOW}]},
                          headers=AUTH)
    assert [a.status_code for a in (single, listed, wrapped)] == [202, 202, 202]
    with harness.app.store.connect() as conn:
        times = set(conn.execute(select(events.c.occurred_at)).scalars())
    assert times == {parse_instant(NOW)}


def test_a_batch_with_one_bad_event_is_refused_whole_naming_its_index(web: tuple[Harness, TestClient]) -> None:
    harness, client = web
    batch = [{"member_id": "m1", "type": "login", "at": NOW},
             {"member_id": "m1", "type": "purchase", "at": NOW, "properties": {"amount": -5, "order_id": "A-1"}},
             {"member_id": "m1", "type": "login", "at": NOW},
             {"member_id": "ghost", "type": "login", "at": NOW},
             "not an object"]
    answer = client.post("/v1/events", json=batch, headers=AUTH)
    assert answer.status_code == 422
    errors = answer.json()["errors"]
    assert [e["index"] for e in errors] == [1, 3, 4]
    assert "amount" in errors[0]["error"] and "ghost" in errors[1]["error"]
    assert count_events(harness) == 0  # not even the good logins
    assert member_row(harness, "m1")["total_spend"] == 0


def test_retried_events_are_reported_as_duplicates_not_errors(web: tuple[Harness, TestClient]) -> None:
    harness, client = web
    purchase = {"member_id": "m1", "type": "purchase", "at": NOW, "properties": {"amount": 120, "order_id": "A-7"}}
    login = {"id": "evt-1", "member_id": "m1", "type": "login", "at": NOW}
    first = client.post("/v1/events", json=[purchase, login], headers=AUTH)
    again = client.post("/v1/events", json=[purchase, login, {**login, "id": "evt-2"}], headers=AUTH)
    assert first.status_code == 202 and first.json()["accepted"] == 2
    assert again.status_code == 202
    assert again.json()["accepted"] == 1
    assert again.json()["duplicates"] == [{"index": 0, "id": "purchase:A-7"}, {"index": 1, "id": "evt-1"}]
    assert member_row(harness, "m1")["total_spend"] == 120
    assert count_events(harness, type="purchase") == 1


def test_unreadable_empty_or_oversized_bodies_are_refused(web: tuple[Harness, TestClient]) -> None:
    harness, client = web
    headers = {**AUTH, "Content-Type": "application/json"}
    assert client.post("/v1/events", content=b"{not json", headers=headers).status_code == 400
    assert client.post("/v1/events", content=b"[]", headers=headers).status_code == 422
    many = [{"member_id": "m1", "type": "login", "at": NOW}] * 1001
    assert client.post("/v1/events", json=many, headers=AUTH).status_code == 413
    assert client.post("/v1/events", content=b" " * (11 * 1024 * 1024), headers=headers).status_code == 413
    assert count_events(harness) == 0


# --------------------------------------------------------------------------- members


def test_put_member_creates_then_updates_only_the_fields_given(web: tuple[Harness, TestClient]) -> None:
    harness, client = web
    created = client.put("/v1/members/m9", json={"name": "Amy", "email": "amy@example.com", "phone": "+447911123456",
                                                  "email_opt_in": True, "vip": "yes"}, headers=AUTH)
    assert created.status_code == 200 and created.json() == {"id": "m9", "created": True}
    updated = client.put("/v1/members/m9", json={"name": "Amy Li", "locale": "en"}, headers=AUTH)
    assert updated.status_code == 200 and updated.json() == {"id": "m9", "created": False}
    row = member_row(harness, "m9")
    assert (row["name"], row["email"], row["locale"], row["email_opt_in"]) == ("Amy Li", "amy@example.com", "en", True)
    assert row["attributes"] == {"vip": "yes"}


def test_put_member_with_bad_fields_is_422_and_stores_nothing(web: tuple[Harness, TestClient]) -> None:
    harness, client = web
    for body, words in (({"email": "not-an-address", "name": "x"}, "email"), ({"timezone": "Mars/Olympus"}, "timezone"),
                        ({"tier": "platinum"}, "tier"), ({"id": "someone-else", "name": "x"}, "id"),
                        (["name", "x"], "object")):
        answer = client.put("/v1/members/m9", json=body, headers=AUTH)
        assert answer.status_code == 422, body
        assert words in answer.json()["errors"][0]["error"], answer.json()
    assert member_row(harness, "m9") == {}
    assert client.put("/v1/members/m1", json={"email": "bad"}, headers=AUTH).status_code == 422
    assert member_row(harness, "m1")["email"] == "lin@example.com"


# --------------------------------------------------------------------------- health and metrics


@pytest.mark.slow
def test_healthz_says_ok_and_503_when_the_database_is_gone(web: tuple[Harness, TestClient],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    harness, client = web
    answer = client.get("/healthz")
    assert answer.status_code == 200 and answer.json()["status"] == "ok"

    def unreachable() -> None:
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    monkeypatch.setattr(harness.app.store, "connect", unreachable)
    down = client.get("/healthz")
    assert down.status_code == 503 and down.json()["status"] == "error"
    metrics = client.get("/metrics").text
    assert "engine_database_up 0.0" in metrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.slow
def test_metrics_read_the_database_at_scrape_time(web: tuple[Harness, TestClient]) -> None:
    harness, client = web
    client.post("/v1/events", json={"member_id": "m1", "type": "signup", "at": NOW}, headers=AUTH)
    before = samples(client.get("/metrics").text)
    assert before[("engine_events_unhandled", ())] == 1
    harness.tick("2026-03-02T10:05:00+08:00")
    client.post("/webhooks/twilio/status", data={"MessageSid": "x", "MessageStatus": "sent"})  # no auth token: 503

    answer = client.get("/metrics")
    assert answer.headers["content-type"].startswith("text/plain")
    after = samples(answer.text)
    assert after[("engine_events_unhandled", ())] == 0
    assert after[("engine_messages", (("channel", "email"), ("status", "sent")))] == 1
    assert after[("engine_enrollments_active", (("journey", "welcome"),))] == 1
    assert after[("engine_database_up", ())] == 1
    assert after[("engine_http_requests_total", (("method", "POST"), ("route", "/v1/events"), ("status", "202")))] == 1
    assert after[("engine_webhooks_rejected_total", (("provider", "twilio"), ("reason", "not_configured")))] == 1


# --------------------------------------------------------------------------- running the service


def test_listen_must_be_host_and_port() -> None:
    assert listen_address("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert listen_address("[::1]:9000") == ("::1", 9000)
    for bad in ("8080", "localhost", "127.0.0.1:http", "127.0.0.1:70000", ":8080"):
        with pytest.raises(ConfigError, match=r"web\.listen"):
            listen_address(bad)


def test_the_web_thread_of_serve_answers_over_a_socket_and_stops(harness: Harness) -> None:
    thread = WebThread(harness.app, "127.0.0.1:0")
    thread.start()
    try:
        answer = httpx.get(f"{thread.url}/healthz", timeout=10)
        assert answer.status_code == 200 and answer.json()["status"] == "ok"
        busy = WebThread(harness.app, thread.url.removeprefix("http://"))
        with pytest.raises(EngineError, match="cannot listen"):
            busy.start()
    finally:
        thread.stop()
    assert thread.thread is not None and not thread.thread.is_alive()


@pytest.mark.slow
def test_run_py_web_serves_until_sigterm_and_exits_cleanly(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(
        f"database: {{url: 'sqlite:///var/engine.db'}}\nrules_dir: {REPO / 'rules'}\n"
        f"templates_dir: {REPO / 'templates'}\nweb: {{listen: '127.0.0.1:0'}}\n", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), "--config", str(tmp_path / "config.yaml"), "web"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url, lines = None, []
        deadline = time.monotonic() + 30
        while url is None and time.monotonic() < deadline and proc.stderr is not None:
            line = proc.stderr.readline()
            lines.append(line)
            if "listening on " in line:
                url = line.split("listening on ", 1)[1].split()[0]
            elif not line and proc.poll() is not None:
                break
        assert url, "".join(lines)
        assert httpx.get(f"{url}/healthz", timeout=10).json()["status"] == "ok"
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, "".join(lines) + rest
    assert "HTTP service stopped" in rest
