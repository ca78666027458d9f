"""A local stand-in for Twilio's Messages API (create, fetch, list as Twilio pages it) with signed status callbacks."""

from __future__ import annotations

import base64
import re
import uuid
from datetime import UTC, date, datetime
from email.message import Message
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from twilio.request_validator import RequestValidator

from channels.sms import segments
from engine.testing.standin_base import (
    TWILIO_STATUS_PATH,
    Reply,
    Sandbox,
    error_status,
    post,
)

_MESSAGES_PATH = re.compile(r"/2010-04-01/Accounts/([^/]+)/Messages(?:/([^/]+))?\.json")
_LIST_FILTERS = ("To", "From", "DateSent", "DateSent<", "DateSent>")
_MAX_PAGE_SIZE = 1000  # Twilio's


class TwilioSandbox(Sandbox):
    """POST /2010-04-01/Accounts/{sid}/Messages.json, form-encoded, HTTP Basic auth, answers like Twilio's; GET
    Messages.json (To, From, DateSent filters; newest first; Twilio's paging) and GET Messages/{Sid}.json."""

    name = "twilio"

    def __init__(self, account_sid: str = "AC" + "5a" * 16, auth_token: str = "sandbox-auth-token",
                 **options: Any) -> None:
        super().__init__(**options)
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.invalid_numbers: set[str] = set()  # answered 21211
        self.unsubscribed_numbers: set[str] = set()  # answered 21610 (the recipient replied STOP)

    def error(self, code: int, message: str, headers: dict[str, str] | None = None) -> Reply:
        status = error_status(code)
        return Reply.json(status, {"code": code, "message": message, "status": status,
                                   "more_info": f"https://www.twilio.com/docs/errors/{code}"}, headers)

    def fault(self, status: int) -> Reply:
        if status == 429:
            return self.error(20429, "Too Many Requests", {"Retry-After": str(self.faults.retry_after)})
        return self.error(20500, "Internal Server Error")

    def message_id(self, record: dict[str, Any]) -> int | None:
        """The engine's row id: the message_id query parameter of the StatusCallback URL it sends."""
        query = parse_qs(urlsplit(record.get("status_callback") or "").query)
        value = query.get("message_id", [""])[-1]
        return int(value) if value.isdigit() else None

    def route(self, method: str, path: str, headers: Message, body: bytes) -> Reply:
        parts = urlsplit(path)
        match = _MESSAGES_PATH.fullmatch(parts.path)
        sid = match.group(2) if match else None
        if match is None or match.group(1) != self.account_sid or (method, sid is None) not in {
                ("POST", True), ("GET", True), ("GET", False)}:
            return self.error(20404, f"The requested resource {parts.path} was not found")
        expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        if headers.get("Authorization") != f"Basic {expected}":
            return self.error(20003, "Authenticate")
        if sid is not None:
            return self._fetch(sid, parts.path)
        if method == "GET":
            return self._list(parts.path, {k: v[-1] for k, v in parse_qs(parts.query).items()})
        return self._create(body)

    def _create(self, body: bytes) -> Reply:
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

    @staticmethod
    def _public(record: dict[str, Any]) -> dict[str, Any]:
        """The Message resource as Twilio shows it: without the StatusCallback it was created with."""
        return {k: v for k, v in record.items() if k != "status_callback"}

    def _fetch(self, sid: str, path: str) -> Reply:
        record = next((r for r in self.messages() if r["sid"] == sid), None)
        if record is None:
            return self.error(20404, f"The requested resource {path} was not found")
        return Reply.json(200, self._public(record))

    def _list(self, path: str, query: dict[str, str]) -> Reply:
        """One page of the account's messages, newest first, in Twilio's page envelope. DateSent filters go by
        day (GMT) and, as Twilio's, never match a message not sent yet (no date_sent)."""
        try:
            size = min(int(query.get("PageSize", "50")), _MAX_PAGE_SIZE)
            number = int(query.get("Page", "0"))
            days = {key: date.fromisoformat(query[key][:10]) for key in _LIST_FILTERS[2:] if key in query}
        except ValueError as exc:
            return self.error(20001, f"Invalid paging or DateSent parameter: {exc}")
        if size < 1 or number < 0:
            return self.error(20001, "PageSize must be at least 1 and Page at least 0")
        records = [self._public(r) for r in reversed(self.messages()) if self._listed(r, query, days)]
        token = query.get("PageToken")
        if token:  # PA<sid>: the page after that message; PB<sid>: the page before it (Twilio's own tokens)
            index = next((i for i, r in enumerate(records) if r["sid"] == token[2:]), None)
            if index is None or token[:2] not in ("PA", "PB"):
                return self.error(20001, f"Invalid PageToken {token}")
            begin, end = (index + 1, index + 1 + size) if token[:2] == "PA" else (max(0, index - size), index)
        else:
            begin, end = number * size, (number + 1) * size
        items = records[begin:end]
        filters = {key: query[key] for key in _LIST_FILTERS if key in query}

        def uri(page: int, page_token: str | None = None) -> str:
            tokens = {"PageToken": page_token} if page_token else {}
            return f"{path}?{urlencode({**filters, 'PageSize': size, 'Page': page, **tokens})}"

        start = number * size
        return Reply.json(200, {
            "messages": items, "page": number, "page_size": size, "start": start,
            "end": start + max(len(items) - 1, 0), "uri": uri(number, token), "first_page_uri": uri(0),
            "next_page_uri": uri(number + 1, "PA" + items[-1]["sid"]) if items and end < len(records) else None,
            "previous_page_uri": uri(number - 1, "PB" + items[0]["sid"]) if items and number > 0 else None})

    @staticmethod
    def _listed(record: dict[str, Any], query: dict[str, str], days: dict[str, date]) -> bool:
        if "To" in query and record["to"] != query["To"]:
            return False
        if "From" in query and record["from"] != query["From"]:
            return False
        if not days:
            return True
        if not record["date_sent"]:
            return False
        sent = parsedate_to_datetime(record["date_sent"]).astimezone(UTC).date()
        return (sent == days.get("DateSent", sent) and sent <= days.get("DateSent<", sent)
                and sent >= days.get("DateSent>", sent))

    def _resource(self, form: dict[str, str]) -> dict[str, Any]:
        sid = "SM" + uuid.uuid4().hex
        now = format_datetime(datetime.now(UTC), usegmt=True)  # RFC 2822, as Twilio: "Mon, 16 Aug 2010 03:45:01 GMT"
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
        now = format_datetime(datetime.now(UTC), usegmt=True)
        with self.lock:  # the resource moves on as Twilio's does: look-ups see the new status
            record.update(status=status, date_updated=now)
            if status in ("sent", "delivered", "undelivered") and not record["date_sent"]:
                record["date_sent"] = now
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
