"""The provider sandboxes: their wire format, faults and signed callbacks; and the engine end to end through them.

Signatures are checked with the providers' own libraries (twilio.request_validator, sendgrid's EventWebhook),
which is what the engine's webhooks use.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
import requests
from sendgrid.helpers.eventwebhook import EventWebhook
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.request_validator import RequestValidator

from channels.base import OutgoingMessage
from channels.sendgrid import SendGridEmail
from channels.twilio import TwilioSMS
from engine.config import Config, load_config
from engine.providers import build_channel
from engine.testing import Harness
from engine.testing.standins import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Faults,
    Reply,
    Sandbox,
    SendGridSandbox,
    TwilioSandbox,
    config_snippet,
)

pytestmark = pytest.mark.slow  # the slow tier: provider stand-ins over sockets, and their command line

PUBLIC_URL = "https://crm.example.com"
FROM = "+15005550006"


class Receiver(Sandbox):
    """Our side of the callbacks: records every request (path, headers, raw body) and answers 200."""

    name = "receiver"

    def __init__(self) -> None:
        super().__init__()
        self.arrived = threading.Condition()

    def route(self, method: str, path: str, headers: Message, body: bytes) -> Reply:
        self.accept({"path": path, "headers": dict(headers.items()), "body": body})
        with self.arrived:
            self.arrived.notify_all()
        return Reply(200, b"ok")

    def wait_for(self, count: int) -> list[dict[str, Any]]:
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.messages()) >= count, timeout=10)
        return self.messages()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as running:
        yield running


def sms(message_id: int, to: str = "+8613800138000") -> OutgoingMessage:
    return OutgoingMessage(id=message_id, channel="sms", recipient=to, text=f"hello {message_id}",
                           member_id="m1", journey="birthday", step="birthday_sms")


def mail(message_id: int, to: str = "lin@example.com") -> OutgoingMessage:
    return OutgoingMessage(id=message_id, channel="email", recipient=to, text="hi", member_id="m1",
                           journey="birthday", step="birthday_email", subject="Hi", html="<p>hi</p>")


def twilio_channel(box: TwilioSandbox, **options: Any) -> TwilioSMS:
    return TwilioSMS(box.account_sid, box.auth_token, public_url=PUBLIC_URL, sender=FROM, base_url=box.url,
                     rate_per_second=0, timeout=2.0, **options)


# ---------------------------------------------------------------------- wire format


def test_twilio_sandbox_answers_errors_as_twilio_does() -> None:
    with TwilioSandbox() as box, httpx.Client(base_url=box.url) as http:
        path = f"/2010-04-01/Accounts/{box.account_sid}/Messages.json"
        form = {"To": "+8613800138000", "From": FROM, "Body": "hi"}
        unauthorised = http.post(path, data=form, auth=(box.account_sid, "wrong"))
        assert unauthorised.status_code == 401
        assert unauthorised.json() == {"code": 20003, "message": "Authenticate", "status": 401,
                                       "more_info": "https://www.twilio.com/docs/errors/20003"}
        other_account = http.post(path.replace(box.account_sid, "AC" + "0" * 32), data=form,
                                  auth=(box.account_sid, box.auth_token))
        assert (other_account.status_code, other_account.json()["code"]) == (404, 20404)
        no_body = http.post(path, data={**form, "Body": ""}, auth=(box.account_sid, box.auth_token))
        assert (no_body.status_code, no_body.json()["code"]) == (400, 21602)
        created = http.post(path, data=form, auth=(box.account_sid, box.auth_token))
        assert created.status_code == 201
        assert created.json()["status"] == "queued" and created.json()["num_segments"] == "1"


def test_twilio_sids_are_unique() -> None:
    with TwilioSandbox() as box:
        channel = twilio_channel(box)
        results = channel.send_batch([sms(i) for i in range(20)])
        channel.close()
    assert len({r.provider_id for r in results}) == 20


def test_sendgrid_sandbox_answers_as_sendgrid_does() -> None:
    with SendGridSandbox() as box, httpx.Client(base_url=box.url) as http:
        body = {"personalizations": [{"to": [{"email": "a@example.com"}]}], "from": {"email": "m@example.com"},
                "subject": "s", "content": [{"type": "text/plain", "value": "x"}]}
        unauthorised = http.post("/v3/mail/send", json=body)
        assert unauthorised.status_code == 401
        [error] = unauthorised.json()["errors"]
        assert set(error) == {"message", "field", "help"}
        bearer = {"Authorization": f"Bearer {box.api_key}"}
        no_subject = http.post("/v3/mail/send", json={**body, "subject": ""}, headers=bearer)
        assert no_subject.status_code == 400 and no_subject.json()["errors"][0]["field"] == "subject"
        accepted = http.post("/v3/mail/send", json=body, headers=bearer)
        assert (accepted.status_code, accepted.content) == (202, b"")
        assert len(accepted.headers["X-Message-Id"]) == 22


def test_fault_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="add up to at most 1"):
        Faults(too_many=0.6, server_error=0.6)
    with pytest.raises(ValueError, match="add up to at most 1"):
        Faults(slow=0.5, lost=0.6)
    with pytest.raises(ValueError, match=r"within 0\.\.1"):
        Faults(drop=-0.1)
    with pytest.raises(ValueError, match=r"within 0\.\.1"):
        Faults(lost=1.5)
    with pytest.raises(ValueError, match="slow_seconds must be 0 or more"):
        Faults(slow_seconds=-1)
    with pytest.raises(ValueError, match="fault kinds must be among"):
        TwilioSandbox().fail_next("timeout")


def test_lost_is_drawn_as_its_share_says() -> None:
    rng = random.Random(5)
    drawn = Counter(Faults(lost=0.25, slow=0.25).draw(rng) for _ in range(4000))
    assert set(drawn) == {"ok", "lost", "slow"}
    assert 900 < drawn["lost"] < 1100 and 900 < drawn["slow"] < 1100


# ---------------------------------------------------------------------- what the client sees of each fault

FORM = {"To": "+8613800138000", "From": FROM, "Body": "hi"}


@pytest.mark.parametrize(("kind", "error", "accepted"), [
    ("drop", httpx.RemoteProtocolError, 0),  # closed without processing: "Server disconnected"
    ("lost", httpx.ReadError, 1),  # processed, then reset: "Connection reset by peer"
])
def test_drop_closes_before_processing_and_lost_resets_after(kind: str, error: type[Exception],
                                                              accepted: int) -> None:
    with TwilioSandbox() as box, httpx.Client(base_url=box.url, auth=(box.account_sid, box.auth_token)) as http:
        box.fail_next(kind)
        with pytest.raises(error):
            http.post(f"/2010-04-01/Accounts/{box.account_sid}/Messages.json", data=FORM)
        assert len(box.messages()) == accepted


def test_slow_processes_at_once_and_answers_late() -> None:
    """The dangerous case: the client gives up while the provider already has the message."""
    with TwilioSandbox(faults=Faults(slow_seconds=1.0)) as box, \
            httpx.Client(base_url=box.url, auth=(box.account_sid, box.auth_token)) as http:
        box.fail_next("slow")
        with pytest.raises(httpx.ReadTimeout):
            http.post(f"/2010-04-01/Accounts/{box.account_sid}/Messages.json", data=FORM, timeout=0.3)
        assert len(box.messages()) == 1  # created before the client gave up
        box.fail_next("slow")
        started = time.monotonic()
        late = http.post(f"/2010-04-01/Accounts/{box.account_sid}/Messages.json", data=FORM, timeout=5)
        assert late.status_code == 201 and time.monotonic() - started >= 1.0


def test_duplicates_count_our_ids_accepted_more_than_once() -> None:
    with TwilioSandbox() as sms_box, SendGridSandbox() as mail_box:
        channel = twilio_channel(sms_box)
        channel.send_batch([sms(1), sms(2), sms(1), sms(3), sms(1), sms(2)])
        channel.close()
        email = SendGridEmail(mail_box.api_key, "m@example.com", base_url=mail_box.url, rate_per_second=0)
        email.send_batch([mail(7), mail(8), mail(7)])
        assert (sms_box.duplicates(), mail_box.duplicates()) == ({1: 3, 2: 2}, {7: 2})
        assert len(sms_box.messages()) == 6  # every accepted request is kept


# ---------------------------------------------------------------------- Twilio look-ups


def test_twilio_lists_messages_newest_first_in_its_page_envelope() -> None:
    with TwilioSandbox() as box, httpx.Client(base_url=box.url, auth=(box.account_sid, box.auth_token)) as http:
        channel = twilio_channel(box, concurrency=1)
        channel.send_batch([sms(i) for i in range(5)] + [sms(9, to="+8613900139000")])
        channel.close()
        path = f"/2010-04-01/Accounts/{box.account_sid}/Messages.json"
        first = http.get(path, params={"To": "+8613800138000", "PageSize": 2}).json()
        assert set(first) == {"messages", "next_page_uri", "first_page_uri", "previous_page_uri", "page",
                              "page_size", "start", "end", "uri"}
        assert [m["body"] for m in first["messages"]] == ["hello 4", "hello 3"]
        assert (first["page"], first["page_size"], first["start"], first["end"]) == (0, 2, 0, 1)
        assert first["previous_page_uri"] is None and first["first_page_uri"].startswith(path + "?")
        assert "status_callback" not in first["messages"][0]  # Twilio's resource does not carry it
        bodies = [m["body"] for m in first["messages"]]
        page = first
        while page["next_page_uri"]:
            page = http.get(page["next_page_uri"]).json()
            bodies += [m["body"] for m in page["messages"]]
        assert bodies == [f"hello {i}" for i in (4, 3, 2, 1, 0)]
        assert (page["page"], page["start"], page["end"]) == (2, 4, 4)
        back = http.get(page["previous_page_uri"]).json()
        assert [m["body"] for m in back["messages"]] == ["hello 2", "hello 1"]
        by_sender = http.get(path, params={"From": FROM}).json()["messages"]
        assert len(by_sender) == 6
        assert http.get(path, params={"From": "+15550000000"}).json()["messages"] == []
        unauthorised = http.get(path, auth=(box.account_sid, "wrong"))
        assert (unauthorised.status_code, unauthorised.json()["code"]) == (401, 20003)


def test_the_official_client_pages_through_the_list_and_fetches_by_sid() -> None:
    with TwilioSandbox() as box:
        channel = twilio_channel(box, concurrency=1)
        results = channel.send_batch([sms(i) for i in range(7)])
        before = box.attempts
        listed = channel.client.messages.list(to="+8613800138000", page_size=3)
        assert box.attempts - before == 3  # 3 + 3 + 1
        assert [m.sid for m in listed] == [r.provider_id for r in reversed(results)]
        assert [m.body for m in channel.client.messages.stream(to="+8613800138000", limit=4, page_size=3)] == [
            f"hello {i}" for i in (6, 5, 4, 3)]
        fetched = channel.client.messages(str(results[2].provider_id)).fetch()
        assert (fetched.body, fetched.status, fetched.to) == ("hello 2", "queued", "+8613800138000")
        assert fetched.date_created is not None and fetched.date_created.tzinfo is not None
        with pytest.raises(TwilioRestException) as missing:
            channel.client.messages("SM" + "0" * 32).fetch()
        assert (missing.value.status, missing.value.code) == (404, 20404)
        channel.close()


def test_date_sent_filters_go_by_day_and_never_match_a_queued_message(receiver: Receiver) -> None:
    with TwilioSandbox() as box:
        channel = twilio_channel(box, concurrency=1)
        queued, delivered = channel.send_batch([sms(1), sms(2)])
        assert box.send_status(str(delivered.provider_id), "delivered", url=receiver.url) == 200
        today, tomorrow = datetime.now(UTC), datetime.now(UTC) + timedelta(days=1)
        everything = [m.sid for m in channel.client.messages.list()]
        on_day = [m.sid for m in channel.client.messages.list(date_sent=today)]
        before_tomorrow = [m.sid for m in channel.client.messages.list(date_sent_before=tomorrow)]
        from_tomorrow = [m.sid for m in channel.client.messages.list(date_sent_after=tomorrow)]
        channel.close()
    assert everything == [delivered.provider_id, queued.provider_id]
    assert on_day == before_tomorrow == [delivered.provider_id]  # the queued one has no date_sent yet
    assert from_tomorrow == []


@pytest.mark.parametrize(("kind", "error"), [("500", TwilioException), ("drop", requests.ConnectionError)])
def test_faults_apply_to_look_ups_too(kind: str, error: type[Exception]) -> None:
    with TwilioSandbox() as box:
        channel = twilio_channel(box)
        box.fail_next(kind)
        with pytest.raises(error):
            channel.client.messages.list(to="+8613800138000")
        channel.close()


def test_faults_are_drawn_from_the_seed() -> None:
    faults = Faults(too_many=0.2, server_error=0.2, drop=0.1)

    def outcomes(seed: int) -> list[str | None]:
        with TwilioSandbox(faults=faults, seed=seed) as box:
            channel = twilio_channel(box, concurrency=1)
            results = channel.send_batch([sms(i) for i in range(40)])
            channel.close()
        return [r.error.split(":")[0] if r.error else None for r in results]

    first = outcomes(11)
    assert first == outcomes(11)
    assert first != outcomes(12)
    assert set(first) == {None, "twilio 20429", "twilio 20500", "twilio"}  # sent, 429, 500, dropped


# ---------------------------------------------------------------------- signed callbacks


def test_twilio_callbacks_are_signed_over_the_public_url(receiver: Receiver) -> None:
    """The signature covers the URL Twilio called — the public one, not what a proxy forwards to."""
    with TwilioSandbox(callback_url=receiver.url) as box:
        channel = twilio_channel(box)
        [result] = channel.send_batch([sms(5)])
        channel.close()
        assert box.send_status(str(result.provider_id), "undelivered", error_code=30005) == 200
    [callback] = receiver.wait_for(1)
    assert callback["path"] == "/webhooks/twilio/status?message_id=5"
    params = dict(parse_qsl(callback["body"].decode()))
    assert params["MessageSid"] == result.provider_id
    assert (params["MessageStatus"], params["ErrorCode"], params["To"], params["From"]) == (
        "undelivered", "30005", "+8613800138000", FROM)
    validator = RequestValidator(box.auth_token)
    signature = callback["headers"]["X-Twilio-Signature"]
    assert validator.validate(f"{PUBLIC_URL}/webhooks/twilio/status?message_id=5", params, signature)
    assert not validator.validate(receiver.url + callback["path"], params, signature)
    assert not RequestValidator("another-token").validate(f"{PUBLIC_URL}{callback['path']}", params, signature)


def test_sendgrid_event_batches_are_signed_with_ecdsa(receiver: Receiver) -> None:
    with SendGridSandbox(callback_url=receiver.url) as box:
        channel = SendGridEmail(box.api_key, "会员中心 <members@example.com>", base_url=box.url, rate_per_second=0)
        [result] = channel.send_batch([mail(9)])
        [record] = box.messages()
        assert box.post_events([box.event(record, "delivered"), box.event(record, "bounce")]) == 200
    [batch] = receiver.wait_for(1)
    assert batch["path"] == "/webhooks/sendgrid/events"
    events = json.loads(batch["body"])
    assert [e["event"] for e in events] == ["delivered", "bounce"]
    assert {e["engine_message_id"] for e in events} == {"9"}
    assert all(e["sg_message_id"].split(".")[0] == result.provider_id for e in events)
    assert len({e["sg_event_id"] for e in events}) == 2
    verifier = EventWebhook(box.public_key)
    body, stamp = batch["body"].decode(), batch["headers"][TIMESTAMP_HEADER]
    signature = batch["headers"][SIGNATURE_HEADER]
    assert verifier.verify_signature(body, signature, stamp)
    assert not verifier.verify_signature(body.replace("bounce", "delivered"), signature, stamp)
    assert not verifier.verify_signature(body, signature, str(int(stamp) + 1))
    # twilio's validator: garbage raises instead of answering False — the webhook must catch it.
    with pytest.raises(binascii.Error):
        verifier.verify_signature(body, "not base64!", stamp)


def test_the_webhook_key_is_stable_for_a_seed() -> None:
    assert SendGridSandbox(key_seed=3).public_key == SendGridSandbox(key_seed=3).public_key
    assert SendGridSandbox(key_seed=3).public_key != SendGridSandbox(key_seed=4).public_key
    assert len(base64.b64decode(SendGridSandbox().public_key)) == 91  # DER SubjectPublicKeyInfo, P-256


def test_delivered_callbacks_follow_each_accepted_message(receiver: Receiver) -> None:
    options: dict[str, Any] = {"callback_url": receiver.url, "deliver_after": 0.0}
    with TwilioSandbox(**options) as sms_box, SendGridSandbox(**options) as mail_box:
        sms_channel = twilio_channel(sms_box)
        sms_channel.send_batch([sms(1)])
        sms_channel.close()
        SendGridEmail(mail_box.api_key, "m@example.com", base_url=mail_box.url, rate_per_second=0).send_batch(
            [mail(2)])
        arrived = receiver.wait_for(2)
    by_path = {r["path"].split("?")[0]: r for r in arrived}
    status = dict(parse_qsl(by_path["/webhooks/twilio/status"]["body"].decode()))
    assert status["MessageStatus"] == "delivered"
    [event] = json.loads(by_path["/webhooks/sendgrid/events"]["body"])
    assert (event["event"], event["engine_message_id"]) == ("delivered", "2")


# ---------------------------------------------------------------------- pointing config.yaml at the sandboxes


def test_the_printed_config_snippet_builds_working_adapters(tmp_path: Path) -> None:
    with TwilioSandbox() as sms_box, SendGridSandbox() as mail_box:
        path = tmp_path / "config.yaml"
        path.write_text(config_snippet(sms_box, mail_box, "http://127.0.0.1:8080") + "\n", encoding="utf-8")
        config: Config = load_config(path)
        assert config.web.public_url == "http://127.0.0.1:8080"
        assert config.channels.email.webhook_public_key == mail_box.public_key
        sms_channel, mail_channel = build_channel("sms", config), build_channel("email", config)
        assert sms_channel.send_batch([sms(1)])[0].sent
        assert mail_channel.send_batch([mail(2)])[0].sent
        sms_channel.close()


def _ignoring_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell starts a background job


@pytest.mark.parametrize("started", ["in the foreground", "as a background job"])
def test_the_command_runs_until_ctrl_c_and_prints_the_config(started: str) -> None:
    command = [sys.executable, "-m", "engine.testing.standins", "--twilio-port", "0", "--sendgrid-port", "0"]
    setup = _ignoring_sigint if started == "as a background job" else None
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          preexec_fn=setup) as process:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "webhook_public_key" in line:
                break
        process.send_signal(signal.SIGINT)
        try:
            rest, errors = process.communicate(timeout=30)
        finally:
            process.kill()  # a failure here must not leave it running
    assert process.returncode == 0, errors
    printed = "".join(lines)
    assert "provider: twilio" in printed and "provider: sendgrid" in printed
    assert "stopped: 0 SMS and 0 emails accepted" in rest


def test_the_command_takes_slow_drop_and_lost_shares() -> None:
    base = [sys.executable, "-m", "engine.testing.standins", "--twilio-port", "0", "--sendgrid-port", "0"]
    refused = subprocess.run([*base, "--slow", "0.6", "--lost", "0.6"], capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2
    assert "add up to at most 1" in refused.stderr
    command = [*base, "--slow", "0.2", "--slow-seconds", "3", "--drop", "0.1", "--lost", "0.1"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        for line in process.stdout:
            if "webhook_public_key" in line:
                break
        process.send_signal(signal.SIGINT)
        _, errors = process.communicate(timeout=30)
    assert process.returncode == 0, errors


# ---------------------------------------------------------------------- the engine end to end


def member(i: int) -> dict[str, Any]:
    return {"id": f"b{i}", "name": f"Member {i}", "email": f"b{i}@example.com", "phone": f"+86138001380{i:02d}",
            "birthday": "1990-05-20", "timezone": "Asia/Shanghai", "locale": "en" if i % 2 else "zh-CN",
            "email_opt_in": True, "sms_opt_in": True}


def test_flaky_providers_every_message_goes_once_or_fails_after_max_attempts(tmp_path: Path, db_url: str) -> None:
    """Birthday offers for 30 members (an email and an SMS each) through providers failing 30% of requests."""
    # Refusals only: a drop, a slow or a lost answer leaves a message in doubt, which reconciliation settles
    # (tests/test_channel_reconcile.py for the channels' side).
    faults = Faults(too_many=0.15, server_error=0.15)
    with TwilioSandbox(faults=faults, seed=3) as sms_box, SendGridSandbox(faults=faults, seed=4) as mail_box:
        common = {"rate_per_second": 0, "concurrency": 4, "timeout": 2, "max_attempts": 3}
        harness = Harness(tmp_path, db_url, config={"channels": {
            "sms": {"provider": "twilio", "account_sid": sms_box.account_sid, "auth_token": sms_box.auth_token,
                    "from": FROM, "base_url": sms_box.url, **common},
            "email": {"provider": "sendgrid", "api_key": mail_box.api_key, "from": "会员中心 <members@example.com>",
                      "base_url": mail_box.url, **common}}})
        harness.app._channels.clear()  # the real adapters, built from the config, instead of the recorders
        try:
            harness.members(*[member(i) for i in range(30)])
            now = harness.at("2026-05-20T10:01:00+08:00")
            for _ in range(10):
                harness.tick(now)
                if not harness.log(status="queued"):
                    break
                now += timedelta(minutes=15)
            rows = harness.log()
        finally:
            harness.close()

    assert len(rows) == 60
    assert {r["status"] for r in rows} <= {"sent", "failed"}
    assert any(r["attempts"] > 1 for r in rows)  # the faults happened and were retried
    for row in rows:
        if row["status"] == "failed":
            assert row["attempts"] == 3 and row["error"].startswith("gave up after 3 attempts")
    sent = {(r["channel"], r["recipient"]): r for r in rows if r["status"] == "sent"}

    texts = Counter(m["to"] for m in sms_box.messages())
    assert set(texts.values()) == {1}  # never twice
    assert sms_box.duplicates() == mail_box.duplicates() == {}
    assert {("sms", m["to"]): m["sid"] for m in sms_box.messages()} == {
        k: r["provider_id"] for k, r in sent.items() if k[0] == "sms"}

    emails = Counter(m["custom_args"]["engine_message_id"] for m in mail_box.messages())
    assert set(emails.values()) == {1}
    assert {m["custom_args"]["engine_message_id"]: m["message_id"] for m in mail_box.messages()} == {
        str(r["id"]): r["provider_id"] for k, r in sent.items() if k[0] == "email"}

    # One request per attempt the log records: nothing retried behind the engine's back.
    assert sms_box.attempts == sum(r["attempts"] for r in rows if r["channel"] == "sms")
    assert mail_box.attempts == sum(r["attempts"] for r in rows if r["channel"] == "email")
