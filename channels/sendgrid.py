"""Email through SendGrid's v3 mail/send (the official ``sendgrid`` client), classified for the engine's retries.

One request per message, so that each log row gets its own X-Message-Id and its own answer. The client's
default timeout is None (measured): a hung connection would stall the daemon, so one is always set.

python-http-client calls urllib, which wraps what fails while connecting and writing the request in URLError
(nothing reached SendGrid: TRANSIENT) and lets what fails while reading the answer through as it is (a timeout,
a reset, a closed connection: SendGrid may have accepted the mail, so UNCERTAIN). The v3 Mail API has no way to
look a message up: an UNCERTAIN email is settled by SendGrid's event webhook (our ``engine_message_id`` custom
arg comes back with every event) or by an operator.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Sequence
from email.utils import parseaddr
from typing import Any
from urllib.error import URLError

from python_http_client.exceptions import HTTPError
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import Category, CustomArg, From, Header, Mail, To

from channels.base import Found, InDoubt, Outcome, OutgoingMessage, Reconciled, SendResult
from channels.pacing import PacedChannel, TokenBucket, describe_network_error, limiter_for, one_line, parse_retry_after

# SendGrid publishes no per-second figure for mail/send (its rate-limit page: "a specific number of requests
# per refresh period", with X-RateLimit-* headers and 429); its documented default for the v3 API is 600
# requests per minute per user (https://www.twilio.com/en-us/changelog/imposing-rate-limits-on-some-sendgrid-
# v2-api-endpoints). 10/s stays inside that until ops measure their account and raise rate_per_second.
DEFAULT_RATE = 10.0
MESSAGE_ID_ARG = "engine_message_id"  # custom arg: every event webhook carries it back to our log row
RECONCILING = "reconciling before any retry"


def parse_sender(text: str) -> From:
    """``会员中心 <members@example.com>`` or a bare address, as SendGrid's From; ValueError names the problem."""
    name, address = parseaddr(text)
    if "@" not in address or address.startswith("@") or address.endswith("@"):
        raise ValueError(f"from must be an email address such as '会员中心 <members@example.com>', got: {text!r}")
    return From(address, name or None)


