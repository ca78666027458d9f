"""The HTTP server: uvicorn (h11) with the limits a service facing the internet needs.

uvicorn bounds neither how long a client may take to send its request nor how many connections it keeps open,
and reads a request line or header block of any length before saying no. ``GuardedProtocol`` adds, per
connection:

- a read deadline: a request (line, headers and body) not fully received within ``web.read_timeout`` seconds
  of its first byte is answered 408 and the connection closed, so half-sent requests cannot pile up;
- size limits checked on the raw bytes before h11 parses them: a request line over MAX_REQUEST_LINE bytes is
  414, a header block over MAX_HEAD bytes is 431;
- a connection cap: beyond ``web.max_connections`` open connections a new one is answered 503 at once and
  closed, so the file descriptors (and the memory) held by clients stay bounded and /healthz keeps answering.

Keep-alive connections idle for ``web.keepalive_timeout`` seconds are closed (uvicorn's own timer). Body sizes
are the routes' business (engine.http.app: 413 before any parsing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from engine.logs import guard_against_floods

log = logging.getLogger(__name__)

MAX_REQUEST_LINE = 8 * 1024  # bytes: method, target and version (the URL with its query)
MAX_HEAD = 32 * 1024  # bytes: the request line and every header


@dataclass(frozen=True)
class Limits:
    read_timeout: float = 10.0
    keepalive_timeout: float = 5.0
    max_connections: int = 1000


def _answer(status: int, reason: str, text: str) -> bytes:
    body = (text + "\n").encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


REQUEST_LINE_TOO_LONG = _answer(414, "URI Too Long", f"the request line must be at most {MAX_REQUEST_LINE} bytes")
HEAD_TOO_LARGE = _answer(431, "Request Header Fields Too Large", f"the headers must be at most {MAX_HEAD} bytes")
TOO_SLOW = _answer(408, "Request Timeout", "the request was not received in time")
TOO_MANY = _answer(503, "Service Unavailable", "too many connections; try again shortly")


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with a read deadline, request-line and header limits and a connection cap."""

    limits: ClassVar[Limits] = Limits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head = bytearray()  # the request head received so far (only while waiting for a request)
        self._deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(TOO_MANY, "too many connections: answered 503 and closed")
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # between requests: this is (part of) a request head
            if self._deadline is None:
                self._arm()
            if self._head_too_big(data):
                return
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._head.clear()
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            self._disarm()  # all of the request is in: the application's time is not the client's

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next request's deadline starts with its first byte (uvicorn's keep-alive timer runs until then).
        self._disarm()

    def _head_too_big(self, data: bytes) -> bool:
        room = MAX_HEAD + 1 - len(self._head)
        self._head += data[:room]
        line_end = self._head.find(b"\r\n")
        if (line_end < 0 and len(self._head) > MAX_REQUEST_LINE) or line_end > MAX_REQUEST_LINE:
            self._refuse(REQUEST_LINE_TOO_LONG, f"request line over {MAX_REQUEST_LINE} bytes: answered 414")
            return True
        if self._head.find(b"\r\n\r\n") < 0 and len(self._head) > MAX_HEAD:
            self._refuse(HEAD_TOO_LARGE, f"request headers over {MAX_HEAD} bytes: answered 431")
            return True
        return False

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.limits.read_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        started = self.cycle is not None and self.cycle.response_started
        self._refuse(None if started else TOO_SLOW,
                     f"request not received within {self.limits.read_timeout:g}s: answered 408 and closed")

    def _refuse(self, answer: bytes | None, why: str) -> None:
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        # The reason in the template: the flood guard counts each kind of refusal apart.
        log.warning("HTTP connection refused, " + why.replace("%", "%%") + " (from %s)", client)
        self._disarm()
        self._head.clear()
        if answer is not None:
            self.transport.write(answer)
        self.transport.close()


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to the hard limit; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


class QuietServer(uvicorn.Server):
    """uvicorn without signal handlers of its own: whoever runs it stops it by setting ``should_exit``."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def make_server(asgi: ASGIApp, limits: Limits) -> QuietServer:
    """A uvicorn server for ASGI with LIMITS; the connection cap is kept below the open-files limit."""
    # Everyone on the internet can make these speak: a few lines per kind of trouble per minute, with a count.
    guard_against_floods("engine.http.server", "engine.http.app", "uvicorn.error", "asyncio")
    files = raise_open_files_limit()
    cap = limits.max_connections
    if files != resource.RLIM_INFINITY and cap > files // 2:
        cap = max(16, files // 2)
        log.warning("web.max_connections lowered to %d: this process may open only %d files", cap, files)
    protocol: type[GuardedProtocol] = type("Guarded", (GuardedProtocol,), {"limits": Limits(
        limits.read_timeout, limits.keepalive_timeout, cap)})
    config: Any = uvicorn.Config(asgi, log_config=None, lifespan="off", timeout_graceful_shutdown=10,
                                 server_header=False, http=protocol, limit_concurrency=cap + 1,
                                 timeout_keep_alive=max(1, round(limits.keepalive_timeout)),
                                 h11_max_incomplete_event_size=MAX_HEAD * 2)
    return QuietServer(config)


def bound_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on HOST:PORT (OSError when the address is busy or not ours)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections queue from here on, so "listening" in our log is already true
    except OSError:
        sock.close()
        raise
    return sock
