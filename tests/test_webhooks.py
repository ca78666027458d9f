"""Provider webhooks and unsubscribe links, as stories: Twilio and SendGrid call back, members text STOP or click
a link, and the log, the consent flags and the suppression list follow — but only for genuine, fresh callbacks.

Signatures are made the way the providers make them: Twilio's with RequestValidator.compute_signature over our
public URL, SendGrid's with a real ECDSA P-256 key generated here and checked through sendgrid's EventWebhook.
"""

from __future__ import annotations

import base64
import json
import warnings
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from xml.etree import ElementTree

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import select, update
from twilio.request_validator import RequestValidator

from engine.domain import unsubscribe
from engine.domain.timeutil import parse_instant
from engine.http import webhooks
from engine.http.app import create_app
from engine.store.models import MessageStatus, events, members, messages, suppressions, webhook_receipts
from engine.testing import Harness

with warnings.catch_warnings():
    # starlette 1.10 asks for httpx2 in its TestClient; the dev dependencies pin httpx, which still works.
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

PUBLIC_URL = "https://crm.example.com"
TWILIO_TOKEN = "twilio-auth-token-for-tests"
SENDGRID_KEY = ec.generate_private_key(ec.SECP256R1())
SENDGRID_PUBLIC = base64.b64encode(SENDGRID_KEY.public_key().public_bytes(
    Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).decode()
BIRTHDAY_TICK = "2026-05-20T10:01:00+08:00"
NOW = parse_instant("2026-05-20T10:05:00+08:00")
LIN = {"id": "lin", "name": "林小雨", "email": "lin@example.com", "phone": "13800138000", "birthday": "1990-05-20",
       "timezone": "Asia/Shanghai", "locale": "zh-CN", "email_opt_in": True, "sms_opt_in": True}
LIN_PHONE = "+8613800138000"


class Clock:
    def __init__(self, when: datetime) -> None:
        self.now = when

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def service(tmp_path: Path, db_url: str) -> Iterator[tuple[Harness, TestClient, Clock]]:
    """Lin has had her birthday email and SMS (both sent); the service's clock reads four minutes later."""
    harness = Harness(tmp_path, db_url, config={
        "web": {"public_url": PUBLIC_URL, "webhook_max_age": 300},
        "channels": {"sms": {"provider": "outbox", "auth_token": TWILIO_TOKEN},
                     "email": {"provider": "outbox", "webhook_public_key": SENDGRID_PUBLIC}},
    })
    harness.members(LIN)
    harness.tick(BIRTHDAY_TICK)
    clock = Clock(NOW)
    with TestClient(create_app(harness.app, clock=clock)) as client:
        yield harness, client, clock
    harness.close()


def row(harness: Harness, step: str) -> dict[str, Any]:
    return harness.log(step=step)[0]


def query(harness: Harness, stmt: Any) -> list[Any]:
    with harness.app.store.connect() as conn:
        return list(conn.execute(stmt).all())


def member(harness: Harness, member_id: str = "lin") -> dict[str, Any]:
    with harness.app.store.connect() as conn:
        return dict(conn.execute(select(members).where(members.c.id == member_id)).mappings().one())


def suppressed(harness: Harness) -> set[tuple[str, str, str]]:
    return {(r.channel, r.address, r.reason) for r in query(harness, select(suppressions))}


def member_events(harness: Harness, kind: str) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in query(harness, select(events).where(events.c.type == kind))]


# --------------------------------------------------------------------------- Twilio status callbacks


def twilio(client: TestClient, path: str, params: dict[str, str], *, url: str | None = None,
           token: str = TWILIO_TOKEN, signature: str | None = None) -> Any:
    """POST as Twilio does: signed over the public URL it called (not the test client's http://testserver)."""
    signed = signature if signature is not None else RequestValidator(token).compute_signature(
        url or PUBLIC_URL + path, params)
    return client.post(path, data=params, headers={"X-Twilio-Signature": signed})


