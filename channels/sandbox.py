"""Local stand-ins for Twilio's Messages API and SendGrid's mail/send: same wire format, no network, faults on demand.

Tests point the real adapters (and so the real ``twilio`` and ``sendgrid`` clients) at them; ops can point
config.yaml at them with ``python -m channels.sandbox``. Each runs a threaded HTTP server on 127.0.0.1,
records what it accepted (and counts what it accepted twice: duplicates()), can fail on purpose (a seeded share
of 429 / 500 / slow answers / dropped or lost connections, or permanent errors for chosen recipients) and can
post signed delivery callbacks the way the providers do: Twilio's form posts signed with X-Twilio-Signature,
SendGrid's event batches signed with ECDSA. The Twilio one also answers look-ups (GET Messages.json, paged as
Twilio pages, and GET Messages/{Sid}.json), which is how the adapter reconciles a message in doubt.

Faults, and what the client sees:

    429, 500  refused before any processing: an error answer
    drop      closed without processing and without an answer (the client reads "connection closed")
    slow      processed (accepted and recorded) at once, answered only after slow_seconds: a client that times
              out first leaves behind a message that exists at the provider
    lost      processed, then the connection is reset without an answer (the client reads "connection reset")

A client cannot tell drop from lost, nor a slow answer from one that never comes: all three are "the request
was written and no answer came", and only a look-up (or a callback) says whether the provider has the message.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import heapq
import json
import logging
import random
import re
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from email.message import Message
from email.utils import format_datetime, parsedate_to_datetime
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlencode, urlsplit

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twilio.request_validator import RequestValidator

from engine.sms import segments

log = logging.getLogger(__name__)

KINDS = ("ok", "429", "500", "slow", "drop", "lost")
TWILIO_STATUS_PATH = "/webhooks/twilio/status"
SENDGRID_EVENTS_PATH = "/webhooks/sendgrid/events"
SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
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


def _error_status(code: int) -> int:
    return {20003: 401, 20404: 404, 20429: 429, 20500: 500}.get(code, 400)


_MESSAGES_PATH = re.compile(r"/2010-04-01/Accounts/([^/]+)/Messages(?:/([^/]+))?\.json")
_LIST_FILTERS = ("To", "From", "DateSent", "DateSent<", "DateSent>")
_MAX_PAGE_SIZE = 1000  # Twilio's


class TwilioSandbox(Sandbox):
    """POST /2010-04-01/Accounts/{sid}/Messages.json, form-encoded, HTTP Basic auth, answers like Twilio's; GET
    Messages.json (To, From, DateSent filters; newest first; Twilio's paging) and GET Messages/{Sid}.json."""

    name = "twilio"

    def __init__(self, account_sid: str = "AC" + "5a" * 16, auth_token: str = "sandbox-auth-token",
                 **options: Any) -> None:
        super().__init__(**options)
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.invalid_numbers: set[str] = set()  # answered 21211
        self.unsubscribed_numbers: set[str] = set()  # answered 21610 (the recipient replied STOP)

    def error(self, code: int, message: str, headers: dict[str, str] | None = None) -> Reply:
        status = _error_status(code)
        return Reply.json(status, {"code": code, "message": message, "status": status,
                                   "more_info": f"https://www.twilio.com/docs/errors/{code}"}, headers)

    def fault(self, status: int) -> Reply:
        if status == 429:
            return self.error(20429, "Too Many Requests", {"Retry-After": str(self.faults.retry_after)})
        return self.error(20500, "Internal Server Error")

    def message_id(self, record: dict[str, Any]) -> int | None:
        """The engine's row id: the message_id query parameter of the StatusCallback URL it sends."""
        query = parse_qs(urlsplit(record.get("status_callback") or "").query)
        value = query.get("message_id", [""])[-1]
        return int(value) if value.isdigit() else None

    def route(self, method: str, path: str, headers: Message, body: bytes) -> Reply:
        parts = urlsplit(path)
        match = _MESSAGES_PATH.fullmatch(parts.path)
        sid = match.group(2) if match else None
        if match is None or match.group(1) != self.account_sid or (method, sid is None) not in {
                ("POST", True), ("GET", True), ("GET", False)}:
            return self.error(20404, f"The requested resource {parts.path} was not found")
        expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        if headers.get("Authorization") != f"Basic {expected}":
            return self.error(20003, "Authenticate")
        if sid is not None:
            return self._fetch(sid, parts.path)
        if method == "GET":
            return self._list(parts.path, {k: v[-1] for k, v in parse_qs(parts.query).items()})
        return self._create(body)

    def _create(self, body: bytes) -> Reply:
        form = {k: v[-1] for k, v in parse_qs(body.decode("utf-8"), keep_blank_values=True).items()}
        to, sender, service = form.get("To", ""), form.get("From"), form.get("MessagingServiceSid")
        if not to:
            return self.error(21604, "A 'To' phone number is required.")
        if not sender and not service:
            return self.error(21603, "A 'From' phone number is required.")
        if not form.get("Body"):
            return self.error(21602, "Message body is required.")
        if to in self.invalid_numbers or not re.fullmatch(r"\+[1-9][0-9]{6,14}", to):
            return self.error(21211, f"The 'To' number {to} is not a valid phone number.")
        if to in self.unsubscribed_numbers:
            return self.error(21610, "Attempt to send to unsubscribed recipient")
        resource = self._resource(form)
        self.accept({**resource, "status_callback": form.get("StatusCallback")})
        return Reply.json(201, resource)

    @staticmethod
    def _public(record: dict[str, Any]) -> dict[str, Any]:
        """The Message resource as Twilio shows it: without the StatusCallback it was created with."""
        return {k: v for k, v in record.items() if k != "status_callback"}

    def _fetch(self, sid: str, path: str) -> Reply:
        record = next((r for r in self.messages() if r["sid"] == sid), None)
        if record is None:
            return self.error(20404, f"The requested resource {path} was not found")
        return Reply.json(200, self._public(record))

    def _list(self, path: str, query: dict[str, str]) -> Reply:
        """One page of the account's messages, newest first, in Twilio's page envelope. DateSent filters go by
        day (GMT) and, as Twilio's, never match a message not sent yet (no date_sent)."""
        try:
            size = min(int(query.get("PageSize", "50")), _MAX_PAGE_SIZE)
            number = int(query.get("Page", "0"))
            days = {key: date.fromisoformat(query[key][:10]) for key in _LIST_FILTERS[2:] if key in query}
        except ValueError as exc:
            return self.error(20001, f"Invalid paging or DateSent parameter: {exc}")
        if size < 1 or number < 0:
            return self.error(20001, "PageSize must be at least 1 and Page at least 0")
        records = [self._public(r) for r in reversed(self.messages()) if self._listed(r, query, days)]
        token = query.get("PageToken")
        if token:  # PA<sid>: the page after that message; PB<sid>: the page before it (Twilio's own tokens)
            index = next((i for i, r in enumerate(records) if r["sid"] == token[2:]), None)
            if index is None or token[:2] not in ("PA", "PB"):
                return self.error(20001, f"Invalid PageToken {token}")
            begin, end = (index + 1, index + 1 + size) if token[:2] == "PA" else (max(0, index - size), index)
        else:
            begin, end = number * size, (number + 1) * size
        items = records[begin:end]
        filters = {key: query[key] for key in _LIST_FILTERS if key in query}

        def uri(page: int, page_token: str | None = None) -> str:
            tokens = {"PageToken": page_token} if page_token else {}
            return f"{path}?{urlencode({**filters, 'PageSize': size, 'Page': page, **tokens})}"

        start = number * size
        return Reply.json(200, {
            "messages": items, "page": number, "page_size": size, "start": start,
            "end": start + max(len(items) - 1, 0), "uri": uri(number, token), "first_page_uri": uri(0),
            "next_page_uri": uri(number + 1, "PA" + items[-1]["sid"]) if items and end < len(records) else None,
            "previous_page_uri": uri(number - 1, "PB" + items[0]["sid"]) if items and number > 0 else None})

    @staticmethod
    def _listed(record: dict[str, Any], query: dict[str, str], days: dict[str, date]) -> bool:
        if "To" in query and record["to"] != query["To"]:
            return False
        if "From" in query and record["from"] != query["From"]:
            return False
        if not days:
            return True
        if not record["date_sent"]:
            return False
        sent = parsedate_to_datetime(record["date_sent"]).astimezone(UTC).date()
        return (sent == days.get("DateSent", sent) and sent <= days.get("DateSent<", sent)
                and sent >= days.get("DateSent>", sent))

    def _resource(self, form: dict[str, str]) -> dict[str, Any]:
        sid = "SM" + uuid.uuid4().hex
        now = format_datetime(datetime.now(UTC), usegmt=True)  # RFC 2822, as Twilio: "Mon, 16 Aug 2010 03:45:01 GMT"
        base = f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}"
        return {"account_sid": self.account_sid, "api_version": "2010-04-01", "body": form["Body"],
                "date_created": now, "date_sent": None, "date_updated": now, "direction": "outbound-api",
                "error_code": None, "error_message": None, "from": form.get("From"),
                "messaging_service_sid": form.get("MessagingServiceSid"), "num_media": "0",
                "num_segments": str(segments(form["Body"])[0]), "price": None, "price_unit": "USD", "sid": sid,
                "status": "accepted" if form.get("MessagingServiceSid") else "queued",
                "subresource_uris": {"media": f"{base}/Media.json"}, "to": form["To"], "uri": f"{base}.json"}

    def signature(self, url: str, params: dict[str, str]) -> str:
        """X-Twilio-Signature for a POST of PARAMS to URL: computed by twilio's own RequestValidator."""
        return str(RequestValidator(self.auth_token).compute_signature(url, params))

    def send_status(self, sid: str, status: str = "delivered", *, error_code: int | None = None,
                    url: str | None = None) -> int:
        """Post a status callback for message SID; the HTTP status our webhook answered.

        Signed over the StatusCallback URL the message was created with (the public URL, as Twilio does);
        posted to URL, else to callback_url plus StatusCallback's path and query, else to StatusCallback.
        """
        record = next((r for r in self.messages() if r["sid"] == sid), None)
        if record is None:
            raise ValueError(f"no message {sid} was accepted by this sandbox")
        now = format_datetime(datetime.now(UTC), usegmt=True)
        with self.lock:  # the resource moves on as Twilio's does: look-ups see the new status
            record.update(status=status, date_updated=now)
            if status in ("sent", "delivered", "undelivered") and not record["date_sent"]:
                record["date_sent"] = now
        callback = record["status_callback"]
        if not url and self.callback_url:  # a TLS proxy's view: same path and query, reached on our side
            parts = urlsplit(callback or TWILIO_STATUS_PATH)
            url = self.callback_url + parts.path + (f"?{parts.query}" if parts.query else "")
        target = url or callback
        if not target:
            raise ValueError(f"message {sid} has no StatusCallback; pass url=")
        params = {"AccountSid": self.account_sid, "ApiVersion": "2010-04-01", "From": record["from"] or "",
                  "MessageSid": sid, "MessageStatus": status, "SmsSid": sid, "SmsStatus": status,
                  "To": record["to"]}
        if error_code is not None:
            params["ErrorCode"] = str(error_code)
        signed = self.signature(callback or target, params)
        return post(target, urlencode(params).encode(),
                    {"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": signed})

    def deliver(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self.send_status(record["sid"], "delivered")


class SendGridSandbox(Sandbox):
    """POST /v3/mail/send JSON with a Bearer key; 202 and X-Message-Id; signed event webhook batches."""

    name = "sendgrid"

    def __init__(self, api_key: str = "SG.sandbox-api-key", *, key_seed: int = 1, **options: Any) -> None:
        super().__init__(**options)
        self.api_key = api_key
        self.rejected_emails: set[str] = set()  # answered 400
        # Derived from a seed rather than random, so that config.yaml's webhook_public_key survives restarts.
        secret = int.from_bytes(hashlib.sha256(f"sendgrid-sandbox:{key_seed}".encode()).digest(), "big")
        self._key = ec.derive_private_key(secret % (_P256_ORDER - 1) + 1, ec.SECP256R1())
        der = self._key.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
        self.public_key = base64.b64encode(der).decode()  # what SendGrid shows as the verification key

    def message_id(self, record: dict[str, Any]) -> int | None:
        """The engine's row id: the engine_message_id custom arg."""
        value = str((record.get("custom_args") or {}).get("engine_message_id", ""))
        return int(value) if value.isdigit() else None

    @staticmethod
    def errors(status: int, *items: tuple[str, str | None], headers: dict[str, str] | None = None) -> Reply:
        help_url = "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html"
        return Reply.json(status, {"errors": [{"message": m, "field": f, "help": help_url if f else None}
                                              for m, f in items]}, headers)

    def fault(self, status: int) -> Reply:
        if status == 429:
            reset = str(int(time.time()) + self.faults.retry_after)
            return self.errors(429, ("too many requests", None), headers={
                "Retry-After": str(self.faults.retry_after), "X-RateLimit-Limit": "600",
                "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset})
        return self.errors(500, ("internal error", None))

    def route(self, method: str, path: str, headers: Message, body: bytes) -> Reply:
        if method != "POST" or path.split("?")[0] != "/v3/mail/send":
            return self.errors(404, ("resource not found", None))
        if headers.get("Authorization") != f"Bearer {self.api_key}":
            return self.errors(401, ("The provided authorization grant is invalid, expired, or revoked", None))
        try:
            mail = json.loads(body)
        except ValueError:
            return self.errors(400, ("Bad Request", None))
        problems = self._problems(mail if isinstance(mail, dict) else {})
        if problems:
            return self.errors(400, *problems)
        message_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        self.accept({"message_id": message_id, **mail})
        return Reply(202, b"", {"X-Message-Id": message_id})

    def _problems(self, mail: dict[str, Any]) -> list[tuple[str, str | None]]:
        problems: list[tuple[str, str | None]] = []
        if not (mail.get("from") or {}).get("email"):
            problems.append(("The from object must be provided for every email send.", "from"))
        if not mail.get("subject"):
            problems.append(("The subject is required.", "subject"))
        if not mail.get("content"):
            problems.append(("Unless a valid template_id is provided, the content parameter is required.",
                             "content"))
        people = mail.get("personalizations") or []
        if not people:
            problems.append(("The personalizations field is required and must have at least one personalization.",
                             "personalizations"))
        for i, person in enumerate(people):
            for j, to in enumerate(person.get("to") or []):
                address = str(to.get("email", ""))
                if address in self.rejected_emails or not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", address):
                    problems.append(("Does not contain a valid address.", f"personalizations.{i}.to.{j}.email"))
        return problems

    def event(self, record: dict[str, Any], kind: str = "delivered", **extra: Any) -> dict[str, Any]:
        """One event webhook entry about an accepted message (custom args come back as top-level keys)."""
        message_id = record["message_id"]
        event: dict[str, Any] = {
            "email": record["personalizations"][0]["to"][0]["email"], "timestamp": int(time.time()), "event": kind,
            "sg_event_id": base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="),
            "sg_message_id": f"{message_id}.filterdrecv-sandbox-1-0.0", "smtp-id": f"<{message_id}@sandbox>",
            "category": record.get("categories", []), **record.get("custom_args", {})}
        if kind == "bounce":
            event.update(type="bounce", status="5.1.1", reason="550 5.1.1 The email account does not exist.")
        elif kind == "dropped":
            event.update(reason="Bounced Address")
        event.update(extra)
        return event

    def sign(self, timestamp: str, payload: bytes) -> str:
        """The signature header SendGrid sends: ECDSA P-256 / SHA-256 over timestamp + raw body, base64 DER."""
        return base64.b64encode(self._key.sign(timestamp.encode() + payload, ec.ECDSA(hashes.SHA256()))).decode()

    def post_events(self, events: list[dict[str, Any]], url: str | None = None,
                    timestamp: str | None = None) -> int:
        target = url or (self.callback_url + SENDGRID_EVENTS_PATH if self.callback_url else None)
        if target is None:
            raise ValueError("no webhook URL: pass url= or start the sandbox with callback_url")
        payload = json.dumps(events).encode()
        stamp = timestamp or str(int(time.time()))
        return post(target, payload, {"Content-Type": "application/json", TIMESTAMP_HEADER: stamp,
                                      SIGNATURE_HEADER: self.sign(stamp, payload)})

    def deliver(self, records: list[dict[str, Any]]) -> None:
        self.post_events([self.event(r) for r in records])


@contextlib.contextmanager
def unanswered_port() -> Iterator[str]:
    """The URL of a port whose listen queue is full: the kernel drops further SYNs, so a client's connect times
    out without a byte of its request written (a provider that is down behind a black-holing network)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        fillers = []
        try:
            for _ in range(8):  # the queue holds backlog + 1 connections; the other SYNs go unanswered
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(listener.getsockname())
                fillers.append(filler)
            yield f"http://127.0.0.1:{listener.getsockname()[1]}"
        finally:
            for filler in fillers:
                filler.close()


def config_snippet(twilio: TwilioSandbox, sendgrid: SendGridSandbox, public_url: str | None) -> str:
    lines = ["channels:", "  sms:", "    provider: twilio", f"    account_sid: {twilio.account_sid}",
             f"    auth_token: {twilio.auth_token}", '    from: "+15005550006"', f"    base_url: {twilio.url}",
             "    rate_per_second: 0", "  email:", "    provider: sendgrid", f"    api_key: {sendgrid.api_key}",
             '    from: "会员中心 <members@example.com>"', f"    base_url: {sendgrid.url}",
             f"    webhook_public_key: {sendgrid.public_key}", "    rate_per_second: 0"]
    if public_url:
        lines += ["web:", f"  public_url: {public_url}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m channels.sandbox",
                                     description="Run local Twilio and SendGrid stand-ins until Ctrl-C.")
    parser.add_argument("--twilio-port", type=int, default=8901)
    parser.add_argument("--sendgrid-port", type=int, default=8902)
    parser.add_argument("--callback-url", help="the engine's web base URL; delivered callbacks go to "
                        f"URL{TWILIO_STATUS_PATH} and URL{SENDGRID_EVENTS_PATH}")
    parser.add_argument("--deliver-after", type=float, default=3.0, metavar="SECONDS")
    parser.add_argument("--transient", type=float, default=0.0, metavar="SHARE",
                        help="share of requests answered 429 or 500 (half each), e.g. 0.3")
    parser.add_argument("--slow", type=float, default=0.0, metavar="SHARE",
                        help="share of requests processed at once but answered only after --slow-seconds")
    parser.add_argument("--slow-seconds", type=float, default=2.0, metavar="S",
                        help="how late a slow answer comes (default 2; make it longer than the client's timeout)")
    parser.add_argument("--drop", type=float, default=0.0, metavar="SHARE",
                        help="share of requests closed without processing and without an answer")
    parser.add_argument("--lost", type=float, default=0.0, metavar="SHARE",
                        help="share of requests processed, then reset without an answer")
    args = parser.parse_args(argv)
    shares = {"--transient": args.transient, "--slow": args.slow, "--drop": args.drop, "--lost": args.lost}
    if any(not 0 <= share <= 1 for share in shares.values()) or sum(shares.values()) > 1:
        parser.error("--transient, --slow, --drop and --lost must each be within 0..1 and add up to at most 1, "
                     "got: " + ", ".join(f"{name} {share:g}" for name, share in shares.items()))
    for name, seconds in (("--deliver-after", args.deliver_after), ("--slow-seconds", args.slow_seconds)):
        if seconds < 0:
            parser.error(f"{name} must be 0 or more seconds, got: {seconds:g}")
    faults = Faults(too_many=args.transient / 2, server_error=args.transient / 2, slow=args.slow,
                    drop=args.drop, lost=args.lost, slow_seconds=args.slow_seconds)
    options: dict[str, Any] = {"faults": faults, "callback_url": args.callback_url,
                               "deliver_after": args.deliver_after if args.callback_url else None}
    twilio = TwilioSandbox(port=args.twilio_port, **options)
    sendgrid = SendGridSandbox(port=args.sendgrid_port, **options)
    with twilio, sendgrid:
        try:
            print(f"Twilio sandbox on {twilio.url}, SendGrid sandbox on {sendgrid.url}. In config.yaml:\n")
            print(config_snippet(twilio, sendgrid, args.callback_url), flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print(f"\nstopped: {len(twilio.received)} SMS and {len(sendgrid.received)} emails accepted")
            for box in (twilio, sendgrid):
                if box.duplicates():
                    print(f"{box.name}: accepted more than once: {box.duplicates()} (our message id: times)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
