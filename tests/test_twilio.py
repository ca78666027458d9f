"""The Twilio SMS adapter, through the real ``twilio`` client, against the local Twilio sandbox.

Also the pacing every provider adapter shares (channels.TokenBucket), on a fake clock.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import socket
import ssl
import threading
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from channels.base import Outcome, OutgoingMessage
from channels.pacing import TokenBucket
from channels.twilio import TwilioSMS
from engine.config import ChannelConfig, Config
from engine.exceptions import ConfigError
from engine.providers import build_channel
from engine.testing.standins import Faults, Reply, TwilioSandbox, unanswered_port

PUBLIC_URL = "https://crm.example.com"
FROM = "+15005550006"


def sms(message_id: int, to: str = "+8613800138000", text: str = "【会员中心】生日快乐！回T退订") -> OutgoingMessage:
    return OutgoingMessage(id=message_id, channel="sms", recipient=to, text=text, member_id=f"m{message_id}",
                           journey="birthday", step="birthday_sms")


def config(sandbox: TwilioSandbox, **sms_settings: Any) -> Config:
    settings = {"provider": "twilio", "account_sid": sandbox.account_sid, "auth_token": sandbox.auth_token,
                "from": FROM, "base_url": sandbox.url, "rate_per_second": 0, "timeout": 2, **sms_settings}
    return Config.model_validate({"channels": {"sms": settings}, "web": {"public_url": PUBLIC_URL}})


@contextlib.contextmanager
def tls_listener(folder: Path) -> Iterator[str]:
    """An HTTPS port with a self-signed certificate, which the client refuses during the handshake."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn, contextlib.suppress(OSError), context.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        thread.join(timeout=5)


@pytest.fixture
def sandbox() -> Iterator[TwilioSandbox]:
    with TwilioSandbox(faults=Faults(slow_seconds=5.0)) as running:
        yield running


@pytest.fixture
def channel(sandbox: TwilioSandbox) -> Iterator[TwilioSMS]:
    built = build_channel("sms", config(sandbox, concurrency=1))
    assert isinstance(built, TwilioSMS)
    yield built
    built.close()


# ---------------------------------------------------------------------- answers and their classes


def test_an_accepted_message_records_twilios_sid(channel: TwilioSMS, sandbox: TwilioSandbox) -> None:
    [result] = channel.send_batch([sms(41)])
    assert result.outcome is Outcome.SENT
    [received] = sandbox.messages()
    assert result.provider_id == received["sid"]
    assert re.fullmatch(r"SM[0-9a-f]{32}", received["sid"])
    assert (received["to"], received["from"], received["body"]) == ("+8613800138000", FROM, sms(41).text)
    # Callbacks go to the public URL (Twilio signs over it), carrying our row id for the webhook.
    assert received["status_callback"] == f"{PUBLIC_URL}/webhooks/twilio/status?message_id=41"


def test_a_messaging_service_can_send_instead_of_a_number(sandbox: TwilioSandbox) -> None:
    channel = build_channel("sms", config(sandbox, **{"from": None, "messaging_service_sid": "MG" + "1" * 32}))
    try:
        [result] = channel.send_batch([sms(1)])
    finally:
        channel.close()
    assert result.sent
    [received] = sandbox.messages()
    assert (received["from"], received["messaging_service_sid"], received["status"]) == (None, "MG" + "1" * 32,
                                                                                         "accepted")


def test_an_invalid_number_is_permanent_and_names_the_code(channel: TwilioSMS, sandbox: TwilioSandbox) -> None:
    sandbox.invalid_numbers.add("+15550001111")
    [result] = channel.send_batch([sms(1, to="+15550001111")])
    assert result.outcome is Outcome.PERMANENT
    assert result.error == "twilio 21211: The 'To' number +15550001111 is not a valid phone number."
    assert result.suppress_reason is None
    assert sandbox.messages() == []


def test_a_recipient_who_replied_stop_is_permanent_and_suppressed(channel: TwilioSMS, sandbox: TwilioSandbox) -> None:
    sandbox.unsubscribed_numbers.add("+8613900139000")
    [result] = channel.send_batch([sms(1, to="+8613900139000")])
    assert (result.outcome, result.suppress_reason) == (Outcome.PERMANENT, "unsubscribed")
    assert result.error is not None and result.error.startswith("twilio 21610:")


def test_a_number_that_is_not_e164_never_reaches_twilio(channel: TwilioSMS, sandbox: TwilioSandbox) -> None:
    [result] = channel.send_batch([sms(1, to="13800138000")])
    assert result.outcome is Outcome.PERMANENT
    assert "E.164" in (result.error or "")
    assert sandbox.attempts == 0


