"""The loyalty programme as a story: points earned, redeemed and expiring oldest first; tiers over a rolling
window, reviewed and lowered only at review; member intelligence (lifecycle, RFM, value, churn flags);
the points-expiry reminder; and what ``member show`` and ``report --programme`` tell a marketer."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from engine.cli.main import main
from engine.programme import points
from engine.store.models import events, members, points_ledger
from engine.testing import Harness


def member(member_id: str, total_spend: float = 0, **extra: Any) -> dict[str, Any]:
    return {"id": member_id, "name": member_id.title(), "email": f"{member_id}@example.com",
            "timezone": "Asia/Shanghai", "locale": "zh-CN", "total_spend": total_spend, "email_opt_in": True,
            "sms_opt_in": False, **extra}


def stored(h: Harness, member_id: str) -> dict[str, Any]:
    with h.app.store.connect() as conn:
        return dict(conn.execute(select(members).where(members.c.id == member_id)).mappings().one())


def ledger(h: Harness, member_id: str) -> list[tuple[str, int]]:
    with h.app.store.connect() as conn:
        return [(k, p) for k, p in conn.execute(select(points_ledger.c.kind, points_ledger.c.points)
                                                 .where(points_ledger.c.member_id == member_id)
                                                 .order_by(points_ledger.c.id))]


def typed_events(h: Harness, member_id: str, kind: str) -> list[dict[str, Any]]:
    with h.app.store.connect() as conn:
        return [dict(p) for p in conn.execute(select(events.c.properties).where(
            events.c.member_id == member_id, events.c.type == kind).order_by(events.c.id)).scalars()]


# ------------------------------------------------------------------------------------------------ points


def test_points_are_earned_redeemed_and_expire_oldest_first(harness: Harness) -> None:
    """Mei earns 300 in January and 200 in June, redeems 250 in July: the January lot is used first, so in
    January next year only 50 expire, and the June lot's 200 stay until June."""
    h = harness
    h.members(member("mei"))
    h.event("mei", "purchase", "2026-01-10T10:00:00+08:00", amount=300, order_id="J-1")
    h.event("mei", "purchase", "2026-06-10T10:00:00+08:00", amount=200, order_id="J-2")
    assert h.event("mei", "points_redeemed", "2026-07-01T10:00:00+08:00", points=250, reward="杯子").loaded == 1
    refused = h.event("mei", "points_redeemed", "2026-07-02T10:00:00+08:00", points=251)
    assert refused.loaded == 0 and "insufficient balance" in refused.skipped[0][1]
    assert stored(h, "mei")["points"] == 250

    with h.app.store.connect() as conn:
        assert points.upcoming_expiries(conn, "mei", h.at("2026-07-02T00:00:00Z")) == [
            (h.at("2027-01-10T02:00:00Z"), 50), (h.at("2027-06-10T02:00:00Z"), 200)]

    h.tick("2027-01-10T01:00:00Z")  # an hour before: nothing expires
    assert stored(h, "mei")["points"] == 250
    report = h.tick("2027-01-10T03:00:00Z")
    assert report.counts["points_expired"] == 1
    assert stored(h, "mei")["points"] == 200
    assert typed_events(h, "mei", "points_expired") == [{"points": 50, "balance": 200}]
    h.tick("2027-01-11T03:00:00Z")  # settled once
    h.tick("2027-06-10T03:00:00Z")
    assert stored(h, "mei")["points"] == 0
    assert ledger(h, "mei") == [("earn", 300), ("earn", 200), ("redeem", -250), ("expire", -50), ("expire", -200)]
    assert [e["points"] for e in typed_events(h, "mei", "points_earned")] == [300, 200]


def test_other_events_earn_points_by_the_programme_table_and_imports_adjust_the_ledger(harness: Harness) -> None:
    h = harness
    h.members(member("kai", points=1000))
    h.event("kai", "check_in", "2026-02-01T08:00:00+08:00")
    h.event("kai", "review_submitted", "2026-02-02T08:00:00+08:00")
    h.event("kai", "login", "2026-02-03T08:00:00+08:00")  # earns nothing
    assert stored(h, "kai")["points"] == 1025
    h.members(member("kai", points=900))  # the CRM says 900: the ledger records the difference
    assert ledger(h, "kai") == [("adjust", 1000), ("earn", 5), ("earn", 20), ("adjust", -125)]
    with h.app.store.connect() as conn:
        assert points.balance(conn, "kai") == stored(h, "kai")["points"] == 900


