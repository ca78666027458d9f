"""Members and events coming in, as a story: the CRM exports a file, some rows are wrong; the wrong ones are named
by line and reason and skipped, the good ones load. Purchases move spend, orders, points and tier, once per order."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from engine.ingest.events import import_events
from engine.ingest.members import ImportReport, import_members
from engine.store.models import members
from engine.testing import REPO, Harness

NOW = datetime(2026, 3, 1, tzinfo=UTC)
GOOD = {"id": "m1", "name": "林小雨", "email": "lin@example.com", "phone": "13800138000", "birthday": "1990-05-20",
        "timezone": "Asia/Shanghai", "locale": "zh-CN", "tier": "silver", "total_spend": 6000, "points": 100,
        "order_count": 2, "last_order_at": "2026-01-01T12:00:00+08:00", "email_opt_in": True, "sms_opt_in": True}
CSV_HEADER = "id,name,email,phone,birthday,timezone,locale,total_spend,email_opt_in,sms_opt_in,city,vip_score"


def jsonl(path: Path, *lines: dict[str, Any] | str) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines) + "\n",
                    encoding="utf-8")
    return path


def load_members(harness: Harness, path: Path) -> ImportReport:
    return import_members(harness.app.store, path, harness.app.require_valid_rules().loyalty,
                          harness.config.default_region, NOW)


def load_events(harness: Harness, path: Path) -> ImportReport:
    return import_events(harness.app.store, path, harness.app.require_valid_rules().loyalty, NOW)


def stored(harness: Harness) -> dict[str, dict[str, Any]]:
    with harness.app.store.connect() as conn:
        return {r["id"]: dict(r) for r in conn.execute(select(members)).mappings()}


def reasons(report: ImportReport) -> dict[int, str]:
    return dict(report.skipped)


# --------------------------------------------------------------------------- members


def test_each_bad_member_row_is_named_by_line_and_reason_and_the_good_rows_load(harness: Harness,
                                                                                 tmp_path: Path) -> None:
    """Nine lines of JSONL, seven of them wrong in a different way: two members load, seven lines are reported."""
    path = jsonl(tmp_path / "members.jsonl",
                 GOOD,
                 {**GOOD, "id": "m2", "email": "lin at example.com"},
                 {**GOOD, "id": "m3", "phone": "12345"},
                 {**GOOD, "id": "m4", "birthday": "1990-02-30"},
                 {**GOOD, "id": "m5", "timezone": "Asia/Beijing"},
                 {**GOOD, "id": "m6", "tier": "platinum"},
                 {**GOOD, "id": "m7", "total_spend": "lots"},
                 '{"id": "m8", "name": "坏行"',
                 {**GOOD, "id": "m9", "name": "王芳", "email": "wang@example.com"})
    report = load_members(harness, path)

    assert report.loaded == 2
    assert sorted(stored(harness)) == ["m1", "m9"]
    why = reasons(report)
    assert sorted(why) == [2, 3, 4, 5, 6, 7, 8]
    assert "email" in why[2] and "lin at example.com" in why[2]
    assert "phone" in why[3] and "12345" in why[3]
    assert "birthday" in why[4] and "1990-02-30" in why[4]
    assert "timezone" in why[5] and "Asia/Beijing" in why[5]
    assert "tier" in why[6] and "platinum" in why[6] and "regular, silver, gold, diamond" in why[6]
    assert "total_spend" in why[7] and "lots" in why[7]
    assert "JSON" in why[8]
    assert report.lines("members.jsonl")[0].startswith("members.jsonl:2: email ")
    assert stored(harness)["m9"]["name"] == "王芳"


def test_a_csv_with_a_bom_chinese_names_and_rows_of_the_wrong_width(harness: Harness, tmp_path: Path) -> None:
    """An Excel export (UTF-8 with BOM, CRLF line ends): Chinese names load; a row with a value too many and a row
    with values missing are each reported and skipped."""
    path = tmp_path / "members.csv"
    path.write_text("\r\n".join([
        CSV_HEADER,
        "c1,林小雨,lin@example.com,13800138000,1990-05-20,Asia/Shanghai,zh-CN,4800,true,true,杭州,85",
        "c2,王芳,wang@example.com,13900139000,1991-06-01,Asia/Shanghai,zh-CN,300,true,false,上海,70,extra",
        "c3,张伟,zhang@example.com,13700137000,1992-07-02",
        "c4,赵磊,zhao@example.com,13600136000,1989-12-31,Asia/Shanghai,zh-CN,120.5,是,否,北京,9",
    ]) + "\r\n", encoding="utf-8-sig")
    report = load_members(harness, path)

    assert sorted(reasons(report)) == [3, 4]
    assert report.loaded == 2
    rows = stored(harness)
    assert sorted(rows) == ["c1", "c4"]
    assert rows["c1"]["name"] == "林小雨"  # the BOM did not end up in the first column's name
    assert rows["c1"]["phone"] == "+8613800138000"
    assert rows["c4"]["name"] == "赵磊"
    assert rows["c4"]["total_spend"] == 120.5
    assert (rows["c4"]["email_opt_in"], rows["c4"]["sms_opt_in"]) == (True, False)


def test_line_numbers_stay_right_after_a_cell_that_spans_lines(harness: Harness, tmp_path: Path) -> None:
    """An address with a line break inside quotes takes two lines: the bad email after it is reported on line 4."""
    path = tmp_path / "members.csv"
    path.write_text('id,name,email,address\r\n'
                    'a1,林小雨,lin@example.com,"杭州市西湖区\r\n文三路 1 号"\r\n'
                    'a2,王芳,wang@,上海\r\n'
                    'a3,赵磊,zhao@example.com,北京\r\n', encoding="utf-8")
    report = load_members(harness, path)
    assert report.loaded == 2
    assert [line for line, _ in report.skipped] == [4]
    assert stored(harness)["a1"]["attributes"] == {"address": "杭州市西湖区\r\n文三路 1 号"}


def test_a_truncated_csv_row_does_not_wipe_a_known_member(harness: Harness, tmp_path: Path) -> None:
    """A row cut short after the birthday (a broken export) must not blank Zhang's spend, tier and consent."""
    load_members(harness, jsonl(tmp_path / "members.jsonl", {**GOOD, "id": "c3", "name": "张伟"}))
    path = tmp_path / "members.csv"
    path.write_text(CSV_HEADER + "\nc3,张伟,zhang@example.com,13700137000,1992-07-02\n", encoding="utf-8")
    report = load_members(harness, path)

    assert report.loaded == 0
    assert [line for line, _ in report.skipped] == [2]
    zhang = stored(harness)["c3"]
    assert (zhang["total_spend"], zhang["tier"]) == (6000, "silver")
    assert (zhang["email_opt_in"], zhang["sms_opt_in"]) == (True, True)
    assert zhang["timezone"] == "Asia/Shanghai"


