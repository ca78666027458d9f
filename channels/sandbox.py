"""Local stand-ins for Twilio's Messages API and SendGrid's mail/send: same wire format, no network, faults on demand.

Tests point the real adapters (and so the real ``twilio`` and ``sendgrid`` clients) at them; ops can point
config.yaml at them with ``python -m channels.sandbox``. Each runs a threaded HTTP server on 127.0.0.1,
records what it accepted, can fail on purpose (a seeded share of 429 / 500 / slow answers / dropped
connections, or permanent errors for chosen recipients) and can post signed delivery callbacks the way the
providers do: Twilio's form posts signed with X-Twilio-Signature, SendGrid's event batches signed with ECDSA.
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
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlencode, urlsplit

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twilio.request_validator import RequestValidator

from engine.sms import segments

log = logging.getLogger(__name__)

KINDS = ("ok", "429", "500", "slow", "drop")
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
    slow: float = 0.0  # answer only after slow_seconds: longer than the client's timeout
    drop: float = 0.0  # close the connection without any answer
    slow_seconds: float = 2.0
    retry_after: int = 1

    def __post_init__(self) -> None:
        shares = (self.too_many, self.server_error, self.slow, self.drop)
        if any(not 0 <= s <= 1 for s in shares) or sum(shares) > 1:
            raise ValueError(f"fault shares must each be within 0..1 and add up to at most 1, got: {shares}")

    def draw(self, rng: random.Random) -> str:
        point = rng.random()
        for kind, share in zip(KINDS[1:], (self.too_many, self.server_error, self.slow, self.drop), strict=True):
            if point < share:
                return kind
            point -= share
        return "ok"


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
        if reply is None:  # a dropped connection: no status line at all
            self.close_connection = True
            return
        self.send_response(reply.status)
        for key, value in reply.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)

    do_GET = do_POST  # answered with the provider's 404

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
        """Answer the next requests this way, in order ("ok", "429", "500", "slow", "drop"), before drawing."""
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"fault kinds must be among {', '.join(KINDS)}, got: {unknown}")
        with self.lock:
            self._script.extend(kinds)

    def messages(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.received)

    def handle(self, method: str, path: str, headers: Message, body: bytes) -> Reply | None:
        """The answer to one request; None = drop the connection."""
        with self.lock:
            self.attempts += 1
            kind = self._script.popleft() if self._script else self.faults.draw(self._rng)
        if kind == "drop" or (kind == "slow" and self._stopping.wait(self.faults.slow_seconds)):
            return None
        if kind in ("429", "500"):
            return self.fault(int(kind))
        return self.route(method, path, headers, body)

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


class TwilioSandbox(Sandbox):
    """POST /2010-04-01/Accounts/{sid}/Messages.json, form-encoded, HTTP Basic auth, answers like Twilio's."""

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

    def route(self, method: str, path: str, headers: Message, body: bytes) -> Reply:
        match = re.fullmatch(r"/2010-04-01/Accounts/([^/]+)/Messages\.json", path.split("?")[0])
        if method != "POST" or match is None or match.group(1) != self.account_sid:
            return self.error(20404, f"The requested resource {path} was not found")
        expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        if headers.get("Authorization") != f"Basic {expected}":
            return self.error(20003, "Authenticate")
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

    def _resource(self, form: dict[str, str]) -> dict[str, Any]:
        sid = "SM" + uuid.uuid4().hex
        now = format_datetime(datetime.now(UTC))
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
    args = parser.parse_args(argv)
    if args.deliver_after < 0 or not 0 <= args.transient <= 1:
        parser.error("--deliver-after must be >= 0 and --transient within 0..1")
    faults = Faults(too_many=args.transient / 2, server_error=args.transient / 2)
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