def test_a_purchase_earns_at_the_tier_multiplier(harness: Harness) -> None:
    h = harness
    h.members(member("gold", tier="gold"))
    h.event("gold", "purchase", "2026-03-01T10:00:00+08:00", amount=1000, order_id="G-1")
    assert ledger(h, "gold") == [("earn", 1500)]  # 1 point per yuan x 1.5 for gold


# ------------------------------------------------------------------------------------------------ tiers


def test_spend_older_than_the_window_does_not_qualify(harness: Harness) -> None:
    """Ping spent ¥4,800 two years ago; a ¥300 order today is ¥300 within 365 days: still regular."""
    h = harness
    h.members(member("ping", 4800, last_order_at="2024-03-01T10:00:00+08:00"))
    h.event("ping", "purchase", "2026-03-10T10:00:00+08:00", amount=300, order_id="P-1")
    row = stored(h, "ping")
    assert row["tier"] == "regular" and row["qualifying_spend"] == 300
    h.event("ping", "purchase", "2026-04-10T10:00:00+08:00", amount=4700, order_id="P-2")
    assert stored(h, "ping")["tier"] == "silver"


def test_a_tier_can_ask_for_orders_too_or_either(tmp_path: Path, db_url: str) -> None:
    """Silver needs ¥5,000 and 5 orders in the year; gold ¥20,000 or 30 orders, whichever comes first."""
    import shutil

    from engine.testing import REPO

    rules = tmp_path / "rules"
    shutil.copytree(REPO / "rules", rules)
    text = (rules / "loyalty.yaml").read_text(encoding="utf-8")
    text = text.replace("    min_spend: 5000\n", "    min_spend: 5000\n    min_orders: 5\n")
    text = text.replace("    min_spend: 20000\n", "    min_spend: 20000\n    min_orders: 30\n    requires: any\n")
    text = text.replace("    min_spend: 100000\n", "    min_spend: 100000\n    min_orders: 30\n")  # never easier
    (rules / "loyalty.yaml").write_text(text, encoding="utf-8")
    h = Harness(tmp_path, db_url, rules=rules)
    try:
        h.members(member("big"), member("often"))
        h.event("big", "purchase", "2026-03-01T10:00:00+08:00", amount=6000, order_id="B-1")
        assert stored(h, "big")["tier"] == "regular"  # one order: not yet silver
        for n in range(2, 6):
            h.event("big", "purchase", f"2026-03-0{n}T10:00:00+08:00", amount=10, order_id=f"B-{n}")
        assert stored(h, "big")["tier"] == "silver"
        for n in range(30):
            h.event("often", "purchase", f"2026-04-{n // 2 + 1:02d}T{10 + n % 2}:00:00+08:00", amount=200,
                    order_id=f"O-{n}")
        assert stored(h, "often")["tier"] == "gold"  # 30 orders, ¥6,000: gold by orders alone
    finally:
        h.close()


def test_no_downgrade_before_the_review_and_at_most_one_tier_at_it(harness: Harness) -> None:
    """Wu reached diamond with a ¥100,000 order in March 2026 and then stopped buying. He stays diamond until
    March 2027; that review takes him down one tier only (gold), the next one to silver."""
    h = harness
    h.members(member("wu"))
    h.event("wu", "purchase", "2026-03-01T10:00:00+08:00", amount=100000, order_id="W-1")
    assert stored(h, "wu")["tier"] == "diamond"
    h.tick("2026-03-01T02:05:00Z")  # the upgrade is congratulated
    assert stored(h, "wu")["tier_review_at"] == h.at("2027-03-01T02:00:00Z")

    h.tick("2027-02-28T12:00:00Z")
    assert stored(h, "wu")["tier"] == "diamond"
    report = h.tick("2027-03-01T03:00:00Z")
    assert report.counts["tier_down"] == 1
    assert stored(h, "wu")["tier"] == "gold"
    downs = [e for e in typed_events(h, "wu", "tier_changed") if e["direction"] == "down"]
    assert downs == [{"from": "diamond", "to": "gold", "direction": "down", "cause": "review",
                      "qualifying_spend": 0.0, "qualifying_orders": 0}]
    h.tick("2028-03-01T03:00:00Z")
    assert stored(h, "wu")["tier"] == "silver"
    # downgrades bring no congratulation
    assert [s for s in h.steps_sent("wu") if s[0] == "tier_upgrade"] == [("tier_upgrade", "congrats_email")]