def test_wrong_credentials_are_permanent_and_tell_ops_what_to_check(sandbox: TwilioSandbox) -> None:
    channel = build_channel("sms", config(sandbox, auth_token="not-the-token"))
    try:
        [result] = channel.send_batch([sms(1)])
    finally:
        channel.close()
    assert result.outcome is Outcome.PERMANENT
    assert result.error is not None and result.error.startswith("twilio 20003: Authenticate")
    assert "channels.sms.auth_token" in result.error


@pytest.mark.parametrize(("kind", "expected"), [
    ("429", "twilio 20429: Too Many Requests"),
    ("500", "twilio 20500: Internal Server Error"),
])
def test_rate_limits_and_server_errors_are_transient(channel: TwilioSMS, sandbox: TwilioSandbox, kind: str,
                                                     expected: str) -> None:
    sandbox.fail_next(kind)
    [result] = channel.send_batch([sms(1)])
    assert result.outcome is Outcome.TRANSIENT
    assert result.error == expected
    assert sandbox.messages() == []


@pytest.mark.parametrize(("kind", "expected", "created"), [
    # The stand-in created the message, then answered after 5 s: the 0.5 s timeout ends the wait first.
    ("slow", "twilio: no answer within 0.5s (timeout) after the request was sent; reconciling before any retry", 1),
    # Created, then the connection was reset.
    ("lost", "ConnectionResetError", 1),
    # Closed without creating anything; but the client reads exactly what it reads for a message created and then
    # lost (a connection closed after the request was written), so TRANSIENT would be a guess that can send twice.
    # UNCERTAIN, and the look-up answers ABSENT (tests/test_channel_reconcile.py): then it is sent again.
    ("drop", "RemoteDisconnected: Remote end closed connection without response", 0),
])
@pytest.mark.slow  # waits for real socket timeouts or a second process
def test_no_answer_after_the_request_was_written_is_uncertain(sandbox: TwilioSandbox, kind: str, expected: str,
                                                              created: int) -> None:
    channel = build_channel("sms", config(sandbox, timeout=0.5, concurrency=1))
    sandbox.fail_next(kind)
    try:
        [result] = channel.send_batch([sms(1)])
    finally:
        channel.close()
    assert result.outcome is Outcome.UNCERTAIN
    assert expected in (result.error or "") and "reconciling before any retry" in (result.error or "")
    assert "\n" not in (result.error or "")
    assert len(sandbox.messages()) == created


def test_a_429_carries_retry_after_and_the_next_try_goes_through(channel: TwilioSMS, sandbox: TwilioSandbox) -> None:
    sandbox.faults = Faults(retry_after=7)
    sandbox.fail_next("429")
    [first] = channel.send_batch([sms(1)])
    assert (first.outcome, first.retry_after) == (Outcome.TRANSIENT, 7.0)
    [second] = channel.send_batch([sms(1)])
    assert second.sent and second.retry_after is None
    assert len(sandbox.messages()) == 1


@pytest.mark.parametrize(("kind", "outcome"), [("429", Outcome.TRANSIENT), ("500", Outcome.TRANSIENT),
                                               ("drop", Outcome.UNCERTAIN), ("lost", Outcome.UNCERTAIN)])
def test_the_client_never_retries_on_its_own(channel: TwilioSMS, sandbox: TwilioSandbox, kind: str,
                                             outcome: Outcome) -> None:
    """twilio does not retry; neither may our adapter. The engine retries, and logs each try."""
    sandbox.fail_next(kind)
    [result] = channel.send_batch([sms(1)])
    assert result.outcome is outcome
    assert sandbox.attempts == 1
    assert len(sandbox.messages()) == (1 if kind == "lost" else 0)


def test_permanent_answers_are_asked_once(channel: TwilioSMS, sandbox: TwilioSandbox) -> None:
    sandbox.invalid_numbers.add("+15550001111")
    sandbox.unsubscribed_numbers.add("+15550002222")
    results = channel.send_batch([sms(1, to="+15550001111"), sms(2, to="+15550002222")])
    assert [r.outcome for r in results] == [Outcome.PERMANENT, Outcome.PERMANENT]
    assert sandbox.attempts == 2


def test_an_unreachable_provider_is_transient(sandbox: TwilioSandbox, channel: TwilioSMS) -> None:
    sandbox.stop()  # its port is closed: connection refused
    [result] = channel.send_batch([sms(1)])
    assert result.outcome is Outcome.TRANSIENT
    assert "connection to http://127.0.0.1" in (result.error or "")
    assert "Connection refused" in (result.error or "")


def test_a_name_that_does_not_resolve_is_transient(sandbox: TwilioSandbox) -> None:
    channel = build_channel("sms", config(sandbox, base_url="http://twilio-sandbox.invalid"))
    try:
        [result] = channel.send_batch([sms(1)])
    finally:
        channel.close()
    assert result.outcome is Outcome.TRANSIENT
    assert "connection to http://twilio-sandbox.invalid failed" in (result.error or "")


