"""One bad unit of work (an event, an enrollment, a journey) never stops the others (issue 13, item 1)."""

from __future__ import annotations

import shutil
from pathlib import Path

from engine.testing import REPO, Harness

CART = """\
journey: abandoned_cart
name: 购物车提醒
trigger: {event: cart_abandoned}
exit_when: {event: purchase}
steps:
  - id: wait_for_purchase
    wait: {until_event: purchase, timeout: 4h}
  - id: reminder
    send: email
    template: review/ask
"""


def rules_with(tmp_path: Path, **journeys: str) -> Path:
    """A rules folder with the repository's segments and loyalty programme and only the JOURNEYS given."""
    rules = tmp_path / "rules"
    (rules / "journeys").mkdir(parents=True)
    for name in ("segments.yaml", "loyalty.yaml"):
        shutil.copy(REPO / "rules" / name, rules / name)
    for name, text in journeys.items():
        (rules / "journeys" / f"{name}.yaml").write_text(text, encoding="utf-8")
    return rules


MEMBER = {"id": "R1", "name": "Rui", "email": "r1@example.com", "email_opt_in": True, "timezone": "Asia/Shanghai",
          "locale": "en"}


def test_a_purchase_that_both_ends_a_wait_and_exits_the_journey_does_not_stop_the_tick(tmp_path: Path,
                                                                                        db_url: str) -> None:
    """exit_when and until_event on the same event type: the member leaves, and later ticks keep working."""
    h = Harness(tmp_path, db_url, rules=rules_with(tmp_path, cart=CART))
    h.members(MEMBER, {**MEMBER, "id": "R2", "email": "r2@example.com"})
    h.event("R1", "cart_abandoned", "2026-03-02T02:00:00Z")
    h.event("R2", "cart_abandoned", "2026-03-02T02:00:00Z")
    h.tick("2026-03-02T02:01:00Z")
    assert {e["member_id"]: e["waiting_for"] for e in h.enrollments()} == {"R1": "purchase", "R2": "purchase"}

    h.event("R1", "purchase", "2026-03-02T02:30:00Z", amount=10, order_id="O-1")
    report = h.tick("2026-03-02T02:31:00Z")
    assert report.counts["exited"] == 1
    by_member = {e["member_id"]: e for e in h.enrollments()}
    assert by_member["R1"]["status"] == "exited" and by_member["R1"]["exit_reason"] == "exit_when: purchase event"
    assert by_member["R2"]["status"] == "active"

    # The next ticks still run: R2's wait times out and the reminder goes; R1 gets nothing.
    h.tick("2026-03-02T06:05:00Z")
    assert h.steps_sent() == [("abandoned_cart", "reminder")]
    assert [m.member_id for m in h.sent()] == ["R2"]
    h.close()
