"""The HTTP service against hostile clients, over real sockets on loopback (the server `serve` and `web` run).

Half-sent requests, long URLs and header blocks, oversized, slow and deeply nested bodies, more connections than
allowed: each is refused on its own, quickly, with the status a client can act on, while /healthz keeps
answering for everyone else and the log does not fill with one line per attacker.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engine.cli.daemon import WebThread
from engine.http.server import MAX_HEAD, MAX_REQUEST_LINE
from engine.logs import FloodGuard
from engine.testing import Harness

pytestmark = pytest.mark.slow  # sockets and timeouts: the slow tier

TOKEN = "s3cret-token"
READ_TIMEOUT = 1.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Harness, WebThread]]:
    harness = Harness(tmp_path, f"sqlite:///{tmp_path / 'engine.db'}", config={
        "web": {"api_token": TOKEN, "read_timeout": READ_TIMEOUT, "max_connections": 800},
        "channels": {"sms": {"provider": "outbox", "auth_token": "twilio-token"}}})
    thread = WebThread(harness.app, "127.0.0.1:0")
    thread.start()
    try:
        yield harness, thread
    finally:
        thread.stop()
        harness.close()


def address(thread: WebThread) -> tuple[str, int]:
    host, port = thread.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def connect(thread: WebThread) -> socket.socket:
    sock = socket.create_connection(address(thread), timeout=10)
    return sock


def answer_of(sock: socket.socket, limit: float = 10) -> bytes:
    """Everything the server sends until it closes the connection (or LIMIT seconds pass)."""
    sock.settimeout(limit)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def healthz_seconds(thread: WebThread) -> float:
    started = time.monotonic()
    answer = httpx.get(f"{thread.url}/healthz", timeout=10)
    assert answer.status_code == 200
    return time.monotonic() - started


def test_half_sent_requests_are_dropped_and_healthz_keeps_answering(server: tuple[Harness, WebThread]) -> None:
    _, thread = server
    held = []
    try:
        for _ in range(500):
            sock = connect(thread)
            sock.sendall(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n")  # never finished
            held.append(sock)
        assert max(healthz_seconds(thread) for _ in range(5)) < 1.0
        time.sleep(READ_TIMEOUT + 1.0)
        answers = [answer_of(sock, 5) for sock in held[:20]]
    finally:
        for sock in held:
            sock.close()
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[:3]


def test_connections_that_never_send_a_byte_are_closed_at_the_read_deadline(
        server: tuple[Harness, WebThread]) -> None:
    _, thread = server
    silent = [connect(thread) for _ in range(50)]
    try:
        deadline = time.monotonic() + READ_TIMEOUT + 5
        answers = [answer_of(sock, max(0.1, deadline - time.monotonic())) for sock in silent]
    finally:
        for sock in silent:
            sock.close()
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[:3]


def test_a_slow_body_is_cut_off_at_the_read_deadline(server: tuple[Harness, WebThread]) -> None:
    _, thread = server
    with connect(thread) as sock:
        sock.sendall(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n[")
        started = time.monotonic()
        for _ in range(40):  # a byte every 0.1 s: alive, but never done
            try:
                sock.sendall(b" ")
            except OSError:
                break
            time.sleep(0.1)
        answer = answer_of(sock, 5)
    assert time.monotonic() - started < READ_TIMEOUT + 3
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:200]


def test_a_long_url_is_414_at_once_and_does_not_block_others(server: tuple[Harness, WebThread]) -> None:
    _, thread = server
    with connect(thread) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /healthz?" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = answer_of(sock)
        assert answer.startswith(b"HTTP/1.1 414"), answer[:200]
        assert time.monotonic() - started < 1.0
    # Just under the limit is a request like any other.
    with connect(thread) as sock:
        target = b"/healthz?q=" + b"a" * (MAX_REQUEST_LINE - 40)
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert answer_of(sock).startswith(b"HTTP/1.1 200")
    assert healthz_seconds(thread) < 1.0


def test_a_header_flood_is_431(server: tuple[Harness, WebThread]) -> None:
    _, thread = server
    with connect(thread) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        for i in range(MAX_HEAD // 100 + 10):
            sock.sendall(b"X-Pad-%d: " % i + b"b" * 90 + b"\r\n")
        answer = answer_of(sock)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]


def test_beyond_max_connections_new_ones_get_a_fast_503(tmp_path: Path) -> None:
    harness = Harness(tmp_path, f"sqlite:///{tmp_path / 'engine.db'}", config={"web": {"max_connections": 20}})
    thread = WebThread(harness.app, "127.0.0.1:0")
    thread.start()
    held = [connect(thread) for _ in range(20)]
    try:
        time.sleep(0.2)
        started = time.monotonic()
        with connect(thread) as extra:
            answer = answer_of(extra)
        assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
        assert time.monotonic() - started < 1.0
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)  # the closed ones are gone: room again
    try:
        assert httpx.get(f"{thread.url}/healthz", timeout=10).status_code == 200
    finally:
        thread.stop()
        harness.close()


def test_an_oversized_body_is_413_before_it_is_read(server: tuple[Harness, WebThread]) -> None:
    _, thread = server
    for path, auth in (("/v1/events", True), ("/webhooks/twilio/inbound", False)):
        with connect(thread) as sock:
            head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {50 * 1024 * 1024}\r\n"
                    f"Content-Type: application/x-www-form-urlencoded\r\n")
            if auth:
                head += f"Authorization: Bearer {TOKEN}\r\n"
            sock.sendall(head.encode() + b"\r\n" + b"a" * 1000)
            answer = answer_of(sock, 5)
        assert answer.startswith(b"HTTP/1.1 413"), (path, answer[:300])


def test_an_unsigned_twilio_form_larger_than_any_real_one_is_413(server: tuple[Harness, WebThread]) -> None:
    _, thread = server
    body = b"From=%2B8613800138000&Body=" + b"x" * (1024 * 1024)
    answer = httpx.post(f"{thread.url}/webhooks/twilio/inbound", content=body, timeout=10,
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert answer.status_code == 413


def test_deeply_nested_json_is_400_not_500(server: tuple[Harness, WebThread]) -> None:
    _, thread = server
    for depth in (100_000, 200):
        body = b"[" * depth + b"]" * depth
        answer = httpx.post(f"{thread.url}/v1/events", content=body, timeout=10,
                            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        assert answer.status_code == 400, (depth, answer.text[:200])
        assert "nested" in answer.json()["error"]
    nested_property = {"id": "e1", "member_id": "m1", "type": "page_view",
                       "properties": {"a": json.loads("[" * 30 + "]" * 30)}}
    answer = httpx.post(f"{thread.url}/v1/events", json=nested_property, timeout=10,
                        headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code != 500


def test_a_flood_of_bad_requests_leaves_a_few_log_lines_with_a_count(server: tuple[Harness, WebThread],
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    _, thread = server
    for guard in logging.getLogger("engine.http.server").filters:
        if isinstance(guard, FloodGuard):
            guard.reset()  # earlier tests' refusals count in the same minute
    with caplog.at_level(logging.WARNING):
        for _ in range(300):
            with connect(thread) as sock:
                sock.sendall(b"GET /" + b"a" * (MAX_REQUEST_LINE + 10) + b" HTTP/1.1\r\n\r\n")
                answer_of(sock)
        time.sleep(0.1)
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert 1 <= len(refused) <= 5, len(refused)
    assert "answered 414" in refused[0].getMessage()


def test_the_flood_guard_says_how_many_it_left_out() -> None:
    now = [0.0]
    guard = FloodGuard(burst=2, interval=60, clock=lambda: now[0])

    def record(msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("engine.http.server", logging.WARNING, __file__, 1, msg, args, None)

    passed = [guard.filter(record("refused: %s", i)) for i in range(10)]
    assert passed == [True, True] + [False] * 8
    assert guard.filter(record("another kind %s", 1))  # kinds are counted apart
    now[0] = 61.0
    later = record("refused: %s", 99)
    assert guard.filter(later)
    assert later.getMessage() == "refused: 99 (and 8 more like this in the last 60s, not logged)"