class SendGridEmail(PacedChannel):
    provider = "sendgrid"

    def __init__(self, api_key: str, sender: str, *, base_url: str | None = None,
                 rate_per_second: float | None = None, concurrency: int = 4, timeout: float = 10.0,
                 limiter: TokenBucket | None = None, in_flight: int | None = None,
                 reconcile_after: float | None = None) -> None:
        super().__init__(concurrency=concurrency, limiter=limiter or limiter_for(rate_per_second, DEFAULT_RATE),
                         in_flight=in_flight, reconcile_after=reconcile_after)
        self.sender = parse_sender(sender)
        self.base_url = (base_url or "https://api.sendgrid.com").rstrip("/")
        self.timeout = timeout
        self.api = SendGridAPIClient(api_key, host=self.base_url)
        self.api.client.timeout = timeout
        # The client adds Content-Type to its shared header dict on the first request; adding it now keeps
        # concurrent first requests from changing that dict while another thread copies it.
        self.api.client.request_headers["Content-Type"] = "application/json"

    def build(self, message: OutgoingMessage) -> dict[str, Any]:
        """The mail/send JSON body for MESSAGE."""
        mail = Mail(from_email=self.sender, to_emails=To(message.recipient), subject=message.subject,
                    plain_text_content=message.text, html_content=message.html)
        for key, value in message.headers.items():
            mail.add_header(Header(key, value))
        mail.add_custom_arg(CustomArg(MESSAGE_ID_ARG, str(message.id)))
        mail.add_category(Category(message.journey))
        body: dict[str, Any] = mail.get()
        return body

    def send_one(self, message: OutgoingMessage) -> SendResult:
        if not message.subject:
            return SendResult(Outcome.PERMANENT, error="email has no subject; the template must render one")
        try:
            response = self.api.client.mail.send.post(request_body=self.build(message), timeout=self.timeout)
        except HTTPError as exc:
            return self.classify(exc)
        except (URLError, OSError, http.client.HTTPException) as exc:
            return self.classify_network(exc)
        provider_id = response.headers.get("X-Message-Id")
        if response.status_code != 202 or not provider_id:
            # Accepted or not, we cannot tell: reconcile (the event webhook) rather than send it twice.
            return SendResult(Outcome.UNCERTAIN, error=f"sendgrid: answered {response.status_code} without an "
                                                       f"X-Message-Id; {RECONCILING}")
        return SendResult(Outcome.SENT, provider_id=str(provider_id))

    def classify_network(self, exc: URLError | OSError | http.client.HTTPException) -> SendResult:
        """urllib's URLError: the request never got through (TRANSIENT); anything raw came while reading the
        answer, after the request was written (UNCERTAIN)."""
        cause = describe_network_error(exc)
        if isinstance(exc, URLError):  # HTTPError, its subclass, never gets here: python-http-client converts it
            return SendResult(Outcome.TRANSIENT, error=f"sendgrid: connection to {self.base_url} failed: {cause}")
        if isinstance(exc, TimeoutError):
            return SendResult(Outcome.UNCERTAIN, error=f"sendgrid: no answer within {self.timeout:g}s (timeout) "
                                                       f"after the request was sent; {RECONCILING}")
        if isinstance(exc, ConnectionError):  # RemoteDisconnected, ConnectionResetError, BrokenPipeError
            return SendResult(Outcome.UNCERTAIN, error=f"sendgrid: the connection to {self.base_url} broke after the "
                                                       f"request was sent ({cause}); {RECONCILING}")
        return SendResult(Outcome.UNCERTAIN, error=one_line(f"sendgrid: could not read the answer ({cause}); "
                                                            f"{RECONCILING}"))

    def reconcile(self, messages: Sequence[InDoubt]) -> list[Reconciled]:
        """SendGrid's v3 Mail API cannot look a message up: each waits for SendGrid's event webhook, which carries
        our id back as the ``engine_message_id`` custom arg (the engine's webhook handler applies it)."""
        return [Reconciled(Found.UNKNOWN, retry_after=None, detail=(
            f"sendgrid cannot look messages up: waiting for its event webhook for {MESSAGE_ID_ARG}={m.id} "
            "(processed, delivered, bounce or dropped), or an operator")) for m in messages]

    def classify(self, exc: HTTPError) -> SendResult:
        status = int(exc.status_code)
        error = f"sendgrid {status}: {_error_text(exc.body) or exc.reason}"
        if status == 429:
            return SendResult(Outcome.TRANSIENT, error=error, retry_after=_retry_after(exc.headers))
        if status >= 500 or status == 408:
            return SendResult(Outcome.TRANSIENT, error=error, retry_after=_retry_after(exc.headers))
        if status in (401, 403):
            return SendResult(Outcome.PERMANENT,
                              error=f"{error} — SendGrid refused the API key; check channels.email.api_key "
                                    "(it needs the Mail Send permission)")
        return SendResult(Outcome.PERMANENT, error=error)


def _error_text(body: bytes | str | None) -> str:
    """``errors[].message`` of a SendGrid error body, with the field each one is about."""
    if not body:
        return ""
    try:
        data = json.loads(body)
    except ValueError:
        return (body.decode("utf-8", "replace") if isinstance(body, bytes) else body)[:300]
    parts = []
    for item in data.get("errors", []) if isinstance(data, dict) else []:
        if isinstance(item, dict) and item.get("message"):
            field = f" ({item['field']})" if item.get("field") else ""
            parts.append(f"{item['message']}{field}")
    return "; ".join(parts)


def _retry_after(headers: Any) -> float | None:
    """Retry-After, or else how long until X-RateLimit-Reset (SendGrid's own header, an epoch second)."""
    if headers is None:
        return None
    seconds = parse_retry_after(headers.get("Retry-After"))
    if seconds is not None:
        return seconds
    reset = headers.get("X-RateLimit-Reset")
    if reset and str(reset).isdigit():
        return max(0.0, int(reset) - time.time())
    return None
