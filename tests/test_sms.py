"""SMS segment counting: Chinese text is UCS-2, 70 characters in one part and 67 per part after that."""

from __future__ import annotations

from channels.sms import segments
from engine.testing import Harness


def test_gsm7_and_ucs2_part_sizes() -> None:
    assert segments("a" * 160) == (1, "gsm7")
    assert segments("a" * 161) == (2, "gsm7")
    assert segments("{" * 80) == (1, "gsm7")  # extension characters count twice
    assert segments("{" * 81) == (2, "gsm7")
    assert segments("会" * 70) == (1, "ucs2")
    assert segments("会" * 71) == (2, "ucs2")
    assert segments("会" * 134) == (2, "ucs2")
    assert segments("会" * 135) == (3, "ucs2")
    assert segments("Hi 😀") == (1, "ucs2")  # one emoji makes the whole message UCS-2


def test_each_sms_in_the_log_records_its_parts_and_encoding(harness: Harness) -> None:
    harness.members({"id": "z1", "name": "张伟", "phone": "13800138000", "sms_opt_in": True, "locale": "zh-CN",
                     "timezone": "Asia/Shanghai", "last_order_at": "2025-01-01T00:00:00Z"})
    harness.tick("2026-03-02T04:00:00Z")
    harness.tick("2026-03-09T05:00:00Z")
    [row] = harness.log(channel="sms")
    assert row["status"] == "sent" and row["encoding"] == "ucs2"
    assert row["segments"] == (1 if len(row["body"]) <= 70 else -(-len(row["body"]) // 67))