def status(client: TestClient, sid: str, value: str, **extra: str) -> Any:
    return twilio(client, "/webhooks/twilio/status", {"MessageSid": sid, "MessageStatus": value, **extra})


def test_a_signed_delivery_report_marks_the_sms_delivered(service: tuple[Harness, TestClient, Clock]) -> None:
    harness, client, _ = service
    sms = row(harness, "birthday_sms")
    assert sms["status"] == "sent" and sms["provider_id"]
    answer = status(client, sms["provider_id"], "delivered", AccountSid="AC123")
    assert answer.status_code == 200 and answer.json() == {"result": "applied"}
    assert row(harness, "birthday_sms")["status"] == "delivered"
    assert row(harness, "birthday_email")["status"] == "sent"  # the other message is untouched


def test_a_callback_not_signed_for_our_public_url_is_403_and_changes_nothing(
        service: tuple[Harness, TestClient, Clock]) -> None:
    harness, client, _ = service
    before = row(harness, "birthday_sms")
    params = {"MessageSid": before["provider_id"], "MessageStatus": "undelivered", "ErrorCode": "30003"}
    path = "/webhooks/twilio/status"
    answers = {
        "forged": twilio(client, path, params, token="not-our-auth-token"),
        "unsigned": client.post(path, data=params),
        "garbage": twilio(client, path, params, signature="%%%"),
        # what a TLS proxy makes of the URL, if we trusted the request's own instead of web.public_url
        "http_not_https": twilio(client, path, params, url="http://crm.example.com" + path),
        "other_path": twilio(client, path, params, url=PUBLIC_URL + "/webhooks/twilio/inbound"),
        "other_params": twilio(client, path, params, signature=RequestValidator(TWILIO_TOKEN).compute_signature(
            PUBLIC_URL + path, {**params, "MessageStatus": "delivered"})),
    }
    assert {how: a.status_code for how, a in answers.items()} == dict.fromkeys(answers, 403)
    assert row(harness, "birthday_sms") == before
    assert query(harness, select(webhook_receipts)) == []


def test_the_same_callback_twice_is_applied_once(service: tuple[Harness, TestClient, Clock]) -> None:
    harness, client, _ = service
    sid = row(harness, "birthday_sms")["provider_id"]
    first = status(client, sid, "undelivered", ErrorCode="30003")
    again = status(client, sid, "undelivered", ErrorCode="30003")
    assert (first.json(), again.json()) == ({"result": "applied"}, {"result": "duplicate"})
    sms = row(harness, "birthday_sms")
    assert sms["status"] == "failed" and "30003" in sms["error"]
    assert len(query(harness, select(webhook_receipts))) == 1


def test_callbacks_out_of_order_never_move_a_message_backwards(service: tuple[Harness, TestClient, Clock]) -> None:
    harness, client, _ = service
    sid = row(harness, "birthday_sms")["provider_id"]
    assert status(client, sid, "delivered").json() == {"result": "applied"}
    assert status(client, sid, "sent").json() == {"result": "unchanged"}  # the late one
    assert status(client, sid, "queued").json() == {"result": "ignored"}
    assert row(harness, "birthday_sms")["status"] == "delivered"


def test_an_undeliverable_number_bounces_and_is_suppressed(service: tuple[Harness, TestClient, Clock]) -> None:
    harness, client, _ = service
    sid = row(harness, "birthday_sms")["provider_id"]
    status(client, sid, "failed", ErrorCode="30006")
    sms = row(harness, "birthday_sms")
    assert sms["status"] == "bounced" and "30006" in sms["error"]
    assert suppressed(harness) == {("sms", LIN_PHONE, "bounce")}
    assert status(client, sid, "delivered").json() == {"result": "unchanged"}


