"""The event matcher as the engine uses it: stories around durable-rules' traps.

Each trap has a test that would fail had we fallen into it: the 1,024-session cap, messages merged by a content
hash or a 32-bit id hash, exceptions swallowed inside actions, a ruleset name registered twice, timer threads
left running. The answers themselves are held to ``engine.rules.conditions.evaluate`` here and, over the whole
grammar, in tests/test_differential.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

pytest.importorskip("durable", reason="durable-rules does not import on this Python (3.13+): the engine uses its "
                    "Python matcher")

from engine.matching.durable import EventMatcher
from engine.matching.durable_rules import FIELD_NAMES, ConditionTooComplex, MatcherError, MatchRule
from engine.rules.conditions import Condition, evaluate, parse
from engine.rules.problems import Problems
from engine.rules.yamlsrc import UNKNOWN, load_yaml

NOW = datetime(2026, 4, 1, 10, 0, tzinfo=UTC)


def condition(text: str, segments: bool = False) -> Condition:
    problems = Problems("test.yaml")
    parsed = parse(load_yaml(text), UNKNOWN, problems, "where", allow_event=not segments)
    assert parsed is not None, problems.items
    return parsed


def member(member_id: str, **values: Any) -> dict[str, Any]:
    return {"id": member_id, "tier": None, "points": 0, "total_spend": 0.0, "order_count": 0,
            "email_opt_in": True, "sms_opt_in": False, "last_order_at": None, "birthday": None,
            "signup_at": None, "attributes": {}, **values}


WINBACK = [
    MatchRule("trigger:welcome", "signup", condition("{tier: {in: [silver, gold]}, attributes.channel: app}")),
    MatchRule("exit:winback", "purchase"),
    MatchRule("goal:winback", "purchase", condition("{event.amount: {gte: 100}, last_order_at: {before: 60d}}")),
    MatchRule("trigger:big_order", "purchase", condition("{any: [{event.amount: {gt: 1000}}, {tier: diamond}]}")),
]


@pytest.fixture
def matcher() -> Iterator[EventMatcher]:
    with EventMatcher(WINBACK) as m:
        yield m


def expected(rules: list[MatchRule], event_type: str, props: dict[str, Any], person: dict[str, Any]) -> set[str]:
    return {r.key for r in rules if r.event_type == event_type
            and (r.condition is None or evaluate(r.condition, person, NOW, r.segments or {}, props))}


def test_a_purchase_matches_its_exit_goal_and_trigger_and_nothing_of_other_types(matcher: EventMatcher) -> None:
    lapsed = member("wang", tier="diamond", last_order_at=NOW - timedelta(days=61))
    assert matcher.matches(1, "purchase", {"amount": 259}, lapsed, NOW) == {
        "exit:winback", "goal:winback", "trigger:big_order"}
    assert matcher.matches(2, "purchase", {"amount": 99}, lapsed, NOW) == {"exit:winback", "trigger:big_order"}
    assert matcher.matches(3, "login", {"amount": 259}, lapsed, NOW) == set()
    newcomer = member("li", tier="gold", attributes={"channel": "app"})
    assert matcher.matches(4, "signup", {}, newcomer, NOW) == {"trigger:welcome"}


def test_three_thousand_members_through_one_matcher(matcher: EventMatcher) -> None:
    """durable-rules holds at most 1,024 sessions per ruleset (then MemoryError, or a crash): one shared session
    serves every member, so member 3,000 is matched as well as member 1."""
    tiers = [None, "silver", "gold", "diamond"]
    for n in range(3000):
        person = member(f"member-{n}", tier=tiers[n % 4], attributes={"channel": "app" if n % 3 else "web"},
                        last_order_at=NOW - timedelta(days=n % 120))
        event_type, props = ("signup", {}) if n % 2 else ("purchase", {"amount": (n * 37) % 1500})
        assert matcher.matches(n + 1, event_type, props, person, NOW) == expected(WINBACK, event_type, props, person)


def test_identical_events_are_each_matched(matcher: EventMatcher) -> None:
    """A message's default id is a hash of its content: without our ids the second of two identical purchases
    could be dropped. Ids 40189 and 797186 also share durable-rules' 32-bit FNV-1a hash."""
    person = member("zhao", tier="diamond")
    for event_id in (40189, 797186, 797187):
        assert matcher.matches(event_id, "purchase", {"amount": 5}, person, NOW) == {"exit:winback",
                                                                                    "trigger:big_order"}
    assert matcher.matches(40189, "purchase", {"amount": 5}, person, NOW) == {"exit:winback", "trigger:big_order"}