def test_a_member_who_still_qualifies_keeps_the_tier_at_review(harness: Harness) -> None:
    h = harness
    h.members(member("an"))
    h.event("an", "purchase", "2026-03-01T10:00:00+08:00", amount=6000, order_id="A-1")
    h.event("an", "purchase", "2027-01-15T10:00:00+08:00", amount=5200, order_id="A-2")
    h.tick("2027-03-01T03:00:00Z")
    row = stored(h, "an")
    assert row["tier"] == "silver" and row["qualifying_spend"] == 5200
    assert row["tier_review_at"] == h.at("2028-02-29T03:00:00Z")  # 365 days on, in a leap year


# ------------------------------------------------------------------------------------------------ intelligence


def test_rfm_scores_on_a_known_small_base(harness: Harness) -> None:
    """Five buyers, each better than the last on all three measures, score 1 to 5; a buyer tied with the best
    gets the same scores; a member with no orders gets none."""
    h = harness
    rows = [member(f"b{i}", 1000 * i, order_count=i, last_order_at=f"2026-0{i}-01T00:00:00Z") for i in range(1, 6)]
    rows.append(member("twin", 5000, order_count=5, last_order_at="2026-05-01T00:00:00Z"))
    rows.append(member("none"))
    h.members(*rows)
    h.tick("2026-06-01T00:00:00Z")
    got = {m: (stored(h, m)["rfm_r"], stored(h, m)["rfm_f"], stored(h, m)["rfm_m"], stored(h, m)["rfm_segment"])
           for m in ("b1", "b2", "b3", "b4", "b5", "twin", "none")}
    # six buyers: 1 + (rank - 1) * 5 // 6 with ranks 1, 2, 3, 4, 5, 5
    assert got == {"b1": (1, 1, 1, "hibernating"), "b2": (1, 1, 1, "hibernating"), "b3": (2, 2, 2, "hibernating"),
                   "b4": (3, 3, 3, "needs_attention"), "b5": (4, 4, 4, "champions"),
                   "twin": (4, 4, 4, "champions"), "none": (None, None, None, None)}


def test_lifecycle_value_and_churn_flags(harness: Harness) -> None:
    h = harness
    h.members(
        member("newbie", signup_at="2026-05-20T00:00:00Z"),
        member("regular", 3000, order_count=3, signup_at="2025-06-01T00:00:00Z",
               last_order_at="2026-05-25T00:00:00Z"),
        member("quiet", 800, order_count=2, signup_at="2025-01-01T00:00:00Z", last_order_at="2026-03-01T00:00:00Z"),
        member("gone", 500, order_count=1, signup_at="2024-01-01T00:00:00Z", last_order_at="2025-06-01T00:00:00Z"),
        now="2026-05-20T00:00:00Z")
    h.event("regular", "login", "2026-04-01T00:00:00Z")  # last login two months before the clock
    for n, amount in enumerate((100, 80), 1):  # recent orders far below the ¥1,000 average before them
        h.event("regular", "purchase", f"2026-05-2{n}T00:00:00Z", amount=amount, order_id=f"R-{n}")
    h.tick("2026-06-01T00:00:00Z")
    stages = {m: stored(h, m)["lifecycle_stage"] for m in ("newbie", "regular", "quiet", "gone")}
    assert stages == {"newbie": "new", "regular": "active", "quiet": "silent", "gone": "churned"}
    reg = stored(h, "regular")
    assert reg["aov"] == 3180 / 5
    assert reg["churn_risk"] is True and reg["churn_reasons"] == "no_login,aov_drop"
    assert stored(h, "quiet")["churn_risk"] is False
    # CLV: spend per year so far x 3 years x retention; "gone" is churned, so 0.
    days = (h.at("2026-06-01T00:00:00Z") - h.at("2025-06-01T00:00:00Z")).days
    assert abs(reg["predicted_clv"] - 3180 * 365 / days * 3) < 0.01
    assert stored(h, "gone")["predicted_clv"] == 0