def test_our_id_in_the_callback_url_settles_a_message_left_unknown(service: tuple[Harness, TestClient, Clock]) -> None:
    """The engine stopped after Twilio accepted the SMS and before its id was stored: the row is unknown.

    The adapter puts our message id in the StatusCallback URL, so the signed callback still finds the row."""
    harness, client, _ = service
    sms = row(harness, "birthday_sms")
    with harness.app.store.begin() as conn:
        conn.execute(update(messages).where(messages.c.id == sms["id"]).values(status="unknown", provider_id=None))
    path = f"/webhooks/twilio/status?message_id={sms['id']}"
    answer = twilio(client, path, {"MessageSid": "SM0123456789abcdef", "MessageStatus": "delivered"})
    assert answer.json() == {"result": "applied"}
    settled = row(harness, "birthday_sms")
    assert (settled["status"], settled["provider_id"]) == ("delivered", "SM0123456789abcdef")


def test_a_callback_for_a_message_we_do_not_know_changes_nothing(service: tuple[Harness, TestClient, Clock]) -> None:
    harness, client, _ = service
    assert status(client, "SMnot-ours", "delivered").json() == {"result": "unknown"}
    assert query(harness, select(webhook_receipts)) == []  # a later resend, once we know the message, still counts


def test_status_only_moves_forward_and_never_touches_a_suppressed_row(
        service: tuple[Harness, TestClient, Clock]) -> None:
    """engine.http.webhooks.apply_status on its own: (status in the log, status reported) → does the row move?"""
    harness, _, _ = service
    harness.verify_on_close = False  # the starting statuses are written behind the engine's back
    sms_id = row(harness, "birthday_sms")["id"]
    s = MessageStatus
    cases = [(s.SENT, s.DELIVERED, True), (s.DELIVERED, s.SENT, False), (s.DELIVERED, s.DELIVERED, False),
             (s.DELIVERED, s.BOUNCED, True), (s.FAILED, s.DELIVERED, False), (s.BOUNCED, s.FAILED, False),
             (s.UNKNOWN, s.DELIVERED, True), (s.SENDING, s.SENT, True), (s.SUPPRESSED, s.DELIVERED, False)]
    for start, reported, moves in cases:
        with harness.app.store.begin() as conn:
            conn.execute(update(messages).where(messages.c.id == sms_id).values(status=start.value))
            assert webhooks.apply_status(conn, sms_id, reported, NOW) is moves, (start, reported)
        assert row(harness, "birthday_sms")["status"] == (reported if moves else start).value


def test_a_sha256_signature_needs_the_settings_header_that_names_it() -> None:
    url, params = PUBLIC_URL + "/webhooks/twilio/status", {"MessageSid": "SM1", "MessageStatus": "sent"}
    sha256 = RequestValidator(TWILIO_TOKEN).compute_signature(url, params, "HMAC_SHA256")
    settings = "key=webhooks_sharedkey_1,algorithm=HMAC_SHA256"
    assert webhooks.twilio_signature_ok(TWILIO_TOKEN, url, params, sha256, settings)
    assert not webhooks.twilio_signature_ok(TWILIO_TOKEN, url, params, sha256)
    assert not webhooks.twilio_signature_ok(TWILIO_TOKEN, url, params, "")


# --------------------------------------------------------------------------- inbound SMS


def test_keywords_are_whole_trimmed_words_in_any_case() -> None:
    assert [webhooks.keyword(w) for w in (" stop ", "退订", "t", "Td\n", "STOPALL", "　END　")] == ["stop"] * 6
    assert [webhooks.keyword(w) for w in ("start", "Yes", "UNSTOP")] == ["start"] * 3
    assert [webhooks.keyword(w) for w in ("help", "INFO ")] == ["help"] * 2
    assert [webhooks.keyword(w) for w in ("stop it", "请退订", "", "tt", "startle")] == [None] * 5


def inbound(client: TestClient, body: str, sender: str = LIN_PHONE, sid: str = "SMin1") -> Any:
    return twilio(client, "/webhooks/twilio/inbound", {"From": sender, "To": "+15005550006", "Body": body,
                                                       "MessageSid": sid})


