"""What provider callbacks, SMS keywords and unsubscribe links change in the database.

Every function takes a Connection (the caller's transaction) and plain values,
so the HTTP layer (engine/http/app.py) stays thin and these rules can be tested and
reused without HTTP. Providers retry and resend: each callback is applied once,
through a row in ``webhook_receipts`` written in the same transaction as its
effect (if the effect fails, the receipt rolls back and a retry applies it).

A message's status only moves forward (sent → delivered → failed/bounced): a
late ``sent`` after ``delivered`` changes nothing, and a ``suppressed`` row,
which never went out, is never touched.
"""

from __future__ import annotations

import binascii
import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from sendgrid.helpers.eventwebhook import EventWebhook
from sqlalchemy import Connection, delete, func, literal, select, update
from twilio.request_validator import RequestValidator, get_signature_algorithm

from engine.ingest.members import RowError, normalise_email, normalise_phone
from engine.store.database import insert_for
from engine.store.models import MessageStatus, UTCDateTime, events, members, messages, suppressions, webhook_receipts
from engine.store.rails import add_suppressions
from engine.store.seal import reseal

#: how far along a message is; a callback may only move it to a higher rank
RANK = {MessageStatus.QUEUED: 0, MessageStatus.SENDING: 0, MessageStatus.UNKNOWN: 0, MessageStatus.SENT: 1,
        MessageStatus.DELIVERED: 2, MessageStatus.FAILED: 3, MessageStatus.BOUNCED: 3}

STOP_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "退订", "TD", "T"})
START_WORDS = frozenset({"START", "YES", "UNSTOP"})
HELP_WORDS = frozenset({"HELP", "INFO"})

# Twilio error codes that mean the number itself cannot receive SMS: the message bounced and the number is
# suppressed. 21610: the recipient had replied STOP to our sender (a carrier-side opt-out).
TWILIO_BAD_NUMBER = frozenset({"21211", "21614", "30005", "30006"})
TWILIO_OPTED_OUT = "21610"
_TWILIO_STATUS = {"sent": MessageStatus.SENT, "delivered": MessageStatus.DELIVERED, "read": MessageStatus.DELIVERED,
                  "undelivered": MessageStatus.FAILED, "failed": MessageStatus.FAILED,
                  "canceled": MessageStatus.FAILED}


class SuppressionReason:
    SMS_STOP = "sms_stop"
    BOUNCE = "bounce"
    SPAM_REPORT = "spam_report"
    UNSUBSCRIBED = "unsubscribed"


# --------------------------------------------------------------------------- signatures


def twilio_signature_ok(token: str, url: str, params: Any, signature: str, settings: str | None = None) -> bool:
    """X-Twilio-Signature over URL (the one Twilio called: our public URL, not what a proxy forwarded) and the
    form PARAMS (a multi-dict); SETTINGS is the X-Twilio-Webhooks-Signature-Settings header, naming the algorithm."""
    if not signature:
        return False
    return bool(RequestValidator(token).validate(url, params, signature, get_signature_algorithm(settings)))


def sendgrid_problem(verifier: EventWebhook, body: bytes, stamp: str, signature: str, now: datetime,
                     max_age: int, skew: int = 300) -> str | None:
    """Why a SendGrid event batch must be refused ("signature" or "replay"), or None if it is genuine and fresh."""
    if not stamp or not signature:
        return "signature"
    try:
        # The library raises (binascii.Error, …) on a malformed signature instead of answering False.
        valid = verifier.verify_signature(body.decode(), signature, stamp)
    except (binascii.Error, ValueError, TypeError, UnsupportedAlgorithm):
        valid = False
    if not valid:
        return "signature"
    # The library checks no age: without this window a captured request could be replayed forever.
    age = now.timestamp() - int(stamp) if stamp.isdigit() else None
    if age is None or age > max_age or age < -skew:
        return "replay"
    return None


# --------------------------------------------------------------------------- building blocks


