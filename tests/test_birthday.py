"""The birthday offer, as a story: at 10:00 on the member's own birthday, in their own time zone, an email and an
SMS whose gift depends on the member's tier, once a year (29 February falls on 28 February in other years)."""

from __future__ import annotations

from typing import Any

from channels.base import OutgoingMessage
from engine.testing import Harness

BIRTHDAY = [("birthday", "birthday_email"), ("birthday", "birthday_sms")]


def member(member_id: str, name: str, birthday: str, *, timezone: str = "Asia/Shanghai", locale: str = "zh-CN",
           tier: str = "regular", phone: str = "13800138000") -> dict[str, Any]:
    return {"id": member_id, "name": name, "email": f"{member_id}@example.com", "phone": phone,
            "birthday": birthday, "timezone": timezone, "locale": locale, "tier": tier,
            "email_opt_in": True, "sms_opt_in": True}


def emails_to(harness: Harness, member_id: str) -> list[OutgoingMessage]:
    return [m for m in harness.sent("email") if m.member_id == member_id]


def test_the_offer_goes_at_ten_local_time_and_not_a_minute_before(harness: Harness) -> None:
    """Lin, in Shanghai, has her birthday on 20 May: nothing at 09:59, the email and SMS at 10:01."""
    harness.members(member("lin", "林小雨", "1990-05-20"))

    harness.tick("2026-05-20T09:59:00+08:00")
    assert harness.sent() == []
    assert harness.enrollments(journey_id="birthday") == []

    harness.tick("2026-05-20T10:01:00+08:00")
    assert harness.steps_sent("lin") == BIRTHDAY
    email, sms = harness.sent()
    assert email.recipient == "lin@example.com"
    assert "林小雨" in (email.subject or "") and "生日快乐" in (email.subject or "")
    assert sms.recipient == "+8613800138000"
    assert "生日快乐" in sms.text
    assert [e["status"] for e in harness.enrollments(journey_id="birthday")] == ["completed"]


def test_members_on_either_side_of_utc_midnight_get_it_at_their_own_ten_oclock(harness: Harness) -> None:
    """Kiri (Auckland, UTC+12) and Joe (Los Angeles, UTC-7) share the birthday 15 June.

    10:00 on 15 June in Auckland is 22:00 UTC on 14 June; in Los Angeles it is 17:00 UTC on 15 June. Each gets the
    offer at their own 10:00 — Joe not when the UTC date turns 15 June, Kiri not a day late.
    """
    harness.members(member("kiri", "Kiri", "1988-06-15", timezone="Pacific/Auckland", locale="en",
                           phone="+64211234567"),
                    member("joe", "Joe", "1988-06-15", timezone="America/Los_Angeles", locale="en",
                           phone="+14155552671"))

    harness.tick("2026-06-14T21:59:00Z")  # Auckland 09:59 on the 15th
    assert harness.sent() == []

    harness.tick("2026-06-14T22:01:00Z")  # Auckland 10:01 on the 15th; Los Angeles 15:01 on the 14th
    assert harness.steps_sent("kiri") == BIRTHDAY
    assert harness.steps_sent("joe") == []

    harness.tick("2026-06-15T16:59:00Z")  # UTC date is the 15th, but Los Angeles is at 09:59
    assert harness.steps_sent("joe") == []
    assert len(harness.sent()) == 2

    harness.tick("2026-06-15T17:01:00Z")  # Los Angeles 10:01 on the 15th
    assert harness.steps_sent("joe") == BIRTHDAY
    assert harness.steps_sent("kiri") == BIRTHDAY  # nothing more for Kiri
    assert harness.sent("sms")[-1].recipient == "+14155552671"


def test_a_29_february_birthday_falls_on_28_february_in_2027_and_29_february_in_2028(harness: Harness) -> None:
    """Mei was born on 29 February 2000: in 2027 she celebrates on 28 February, in 2028 on the 29th, once each."""
    harness.members(member("mei", "陈美", "2000-02-29"))

    harness.tick("2027-02-28T09:59:00+08:00")
    assert harness.sent() == []
    harness.tick("2027-02-28T10:01:00+08:00")
    assert harness.steps_sent("mei") == BIRTHDAY
    harness.tick("2027-03-01T10:01:00+08:00")  # not again on 1 March
    assert len(harness.sent()) == 2

    harness.tick("2028-02-28T10:01:00+08:00")  # 2028 has a 29 February: the 28th is not her day
    assert len(harness.sent()) == 2
    harness.tick("2028-02-29T09:59:00+08:00")
    assert len(harness.sent()) == 2
    harness.tick("2028-02-29T10:01:00+08:00")
    assert harness.steps_sent("mei") == BIRTHDAY * 2
    harness.tick("2028-03-01T10:01:00+08:00")
    assert harness.steps_sent("mei") == BIRTHDAY * 2
    assert len(harness.enrollments(journey_id="birthday")) == 2


def test_ticking_twice_at_the_same_clock_sends_nothing_new(harness: Harness) -> None:
    """A restarted daemon may tick again at the same clock: the birthday offer still goes once."""
    harness.members(member("lin", "林小雨", "1990-05-20"))
    first = harness.tick("2026-05-20T10:01:00+08:00")
    second = harness.tick("2026-05-20T10:01:00+08:00")
    assert first.counts["sent"] == 2
    assert second.counts["sent"] == 0
    assert harness.steps_sent() == BIRTHDAY
    assert len(harness.log()) == 2
    assert len(harness.enrollments(journey_id="birthday")) == 1