# ------------------------------------------------------------------------------------------------ journey


def test_the_points_expiry_reminder_fires_thirty_days_before(harness: Harness) -> None:
    """Qing earned 500 points on 10 January 2027; they expire on 10 January 2028. The reminder goes on
    11 December 2027, the first daily tick with them inside 30 days, naming the amount and the date."""
    h = harness
    h.members(member("qing"))
    h.event("qing", "purchase", "2027-01-10T10:00:00+08:00", amount=500, order_id="Q-1")
    for day in range(1, 16):
        h.tick(f"2027-12-{day:02d}T10:00:00+08:00")
        if ("points_expiry", "reminder_email") in h.steps_sent("qing"):
            break
    assert day == 11
    (email,) = [m for m in h.sent() if m.journey == "points_expiry"]
    assert email.subject == "您有 500 积分即将到期"
    assert "500 积分将于 2028年1月10日 到期" in email.text
    h.tick("2027-12-12T10:00:00+08:00")
    assert [m.step for m in h.sent() if m.journey == "points_expiry"] == ["reminder_email"]


# ------------------------------------------------------------------------------------------------ visibility


def _cli(h: Harness, *args: str) -> Any:
    return CliRunner().invoke(main, ["--config", str(h.tmp / "config.yaml"), *args], catch_exceptions=False)


def test_member_show_and_programme_report(harness: Harness) -> None:
    h = harness
    h.members(member("lin", 4800), member("zhao"))
    h.event("lin", "purchase", "2026-03-10T10:00:00+08:00", amount=300, order_id="A-1")
    h.tick("2026-03-10T10:05:00+08:00")
    shown = _cli(h, "member", "show", "lin", "--at", "2026-03-11T00:00:00Z")
    assert shown.exit_code == 0, shown.output
    out = shown.output
    assert "银卡会员 (silver) since 2026-03-10, review 2027-03-10" in out
    assert "5,100.00 spend over 1 orders in the last 365 days" in out
    assert "金卡会员: 14,900.00 more spend (at 20,000)" in out
    assert "300; expiring: 300 on 2027-03-10" in out
    assert "lifecycle      active" in out
    assert "earn   +300 -> 300  purchase A-1, expires 2027-03-10" in out

    report = _cli(h, "report", "--programme", "--from", "2026-03-01T00:00:00Z", "--to", "2026-03-31T00:00:00Z",
                  "--format", "json")
    data = json.loads(report.output)
    assert data["tiers"] == {"regular": 1, "silver": 1, "gold": 0, "diamond": 0}
    assert data["points_balance"] == 300 and data["points_earned"] == 300
    assert data["movements"] == [{"from": "regular", "to": "silver", "direction": "up", "members": 1}]
    table = _cli(h, "report", "--programme", "--to", "2026-03-31T00:00:00Z").output
    assert "银卡会员 (silver): 1 (50.0%)" in table
    assert "up   regular -> silver: 1" in table
    # preview loads the computed attributes the journey uses, as a send does
    preview = _cli(h, "preview", "points_expiry", "reminder_email", "--member", "lin")
    assert preview.exit_code == 0, preview.output
    assert "subject: 您有 0 积分即将到期" in preview.output and "您的 300 积分将于 2027年3月10日 到期" in preview.output
    page = _cli(h, "report", "--programme", "--format", "html", "--to", "2026-03-31T00:00:00Z").output
    assert page.startswith("<!doctype html>") and "银卡会员 (silver): 1 (50.0%)" in page