def first_receipt(conn: Connection, dialect: str, provider: str, key: str, now: datetime) -> bool:
    """Record that (provider, key) was received; False if it already was (a retry or a replay)."""
    insert = insert_for(dialect)
    # RETURNING, not rowcount: psycopg reports -1 for an INSERT … ON CONFLICT DO NOTHING here.
    stmt = insert(webhook_receipts).on_conflict_do_nothing().returning(webhook_receipts.c.id)
    return conn.execute(stmt, {"provider": provider, "event_key": key[:200], "received_at": now}).first() is not None


@dataclass(frozen=True)
class LoggedMessage:
    id: int
    member_id: str
    recipient: str | None
    provider_id: str | None
    journey: str
    step: str


def find_message(conn: Connection, channel: str, *, message_id: int | None = None,
                 provider_id: str | None = None) -> LoggedMessage | None:
    """The logged message a callback is about: by our own id when the callback carries it, else by the provider's.

    Our id (a SendGrid custom arg, a parameter of Twilio's signed callback URL) also finds a message whose
    provider id is not stored yet: the callback overtook the recording of the send, or the engine stopped
    before recording it (the row is ``unknown``) — the callback then settles what happened.
    """
    columns = (messages.c.id, messages.c.member_id, messages.c.recipient, messages.c.provider_id, messages.c.journey,
               messages.c.step)
    row = None
    if message_id is not None:
        row = conn.execute(select(*columns).where(messages.c.id == message_id, messages.c.channel == channel)).first()
    if row is None and provider_id:
        row = conn.execute(select(*columns).where(messages.c.provider_id == provider_id,
                                                  messages.c.channel == channel).limit(1)).first()
    return None if row is None else LoggedMessage(*row)


def apply_status(conn: Connection, message_id: int, status: MessageStatus, now: datetime, *,
                 error: str | None = None, provider_id: str | None = None) -> bool:
    """Move a message forward to STATUS; False if it is already there or further along (or was never sent)."""
    lower = [s.value for s, rank in RANK.items() if rank < RANK[status]]
    values: dict[str, Any] = {"status": status.value, "updated_at": now,
                              "claimed_by": None, "claimed_until": None}
    if error is not None:
        values["error"] = error
    if status in (MessageStatus.SENT, MessageStatus.DELIVERED):
        values["sent_at"] = func.coalesce(messages.c.sent_at, literal(now, UTCDateTime()))
    if provider_id:
        values["provider_id"] = func.coalesce(messages.c.provider_id, provider_id)
    stmt = (update(messages).where(messages.c.id == message_id, messages.c.status.in_(lower)).values(**values)
            .returning(messages.c.id))
    if conn.execute(stmt).first() is None:
        return False
    reseal(conn, [message_id])
    return True


def members_with_address(conn: Connection, channel: str, address: str) -> list[str]:
    column = members.c.email if channel == "email" else members.c.phone
    return list(conn.execute(select(members.c.id).where(column == address).order_by(members.c.id)).scalars())


def record_event(conn: Connection, member_ids: Iterable[str], kind: str, properties: Mapping[str, Any],
                 at: datetime, source: str, now: datetime) -> int:
    """Store an event for each member so journeys can trigger, exit or convert on it."""
    rows = [{"external_id": None, "member_id": m, "type": kind, "occurred_at": at, "properties": dict(properties),
             "source": source, "recorded_at": now, "handled_at": None} for m in dict.fromkeys(member_ids)]
    if rows:
        conn.execute(events.insert(), rows)
    return len(rows)


def _consent_column(channel: str) -> str:
    return "email_opt_in" if channel == "email" else "sms_opt_in"


def opt_out(conn: Connection, dialect: str, channel: str, address: str | None, reason: str, source: str,
            now: datetime, member_ids: Sequence[str] = ()) -> list[str]:
    """Withdraw CHANNEL consent of the given members and of every member with ADDRESS, and suppress ADDRESS.

    Returns the members whose consent changed; each gets an ``unsubscribe`` event (journeys may exit on it).
    """
    who = set(member_ids) | (set(members_with_address(conn, channel, address)) if address else set())
    column = members.c[_consent_column(channel)]
    changed = sorted(conn.execute(
        update(members).where(members.c.id.in_(sorted(who)), column.is_(True))
        .values({column: False, members.c.updated_at: now}).returning(members.c.id)).scalars()) if who else []
    if address:
        add_suppressions(conn, dialect, [(channel, address, reason)], source, now)
    record_event(conn, changed, "unsubscribe", {"channel": channel, "reason": reason, "via": source}, now, source, now)
    return changed