@pytest.mark.slow  # waits for real socket timeouts or a second process
def test_a_connect_timeout_is_transient(sandbox: TwilioSandbox) -> None:
    """The connection is never made (a listener whose queue is full drops the SYN): nothing was written."""
    with unanswered_port() as url:
        channel = build_channel("sms", config(sandbox, base_url=url, timeout=0.5))
        try:
            [result] = channel.send_batch([sms(1)])
        finally:
            channel.close()
    assert result.outcome is Outcome.TRANSIENT, result.error
    assert result.error == f"twilio: connection to {url} failed: no connection within 0.5s (connect timeout)"


def test_a_refused_certificate_is_transient(sandbox: TwilioSandbox, tmp_path: Path) -> None:
    """A TLS handshake refused by the client happens before any byte of the request is written."""
    with tls_listener(tmp_path) as url:
        channel = build_channel("sms", config(sandbox, base_url=url))
        try:
            [result] = channel.send_batch([sms(1)])
        finally:
            channel.close()
    assert result.outcome is Outcome.TRANSIENT, result.error
    assert "CERTIFICATE_VERIFY_FAILED" in (result.error or "")


class Garbled(TwilioSandbox):
    """Creates the message, then answers 201 with BODY instead of the resource."""

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def route(self, method: str, path: str, headers: Message, body: bytes) -> Reply:
        created = super().route(method, path, headers, body)
        return Reply(created.status, self.body, {"Content-Type": "application/json"})


@pytest.mark.parametrize(("body", "expected"), [
    (b"<html>gateway</html>", "twilio: answered with something we cannot read"),
    (b"{}", "twilio: answered without a message sid"),
    # The real client trips over a JSON list (AttributeError): the adapter's catch-all makes it UNCERTAIN too.
    (b"[]", "twilio: unexpected AttributeError while sending"),
])
def test_an_answer_that_cannot_be_read_is_uncertain(body: bytes, expected: str) -> None:
    with Garbled(body) as garbled:
        channel = build_channel("sms", config(garbled))
        try:
            [result] = channel.send_batch([sms(1)])
        finally:
            channel.close()
        assert len(garbled.messages()) == 1  # it was created: a TRANSIENT retry would send it twice
    assert result.outcome is Outcome.UNCERTAIN
    assert (result.error or "").startswith(expected) and "reconciling before any retry" in (result.error or "")
    assert "\n" not in (result.error or "")


def test_a_concurrent_batch_answers_in_input_order(sandbox: TwilioSandbox) -> None:
    sandbox.invalid_numbers.update({"+15550000003", "+15550000007"})
    channel = build_channel("sms", config(sandbox, concurrency=8))
    batch = [sms(i, to=f"+1555000000{i}") for i in range(10)]
    try:
        results = channel.send_batch(batch)
    finally:
        channel.close()
    sids = {r["to"]: r["sid"] for r in sandbox.messages()}
    for message, result in zip(batch, results, strict=True):
        if message.recipient in sandbox.invalid_numbers:
            assert result.outcome is Outcome.PERMANENT and message.recipient in (result.error or "")
        else:
            assert result.provider_id == sids[message.recipient]


# ---------------------------------------------------------------------- configuration


def test_in_flight_and_reconcile_after_come_from_config(sandbox: TwilioSandbox) -> None:
    channel = build_channel("sms", config(sandbox, concurrency=2, in_flight=7, reconcile_after=15))
    try:
        assert isinstance(channel, TwilioSMS)
        assert (channel.in_flight, channel.reconcile_after) == (7, 15.0)
    finally:
        channel.close()
    # Built without config, an adapter has config.yaml's defaults.
    defaults = ChannelConfig.model_fields
    assert TwilioSMS.in_flight == defaults["in_flight"].default
    assert TwilioSMS.reconcile_after == defaults["reconcile_after"].default


@pytest.mark.parametrize(("options", "message"), [({"in_flight": 2, "concurrency": 4}, "in_flight must be at least"),
                                                  ({"reconcile_after": -1}, "reconcile_after must be 0 or more")])