def test_stop_opts_out_suppresses_and_the_next_journey_sms_is_logged_suppressed(
        service: tuple[Harness, TestClient, Clock]) -> None:
    """Lin signs up, gets the welcome email, texts STOP that evening; next day the welcome SMS is not sent."""
    harness, client, clock = service
    harness.event("lin", "signup", "2026-05-21T10:00:00+08:00")
    harness.tick("2026-05-21T10:05:00+08:00")
    assert harness.steps_sent("lin")[-1] == ("welcome", "welcome_email")

    clock.now = parse_instant("2026-05-21T19:00:00+08:00")
    answer = inbound(client, " Stop ")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/xml")
    assert ElementTree.fromstring(answer.text).tag == "Response" and "<Message>" not in answer.text
    assert member(harness)["sms_opt_in"] is False
    assert suppressed(harness) == {("sms", LIN_PHONE, "sms_stop")}
    [said] = member_events(harness, "sms_inbound")
    assert said["member_id"] == "lin" and said["properties"] == {"body": " Stop ", "from": LIN_PHONE}

    harness.tick("2026-05-22T10:10:00+08:00")
    welcome_sms = row(harness, "welcome_sms")
    assert (welcome_sms["status"], welcome_sms["reason"]) == ("suppressed", "consent")
    assert ("welcome", "welcome_sms") not in harness.steps_sent("lin")


def test_every_opt_out_keyword_works_in_any_case(service: tuple[Harness, TestClient, Clock]) -> None:
    harness, client, _ = service
    for n, word in enumerate(["退订", " td", "T", "UNSUBSCRIBE", "stopall", "Quit", "cancel", "End\n"]):
        assert inbound(client, word, sid=f"SMstop{n}").status_code == 200
        assert member(harness)["sms_opt_in"] is False, word
        assert suppressed(harness) == {("sms", LIN_PHONE, "sms_stop")}, word
        inbound(client, ["START", "yes", "Unstop"][n % 3], sid=f"SMstart{n}")
        assert member(harness)["sms_opt_in"] is True and suppressed(harness) == set()


def test_a_sentence_containing_stop_is_not_a_keyword(service: tuple[Harness, TestClient, Clock]) -> None:
    harness, client, _ = service
    inbound(client, "don't stop the offers")
    assert member(harness)["sms_opt_in"] is True and suppressed(harness) == set()
    assert len(member_events(harness, "sms_inbound")) == 1


def test_start_after_stop_opts_back_in(service: tuple[Harness, TestClient, Clock]) -> None:
    harness, client, _ = service
    inbound(client, "STOP", sid="SMa")
    answer = inbound(client, "start", sid="SMb")
    assert answer.status_code == 200 and "<Message>" not in answer.text
    assert member(harness)["sms_opt_in"] is True
    assert suppressed(harness) == set()


def test_a_stop_replayed_after_the_receipts_are_pruned_is_still_a_replay(
        service: tuple[Harness, TestClient, Clock]) -> None:
    """Twilio signs inbound messages without a time: a genuine STOP captured and sent again months later, after
    the member opted back in, must not opt them out again. Its receipt outlives the daily prune."""
    harness, client, clock = service
    inbound(client, "STOP", sid="SMold")
    inbound(client, "START", sid="SMnew")
    clock.now += timedelta(days=90)
    harness.tick(clock.now)  # prunes the receipts it may
    inbound(client, "STOP", sid="SMold")
    assert member(harness)["sms_opt_in"] is True
    assert suppressed(harness) == set()


def test_start_does_not_lift_a_bounce(service: tuple[Harness, TestClient, Clock]) -> None:
    harness, client, _ = service
    status(client, row(harness, "birthday_sms")["provider_id"], "undelivered", ErrorCode="30005")
    inbound(client, "YES")
    assert suppressed(harness) == {("sms", LIN_PHONE, "bounce")}