def sms_opt_in(conn: Connection, phone: str, now: datetime) -> list[str]:
    """START: consent back for every member with PHONE, and the number's opt-out suppression lifted.

    Lifts ``sms_stop`` and ``unsubscribed`` (a START is as explicit as the opt-out it reverses); a bounce
    stays: the number still cannot receive SMS.
    """
    conn.execute(delete(suppressions).where(
        suppressions.c.channel == "sms", suppressions.c.address == phone,
        suppressions.c.reason.in_([SuppressionReason.SMS_STOP, SuppressionReason.UNSUBSCRIBED])))
    ids = members_with_address(conn, "sms", phone)
    if ids:
        conn.execute(update(members).where(members.c.id.in_(ids)).values(sms_opt_in=True, updated_at=now))
    return ids


# --------------------------------------------------------------------------- Twilio


def twilio_status(conn: Connection, dialect: str, params: Mapping[str, str], now: datetime,
                  message_id: int | None = None) -> str:
    """Apply one SMS status callback; returns what happened: applied, unchanged, duplicate, ignored, unknown."""
    sid, reported = params.get("MessageSid") or params.get("SmsSid") or "", params.get("MessageStatus", "")
    status = _TWILIO_STATUS.get(reported.lower())
    if not sid or status is None:
        return "ignored"  # queued / sending / accepted: nothing the log does not already say
    message = find_message(conn, "sms", provider_id=sid, message_id=message_id)
    if message is None:
        return "unknown"  # no receipt: if the provider resends once we know the message, it is applied then
    if not first_receipt(conn, dialect, "twilio", f"{sid}:{reported.lower()}", now):
        return "duplicate"
    code = (params.get("ErrorCode") or "").strip()
    error = None
    if status is MessageStatus.FAILED:
        error = f"twilio {reported.lower()}" + (f" (error {code})" if code else "")
        if code in TWILIO_BAD_NUMBER and message.recipient:
            status = MessageStatus.BOUNCED
            add_suppressions(conn, dialect, [("sms", message.recipient, SuppressionReason.BOUNCE)], "twilio", now)
        elif code == TWILIO_OPTED_OUT:
            opt_out(conn, dialect, "sms", message.recipient, SuppressionReason.SMS_STOP, "twilio", now)
    changed = apply_status(conn, message.id, status, now, error=error, provider_id=sid)
    return "applied" if changed else "unchanged"


@dataclass(frozen=True)
class Inbound:
    keyword: str | None  # "stop", "start", "help" or None
    phone: str
    members: list[str] = field(default_factory=list)
    reply: str | None = None


def keyword(body: str) -> str | None:
    word = body.strip().upper()
    if word in STOP_WORDS:
        return "stop"
    if word in START_WORDS:
        return "start"
    if word in HELP_WORDS:
        return "help"
    return None


def sms_inbound(conn: Connection, dialect: str, *, sender: str, body: str, sid: str | None, region: str,
                help_reply: str, now: datetime) -> Inbound:
    """An SMS from a member: STOP/START/HELP keywords, and an ``sms_inbound`` event for journeys."""
    try:
        phone = normalise_phone(sender, region) or sender.strip()
    except RowError:
        phone = sender.strip()
    word = keyword(body)
    if sid and not first_receipt(conn, dialect, "twilio_inbound", sid, now):
        return Inbound(word, phone)  # a replay: applied once already, no second HELP reply
    who = members_with_address(conn, "sms", phone) if phone else []
    if word == "stop" and phone:
        opt_out(conn, dialect, "sms", phone, SuppressionReason.SMS_STOP, "sms_keyword", now)
    elif word == "start" and phone:
        sms_opt_in(conn, phone, now)
    record_event(conn, who, "sms_inbound", {"body": body, "from": phone}, now, "twilio", now)
    return Inbound(word, phone, who, help_reply if word == "help" else None)


# --------------------------------------------------------------------------- SendGrid


def _int(value: Any) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