def test_the_adapter_rejects_a_bad_window(sandbox: TwilioSandbox, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TwilioSMS(sandbox.account_sid, sandbox.auth_token, public_url=PUBLIC_URL, sender=FROM, **options)


@pytest.mark.parametrize(("settings", "message"), [
    ({"account_sid": None}, "channels.sms.account_sid is required for provider twilio"),
    ({"auth_token": ""}, "channels.sms.auth_token is required for provider twilio"),
    ({"from": None}, "channels.sms.from or channels.sms.messaging_service_sid is required"),
    ({"base_url": "127.0.0.1:8901"}, "channels.sms.base_url must start with http:// or https://"),
])
def test_build_channel_names_the_missing_setting(sandbox: TwilioSandbox, settings: dict[str, Any],
                                                 message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        build_channel("sms", config(sandbox, **settings))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("sender", "rate"), [("+15005550006", 1.0), ("+18885550006", 3.0), ("55555", 100.0),
                                              ("MEMBERS", 1.0), (None, 1.0)])
def test_the_default_rate_is_twilios_documented_one_for_the_sender(sandbox: TwilioSandbox, sender: str | None,
                                                                   rate: float) -> None:
    service = None if sender else "MG" + "1" * 32
    channel = build_channel("sms", config(sandbox, rate_per_second=None, messaging_service_sid=service,
                                          **{"from": sender}))
    try:
        assert isinstance(channel, TwilioSMS) and channel.limiter is not None
        assert channel.limiter.rate == rate
    finally:
        channel.close()


def test_rate_zero_means_no_limit_and_a_number_overrides_the_default(sandbox: TwilioSandbox) -> None:
    unlimited, fixed = (build_channel("sms", config(sandbox, rate_per_second=r)) for r in (0, 25))
    try:
        assert isinstance(unlimited, TwilioSMS) and unlimited.limiter is None
        assert isinstance(fixed, TwilioSMS) and fixed.limiter is not None and fixed.limiter.rate == 25
    finally:
        unlimited.close()
        fixed.close()


# ---------------------------------------------------------------------- pacing on a fake clock


class FakeClock:
    """Time stands still unless a sleep moves it; every sleep is remembered (thread-safe)."""

    def __init__(self, *, advance: bool) -> None:
        self.now = 0.0
        self.advance = advance
        self.wakeups: list[float] = []
        self._lock = threading.Lock()

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.wakeups.append(self.now + seconds)
            if self.advance:
                self.now += seconds


def starts(clock: FakeClock, sends: int) -> list[float]:
    """When each send went: those that did not sleep went at 0, the others when their sleep ended."""
    return sorted([0.0] * (sends - len(clock.wakeups)) + clock.wakeups)


def in_window(times: list[float], start: float, end: float) -> int:
    return sum(1 for t in times if start <= t < end)


def test_the_bucket_lets_rate_per_second_through_each_second() -> None:
    clock = FakeClock(advance=True)
    bucket = TokenBucket(5, clock=clock.time, sleep=clock.sleep)
    went = []
    for _ in range(15):
        bucket.acquire()
        went.append(clock.now)
    assert [in_window(went, s, s + 1) for s in (0, 1, 2)] == [5, 5, 5]


def test_the_bucket_refills_while_idle_but_never_beyond_its_burst() -> None:
    clock = FakeClock(advance=True)
    bucket = TokenBucket(2, clock=clock.time, sleep=clock.sleep)
    bucket.acquire()
    clock.now = 100.0  # a long quiet spell
    went = []
    for _ in range(5):
        bucket.acquire()
        went.append(clock.now)
    assert in_window(went, 100, 101) == 2


def test_the_bucket_rejects_a_rate_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="rate must be more than 0"):
        TokenBucket(0)
    with pytest.raises(ValueError, match="burst must be at least 1"):
        TokenBucket(1, burst=0.5)


def test_a_concurrent_batch_is_paced_by_the_channels_bucket(sandbox: TwilioSandbox) -> None:
    clock = FakeClock(advance=False)
    channel = TwilioSMS(sandbox.account_sid, sandbox.auth_token, public_url=PUBLIC_URL, sender=FROM,
                        base_url=sandbox.url, concurrency=4,
                        limiter=TokenBucket(4, clock=clock.time, sleep=clock.sleep))
    try:
        results = channel.send_batch([sms(i) for i in range(10)])
    finally:
        channel.close()
    assert all(r.sent for r in results)
    went = starts(clock, 10)
    assert [in_window(went, 0, 1), in_window(went, 1, 2), in_window(went, 2, 3)] == [4, 4, 2]


def test_sms_pacing_counts_segments_as_twilio_does(sandbox: TwilioSandbox) -> None:
    clock = FakeClock(advance=False)
    channel = TwilioSMS(sandbox.account_sid, sandbox.auth_token, public_url=PUBLIC_URL, sender=FROM,
                        base_url=sandbox.url, concurrency=1,
                        limiter=TokenBucket(1, clock=clock.time, sleep=clock.sleep))
    long_text = "会员" * 50  # 100 UCS-2 characters: two segments
    try:
        channel.send_batch([sms(1, text=long_text), sms(2, text=long_text), sms(3, text="short")])
    finally:
        channel.close()
    assert starts(clock, 3) == [0.0, 2.0, 4.0]
