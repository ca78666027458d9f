"""SMS through Twilio's Messages API (the official ``twilio`` client), classified for the engine's retry rules.

One ``messages.create`` per message. Twilio's client never retries (measured): a 429, a 5xx or a failure
to connect comes back TRANSIENT and the engine retries it with backoff; a timeout or a broken connection after
the request was written, or an answer we cannot read, is UNCERTAIN (Twilio may have created the message) and is
reconciled by looking the message up; invalid or unreachable numbers are PERMANENT; 21610 (the recipient replied
STOP) is PERMANENT and suppresses the number.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from twilio.base.exceptions import TwilioException, TwilioRestException, TwilioServiceException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client
from urllib3.exceptions import ClosedPoolError, NewConnectionError

from channels.base import Found, InDoubt, Outcome, OutgoingMessage, Reconciled, SendResult
from channels.pacing import (
    PacedChannel,
    TokenBucket,
    causes,
    describe_network_error,
    limiter_for,
    one_line,
    parse_retry_after,
)
from channels.sms import segments

log = logging.getLogger(__name__)

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

    #: Look-ups (reconcile): a message created up to this long before its hand-over was recorded still counts
    #: (Twilio's clock and ours differ; date_created has whole seconds).
    lookup_skew = timedelta(minutes=5)
    #: Messages read per look-up page, and pages read per number at most: a number that got more messages than
    #: that since the hand-over is left UNKNOWN rather than read without end.
    lookup_page_size = 50
    lookup_max_pages = 4
    #: Seconds before a look-up that failed (429, 5xx, network) is tried again, at least.
    lookup_retry_after = 300.0

    def __init__(self, account_sid: str, auth_token: str, *, public_url: str, sender: str | None = None,
                 messaging_service_sid: str | None = None, base_url: str | None = None,
                 rate_per_second: float | None = None, concurrency: int = 4, timeout: float = 10.0,
                 limiter: TokenBucket | None = None, in_flight: int | None = None,
                 reconcile_after: float | None = None) -> None:
        if not sender and not messaging_service_sid:
            raise ValueError("from or messaging_service_sid is required")
        super().__init__(concurrency=concurrency,
                         limiter=limiter or limiter_for(rate_per_second, default_rate(sender)),
                         in_flight=in_flight, reconcile_after=reconcile_after)
        self.sender = sender
        self.messaging_service_sid = messaging_service_sid
        self.timeout = timeout
        # Twilio signs its callbacks over the URL it was given: it must be the public one, not what a proxy forwards to.
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
        except requests.RequestException as exc:
            return self.classify_network(exc)
        except ValueError as exc:  # a 2xx whose body is not JSON: created or not, we cannot tell
            return SendResult(Outcome.UNCERTAIN, error=f"twilio: answered with something we cannot read ({exc}); "
                                                       f"{RECONCILING}")
        if not created.sid:
            return SendResult(Outcome.UNCERTAIN, error=f"twilio: answered without a message sid; {RECONCILING}")
        return SendResult(Outcome.SENT, provider_id=str(created.sid))

    def classify_network(self, exc: requests.RequestException) -> SendResult:
        """TRANSIENT when the request cannot have left (no connection was made); else UNCERTAIN."""
        cause = describe_network_error(exc)
        if isinstance(exc, requests.ConnectTimeout):
            cause = f"no connection within {self.timeout:g}s (connect timeout)"
        if _never_sent(exc):
            return SendResult(Outcome.TRANSIENT, error=f"twilio: connection to {self.base_url} failed: {cause}")
        if isinstance(exc, requests.ReadTimeout):
            return SendResult(Outcome.UNCERTAIN, error=f"twilio: no answer within {self.timeout:g}s (timeout) after "
                                                       f"the request was sent; {RECONCILING}")
        if isinstance(exc, requests.ConnectionError):
            return SendResult(Outcome.UNCERTAIN, error=f"twilio: the connection to {self.base_url} broke after the "
                                                       f"request was sent ({cause}); {RECONCILING}")
        return SendResult(Outcome.UNCERTAIN, error=f"twilio: could not read the answer ({cause}); {RECONCILING}")

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

    # ------------------------------------------------------------------ reconciliation

    def reconcile(self, messages: Sequence[InDoubt]) -> list[Reconciled]:
        """Look each message up among the messages Twilio has to its number (one listing per number).

        The Message resource does not carry the StatusCallback URL (our id), so a match is the exact body, created
        at or after the hand-over minus lookup_skew; each sid matches one message of the call at most.
        """
        by_number: dict[str, list[int]] = {}
        for index, message in enumerate(messages):
            by_number.setdefault(message.recipient, []).append(index)
        answers: dict[int, Reconciled] = {}
        failed: _LookupFailed | None = None
        for number, indexes in by_number.items():
            group = sorted(indexes, key=lambda i: _aware(messages[i].handed_at))
            if failed is None:  # after one failure the service is likely down or limiting us: ask no more
                try:
                    answers.update(zip(group, self._lookup(number, [messages[i] for i in group]), strict=True))
                    continue
                except _LookupFailed as exc:
                    failed = exc
                    detail = f"twilio look-up failed ({exc.reason}); asking again in {exc.retry_after:g}s"
            else:
                detail = (f"not looked up: an earlier twilio look-up failed ({failed.reason}); asking again in "
                          f"{failed.retry_after:g}s")
            answers.update((i, Reconciled(Found.UNKNOWN, detail=detail, retry_after=failed.retry_after))
                           for i in group)
        return [answers[i] for i in range(len(messages))]

    def _lookup(self, number: str, group: list[InDoubt]) -> list[Reconciled]:
        try:
            since = min(_aware(m.handed_at) for m in group) - self.lookup_skew
            return self._match(self._listing(number, since), group)
        except _LookupFailed:
            raise
        except Exception as exc:  # reconcile must not raise: a surprise leaves the messages for a later pass
            log.exception("twilio: unexpected error looking up %d message(s)", len(group))
            raise _LookupFailed(one_line(f"unexpected {type(exc).__name__}: {exc}"), self.lookup_retry_after) from exc

    def _listing(self, number: str, since: datetime) -> _Listing:
        """What Twilio has to NUMBER, newest first, back to SINCE (or lookup_max_pages pages)."""
        self._local.retry_after = None
        found: list[_Found] = []
        try:
            page = self.client.messages.page(to=number, page_size=self.lookup_page_size)
            for read in range(1, self.lookup_max_pages + 1):
                records = [_Found(str(r.sid), r.body, r.date_created) for r in page]
                found.extend(records)
                # Twilio lists newest first: once a page reaches back past SINCE, the next ones hold nothing newer.
                # date_sent is no guide (a queued message has none); DateSent filters would hide such messages.
                if not records or page.next_page_url is None or any(
                        r.created is not None and r.created < since for r in records):
                    return _Listing(found, complete=True)
                if read < self.lookup_max_pages:
                    page = page.next_page()
        except (TwilioRestException, TwilioServiceException) as exc:
            raise self._failed(self.classify(exc).error or f"twilio {exc.status}") from exc
        except TwilioException as exc:  # a list page: twilio raises the bare class, with the response
            raise self._failed(_page_error(exc)) from exc
        except requests.RequestException as exc:
            raise self._failed(f"network: {describe_network_error(exc)}") from exc
        except ValueError as exc:
            raise self._failed(f"unreadable answer: {exc}") from exc
        return _Listing(found, complete=False)

    def _failed(self, reason: str) -> _LookupFailed:
        return _LookupFailed(reason, max(self.lookup_retry_after, self._local.retry_after or 0.0))

    def _match(self, listing: _Listing, group: list[InDoubt]) -> list[Reconciled]:
        """One answer per message of GROUP (one number, oldest hand-over first): each claims the oldest unclaimed
        message with its exact body created in its window."""
        oldest_first = list(reversed(listing.found))
        claimed: set[str] = set()
        answers = []
        latest = datetime.now(UTC) + self.lookup_skew
        for message in group:
            start = _aware(message.handed_at) - self.lookup_skew
            window = [f for f in oldest_first if f.created is None or f.created >= start]
            same = [f for f in window if f.created is not None and f.body == message.text]
            match = next((f for f in same if f.sid not in claimed), None)
            since = f"{start:%Y-%m-%d %H:%M:%S}Z"
            if match is None and _aware(message.handed_at) > latest:
                # Twilio stamps date_created with the real time: a window starting in its future (a virtual
                # clock: tick --now) would miss the message and answer ABSENT, a second send.
                answers.append(Reconciled(Found.UNKNOWN, detail=(
                    f"handed over at {message.handed_at:%Y-%m-%d %H:%M:%S}, later than this machine's clock: a "
                    "look-up by creation time cannot be trusted; a delivery callback or an operator must decide")))
            elif match is not None:
                claimed.add(match.sid)
                answers.append(Reconciled(Found.SENT, provider_id=match.sid, detail=(
                    f"twilio has it: {match.sid}, same number and body, created {match.created:%Y-%m-%d %H:%M:%S}Z")))
            elif same:
                answers.append(Reconciled(Found.UNKNOWN, detail=(
                    f"twilio's only messages with this number and body since {since} ({', '.join(f.sid for f in same)})"
                    " matched other messages in doubt; an operator must decide")))
            elif not listing.complete:
                answers.append(Reconciled(Found.UNKNOWN, detail=(
                    f"more than {len(listing.found)} messages to this number since {since}: not all were read, and "
                    "none read has this body")))
            elif not window:
                answers.append(Reconciled(Found.ABSENT, detail=f"twilio has no message to this number since {since}"))
            else:
                answers.append(Reconciled(Found.UNKNOWN, detail=(
                    f"twilio has {len(window)} message(s) to this number since {since} but none with this exact body "
                    "(it may have re-encoded it); a delivery callback or an operator must decide")))
        return answers

    def close(self) -> None:
        self.http.session.close()


RECONCILING = "reconciling before any retry"


def _never_sent(exc: requests.RequestException) -> bool:
    """True when EXC proves no byte of the request left: the connection was never made (refused, DNS, connect
    timeout, a closed pool, a certificate refused during the handshake). Anything else may have been written."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    if not isinstance(exc, requests.ConnectionError):
        return False
    return any(isinstance(c, NewConnectionError | ClosedPoolError | ssl.SSLCertVerificationError)
               for c in causes(exc))


def _page_error(exc: TwilioException) -> str:
    """``twilio 20500: Internal Server Error`` from the response a failed list page carries."""
    response = exc.args[1] if len(exc.args) > 1 else None
    status = getattr(response, "status_code", "?")
    try:
        body = json.loads(getattr(response, "text", "") or "{}")
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    return one_line(f"twilio {body.get('code') or status}: {body.get('message') or 'the look-up was refused'}")


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class _Found:
    """One message Twilio lists to the number."""

    sid: str
    body: str | None
    created: datetime | None


@dataclass(frozen=True, slots=True)
class _Listing:
    found: list[_Found]  # newest first
    complete: bool  # read back past SINCE (or to the end): no older page can hold a message of the window


class _LookupFailed(Exception):
    """A look-up Twilio did not answer (429, 5xx, network): ask again after retry_after."""

    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