def _instant(value: Any, default: datetime) -> datetime:
    try:
        return datetime.fromtimestamp(int(value), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return default


def _email(value: Any) -> str | None:
    try:
        return normalise_email(value)
    except RowError:
        # Not one an import would accept, but it may still be the address we sent to: keep it as given.
        return value.strip() if isinstance(value, str) and value.strip() else None


def sendgrid_events(conn: Connection, dialect: str, items: Sequence[Any], now: datetime) -> Counter[str]:
    """Apply a batch of SendGrid events; counts of applied, unchanged, duplicate, ignored, unknown."""
    counts: Counter[str] = Counter()
    for item in items:
        if not isinstance(item, dict):
            counts["ignored"] += 1
            continue
        key = str(item.get("sg_event_id") or hashlib.sha256(
            json.dumps(item, sort_keys=True, default=str).encode()).hexdigest())
        if not first_receipt(conn, dialect, "sendgrid", key, now):
            counts["duplicate"] += 1
            continue
        counts[_sendgrid_event(conn, dialect, item, now)] += 1
    return counts


def _sendgrid_event(conn: Connection, dialect: str, item: dict[str, Any], now: datetime) -> str:
    kind = str(item.get("event", ""))
    # sg_message_id is the X-Message-Id returned at send time, then ".filter…" added by SendGrid.
    x_message_id = str(item.get("sg_message_id") or "").split(".", 1)[0] or None
    message = find_message(conn, "email", provider_id=x_message_id, message_id=_int(item.get("engine_message_id")))
    address = message.recipient if message is not None and message.recipient else _email(item.get("email"))
    owners = [message.member_id] if message is not None else []
    if kind == "delivered":
        if message is None:
            return "unknown"
        return "applied" if apply_status(conn, message.id, MessageStatus.DELIVERED, now,
                                         provider_id=x_message_id) else "unchanged"
    if kind in ("processed", "deferred"):
        # SendGrid has accepted it: settles a message whose answer never came (a timeout, a crash: unknown).
        if message is None:
            return "unknown"
        return "applied" if apply_status(conn, message.id, MessageStatus.SENT, now,
                                         provider_id=x_message_id) else "unchanged"
    if kind in ("bounce", "dropped"):
        reason = str(item.get("reason") or item.get("status") or kind)
        if kind == "bounce" and item.get("type") == "blocked":
            # A block is the receiving server refusing for now (reputation, content), not a dead address.
            status, suppress = MessageStatus.FAILED, False
        else:
            status, suppress = MessageStatus.BOUNCED, True
        if suppress and address:
            add_suppressions(conn, dialect, [("email", address, SuppressionReason.BOUNCE)], "sendgrid", now)
        if message is not None:
            apply_status(conn, message.id, status, now, error=f"sendgrid {kind}: {reason}"[:2000])
        return "applied"
    if kind in ("spamreport", "unsubscribe", "group_unsubscribe"):
        why = SuppressionReason.SPAM_REPORT if kind == "spamreport" else SuppressionReason.UNSUBSCRIBED
        opt_out(conn, dialect, "email", address, why, "sendgrid", now, owners)
        return "applied"
    if kind in ("open", "click"):
        who = owners or (members_with_address(conn, "email", address) if address else [])
        props: dict[str, Any] = {"sg_event_id": item.get("sg_event_id")}
        if message is not None:
            props.update(message_id=message.id, journey=message.journey, step=message.step)
        if kind == "click":
            props["url"] = item.get("url")
        recorded = record_event(conn, who, f"email_{'opened' if kind == 'open' else 'clicked'}", props,
                                _instant(item.get("timestamp"), now), "sendgrid", now)
        return "applied" if recorded else "unknown"
    return "ignored"


# --------------------------------------------------------------------------- unsubscribe links


def unsubscribe_member(conn: Connection, dialect: str, member_id: str, channel: str, now: datetime) -> bool:
    """The member clicked an unsubscribe link (or a mail client posted RFC 8058 one-click): opt out of CHANNEL."""
    row = conn.execute(select(members.c.email, members.c.phone).where(members.c.id == member_id)).first()
    if row is None:
        return False
    address = row.email if channel == "email" else row.phone
    opt_out(conn, dialect, channel, address, SuppressionReason.UNSUBSCRIBED, "link", now, [member_id])
    return True