def test_unknown_columns_become_typed_attributes_that_conditions_and_templates_use(tmp_path: Path,
                                                                                  db_url: str) -> None:
    """A marketer adds vip_score and city columns and a journey for attributes.vip_score >= 80.

    Scores are numbers, not text: '9' is below 80 and '100' above it (as text it would be the other way round).
    """
    rules = tmp_path / "rules"
    shutil.copytree(REPO / "rules", rules)
    (rules / "journeys" / "vip_thanks.yaml").write_text(
        "journey: vip_thanks\nname: 高分会员感谢\nstatus: active\n"
        "trigger:\n  segment: {attributes.vip_score: {gte: 80}}\n"
        "entry:\n  reentry: never\n"
        "steps:\n  - id: thanks\n    send: email\n    template: vip/thanks\n", encoding="utf-8")
    templates = tmp_path / "templates"
    shutil.copytree(REPO / "templates", templates)
    (templates / "zh-CN" / "vip").mkdir()
    (templates / "zh-CN" / "vip" / "thanks.subject.j2").write_text("{{ member.name }}，感谢您", encoding="utf-8")
    (templates / "zh-CN" / "vip" / "thanks.text.j2").write_text(
        "{{ member.city }}的{{ member.name }}，您的评分 {{ member.vip_score + 1 }}", encoding="utf-8")
    (tmp_path / "h").mkdir()
    harness = Harness(tmp_path / "h", db_url, rules=rules, templates=templates)
    try:
        path = tmp_path / "members.csv"
        path.write_text("\n".join([
            CSV_HEADER,
            "v1,林小雨,lin@example.com,13800138000,,Asia/Shanghai,zh-CN,0,true,true,杭州,85",
            "v2,王芳,wang@example.com,13900139000,,Asia/Shanghai,zh-CN,0,true,true,上海,9",
            "v3,赵磊,zhao@example.com,13600136000,,Asia/Shanghai,zh-CN,0,true,true,北京,100",
        ]) + "\n", encoding="utf-8")
        assert load_members(harness, path).loaded == 3
        assert stored(harness)["v1"]["attributes"] == {"city": "杭州", "vip_score": 85}

        harness.tick("2026-03-02T10:00:00+08:00")
        assert sorted(m.member_id for m in harness.sent()) == ["v1", "v3"]
        body = {m.member_id: m.text for m in harness.sent()}
        assert body["v1"] == "杭州的林小雨，您的评分 86"
        assert body["v3"] == "北京的赵磊，您的评分 101"
    finally:
        harness.close()


