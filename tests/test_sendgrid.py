"""The SendGrid email adapter, through the real ``sendgrid`` client, against the local SendGrid sandbox."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from email.message import Message
from typing import Any

import pytest
from python_http_client.exceptions import TooManyRequestsError

from channels.base import Found, InDoubt, Outcome, OutgoingMessage
from channels.pacing import TokenBucket
from channels.sendgrid import SendGridEmail
from engine.config import ChannelConfig, Config
from engine.domain.unsubscribe import headers as unsubscribe_headers
from engine.exceptions import ConfigError
from engine.providers import build_channel
from engine.testing.standins import Faults, Reply, SendGridSandbox, unanswered_port

SENDER = "会员中心 <members@example.com>"


def mail(message_id: int, to: str = "lin@example.com", subject: str | None = "林小雨，生日快乐") -> OutgoingMessage:
    return OutgoingMessage(id=message_id, channel="email", recipient=to, text="生日快乐！", member_id=f"m{message_id}",
                           journey="birthday", step="birthday_email", subject=subject, html="<p>生日快乐！</p>",
                           headers=unsubscribe_headers("https://crm.example.com/unsubscribe/tok"))


def config(sandbox: SendGridSandbox, **email_settings: Any) -> Config:
    settings = {"provider": "sendgrid", "api_key": sandbox.api_key, "from": SENDER, "base_url": sandbox.url,
                "rate_per_second": 0, "timeout": 2, **email_settings}
    return Config.model_validate({"channels": {"email": settings}})


@pytest.fixture
def sandbox() -> Iterator[SendGridSandbox]:
    with SendGridSandbox(faults=Faults(slow_seconds=5.0)) as running:
        yield running


@pytest.fixture
def channel(sandbox: SendGridSandbox) -> Iterator[SendGridEmail]:
    built = build_channel("email", config(sandbox, concurrency=1))
    assert isinstance(built, SendGridEmail)
    yield built
    built.close()


def test_an_accepted_email_records_the_x_message_id(channel: SendGridEmail, sandbox: SendGridSandbox) -> None:
    [result] = channel.send_batch([mail(17)])
    assert result.outcome is Outcome.SENT
    [received] = sandbox.messages()
    assert result.provider_id == received["message_id"]
    assert received["from"] == {"name": "会员中心", "email": "members@example.com"}
    assert received["personalizations"] == [{"to": [{"email": "lin@example.com"}]}]
    assert received["subject"] == "林小雨，生日快乐"
    assert received["content"] == [{"type": "text/plain", "value": "生日快乐！"},
                                   {"type": "text/html", "value": "<p>生日快乐！</p>"}]
    # RFC 8058 one-click unsubscribe travels as custom headers; our id and the journey come back in events.
    assert received["headers"] == {"List-Unsubscribe": "<https://crm.example.com/unsubscribe/tok>",
                                   "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
    assert received["custom_args"] == {"engine_message_id": "17"}
    assert received["categories"] == ["birthday"]


def test_a_rejected_address_is_permanent_with_sendgrids_message(channel: SendGridEmail,
                                                                sandbox: SendGridSandbox) -> None:
    sandbox.rejected_emails.add("nobody@example.com")
    [result] = channel.send_batch([mail(1, to="nobody@example.com")])
    assert result.outcome is Outcome.PERMANENT
    assert result.error == "sendgrid 400: Does not contain a valid address. (personalizations.0.to.0.email)"
    assert sandbox.attempts == 1


@pytest.mark.parametrize("api_key", ["SG.wrong", ""])
def test_a_refused_api_key_is_permanent_and_tells_ops_where_to_look(sandbox: SendGridSandbox, api_key: str) -> None:
    channel = SendGridEmail(api_key or "SG.other", SENDER, base_url=sandbox.url, rate_per_second=0)
    [result] = channel.send_batch([mail(1)])
    assert result.outcome is Outcome.PERMANENT
    assert result.error is not None and result.error.startswith("sendgrid 401:")
    assert "check channels.email.api_key" in result.error


@pytest.mark.parametrize(("kind", "expected"), [
    ("429", "sendgrid 429: too many requests"),
    ("500", "sendgrid 500: internal error"),
])
def test_rate_limits_and_server_errors_are_transient(channel: SendGridEmail, sandbox: SendGridSandbox, kind: str,
                                                     expected: str) -> None:
    sandbox.fail_next(kind)
    [result] = channel.send_batch([mail(1)])
    assert result.outcome is Outcome.TRANSIENT
    assert result.error == expected
    assert sandbox.attempts == 1  # python-http-client does not retry, and neither do we
    assert sandbox.messages() == []


@pytest.mark.parametrize(("kind", "expected", "accepted"), [
    # Accepted, answered after 5 s: the 0.5 s timeout ends the wait first (urllib lets it through raw).
    ("slow", "sendgrid: no answer within 0.5s (timeout) after the request was sent; reconciling before any retry",
     1),
    ("lost", "ConnectionResetError", 1),  # accepted, then the connection was reset
    # Closed without accepting: to the client, the same as accepted-then-closed. Guessing TRANSIENT could send it
    # twice; UNCERTAIN waits for SendGrid's events (none will come for it) or an operator.
    ("drop", "RemoteDisconnected: Remote end closed connection without response", 0),
])
@pytest.mark.slow  # waits for real socket timeouts or a second process
def test_no_answer_after_the_request_was_written_is_uncertain(sandbox: SendGridSandbox, kind: str, expected: str,
                                                              accepted: int) -> None:
    channel = build_channel("email", config(sandbox, timeout=0.5, concurrency=1))
    sandbox.fail_next(kind)
    [result] = channel.send_batch([mail(1)])
    assert result.outcome is Outcome.UNCERTAIN
    assert expected in (result.error or "") and "reconciling before any retry" in (result.error or "")
    assert sandbox.attempts == 1
    assert len(sandbox.messages()) == accepted


def test_the_default_timeout_of_none_is_replaced(sandbox: SendGridSandbox) -> None:
    """SendGridAPIClient waits forever by default. Ours gives up after the configured timeout."""
    plain = SendGridEmail(sandbox.api_key, SENDER, base_url=sandbox.url, rate_per_second=0)
    assert plain.api.client.timeout == 10.0  # ChannelConfig's default, never the library's None
    channel = build_channel("email", config(sandbox, timeout=0.25))
    assert isinstance(channel, SendGridEmail) and channel.api.client.timeout == 0.25
    sandbox.fail_next("slow")  # the answer would come after 5 s
    [result] = channel.send_batch([mail(1)])
    assert result.outcome is Outcome.UNCERTAIN and "within 0.25s" in (result.error or "")


class NoMessageId(SendGridSandbox):
    """Accepts the mail, answers STATUS without the X-Message-Id header."""

    def __init__(self, status: int) -> None:
        super().__init__()
        self.status = status

    def route(self, method: str, path: str, headers: Message, body: bytes) -> Reply:
        super().route(method, path, headers, body)
        return Reply(self.status)


@pytest.mark.parametrize("status", [202, 200])
def test_an_acceptance_without_a_message_id_is_uncertain(status: int) -> None:
    with NoMessageId(status) as box:
        channel = build_channel("email", config(box))
        [result] = channel.send_batch([mail(1)])
        assert len(box.messages()) == 1
    assert result.outcome is Outcome.UNCERTAIN
    assert result.error == (f"sendgrid: answered {status} without an X-Message-Id; reconciling before any retry")


def test_a_429_honours_retry_after_and_the_next_try_goes_through(channel: SendGridEmail,
                                                                 sandbox: SendGridSandbox) -> None:
    sandbox.faults = Faults(retry_after=9)
    sandbox.fail_next("429")
    [first] = channel.send_batch([mail(1)])
    assert (first.outcome, first.retry_after) == (Outcome.TRANSIENT, 9.0)
    [second] = channel.send_batch([mail(1)])
    assert second.sent
    assert len(sandbox.messages()) == 1


def test_without_retry_after_the_rate_limit_reset_header_is_used(channel: SendGridEmail) -> None:
    body = json.dumps({"errors": [{"message": "too many requests", "field": None}]}).encode()
    reset = str(int(time.time()) + 30)
    result = channel.classify(TooManyRequestsError(429, "Too Many Requests", body, {"X-RateLimit-Reset": reset}))
    assert result.outcome is Outcome.TRANSIENT
    assert result.retry_after is not None and 25 <= result.retry_after <= 30


def test_an_email_without_a_subject_is_refused_before_sendgrid(channel: SendGridEmail,
                                                               sandbox: SendGridSandbox) -> None:
    [result] = channel.send_batch([mail(1, subject=None)])
    assert result.outcome is Outcome.PERMANENT and "subject" in (result.error or "")
    assert sandbox.attempts == 0


def test_an_unreachable_provider_is_transient(sandbox: SendGridSandbox, channel: SendGridEmail) -> None:
    sandbox.stop()  # its port is closed: connection refused
    [result] = channel.send_batch([mail(1)])
    assert result.outcome is Outcome.TRANSIENT
    assert "Connection refused" in (result.error or "")


def test_a_name_that_does_not_resolve_is_transient(sandbox: SendGridSandbox) -> None:
    channel = build_channel("email", config(sandbox, base_url="http://sendgrid-sandbox.invalid"))
    [result] = channel.send_batch([mail(1)])
    assert result.outcome is Outcome.TRANSIENT
    assert (result.error or "").startswith("sendgrid: connection to http://sendgrid-sandbox.invalid failed: ")


@pytest.mark.slow  # waits for real socket timeouts or a second process
def test_a_connect_timeout_is_transient(sandbox: SendGridSandbox) -> None:
    """urllib wraps a timeout while connecting in URLError: nothing was written."""
    with unanswered_port() as url:
        channel = build_channel("email", config(sandbox, base_url=url, timeout=0.5))
        [result] = channel.send_batch([mail(1)])
    assert result.outcome is Outcome.TRANSIENT, result.error
    assert (result.error or "").startswith(f"sendgrid: connection to {url} failed: ")
    assert "timed out" in (result.error or "")


def test_sendgrid_cannot_look_a_message_up(channel: SendGridEmail) -> None:
    """No look-up in the v3 Mail API: a message in doubt waits for the event webhook (engine_message_id)."""
    handed = datetime.now(UTC)
    answers = channel.reconcile([InDoubt(31, "lin@example.com", "生日快乐！", "林小雨，生日快乐", handed),
                                 InDoubt(32, "wu@example.com", "生日快乐！", "生日快乐", handed, "7")])
    assert [(a.found, a.provider_id, a.retry_after) for a in answers] == [(Found.UNKNOWN, None, None)] * 2
    assert "event webhook for engine_message_id=31" in answers[0].detail
    assert "engine_message_id=32" in answers[1].detail


def test_in_flight_and_reconcile_after_come_from_config(sandbox: SendGridSandbox) -> None:
    channel = build_channel("email", config(sandbox, concurrency=3, in_flight=9, reconcile_after=0))
    assert isinstance(channel, SendGridEmail)
    assert (channel.in_flight, channel.reconcile_after) == (9, 0.0)
    assert SendGridEmail.in_flight == ChannelConfig.model_fields["in_flight"].default


def test_a_concurrent_batch_answers_in_input_order(sandbox: SendGridSandbox) -> None:
    sandbox.rejected_emails.update({"m2@example.com", "m5@example.com"})
    channel = build_channel("email", config(sandbox, concurrency=8))
    batch = [mail(i, to=f"m{i}@example.com") for i in range(12)]
    results = channel.send_batch(batch)
    ids = {r["custom_args"]["engine_message_id"]: r["message_id"] for r in sandbox.messages()}
    for message, result in zip(batch, results, strict=True):
        if message.recipient in sandbox.rejected_emails:
            assert result.outcome is Outcome.PERMANENT
        else:
            assert result.provider_id == ids[str(message.id)]


@pytest.mark.parametrize(("settings", "message"), [
    ({"api_key": None}, "channels.email.api_key is required for provider sendgrid"),
    ({"from": ""}, "channels.email.from is required for provider sendgrid"),
    ({"from": "会员中心"}, "channels.email.from must be an email address such as '会员中心 <members@example.com>'"),
    ({"base_url": "api.sendgrid.com"}, "channels.email.base_url must start with http:// or https://"),
])
def test_build_channel_names_the_bad_setting(sandbox: SendGridSandbox, settings: dict[str, Any],
                                             message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        build_channel("email", config(sandbox, **settings))
    assert "\n" not in str(caught.value)


def test_the_default_rate_is_sendgrids_documented_api_default(sandbox: SendGridSandbox) -> None:
    channel = build_channel("email", config(sandbox, rate_per_second=None))
    assert isinstance(channel, SendGridEmail) and channel.limiter is not None
    assert channel.limiter.rate == 10.0  # 600 requests per minute


def test_a_concurrent_batch_is_paced(sandbox: SendGridSandbox) -> None:
    now = 0.0
    wakeups: list[float] = []
    lock = threading.Lock()

    def sleep(seconds: float) -> None:  # time stands still: each sleep says when its send may go
        with lock:
            wakeups.append(now + seconds)

    channel = SendGridEmail(sandbox.api_key, SENDER, base_url=sandbox.url, concurrency=6,
                            limiter=TokenBucket(3, clock=lambda: now, sleep=sleep))
    results = channel.send_batch([mail(i, to=f"m{i}@example.com") for i in range(8)])
    assert all(r.sent for r in results)
    went = sorted([0.0] * (8 - len(wakeups)) + wakeups)
    assert [sum(1 for t in went if s <= t < s + 1) for s in (0, 1, 2)] == [3, 3, 2]
