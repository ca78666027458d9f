"""What the provider stand-ins share: fault injection (Faults, Hangup, Reply), the threaded HTTP server and request
handler, signed callback posting, and the Sandbox base that records what it accepted."""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import random
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, deque
from dataclasses import dataclass, field
from email.message import Message
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from typing import Any, Self

log = logging.getLogger(__name__)
KINDS = ("ok", "429", "500", "slow", "drop", "lost")
TWILIO_STATUS_PATH = "/webhooks/twilio/status"
SENDGRID_EVENTS_PATH = "/webhooks/sendgrid/events"
SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # callbacks go to local URLs


@dataclass
class Faults:
    """Share (0..1) of requests that fail each way, drawn from the sandbox's seeded random generator."""

    too_many: float = 0.0  # 429 with Retry-After
    server_error: float = 0.0  # 500
    slow: float = 0.0  # process at once, answer only after slow_seconds: longer than the client's timeout
    drop: float = 0.0  # close the connection without processing and without any answer
    lost: float = 0.0  # process, then reset the connection without any answer
    slow_seconds: float = 2.0
    retry_after: int = 1

    def __post_init__(self) -> None:
        shares = self.shares
        if any(not 0 <= s <= 1 for s in shares) or sum(shares) > 1:
            named = ", ".join(f"{kind} {share:g}" for kind, share in zip(KINDS[1:], shares, strict=True))
            raise ValueError(f"fault shares must each be within 0..1 and add up to at most 1, got: {named}")
        if self.slow_seconds < 0:
            raise ValueError(f"slow_seconds must be 0 or more, got: {self.slow_seconds}")

    @property
    def shares(self) -> tuple[float, ...]:
        """The share of each fault kind, in KINDS[1:] order."""
        return (self.too_many, self.server_error, self.slow, self.drop, self.lost)

    def draw(self, rng: random.Random) -> str:
        point = rng.random()
        for kind, share in zip(KINDS[1:], self.shares, strict=True):
            if point < share:
                return kind
            point -= share
        return "ok"


class Hangup(Enum):
    """An end of the connection instead of an answer."""

    CLOSE = "close"  # an orderly close (FIN) with no status line: the client reads "connection closed"
    RESET = "reset"  # a reset (RST, SO_LINGER 0): the client reads "connection reset by peer"


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, data: Any, headers: dict[str, str] | None = None) -> Reply:
        return cls(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})


def post(url: str, data: bytes, headers: dict[str, str], timeout: float = 10.0) -> int:
    """POST DATA to URL; the HTTP status (4xx and 5xx included)."""
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with _NO_PROXY.open(request, timeout=timeout) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the connection: close it or the socket is left to the garbage collector
        return int(exc.code)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 drops bursts of connects: clients then wait 1 s to retry the SYN

    def __init__(self, sandbox: Sandbox, port: int) -> None:
        self.sandbox = sandbox
        self.live: set[socket.socket] = set()
        self.workers: list[threading.Thread] = []
        self.guard = threading.Lock()
        super().__init__(("127.0.0.1", port), _Handler)

    def server_bind(self) -> None:
        TCPServer.server_bind(self)  # HTTPServer's version resolves the host name: slow without DNS
        self.server_name, self.server_port = "127.0.0.1", int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        worker = threading.Thread(target=self.process_request_thread, args=(request, client_address), daemon=True)
        with self.guard:
            self.live.add(request)
            self.workers = [w for w in self.workers if w.is_alive()] + [worker]
        worker.start()

    def shutdown_request(self, request: Any) -> None:
        with self.guard:
            self.live.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("sandbox: connection from %s ended with an error", client_address, exc_info=True)

    def close_connections(self) -> None:
        """Wake handlers idling on keep-alive connections, then wait for them to finish."""
        with self.guard:
            live, workers = list(self.live), list(self.workers)
        for conn in live:
            with contextlib.suppress(OSError):  # already closed by the client
                conn.shutdown(socket.SHUT_RDWR)
        for worker in workers:
            worker.join(timeout=5)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real APIs
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Headers and body go in two writes: without this, Nagle and the client's delayed ACK add 40 ms to each.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        reply = self.server.sandbox.handle(self.command, self.path, self.headers, body)
        if isinstance(reply, Hangup):  # no status line at all
            self.close_connection = True
            if reply is Hangup.RESET:
                # Linger 0: closing sends RST instead of FIN. The socket really closes when finish() lets go of
                # rfile, before the server's own shutdown (which would send a FIN first).
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            return
        self.send_response(reply.status)
        for key, value in reply.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)

    do_GET = do_POST  # the stand-in's route() tells the methods apart, as the provider would

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("sandbox %s: " + format, self.server.sandbox.name, *args)