def test_help_is_answered_with_the_configured_text_in_twiml(service: tuple[Harness, TestClient, Clock]) -> None:
    harness, client, _ = service
    answer = inbound(client, "help")
    message = ElementTree.fromstring(answer.text).find("Message")
    assert message is not None and message.text == harness.config.channels.sms.help_reply
    assert member(harness)["sms_opt_in"] is True


def test_a_resent_inbound_message_is_handled_once(service: tuple[Harness, TestClient, Clock]) -> None:
    harness, client, _ = service
    inbound(client, "HELP", sid="SMsame")
    again = inbound(client, "HELP", sid="SMsame")
    assert "<Message>" not in again.text  # no second reply SMS for a retried webhook
    assert len(member_events(harness, "sms_inbound")) == 1


def test_stop_from_a_number_no_member_has_still_suppresses_it(service: tuple[Harness, TestClient, Clock]) -> None:
    harness, client, _ = service
    assert inbound(client, "STOP", sender="+8613900139000").status_code == 200
    assert suppressed(harness) == {("sms", "+8613900139000", "sms_stop")}
    assert member(harness)["sms_opt_in"] is True


def test_a_forged_stop_changes_nothing(service: tuple[Harness, TestClient, Clock]) -> None:
    harness, client, _ = service
    answer = twilio(client, "/webhooks/twilio/inbound", {"From": LIN_PHONE, "Body": "STOP"}, token="guess")
    assert answer.status_code == 403
    assert member(harness)["sms_opt_in"] is True and suppressed(harness) == set()
    assert member_events(harness, "sms_inbound") == []


# --------------------------------------------------------------------------- SendGrid events


def sendgrid(client: TestClient, items: list[dict[str, Any]], *, at: datetime = NOW,
             key: ec.EllipticCurvePrivateKey = SENDGRID_KEY, signature: str | None = None) -> Any:
    body = json.dumps(items)
    stamp = str(int(at.timestamp()))
    signed = signature or base64.b64encode(key.sign((stamp + body).encode(), ec.ECDSA(hashes.SHA256()))).decode()
    return client.post("/webhooks/sendgrid/events", content=body.encode(), headers={
        "Content-Type": "application/json", "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
        "X-Twilio-Email-Event-Webhook-Signature": signed})


def email_event(harness: Harness, kind: str, event_id: str, **extra: Any) -> dict[str, Any]:
    """An event as SendGrid posts it: sg_message_id is the X-Message-Id we stored plus SendGrid's suffix."""
    email = row(harness, "birthday_email")
    return {"email": email["recipient"], "timestamp": int(NOW.timestamp()), "event": kind, "sg_event_id": event_id,
            "sg_message_id": f"{email['provider_id']}.filterdrecv-5645d9c87f-6r6qz-1-5F0E6F0E-3.0", **extra}


def test_delivered_marks_the_email_delivered(service: tuple[Harness, TestClient, Clock]) -> None:
    harness, client, _ = service
    answer = sendgrid(client, [email_event(harness, "processed", "e0"), email_event(harness, "delivered", "e1")])
    assert answer.status_code == 200 and answer.json() == {"unchanged": 1, "applied": 1}  # processed: it was sent
    assert row(harness, "birthday_email")["status"] == "delivered"


def test_processed_settles_an_email_whose_answer_never_came(service: tuple[Harness, TestClient, Clock]) -> None:
    """A timeout (or a crash) left the row unknown without SendGrid's id: its event webhook, which carries our
    message id, says it was accepted, and the row becomes sent with SendGrid's id."""
    harness, client, _ = service
    email = row(harness, "birthday_email")
    with harness.app.store.begin() as conn:
        conn.execute(update(messages).where(messages.c.id == email["id"])
                     .values(status="unknown", provider_id=None, sent_at=None))
    event = {**email_event(harness, "processed", "e0"), "sg_message_id": "Xq9Yabc.filterdrecv-1",
             "engine_message_id": str(email["id"])}
    assert sendgrid(client, [event]).json() == {"applied": 1}
    settled = row(harness, "birthday_email")
    assert (settled["status"], settled["provider_id"]) == ("sent", "Xq9Yabc") and settled["sent_at"] is not None


