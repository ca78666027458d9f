"""The SendGrid email adapter, through the real ``sendgrid`` client, against the local SendGrid sandbox."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from python_http_client.exceptions import TooManyRequestsError

from channels import TokenBucket, build_channel
from channels.base import Outcome, OutgoingMessage
from channels.sandbox import Faults, SendGridSandbox
from channels.sendgrid import SendGridEmail
from engine.config import Config
from engine.exceptions import ConfigError
from engine.unsubscribe import headers as unsubscribe_headers

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
    ("drop", "RemoteDisconnected"),
    ("slow", "sendgrid: no answer within 2s (timeout)"),
])
def test_rate_limits_server_errors_drops_and_timeouts_are_transient(channel: SendGridEmail,
                                                                    sandbox: SendGridSandbox, kind: str,
                                                                    expected: str) -> None:
    sandbox.fail_next(kind)
    [result] = channel.send_batch([mail(1)])
    assert result.outcome is Outcome.TRANSIENT
    assert expected in (result.error or "")
    assert sandbox.attempts == 1  # python-http-client does not retry, and neither do we
    assert sandbox.messages() == []


def test_the_default_timeout_of_none_is_replaced(sandbox: SendGridSandbox) -> None:
    """LIBRARY_NOTES: SendGridAPIClient waits forever by default. Ours gives up after the configured timeout."""
    plain = SendGridEmail(sandbox.api_key, SENDER, base_url=sandbox.url, rate_per_second=0)
    assert plain.api.client.timeout == 10.0  # ChannelConfig's default, never the library's None
    channel = build_channel("email", config(sandbox, timeout=0.25))
    assert isinstance(channel, SendGridEmail) and channel.api.client.timeout == 0.25
    sandbox.fail_next("slow")  # the answer would come after 5 s
    [result] = channel.send_batch([mail(1)])
    assert result.outcome is Outcome.TRANSIENT and "within 0.25s" in (result.error or "")


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
    sandbox.stop()
    [result] = channel.send_batch([mail(1)])
    assert result.outcome is Outcome.TRANSIENT
    assert "Connection refused" in (result.error or "")


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
