"""Rendering, as a story: a marketer's template mistake fails that one message — logged with the file and the
variable, never half-sent — while everyone else's messages still go; the sandbox refuses to leak internals; money,
dates and numbers read naturally in each member's language."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.store import quarantine
from engine.store.models import members
from engine.testing import REPO, Harness

BIRTHDAY_TICK = "2026-05-20T10:01:00+08:00"


def member(member_id: str, name: str, *, locale: str = "zh-CN", **extra: Any) -> dict[str, Any]:
    return {"id": member_id, "name": name, "email": f"{member_id}@example.com", "phone": "13800138000",
            "birthday": "1990-05-20", "timezone": "Asia/Shanghai", "locale": locale, "tier": "silver",
            "email_opt_in": True, "sms_opt_in": True, **extra}


def templates_with(tmp_path: Path, relative: str, text: str) -> Path:
    """A copy of the repository's templates with one file replaced."""
    root = tmp_path / "templates"
    shutil.copytree(REPO / "templates", root)
    (root / relative).write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def make_harness(tmp_path: Path, db_url: str) -> Iterator[Any]:
    made: list[Harness] = []

    def make(templates: Path) -> Harness:
        home = tmp_path / f"h{len(made)}"
        home.mkdir()
        harness = Harness(home, db_url, templates=templates)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()


def test_an_undefined_variable_holds_that_member_and_the_others_still_go(tmp_path: Path, make_harness: Any) -> None:
    """The zh-CN birthday email greets members by {{ member.nickname }}, an attribute only Lin has.

    Lin gets her email; Wang's does not render: nothing of his step goes out or is logged, he stays at the step,
    and the failure (naming the file and 'nickname') is set aside to be tried again; Amy (English) is untouched.
    """
    broken = templates_with(tmp_path, "zh-CN/birthday/offer.text.j2",
                            "亲爱的{{ member.nickname }}，生日快乐！送您 {{ 100 | money }} 生日礼券。\n"
                            "退订邮件：{{ unsubscribe_url }}\n")
    harness = make_harness(broken)
    harness.members(member("lin", "林小雨", nickname="小雨"), member("wang", "王伟"),
                    member("amy", "Amy", locale="en"))
    report = harness.tick(BIRTHDAY_TICK)

    assert report.counts["retrying"] == 1 and "failed" not in report.counts
    assert [r for r in harness.log() if r["member_id"] == "wang"] == []  # no 'failed' row: not final
    [stuck] = harness.enrollments(member_id="wang")
    assert (stuck["status"], stuck["step"], stuck["failures"]) == ("active", "birthday_email", 1)
    with harness.app.store.connect() as conn:
        [entry] = quarantine.entries(conn)
    assert (entry["kind"], entry["member_id"], entry["status"]) == ("enrollment", "wang", "retrying")
    assert "zh-CN/birthday/offer.text.j2" in entry["error"] and "nickname" in entry["error"]

    emails = {m.member_id: m for m in harness.sent("email")}
    assert sorted(emails) == ["amy", "lin"]
    assert emails["lin"].text.startswith("亲爱的小雨，生日快乐！")
    assert sorted(m.member_id for m in harness.sent("sms")) == ["amy", "lin"]

    # Lin's nickname is given to Wang too: the next try sends his email, then his SMS, once each.
    harness.members(member("wang", "王伟", nickname="伟伟"))
    harness.tick("2026-05-20T10:30:00+08:00")
    assert sorted(m.member_id for m in harness.sent("email")) == ["amy", "lin", "wang"]
    assert sorted(m.member_id for m in harness.sent("sms")) == ["amy", "lin", "wang"]
    with harness.app.store.connect() as conn:
        assert [e["status"] for e in quarantine.entries(conn, statuses=())] == ["resolved"]


@pytest.mark.parametrize("payload, attribute", [
    ("{{ member.__class__.__mro__ }}", "__class__"),
    ("{{ lipsum.__globals__ }}", "__globals__"),
    ("{{ cycler.__init__.__globals__['os'] }}", "__init__"),
    ("{{ member | attr('__class__') }}", "__class__"),
])
def test_the_sandbox_refuses_to_reach_python_internals(tmp_path: Path, make_harness: Any, payload: str,
                                                      attribute: str) -> None:
    """A subject line that tries to reach Python internals fails with a clear 'unsafe' error and leaks nothing."""
    broken = templates_with(tmp_path, "zh-CN/birthday/offer.subject.j2", f"生日快乐 {payload}")
    harness = make_harness(broken)
    harness.members(member("lin", "林小雨"))
    harness.tick(BIRTHDAY_TICK)

    assert harness.log() == [] and harness.sent() == []  # nothing rendered, nothing sent, nothing logged
    with harness.app.store.connect() as conn:
        [entry] = quarantine.entries(conn)
    error = entry["error"]
    assert "zh-CN/birthday/offer.subject.j2" in error
    assert "unsafe" in error and attribute in error
    assert "<class" not in error and "<module" not in error