def test_our_custom_arg_finds_the_message_without_the_provider_id(service: tuple[Harness, TestClient, Clock]) -> None:
    harness, client, _ = service
    email = row(harness, "birthday_email")
    event = {**email_event(harness, "delivered", "e1"), "sg_message_id": "unknown.filter",
             "engine_message_id": str(email["id"])}
    sendgrid(client, [event])
    assert row(harness, "birthday_email")["status"] == "delivered"


def test_a_bounce_marks_the_email_bounced_and_suppresses_the_address(
        service: tuple[Harness, TestClient, Clock]) -> None:
    harness, client, _ = service
    sendgrid(client, [email_event(harness, "bounce", "e2", type="bounce", reason="550 5.1.1 no such user")])
    email = row(harness, "birthday_email")
    assert email["status"] == "bounced" and "no such user" in email["error"]
    assert suppressed(harness) == {("email", "lin@example.com", "bounce")}
    assert member(harness)["email_opt_in"] is True  # consent stands; the address is what is broken


def test_a_spam_report_suppresses_and_withdraws_email_consent(service: tuple[Harness, TestClient, Clock]) -> None:
    harness, client, _ = service
    sendgrid(client, [email_event(harness, "spamreport", "e3")])
    assert member(harness)["email_opt_in"] is False
    assert suppressed(harness) == {("email", "lin@example.com", "spam_report")}
    assert row(harness, "birthday_email")["status"] == "sent"


@pytest.mark.parametrize("kind", ["unsubscribe", "group_unsubscribe"])
def test_an_unsubscribe_event_withdraws_email_consent(service: tuple[Harness, TestClient, Clock], kind: str) -> None:
    harness, client, _ = service
    sendgrid(client, [email_event(harness, kind, "e4")])
    assert member(harness)["email_opt_in"] is False and member(harness)["sms_opt_in"] is True
    assert suppressed(harness) == {("email", "lin@example.com", "unsubscribed")}
    [event] = member_events(harness, "unsubscribe")
    assert event["properties"]["channel"] == "email"


def test_opens_and_clicks_become_events_and_a_replayed_batch_counts_once(
        service: tuple[Harness, TestClient, Clock]) -> None:
    harness, client, clock = service
    batch = [email_event(harness, "open", "e5"), email_event(harness, "click", "e6", url="https://shop.example/x")]
    assert sendgrid(client, batch).json() == {"applied": 2}
    clock.now += timedelta(seconds=30)
    assert sendgrid(client, batch).json() == {"duplicate": 2}  # freshly signed, same sg_event_ids
    [opened], [clicked] = member_events(harness, "email_opened"), member_events(harness, "email_clicked")
    assert opened["member_id"] == "lin" and opened["properties"]["step"] == "birthday_email"
    assert clicked["properties"]["url"] == "https://shop.example/x"
    assert row(harness, "birthday_email")["status"] == "sent"