class Sandbox:
    """What both stand-ins share: server, fault drawing, the record of accepted messages, callbacks."""

    name = "sandbox"

    def __init__(self, *, faults: Faults | None = None, seed: int = 0, port: int = 0,
                 callback_url: str | None = None, deliver_after: float | None = None) -> None:
        self.faults = faults or Faults()
        self.received: list[dict[str, Any]] = []  # accepted messages, in order; append under self.lock
        self.attempts = 0  # every request, failed ones included
        self.callback_url = callback_url.rstrip("/") if callback_url else None
        self.deliver_after = deliver_after
        self.lock = threading.Lock()
        self._rng = random.Random(seed)
        self._script: deque[str] = deque()
        self._port = port
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._due: list[tuple[float, int, dict[str, Any]]] = []
        self._due_changed = threading.Condition(self.lock)
        self._seq = 0

    # ------------------------------------------------------------------ life cycle

    def start(self) -> Self:
        self._stopping.clear()
        self._server = _Server(self, self._port)
        self._threads = [threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True),
                         threading.Thread(target=self._delivery_loop, daemon=True)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._due_changed:
            self._due_changed.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.close_connections()
            self._server.server_close()
            self._server = None
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError(f"{self.name} sandbox is not running; call start() first")
        return f"http://127.0.0.1:{self._server.server_port}"

    # ------------------------------------------------------------------ requests

    def fail_next(self, *kinds: str) -> None:
        """Answer the next requests this way, in order ("ok", "429", "500", "slow", "drop", "lost"), before
        drawing. Look-ups count as requests too."""
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"fault kinds must be among {', '.join(KINDS)}, got: {unknown}")
        with self.lock:
            self._script.extend(kinds)

    def messages(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.received)

    def message_id(self, record: dict[str, Any]) -> int | None:
        """Our message id (the engine's log row) that an accepted RECORD carries, if any."""
        return None

    def duplicates(self) -> dict[int, int]:
        """{our message id: times accepted} for every id accepted more than once: double sends, as the
        provider (and so the member) saw them."""
        counts = Counter(i for i in map(self.message_id, self.messages()) if i is not None)
        return {i: n for i, n in counts.items() if n > 1}

    def handle(self, method: str, path: str, headers: Message, body: bytes) -> Reply | Hangup:
        """The answer to one request, or how the connection ends without one."""
        with self.lock:
            self.attempts += 1
            kind = self._script.popleft() if self._script else self.faults.draw(self._rng)
        if kind == "drop":
            return Hangup.CLOSE
        if kind in ("429", "500"):
            return self.fault(int(kind))
        reply = self.route(method, path, headers, body)  # processed: a valid message is accepted and recorded
        if kind == "lost":
            return Hangup.RESET
        if kind == "slow" and self._stopping.wait(self.faults.slow_seconds):
            return Hangup.CLOSE  # stopping: no answer at all
        return reply

    def route(self, method: str, path: str, headers: Message, body: bytes) -> Reply:
        """The provider's answer to a request that no fault intercepted."""
        raise NotImplementedError

    def fault(self, status: int) -> Reply:
        """An injected 429 (with Retry-After) or 500, in the provider's error format."""
        headers = {"Retry-After": str(self.faults.retry_after)} if status == 429 else {}
        return Reply.json(status, {"message": "injected fault"}, headers)

    def accept(self, record: dict[str, Any]) -> None:
        with self.lock:
            self.received.append(record)
            if self.callback_url and self.deliver_after is not None:
                self._seq += 1
                heapq.heappush(self._due, (time.monotonic() + self.deliver_after, self._seq, record))
                self._due_changed.notify_all()

    # ------------------------------------------------------------------ automatic callbacks

    def _delivery_loop(self) -> None:
        while not self._stopping.is_set():
            with self._due_changed:
                now = time.monotonic()
                ready = []
                while self._due and self._due[0][0] <= now:
                    ready.append(heapq.heappop(self._due)[2])
                if not ready:
                    if not self._stopping.is_set():
                        self._due_changed.wait(timeout=(self._due[0][0] - now) if self._due else None)
                    continue
            try:
                self.deliver(ready)
            except (OSError, ValueError) as exc:  # the engine is down or refused: a real provider retries later
                log.warning("%s sandbox: could not post callbacks to %s: %s", self.name, self.callback_url, exc)

    def deliver(self, records: list[dict[str, Any]]) -> None:
        """Post the provider's 'delivered' callbacks about RECORDS to callback_url."""


def error_status(code: int) -> int:
    return {20003: 401, 20404: 404, 20429: 429, 20500: 500}.get(code, 400)