def test_a_misspelt_stage_or_segment_is_a_validation_error(tmp_path: Path) -> None:
    from engine.domain.attributes import RFM_SEGMENTS
    from engine.programme.intelligence import SEGMENT_NAMES

    assert SEGMENT_NAMES == RFM_SEGMENTS
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "segments.yaml").write_text(
        "segments:\n  quiet:\n    condition: {lifecycle_stage: silnet}\n"
        "  best:\n    condition: {rfm_segment: {in: [champions, loyals]}}\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["validate", str(rules / "segments.yaml")], catch_exceptions=False)
    assert result.exit_code == 1
    assert "segments.yaml:3:" in result.output and "lifecycle_stage is never 'silnet'; did you mean 'silent'?" \
        in result.output
    assert "rfm_segment is never 'loyals'; did you mean 'loyal'?" in result.output


def test_a_loyalty_file_with_mistakes_names_each_line(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    (rules / "journeys").mkdir(parents=True)
    (rules / "loyalty.yaml").write_text(
        "qualification:\n  window: 1 year\n  review: {every: 365d, max_dorp: 1}\n"
        "tiers:\n  - {id: regular, name: 普通, min_spend: 0}\n  - {id: silver, name: 银卡, min_spend: 5000}\n"
        "points:\n  expire_after: 365d\n  earn: {purchase: 1}\n"
        "lifecycle:\n  active_within: 90d\n  churned_after: 60d\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["validate", str(rules / "loyalty.yaml")], catch_exceptions=False)
    assert result.exit_code == 1
    lines = [line.split(": ", 1) for line in result.output.strip().splitlines() if "loyalty.yaml:" in line]
    where = {loc.rsplit(":", 2)[-2]: message for loc, message in lines}
    assert "window must be a duration such as 30d, 12h or 52w, or lifetime, got: '1 year'" in where["2"]
    assert "did you mean 'max_drop'" in where["3"]
    assert "remove purchase from earn" in where["9"]
    assert "must be longer than active_within" in where["12"]


def _ref_expire(lots: list[list[Any]], now: datetime) -> int:
    gone = sum(lot[1] for lot in lots if lot[0] <= now)
    lots[:] = [lot for lot in lots if lot[0] > now]
    return gone


@pytest.mark.slow
def test_ledger_sum_always_equals_the_balance(harness: Harness) -> None:
    """Property: any sequence of earns, redemptions and expiry passes keeps the balance at or above zero,
    equal to the ledger sum, and expires exactly what a lot-by-lot model (oldest first) says."""
    from datetime import timedelta

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    ops = st.lists(st.tuples(st.sampled_from(["earn", "redeem", "tick"]), st.integers(1, 400),
                             st.integers(0, 200)), min_size=1, max_size=12)
    counter = iter(range(10_000))

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(ops)
    def run(steps: list[tuple[str, int, int]]) -> None:
        n = next(counter)
        member_id = f"p{n}"
        clock = h.at("2030-01-01T00:00:00Z") + timedelta(days=3000 * n)
        h.members(member(member_id), now=clock.isoformat())
        lots: list[list[Any]] = []  # [expires_at, remaining], soonest first
        for kind, amount, days in steps:
            clock += timedelta(days=days)
            if kind == "earn":
                h.event(member_id, "purchase", clock.isoformat(), amount=amount)
                lots.append([clock + timedelta(days=365), amount])
            elif kind == "redeem":
                result = h.event(member_id, "points_redeemed", clock.isoformat(), points=amount)
                # Points past their date stay spendable until a tick expires them; the soonest go first.
                assert (result.loaded == 1) == (amount <= sum(lot[1] for lot in lots))
                if result.loaded:
                    left = amount
                    for lot in lots:
                        used = min(left, lot[1])
                        lot[1] -= used
                        left -= used
            else:
                h.tick(clock)
                _ref_expire(lots, clock)
            with h.app.store.connect() as conn:
                total = conn.execute(select(func.sum(points_ledger.c.points))
                                     .where(points_ledger.c.member_id == member_id)).scalar() or 0
            balance = stored(h, member_id)["points"]
            assert balance >= 0 and balance == total == sum(lot[1] for lot in lots)

    h = harness
    run()