def test_reimporting_a_member_updates_them_instead_of_adding_a_second_one(harness: Harness, tmp_path: Path) -> None:
    """The next day's export has Lin's new email and a new attribute; columns it does not give are kept."""
    load_members(harness, jsonl(tmp_path / "day1.jsonl", {**GOOD, "city": "杭州"}))
    report = load_members(harness, jsonl(tmp_path / "day2.jsonl",
                                         {"id": "m1", "name": "林小雨", "email": "Lin.New@Example.com",
                                          "vip_score": 90}))
    assert report.loaded == 1 and report.skipped == []
    with harness.app.store.connect() as conn:
        assert conn.execute(select(func.count()).select_from(members)).scalar_one() == 1
    lin = stored(harness)["m1"]
    assert lin["email"] == "Lin.New@example.com"  # the domain is normalised, the local part kept
    assert lin["points"] == 100 and lin["tier"] == "silver" and lin["phone"] == "+8613800138000"
    assert lin["attributes"] == {"city": "杭州", "vip_score": 90}


# --------------------------------------------------------------------------- events


def test_events_for_an_unknown_member_are_rejected_with_their_line(harness: Harness, tmp_path: Path) -> None:
    """The order system sends an order for a member the CRM never exported: that line is reported, others load."""
    load_members(harness, jsonl(tmp_path / "members.jsonl", GOOD))
    report = load_events(harness, jsonl(
        tmp_path / "events.jsonl",
        {"member_id": "m1", "type": "login", "at": "2026-03-01T09:00:00+08:00"},
        {"member_id": "ghost", "type": "purchase", "at": "2026-03-01T09:30:00+08:00",
         "properties": {"amount": 99, "order_id": "X-1"}},
        {"member_id": "m1", "type": "purchase", "at": "2026-03-01T10:00:00+08:00",
         "properties": {"amount": 100, "order_id": "X-2"}},
        "{not json",
        {"member_id": "m1", "type": "purchase", "at": "2026-03-01T11:00:00+08:00", "properties": {"amount": -5}}))
    assert report.loaded == 2
    why = reasons(report)
    assert sorted(why) == [2, 4, 5]
    assert "'ghost' does not exist" in why[2]
    assert "JSON" in why[4]
    assert "amount" in why[5]
    assert stored(harness)["m1"]["total_spend"] == 6100


def test_a_purchase_updates_spend_orders_last_order_points_and_tier(harness: Harness, tmp_path: Path) -> None:
    """Lin (Silver, ¥6,000, 100 points) buys for ¥500: Silver earns 1.2 points per yuan. Then ¥14,000 makes her Gold.
    A late-arriving older order adds to her spend but does not move her last order date back."""
    load_members(harness, jsonl(tmp_path / "members.jsonl", GOOD,
                                {**GOOD, "id": "m2", "tier": "regular", "total_spend": 0, "points": 0}))
    report = load_events(harness, jsonl(
        tmp_path / "events.jsonl",
        {"member_id": "m1", "type": "purchase", "at": "2026-03-10T10:00:00+08:00",
         "properties": {"amount": 500, "order_id": "P-1"}},
        {"member_id": "m2", "type": "purchase", "at": "2026-03-10T10:00:00+08:00",
         "properties": {"amount": 500, "order_id": "P-2"}}))
    assert report.loaded == 2 and report.skipped == []
    lin, other = stored(harness)["m1"], stored(harness)["m2"]
    assert lin["total_spend"] == 6500
    assert lin["order_count"] == 3
    assert lin["last_order_at"] == datetime(2026, 3, 10, 2, 0, tzinfo=UTC)
    assert lin["points"] == 100 + 600  # ¥500 × 1 point × Silver's 1.2
    assert other["points"] == 500  # a regular member earns 1 point per yuan
    assert lin["tier"] == "silver"

    load_events(harness, jsonl(
        tmp_path / "more.jsonl",
        {"member_id": "m1", "type": "purchase", "at": "2026-03-12T10:00:00+08:00",
         "properties": {"amount": 14000, "order_id": "P-3"}},
        {"member_id": "m1", "type": "purchase", "at": "2026-02-01T10:00:00+08:00",
         "properties": {"amount": 50, "order_id": "P-0"}}))
    lin = stored(harness)["m1"]
    assert lin["tier"] == "gold"
    assert lin["total_spend"] == 20550
    assert lin["order_count"] == 5
    assert lin["last_order_at"] == datetime(2026, 3, 12, 2, 0, tzinfo=UTC)


def test_the_same_order_imported_twice_counts_once(harness: Harness, tmp_path: Path) -> None:
    """The order feed is replayed (and repeats an order inside the file): each order_id adds to spend only once."""
    load_members(harness, jsonl(tmp_path / "members.jsonl", GOOD))
    order = {"member_id": "m1", "type": "purchase", "at": "2026-03-10T10:00:00+08:00",
             "properties": {"amount": 500, "order_id": "P-1"}}
    path = jsonl(tmp_path / "events.jsonl", order, order)
    first = load_events(harness, path)
    assert first.loaded == 1
    assert [line for line, _ in first.skipped] == [2]
    assert "duplicate" in first.skipped[0][1]

    second = load_events(harness, path)
    assert second.loaded == 0
    assert [line for line, _ in second.skipped] == [1, 2]
    assert all("duplicate" in why for _, why in second.skipped)
    lin = stored(harness)["m1"]
    assert lin["total_spend"] == 6500
    assert lin["order_count"] == 3
    assert lin["points"] == 700


