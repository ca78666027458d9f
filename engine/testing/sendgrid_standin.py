"""A local stand-in for SendGrid's mail/send with ECDSA-signed event webhooks."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
import uuid
from email.message import Message
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from engine.testing.standin_base import (
    P256_ORDER,
    SENDGRID_EVENTS_PATH,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Reply,
    Sandbox,
    post,
)


class SendGridSandbox(Sandbox):
    """POST /v3/mail/send JSON with a Bearer key; 202 and X-Message-Id; signed event webhook batches."""

    name = "sendgrid"

    def __init__(self, api_key: str = "SG.sandbox-api-key", *, key_seed: int = 1, **options: Any) -> None:
        super().__init__(**options)
        self.api_key = api_key
        self.rejected_emails: set[str] = set()  # answered 400
        # Derived from a seed rather than random, so that config.yaml's webhook_public_key survives restarts.
        secret = int.from_bytes(hashlib.sha256(f"sendgrid-sandbox:{key_seed}".encode()).digest(), "big")
        self._key = ec.derive_private_key(secret % (P256_ORDER - 1) + 1, ec.SECP256R1())
        der = self._key.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
        self.public_key = base64.b64encode(der).decode()  # what SendGrid shows as the verification key

    def message_id(self, record: dict[str, Any]) -> int | None:
        """The engine's row id: the engine_message_id custom arg."""
        value = str((record.get("custom_args") or {}).get("engine_message_id", ""))
        return int(value) if value.isdigit() else None

    @staticmethod
    def errors(status: int, *items: tuple[str, str | None], headers: dict[str, str] | None = None) -> Reply:
        help_url = "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html"
        return Reply.json(status, {"errors": [{"message": m, "field": f, "help": help_url if f else None}
                                              for m, f in items]}, headers)

    def fault(self, status: int) -> Reply:
        if status == 429:
            reset = str(int(time.time()) + self.faults.retry_after)
            return self.errors(429, ("too many requests", None), headers={
                "Retry-After": str(self.faults.retry_after), "X-RateLimit-Limit": "600",
                "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset})
        return self.errors(500, ("internal error", None))

    def route(self, method: str, path: str, headers: Message, body: bytes) -> Reply:
        if method != "POST" or path.split("?")[0] != "/v3/mail/send":
            return self.errors(404, ("resource not found", None))
        if headers.get("Authorization") != f"Bearer {self.api_key}":
            return self.errors(401, ("The provided authorization grant is invalid, expired, or revoked", None))
        try:
            mail = json.loads(body)
        except ValueError:
            return self.errors(400, ("Bad Request", None))
        problems = self._problems(mail if isinstance(mail, dict) else {})
        if problems:
            return self.errors(400, *problems)
        message_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        self.accept({"message_id": message_id, **mail})
        return Reply(202, b"", {"X-Message-Id": message_id})

    def _problems(self, mail: dict[str, Any]) -> list[tuple[str, str | None]]:
        problems: list[tuple[str, str | None]] = []
        if not (mail.get("from") or {}).get("email"):
            problems.append(("The from object must be provided for every email send.", "from"))
        if not mail.get("subject"):
            problems.append(("The subject is required.", "subject"))
        if not mail.get("content"):
            problems.append(("Unless a valid template_id is provided, the content parameter is required.",
                             "content"))
        people = mail.get("personalizations") or []
        if not people:
            problems.append(("The personalizations field is required and must have at least one personalization.",
                             "personalizations"))
        for i, person in enumerate(people):
            for j, to in enumerate(person.get("to") or []):
                address = str(to.get("email", ""))
                if address in self.rejected_emails or not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", address):
                    problems.append(("Does not contain a valid address.", f"personalizations.{i}.to.{j}.email"))
        return problems

    def event(self, record: dict[str, Any], kind: str = "delivered", **extra: Any) -> dict[str, Any]:
        """One event webhook entry about an accepted message (custom args come back as top-level keys)."""
        message_id = record["message_id"]
        event: dict[str, Any] = {
            "email": record["personalizations"][0]["to"][0]["email"], "timestamp": int(time.time()), "event": kind,
            "sg_event_id": base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="),
            "sg_message_id": f"{message_id}.filterdrecv-sandbox-1-0.0", "smtp-id": f"<{message_id}@sandbox>",
            "category": record.get("categories", []), **record.get("custom_args", {})}
        if kind == "bounce":
            event.update(type="bounce", status="5.1.1", reason="550 5.1.1 The email account does not exist.")
        elif kind == "dropped":
            event.update(reason="Bounced Address")
        event.update(extra)
        return event

    def sign(self, timestamp: str, payload: bytes) -> str:
        """The signature header SendGrid sends: ECDSA P-256 / SHA-256 over timestamp + raw body, base64 DER."""
        return base64.b64encode(self._key.sign(timestamp.encode() + payload, ec.ECDSA(hashes.SHA256()))).decode()

    def post_events(self, events: list[dict[str, Any]], url: str | None = None,
                    timestamp: str | None = None) -> int:
        target = url or (self.callback_url + SENDGRID_EVENTS_PATH if self.callback_url else None)
        if target is None:
            raise ValueError("no webhook URL: pass url= or start the sandbox with callback_url")
        payload = json.dumps(events).encode()
        stamp = timestamp or str(int(time.time()))
        return post(target, payload, {"Content-Type": "application/json", TIMESTAMP_HEADER: stamp,
                                      SIGNATURE_HEADER: self.sign(stamp, payload)})

    def deliver(self, records: list[dict[str, Any]]) -> None:
        self.post_events([self.event(r) for r in records])