def test_an_exception_inside_matching_is_raised_and_the_matcher_recovers(matcher: EventMatcher,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """durable-rules swallows an exception raised in an action into the returned state (and keeps it there)."""
    def broken(key: str) -> None:
        raise RuntimeError(f"cannot record {key}")

    monkeypatch.setattr(matcher, "_record", broken)
    with pytest.raises(MatcherError, match="cannot record exit:winback"):
        matcher.matches(1, "purchase", {"amount": 5}, member("qian"), NOW)
    monkeypatch.undo()
    assert matcher.matches(2, "purchase", {"amount": 5}, member("qian"), NOW) == {"exit:winback"}


def test_a_reload_builds_new_rulesets_beside_the_old_ones(matcher: EventMatcher) -> None:
    """durable-rules refuses a ruleset name registered twice and cannot delete one from Python: every build
    gets its own names and Host, and closing the old matcher frees its rulesets."""
    edited = [*WINBACK[:3], MatchRule("trigger:big_order", "purchase", condition("{event.amount: {gt: 10}}"))]
    reloaded = EventMatcher(edited)
    try:
        assert not set(reloaded.ruleset_names) & set(matcher.ruleset_names)
        person = member("sun")
        assert matcher.matches(1, "purchase", {"amount": 50}, person, NOW) == {"exit:winback"}
        assert reloaded.matches(1, "purchase", {"amount": 50}, person, NOW) == {"exit:winback", "trigger:big_order"}
        matcher.close()
        matcher.close()
        with pytest.raises(MatcherError, match="closed"):
            matcher.matches(2, "purchase", {"amount": 50}, person, NOW)
        assert reloaded.matches(2, "purchase", {"amount": 50}, person, NOW) == {"exit:winback", "trigger:big_order"}
    finally:
        reloaded.close()


def test_no_thread_is_started_or_left_behind() -> None:
    """durable.engine.Host re-arms a threading.Timer every 0.2 s; ours arms none, and close frees the rest."""
    before = set(threading.enumerate())
    for _ in range(3):
        with EventMatcher(WINBACK) as m:
            m.matches(1, "purchase", {"amount": 5}, member("zhou"), NOW)
            assert set(threading.enumerate()) == before
    assert set(threading.enumerate()) == before


def test_missing_values_fail_every_test_but_exists_false() -> None:
    rules = [MatchRule(key, "visit", condition(text)) for key, text in [
        ("ne", "{tier: {ne: gold}}"), ("not_eq", "{not: {tier: gold}}"), ("absent", "{tier: {exists: false}}"),
        ("not_lt", "{not: {attributes.score: {lt: 5}}}"), ("gte", "{attributes.score: {gte: 5}}"),
        ("not_within", "{not: {birthday: {within: 7d}}}"), ("before", "{last_order_at: {before: 1d}}"),
    ]]
    with EventMatcher(rules) as m:
        assert m.matches(1, "visit", {}, member("wu"), NOW) == {"not_eq", "absent", "not_lt", "not_within"}
        assert m.matches(2, "visit", {}, member("wu", attributes={"score": None}), NOW) == {
            "not_eq", "absent", "not_lt", "not_within"}


def test_free_form_values_are_compared_only_with_constants_of_their_type() -> None:
    """durable-rules would find true == 1 and "abc" > 5; conditions.py (and SQL) never do."""
    rules = [MatchRule("one", "e", condition("{attributes.x: {eq: 1}}")),
             MatchRule("above", "e", condition("{attributes.x: {gt: 0}}")),
             MatchRule("not_one", "e", condition("{not: {attributes.x: {eq: 1}}}")),
             MatchRule("text", "e", condition("{attributes.x: {ne: 'a'}}"))]
    with EventMatcher(rules) as m:
        for n, value in enumerate([True, "1", 1, 1.0, [1], {"x": 1}, "abc", 0.5, 1e300]):
            person = member("zheng", attributes={"x": value})
            assert m.matches(n, "e", {}, person, NOW) == expected(rules, "e", {}, person), value


def test_relative_times_flip_exactly_where_python_flips() -> None:
    """before/within are computed from the clock of each event: the edges are those of conditions.py."""
    rules = [MatchRule("lapsed", "e", condition("{last_order_at: {before: 60d}}")),
             MatchRule("recent", "e", condition("{last_order_at: {within: 60d}}")),
             MatchRule("birthday_soon", "e", condition("{birthday: {within: 1d12h}}")),
             MatchRule("old_birthday", "e", condition("{not: {birthday: {before: 2d}}}"))]
    tokyo = ZoneInfo("Asia/Tokyo")
    edge = NOW - timedelta(days=60)
    with EventMatcher(rules) as m:
        for n, when in enumerate([edge, edge - timedelta(microseconds=1), edge + timedelta(microseconds=1),
                                  NOW, NOW + timedelta(microseconds=1), edge.astimezone(tokyo)]):
            person = member("feng", last_order_at=when)
            assert m.matches(n, "e", {}, person, NOW) == expected(rules, "e", {}, person), when
        for n, day in enumerate(date(2026, 3, 28) + timedelta(days=d) for d in range(7)):
            person = member("feng", birthday=day)
            assert m.matches(100 + n, "e", {}, person, NOW) == expected(rules, "e", {}, person), day


def test_named_segments_and_big_conditions_are_compiled_whole() -> None:
    """Beyond durable-rules' 15 and/or per rule, a condition is split over several rules and rulesets."""
    segments = {"vip": condition("{any: [{tier: diamond}, {total_spend: {gte: 5000}}]}", segments=True)}
    wide = "{any: [" + ", ".join(f"{{all: [{{points: {{gte: {n}}}}}, {{any: [{{tier: t{n}}}, {{order_count: {n}}}]}}]}}"
                                 for n in range(20)) + "]}"
    cities = "[" + ", ".join(f"c{n}" for n in range(300)) + "]"
    rules = [MatchRule("vip", "e", condition("{not: {segment: vip}}"), segments),
             MatchRule("wide", "e", condition(wide)),
             MatchRule("city", "e", condition(f"{{attributes.city: {{in: {cities}}}}}"))]
    with EventMatcher(rules) as m:
        assert len([n for n in m.ruleset_names if n.split(".")[1] == "2"]) == 2  # 300 tests: two rulesets
        for n in range(60):
            person = member("chen", tier=["diamond", f"t{n % 25}", None][n % 3], points=n % 23, order_count=n % 21,
                            total_spend=float(n * 100), attributes={"city": f"c{n * 7}"})
            assert m.matches(n, "e", {}, person, NOW) == expected(rules, "e", {}, person)


def test_a_condition_too_large_to_split_is_refused_when_building() -> None:
    cities = "[" + ", ".join(f"c{n}" for n in range(300)) + "]"
    with pytest.raises(ConditionTooComplex, match="exclude_cities"):
        EventMatcher([MatchRule("exclude_cities", "e", condition(f"{{not: {{attributes.city: {{in: {cities}}}}}}}"))])


def test_only_the_rule_too_large_falls_back_to_python(caplog: pytest.LogCaptureFixture) -> None:
    """One rule durable-rules cannot take does not take the others out of it; the answers stay the same."""
    from engine.matching.events import SplitMatcher, build

    cities = "[" + ", ".join(f"c{n}" for n in range(300)) + "]"
    rules = [MatchRule("exclude_cities", "e", condition(f"{{not: {{attributes.city: {{in: {cities}}}}}}}")),
             MatchRule("big_spender", "e", condition("{total_spend: {gte: 5000}}")),
             MatchRule("any_purchase", "purchase", None)]
    matcher = build(rules)
    try:
        assert isinstance(matcher, SplitMatcher) and matcher.python_keys == {"exclude_cities"}
        assert isinstance(matcher.engine, EventMatcher)
        assert "exclude_cities is evaluated in Python" in caplog.text
        for n, city in enumerate(("c5", "elsewhere", "c299")):
            for spend in (100.0, 9000.0):
                person = member("li", total_spend=spend, attributes={"city": city})
                assert matcher.matches(n, "e", {}, person, NOW) == expected(rules, "e", {}, person)
        assert matcher.matches(9, "purchase", {}, member("li"), NOW) == {"any_purchase"}
    finally:
        matcher.close()


def test_the_clock_must_have_a_fixed_offset(matcher: EventMatcher) -> None:
    with pytest.raises(ValueError, match="fixed offset"):
        matcher.matches(1, "purchase", {}, member("he"), NOW.astimezone(ZoneInfo("Asia/Shanghai")))
    with pytest.raises(ValueError, match="fixed offset"):
        matcher.matches(1, "purchase", {}, member("he"), NOW.replace(tzinfo=None))


def test_field_names_never_share_a_name_hash() -> None:
    """durable-rules finds a message property by the 32-bit FNV-1a hash of its name ("$or" hashes to 340911698
    in its rete.c): the names the matcher makes, f0 … f{FIELD_NAMES - 1}, and the engine's own all hash apart."""
    def fnv1a(text: str) -> int:
        value = 0x811C9DC5
        for byte in text.encode():
            value = ((value ^ byte) * 0x01000193) & 0xFFFF_FFFF
        return value

    assert fnv1a("$or") == 340911698
    reserved = ("id", "sid", "t", "$s", "$l", "$r", "$m", "$forward", "label", "chart", "running")
    hashes = {fnv1a(name) for name in (*reserved, *(f"f{n}" for n in range(FIELD_NAMES)))}
    assert len(hashes) == len(reserved) + FIELD_NAMES
    assert fnv1a(f"f{FIELD_NAMES}") in hashes  # the first clash: the limit cannot be raised