def test_a_stale_or_badly_signed_batch_is_403_and_changes_nothing(service: tuple[Harness, TestClient, Clock]) -> None:
    harness, client, _ = service
    batch = [email_event(harness, "spamreport", "e7")]
    stamp = str(int(NOW.timestamp()))
    signed_for_another_body = base64.b64encode(SENDGRID_KEY.sign((stamp + "[]").encode(),
                                                                 ec.ECDSA(hashes.SHA256()))).decode()
    answers = {
        "stale": sendgrid(client, batch, at=NOW - timedelta(seconds=301)),  # web.webhook_max_age is 300
        "future": sendgrid(client, batch, at=NOW + timedelta(minutes=6)),
        "garbage": sendgrid(client, batch, signature="%%% not a signature"),  # the library raises binascii.Error
        "not_der": sendgrid(client, batch, signature=base64.b64encode(b"nonsense").decode()),
        "wrong_signature": sendgrid(client, batch, signature=base64.b64encode(
            b"\x30\x06\x02\x01\x01\x02\x01\x01").decode()),
        "other_key": sendgrid(client, batch, key=ec.generate_private_key(ec.SECP256R1())),
        "tampered": sendgrid(client, batch, signature=signed_for_another_body),
        "unsigned": client.post("/webhooks/sendgrid/events", content=json.dumps(batch).encode()),
    }
    assert {how: a.status_code for how, a in answers.items()} == dict.fromkeys(answers, 403)
    assert member(harness)["email_opt_in"] is True and suppressed(harness) == set()
    assert query(harness, select(webhook_receipts)) == []
    assert sendgrid(client, batch, at=NOW - timedelta(seconds=299)).status_code == 200  # just inside the window


def test_without_a_public_key_sendgrid_events_are_refused_with_503(harness: Harness) -> None:
    with TestClient(create_app(harness.app)) as client:
        answer = client.post("/webhooks/sendgrid/events", content=b"[]")
    assert answer.status_code == 503 and "webhook_public_key" in answer.json()["error"]


# --------------------------------------------------------------------------- unsubscribe links


def link_path(harness: Harness) -> str:
    """The path of the List-Unsubscribe link in the birthday email Lin received."""
    [email] = harness.sent("email")
    return urlsplit(email.headers["List-Unsubscribe"].strip("<>")).path


def test_opening_the_link_shows_a_page_and_changes_nothing(service: tuple[Harness, TestClient, Clock]) -> None:
    harness, client, _ = service
    page = client.get(link_path(harness))
    assert page.status_code == 200 and 'method="post"' in page.text
    assert "退订" in page.text and "Unsubscribe" in page.text
    assert member(harness)["email_opt_in"] is True and suppressed(harness) == set()
    assert member_events(harness, "unsubscribe") == []


def test_one_click_post_unsubscribes_from_email_only(service: tuple[Harness, TestClient, Clock]) -> None:
    harness, client, _ = service
    answer = client.post(link_path(harness), content=b"List-Unsubscribe=One-Click",
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert answer.status_code == 200 and "已退订" in answer.text
    assert member(harness)["email_opt_in"] is False and member(harness)["sms_opt_in"] is True
    assert suppressed(harness) == {("email", "lin@example.com", "unsubscribed")}
    assert client.post(link_path(harness)).status_code == 200  # pressing again is harmless
    assert len(member_events(harness, "unsubscribe")) == 1


def test_an_sms_link_opts_out_of_sms(service: tuple[Harness, TestClient, Clock]) -> None:
    harness, client, _ = service
    token = unsubscribe.make_token(harness.app.secret, "lin", "sms")
    assert client.post(f"/unsubscribe/{token}").status_code == 200
    assert member(harness)["sms_opt_in"] is False and member(harness)["email_opt_in"] is True
    assert suppressed(harness) == {("sms", LIN_PHONE, "unsubscribed")}


def test_a_forged_or_mangled_token_is_404_and_changes_nothing(service: tuple[Harness, TestClient, Clock]) -> None:
    harness, client, _ = service
    forged = unsubscribe.make_token(b"not our secret", "lin", "email")
    other_channel = unsubscribe.make_token(harness.app.secret, "lin", "push")
    cut_short = link_path(harness)[:-3]
    for path in ("/unsubscribe/garbage", "/unsubscribe/bGlu.AAAA", "/unsubscribe/x.y.z", f"/unsubscribe/{forged}",
                 f"/unsubscribe/{other_channel}", cut_short):
        assert client.get(path).status_code == 404, path
        assert client.post(path, content=b"List-Unsubscribe=One-Click").status_code == 404, path
    assert member(harness)["email_opt_in"] is True and suppressed(harness) == set()