def test_money_is_written_the_way_each_locale_reads_it(harness: Harness) -> None:
    """The same Silver birthday gift: '¥100.00' and 8折 in Chinese, 'CN¥100.00' and '20% off' in English."""
    harness.members(member("lin", "林小雨"), member("amy", "Amy", locale="en"))
    harness.tick(BIRTHDAY_TICK)
    text = {m.member_id: m.text for m in harness.sent("email")}
    assert "送您 ¥100.00 生日礼券，生日当月全场8折" in text["lin"]
    assert "here is a CN¥100.00 birthday voucher and 20% off everything" in text["amy"]


def test_dates_and_numbers_are_written_in_the_members_language_and_time_zone(harness: Harness) -> None:
    """Win-back quotes the last order date: 20:00 UTC on 31 December is already 1 January in Shanghai."""
    last_order = "2025-12-31T20:00:00Z"
    common = {"timezone": "Asia/Shanghai", "points": 12345, "last_order_at": last_order, "total_spend": 800,
              "birthday": None}
    harness.members(member("lin", "林小雨", **common), member("amy", "Amy", locale="en", **common),
                    member("joe", "Joe", locale="en", **{**common, "timezone": "America/Los_Angeles"}))
    harness.tick("2026-04-01T10:00:00+08:00")  # 18:00 the day before in Los Angeles: outside quiet hours for all
    text = {m.member_id: m.text for m in harness.sent("email")}
    assert "您上次下单是在 2026年1月1日" in text["lin"]
    assert "当前积分 12,345" in text["lin"]
    assert "Your last order was on January 1, 2026" in text["amy"]
    assert "You have 12,345 points" in text["amy"]
    assert "Your last order was on December 31, 2025" in text["joe"]


def test_dates_for_a_member_without_a_time_zone_use_the_default_zone(harness: Harness) -> None:
    """Zhang has no time zone of his own, so the programme's default (Asia/Shanghai) applies — as it does for when
    his messages go. His last order at 07:00 on 1 January Shanghai time (23:00 UTC the day before) reads 1 January."""
    row = member("zhang", "张伟", last_order_at="2026-01-01T07:00:00+08:00", total_spend=800, birthday=None)
    del row["timezone"]
    harness.members(row)
    harness.tick("2026-04-01T10:00:00+08:00")
    email = harness.sent("email")[0]
    assert "您上次下单是在 2026年1月1日" in email.text


def test_markup_in_a_members_name_is_escaped_in_html_email(harness: Harness) -> None:
    """A member who typed '<b>Amy</b> & co' as her name: the HTML email shows it as text, never as markup —
    both in the hand-written HTML template (welcome) and in HTML derived from the text one (birthday)."""
    harness.members(member("amy", "<b>Amy</b> & co", locale="en"))
    harness.event("amy", "signup", "2026-05-20T10:00:00+08:00")
    harness.tick("2026-05-20T10:05:00+08:00")
    emails = harness.sent("email")
    assert sorted(m.step for m in emails) == ["birthday_email", "welcome_email"]
    for message in emails:
        assert "&lt;b&gt;Amy&lt;/b&gt; &amp; co" in (message.html or "")
        assert "<b>Amy</b>" not in (message.html or "")
        assert "<b>Amy</b> & co" in message.text  # the plain text part is plain


def test_a_line_break_in_data_never_makes_a_second_header_line_in_a_subject(harness: Harness) -> None:
    """Imports refuse control characters in names, but a custom attribute or an event property can still carry
    them into a subject: the rendered subject is one line."""
    harness.members(member("amy", "Amy", locale="en"))
    with harness.app.store.begin() as conn:
        conn.execute(members.update().where(members.c.id == "amy").values(name="Amy\r\nBcc: victim@example.com"))
    harness.event("amy", "signup", "2026-05-20T10:00:00+08:00")
    harness.tick("2026-05-20T10:05:00+08:00")
    [welcome] = [m for m in harness.sent("email") if m.step == "welcome_email"]
    assert welcome.subject is not None and "\r" not in welcome.subject and "\n" not in welcome.subject
    assert "Amy Bcc: victim@example.com" in welcome.subject