def test_next_year_the_offer_comes_again(harness: Harness) -> None:
    """Entry is limited to once in 300 days, so next year's birthday brings next year's gift."""
    harness.members(member("lin", "林小雨", "1990-05-20"))
    harness.tick("2026-05-20T10:01:00+08:00")
    harness.tick("2027-05-20T09:59:00+08:00")
    assert harness.steps_sent() == BIRTHDAY
    harness.tick("2027-05-20T10:01:00+08:00")
    assert harness.steps_sent() == BIRTHDAY * 2
    assert [e["status"] for e in harness.enrollments(journey_id="birthday")] == ["completed", "completed"]
    assert [m["created_at"].year for m in harness.log(step="birthday_email")] == [2026, 2027]


def test_a_corrected_birthday_does_not_bring_a_second_gift_within_300_days(harness: Harness) -> None:
    """Lin got her gift on 20 May, then corrects her birthday to 10 June: no second gift in 2026, one in 2027."""
    harness.members(member("lin", "林小雨", "1990-05-20"))
    harness.tick("2026-05-20T10:01:00+08:00")
    harness.members(member("lin", "林小雨", "1990-06-10"))
    harness.tick("2026-06-10T09:59:00+08:00")
    harness.tick("2026-06-10T10:01:00+08:00")
    assert harness.steps_sent() == BIRTHDAY
    harness.tick("2027-06-10T10:01:00+08:00")
    assert harness.steps_sent() == BIRTHDAY * 2


def test_the_gift_depends_on_the_tier(harness: Harness) -> None:
    """Same birthday, four tiers: ¥50 voucher and double points, ¥100 and 8折, ¥300 and 7折, ¥888 gift and 5折."""
    harness.members(member("r", "普通", "1990-05-20", tier="regular"),
                    member("s", "银卡", "1990-05-20", tier="silver"),
                    member("g", "金卡", "1990-05-20", tier="gold"),
                    member("d", "钻石", "1990-05-20", tier="diamond"))
    harness.tick("2026-05-20T10:01:00+08:00")
    bodies = {mid: emails_to(harness, mid)[0].text for mid in ("r", "s", "g", "d")}

    assert "¥50.00" in bodies["r"] and "双倍积分" in bodies["r"]
    assert "¥100.00" in bodies["s"] and "8折" in bodies["s"] and "银卡会员" in bodies["s"]
    assert "¥300.00" in bodies["g"] and "7折" in bodies["g"] and "金卡会员" in bodies["g"]
    assert "¥888.00" in bodies["d"] and "5折" in bodies["d"] and "钻石会员" in bodies["d"]
    # nobody gets another tier's gift
    assert "¥100.00" not in bodies["r"] and "¥50.00" not in bodies["s"]
    assert "¥888.00" not in bodies["g"] and "¥300.00" not in bodies["d"]
    assert "金卡会员生日礼" in (emails_to(harness, "g")[0].subject or "")
    sms_for_diamond = next(m for m in harness.sent("sms") if m.member_id == "d")
    assert "钻石会员生日礼" in sms_for_diamond.text


def test_the_members_locale_picks_the_template_and_an_unknown_one_falls_back_to_zh_cn(harness: Harness) -> None:
    """Amy reads English, Lin Chinese, and Claire's fr has no templates: she gets the default, zh-CN."""
    harness.members(member("amy", "Amy", "1990-05-20", locale="en", tier="silver"),
                    member("lin", "林小雨", "1990-05-20", locale="zh-CN", tier="silver"),
                    member("claire", "Claire", "1990-05-20", locale="fr", tier="silver"))
    harness.tick("2026-05-20T10:01:00+08:00")

    amy, lin, claire = (emails_to(harness, m)[0] for m in ("amy", "lin", "claire"))
    assert amy.subject == "Happy birthday, Amy! Your Silver birthday gift is here"
    assert "CN¥100.00 birthday voucher" in amy.text and "20% off everything" in amy.text
    assert lin.subject == "林小雨，生日快乐！您的银卡会员生日礼已送达"
    assert claire.subject == "Claire，生日快乐！您的银卡会员生日礼已送达"
    assert "¥100.00 生日礼券" in claire.text
    claire_sms = next(m for m in harness.sent("sms") if m.member_id == "claire")
    assert claire_sms.text.startswith("【会员中心】Claire，生日快乐！")
    assert {r["member_id"]: r["locale"] for r in harness.log(step="birthday_email")} == {
        "amy": "en", "lin": "zh-CN", "claire": "zh-CN"}


def test_a_member_without_a_time_zone_celebrates_at_ten_in_the_default_zone(harness: Harness) -> None:
    """Zhang's record has no time zone: the programme's default, Asia/Shanghai, decides when 10:00 is."""
    row = member("zhang", "张伟", "1990-05-20")
    del row["timezone"]
    harness.members(row)
    harness.tick("2026-05-20T01:59:00Z")  # 09:59 in Shanghai
    assert harness.sent() == []
    harness.tick("2026-05-20T02:01:00Z")
    assert harness.steps_sent("zhang") == BIRTHDAY


def test_a_regional_english_locale_gets_the_english_template(harness: Harness) -> None:
    """Bea's locale is en-GB: there is no en-GB folder, so she gets the en template, not the zh-CN default."""
    harness.members(member("bea", "Bea", "1990-05-20", timezone="Europe/London", locale="en-GB",
                           phone="+447911123456"))
    harness.tick("2026-05-20T09:01:00Z")  # 10:01 in London (BST)
    email = emails_to(harness, "bea")[0]
    assert email.subject == "Happy birthday, Bea! Your Member birthday gift is here"
    assert "CN¥50.00 birthday voucher" in email.text
