"""Parts several test modules share: a provider stand-in with look-ups, and a journey whose step fails for one
member (a render error, as marketers meet them)."""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from channels.base import Channel, Found, InDoubt, Outcome, OutgoingMessage, Reconciled, SendResult
from engine.testing import REPO


class Crash(BaseException):
    """Stands in for the process dying (kill -9) at that very moment."""


class Provider(Channel):
    """A provider that keeps what it accepted (by our message id) and answers look-ups from that record."""

    provider = "memory-provider"
    reconcile_after = 60.0

    def __init__(self, in_flight: int = 3) -> None:
        self.in_flight = in_flight
        self.accepted: Counter[int] = Counter()  # our message id -> times accepted (2+ would be a duplicate)
        self.calls = 0
        self.crash_on_call: int | None = None  # the call during which the engine dies
        self.crash_before_accepting = False  # dies before the provider got the request (else: after)
        self.answer: Outcome = Outcome.SENT

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        self.calls += 1
        crash = self.calls == self.crash_on_call
        if crash and self.crash_before_accepting:
            raise Crash()
        for message in messages:
            self.accepted[message.id] += 1
        if crash:
            raise Crash()
        return [SendResult(self.answer, f"P-{m.id}" if self.answer is Outcome.SENT else None,
                           error=None if self.answer is Outcome.SENT else "no answer within 10s (timeout)")
                for m in messages]

    def reconcile(self, messages: Sequence[InDoubt]) -> list[Reconciled]:
        return [Reconciled(Found.SENT, f"P-{m.id}", "found") if self.accepted[m.id] else
                Reconciled(Found.ABSENT, detail="memory-provider has no record of it") for m in messages]


COUPON = """\
journey: coupon
name: 专属优惠券
trigger: {segment: lapsed_60d}
steps:
  - id: coupon_email
    send: email
    template: test/coupon
  - wait: 1d
  - id: thanks
    send: email
    template: test/thanks
"""


def project(tmp_path: Path) -> tuple[Path, Path]:
    """Rules with only the coupon journey, and templates with one that fails for a member whose coupon value is
    not a number (money of "abc"): a per-member render error, as marketers meet them."""
    rules = tmp_path / "rules"
    (rules / "journeys").mkdir(parents=True)
    for name in ("segments.yaml", "loyalty.yaml"):
        shutil.copy(REPO / "rules" / name, rules / name)
    (rules / "journeys" / "coupon.yaml").write_text(COUPON, encoding="utf-8")
    templates = tmp_path / "templates"
    shutil.copytree(REPO / "templates", templates)
    for locale in ("zh-CN", "en"):
        folder = templates / locale / "test"
        folder.mkdir()
        (folder / "coupon.subject.j2").write_text("A coupon for {{ member.name }}", encoding="utf-8")
        (folder / "coupon.text.j2").write_text("Your coupon: {{ member.attributes.coupon | money }}",
                                               encoding="utf-8")
        (folder / "thanks.subject.j2").write_text("Thanks", encoding="utf-8")
        (folder / "thanks.text.j2").write_text("Thanks, {{ member.name }}", encoding="utf-8")
    return rules, templates


def member(member_id: str, coupon: Any) -> dict[str, Any]:
    return {"id": member_id, "name": member_id.upper(), "email": f"{member_id}@example.com", "email_opt_in": True,
            "timezone": "Asia/Shanghai", "locale": "en", "last_order_at": "2025-06-01T00:00:00Z", "coupon": coupon}