def test_redeeming_more_points_than_the_balance_is_rejected(harness: Harness, tmp_path: Path) -> None:
    """Lin has 100 points: redeeming 150 is refused (line named), redeeming 60 leaves 40."""
    load_members(harness, jsonl(tmp_path / "members.jsonl", GOOD))
    report = load_events(harness, jsonl(
        tmp_path / "events.jsonl",
        {"member_id": "m1", "type": "points_redeemed", "at": "2026-03-10T10:00:00+08:00",
         "properties": {"points": 150}},
        {"member_id": "m1", "type": "points_redeemed", "at": "2026-03-10T11:00:00+08:00",
         "properties": {"points": 60}}))
    assert report.loaded == 1
    assert [line for line, _ in report.skipped] == [1]
    assert "150" in report.skipped[0][1] and "100 points" in report.skipped[0][1]
    assert stored(harness)["m1"]["points"] == 40


def test_unsubscribing_from_sms_turns_off_sms_only(harness: Harness, tmp_path: Path) -> None:
    """Lin replies to stop SMS: sms_opt_in goes off, her email consent stays."""
    load_members(harness, jsonl(tmp_path / "members.jsonl", GOOD))
    report = load_events(harness, jsonl(
        tmp_path / "events.jsonl",
        {"member_id": "m1", "type": "unsubscribe", "at": "2026-03-10T10:00:00+08:00",
         "properties": {"channel": "sms"}}))
    assert report.loaded == 1
    lin = stored(harness)["m1"]
    assert lin["sms_opt_in"] is False
    assert lin["email_opt_in"] is True


def test_a_re_import_raises_an_earned_tier_but_never_lowers_one(harness: Harness, tmp_path: Path) -> None:
    """A CRM sync sends total_spend without a tier: more spend upgrades, less spend does not downgrade."""
    load_members(harness, jsonl(tmp_path / "first.jsonl", {**GOOD, "id": "g1", "tier": "gold", "total_spend": 25000},
                                {**GOOD, "id": "r1", "tier": "regular", "total_spend": 100}))
    sync = {k: v for k, v in GOOD.items() if k != "tier"}
    report = load_members(harness, jsonl(tmp_path / "sync.jsonl", {**sync, "id": "g1", "total_spend": 3000},
                                         {**sync, "id": "r1", "total_spend": 21000}))
    assert report.loaded == 2
    rows = stored(harness)
    assert (rows["g1"]["tier"], rows["g1"]["total_spend"]) == ("gold", 3000)
    assert rows["r1"]["tier"] == "gold"


def test_a_time_zone_that_names_a_folder_of_the_zone_database_is_a_bad_row_not_a_crash(harness: Harness,
                                                                                        tmp_path: Path) -> None:
    """"America" and "Etc" are folders in the zone database and a 300-letter name is too long for a file name:
    ZoneInfo raised OSError for them, which stopped the whole import with a traceback."""
    path = jsonl(tmp_path / "members.jsonl",
                 GOOD,
                 {**GOOD, "id": "m2", "timezone": "America"},
                 {**GOOD, "id": "m3", "timezone": "Etc"},
                 {**GOOD, "id": "m4", "timezone": "x" * 300})
    report = load_members(harness, path)

    assert report.loaded == 1 and sorted(stored(harness)) == ["m1"]
    why = reasons(report)
    assert sorted(why) == [2, 3, 4]
    assert "timezone" in why[2] and "'America'" in why[2]
    assert "timezone" in why[3] and "'Etc'" in why[3]


def test_a_name_with_a_line_break_is_refused_and_never_reaches_a_header(harness: Harness, tmp_path: Path) -> None:
    """``Evil\\r\\nBcc: victim@example.com`` as a name would start a header of its own in an email: the row is
    refused naming the field and the character; the good row beside it loads."""
    path = jsonl(tmp_path / "members.jsonl",
                 {**GOOD, "id": "evil", "name": "Evil\r\nBcc: victim@example.com"},
                 {**GOOD, "id": "tab", "name": "Tab\there"},
                 GOOD)
    report = load_members(harness, path)
    assert report.loaded == 1
    assert reasons(report)[1] == ("name must not contain line breaks or other control characters, found '\\r' at "
                                  "character 5")
    assert "'\\t' at character 4" in reasons(report)[2]
    assert set(stored(harness)) == {"m1"}
