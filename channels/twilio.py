"""SMS through Twilio's Messages API (the official ``twilio`` client), classified for the engine's retry rules.

One ``messages.create`` per message. Twilio's client never retries (LIBRARY_NOTES): a 429, a 5xx or a network
failure comes back TRANSIENT and the engine retries it with backoff; invalid or unreachable numbers are
PERMANENT; 21610 (the recipient replied STOP) is PERMANENT and suppresses the number.
"""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING, Any

import requests
from requests.adapters import HTTPAdapter
from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

from channels import PacedChannel, TokenBucket, describe_network_error, limiter_for, parse_retry_after
from channels.base import Outcome, OutgoingMessage, SendResult
from engine.sms import segments

if TYPE_CHECKING:
    from engine.config import ChannelConfig

E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
STATUS_CALLBACK_PATH = "/webhooks/twilio/status"

# Sender throughput Twilio documents, in message *segments* per second: a US long code sends 1, a short code
# "over 100" (https://www.twilio.com/docs/api/errors/30001, /21611); toll-free numbers 3. A Messaging Service
# is only guaranteed one sender, so it gets the long-code rate: raise rate_per_second to the pool's total.
LONG_CODE_RATE = 1.0
TOLL_FREE_RATE = 3.0
SHORT_CODE_RATE = 100.0
_TOLL_FREE_PREFIXES = tuple(f"+1{area}" for area in ("800", "833", "844", "855", "866", "877", "888"))

UNSUBSCRIBED = 21610  # "Attempt to send to unsubscribed recipient": the member replied STOP to our number
QUEUE_FULL = 21611  # the sender's queue holds 10 hours of messages: try again later, not never
RATE_LIMITED = 20429
# About the recipient's number (invalid, unreachable, not mobile, region not enabled): retrying cannot help.
BAD_NUMBER = frozenset({21211, 21214, 21217, 21407, 21408, 21612, 21614, 21635})
# Codes that mean our settings are wrong: every message will fail the same way until ops fix config.yaml.
_CONFIG_HINTS = {20003: "check channels.sms.account_sid and channels.sms.auth_token",
                 20404: "check channels.sms.account_sid and channels.sms.base_url",
                 21606: "check channels.sms.from (it must be an SMS-capable number of this account)",
                 21659: "check channels.sms.from (it must be a number of this account)",
                 21660: "check channels.sms.from (it must be a number of this account)",
                 21701: "check channels.sms.messaging_service_sid",
                 21703: "check channels.sms.messaging_service_sid (the service has no senders)"}


def default_rate(sender: str | None) -> float:
    """Twilio's documented per-sender rate for the configured sender type (segments per second)."""
    if not sender:  # a Messaging Service picks from its pool, of which only one sender is certain
        return LONG_CODE_RATE
    if sender.isdigit() and 5 <= len(sender) <= 6:
        return SHORT_CODE_RATE
    if sender.startswith(_TOLL_FREE_PREFIXES):
        return TOLL_FREE_RATE
    return LONG_CODE_RATE


class TwilioSMS(PacedChannel):
    provider = "twilio"

    def __init__(self, account_sid: str, auth_token: str, *, public_url: str, sender: str | None = None,
                 messaging_service_sid: str | None = None, base_url: str | None = None,
                 rate_per_second: float | None = None, concurrency: int = 4, timeout: float = 10.0,
                 limiter: TokenBucket | None = None) -> None:
        if not sender and not messaging_service_sid:
            raise ValueError("from or messaging_service_sid is required")
        super().__init__(concurrency=concurrency,
                         limiter=limiter or limiter_for(rate_per_second, default_rate(sender)))
        self.sender = sender
        self.messaging_service_sid = messaging_service_sid
        self.timeout = timeout
        # Twilio signs its callbacks over the URL it was given: it must be the public one (LIBRARY_NOTES).
        self.status_callback = public_url.rstrip("/") + STATUS_CALLBACK_PATH
        self._local = threading.local()
        self.http = TwilioHttpClient(timeout=timeout, request_hooks={"response": [self._remember]})
        # max_retries=0: retrying here would hide attempts from the message log; the pool fits the workers.
        for scheme in ("https://", "http://"):
            self.http.session.mount(scheme, HTTPAdapter(pool_maxsize=concurrency, max_retries=0))
        self.client = Client(account_sid, auth_token, http_client=self.http)
        if base_url:
            self.client.api.base_url = base_url.rstrip("/")
        self.base_url = base_url or "https://api.twilio.com"

    @classmethod
    def from_config(cls, settings: ChannelConfig, *, public_url: str) -> TwilioSMS:
        return cls(settings.account_sid or "", settings.auth_token or "", public_url=public_url,
                   sender=settings.sender, messaging_service_sid=settings.messaging_service_sid,
                   base_url=settings.base_url, rate_per_second=settings.rate_per_second,
                   concurrency=settings.concurrency, timeout=settings.timeout)

    def _remember(self, response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
        # TwilioRestException carries no headers: keep Retry-After of this thread's last response aside.
        self._local.retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return response

    def cost(self, message: OutgoingMessage) -> float:
        return float(segments(message.text)[0])  # Twilio's rates count segments, not messages

    def send_one(self, message: OutgoingMessage) -> SendResult:
        if not E164.match(message.recipient):
            return SendResult(Outcome.PERMANENT, error=f"not an E.164 phone number: {message.recipient!r}")
        # Our id rides along so the webhook finds the row even before Twilio's sid is recorded against it.
        params: dict[str, Any] = {"to": message.recipient, "body": message.text,
                                  "status_callback": f"{self.status_callback}?message_id={message.id}"}
        if self.sender:
            params["from_"] = self.sender
        if self.messaging_service_sid:
            params["messaging_service_sid"] = self.messaging_service_sid
        self._local.retry_after = None
        try:
            created = self.client.messages.create(**params)
        except (TwilioRestException, TwilioServiceException) as exc:
            return self.classify(exc)
        except requests.Timeout:
            return SendResult(Outcome.TRANSIENT, error=f"twilio: no answer within {self.timeout:g}s (timeout)")
        except requests.RequestException as exc:
            return SendResult(Outcome.TRANSIENT,
                              error=f"twilio: connection to {self.base_url} failed: {describe_network_error(exc)}")
        return SendResult(Outcome.SENT, provider_id=str(created.sid))

    def classify(self, exc: TwilioRestException | TwilioServiceException) -> SendResult:
        status = int(exc.status)
        code = int(exc.code or status)
        if isinstance(exc, TwilioRestException):
            text = str(exc.msg).removeprefix("Unable to create record: ")
        else:
            text = str(exc.detail or exc.title)
        error = f"twilio {code}: {text}"
        if status == 429 or code == RATE_LIMITED:
            return SendResult(Outcome.TRANSIENT, error=error, retry_after=self._local.retry_after)
        if status >= 500 or code == QUEUE_FULL:
            return SendResult(Outcome.TRANSIENT, error=error, retry_after=self._local.retry_after)
        if code == UNSUBSCRIBED:
            return SendResult(Outcome.PERMANENT, error=error, suppress_reason="unsubscribed")
        if code in BAD_NUMBER:
            return SendResult(Outcome.PERMANENT, error=error)
        if code in _CONFIG_HINTS:
            error = f"{error} — {_CONFIG_HINTS[code]}"
        elif status in (401, 403):
            error = f"{error} — {_CONFIG_HINTS[20003]}"
        return SendResult(Outcome.PERMANENT, error=error)

    def close(self) -> None:
        self.http.session.close()
