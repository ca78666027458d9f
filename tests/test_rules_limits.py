"""No rules file can crash the loader: whatever a file under rules/ holds, `validate` and `tick` report it as
FILE:LINE:COL with the fix, never a traceback, and every other file still loads.

Each test writes one hostile file beside a copy of the shipped rules and runs the real CLI. Positions are
found in the generated text (a ^ in the anchor marks the column), as in test_validate.py. Timings are not
asserted here: bench/rules_load.py prints them; the suite's per-test timeout guards against a hang.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.cli.main import main
from engine.rules import rulebook
from engine.rules.journey import Journey
from engine.rules.journey_parse import parse_journey
from engine.rules.problems import Problems
from engine.rules.rulebook import journey_from_definition, load_rulebook
from engine.rules.templates import Templates
from engine.testing import REPO

SHIPPED = sorted(p.stem for p in (REPO / "rules" / "journeys").glob("*.yaml"))
HEAD = "journey: hostile\ntrigger: {event: signup}\nsteps:\n"
SEND = "  - id: hello\n    send: email\n    template: welcome/welcome_email\n"


@dataclass(frozen=True)
class Project:
    root: Path

    @property
    def rules(self) -> Path:
        return self.root / "rules"

    def write(self, relative: str, text: str) -> Path:
        path = self.root / relative
        path.write_text(text, encoding="utf-8")
        return path

    def cli(self, *args: str) -> Outcome:
        result = CliRunner().invoke(main, ["--config", str(self.root / "config.yaml"), *args])
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        return Outcome(result.exit_code, result.stdout, result.stderr)

    def book(self) -> rulebook.Rulebook:
        return load_rulebook(self.rules, Templates(REPO / "templates", "zh-CN"))


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    stdout: str
    stderr: str

    def at(self, file: str, line: int, col: int) -> list[str]:
        prefix = f"{file}:{line}:{col}: "
        return [x.removeprefix(prefix) for x in self.stdout.splitlines() if x.startswith(prefix)]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Project:
    shutil.copytree(REPO / "rules", tmp_path / "rules")
    (tmp_path / "config.yaml").write_text(
        f"database: {{url: 'sqlite:///var/engine.db'}}\ntemplates_dir: {REPO / 'templates'}\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return Project(tmp_path)


def locate(text: str, anchor: str) -> tuple[int, int]:
    """Line and column of ANCHOR in TEXT; a ^ inside ANCHOR marks the column."""
    before, _, after = anchor.partition("^")
    for number, line in enumerate(text.splitlines(), 1):
        if before + after in line:
            return number, line.index(before + after) + len(before) + 1
    raise AssertionError(f"{anchor!r} not in the text")


def assert_reported(project: Project, relative: str, text: str, anchor: str, *words: str) -> None:
    """`validate` exits 1 with a problem at ANCHOR holding WORDS, no traceback; the shipped journeys still load."""
    project.write(relative, text)
    outcome = project.cli("validate")
    assert outcome.exit_code == 1, outcome.stdout + outcome.stderr
    assert "Traceback" not in outcome.stdout + outcome.stderr
    found = outcome.at(relative, *locate(text, anchor))
    assert any(all(w in message for w in words) for message in found), \
        f"{words} not at {relative}:{locate(text, anchor)}; got:\n{outcome.stdout[:3000]}"
    book = project.book()
    assert set(SHIPPED) <= set(book.journeys)
    if relative.startswith("rules/journeys/"):
        assert str(project.root / relative) in {str(Path(f).resolve()) for f in book.broken_files}


# --------------------------------------------------------------------------- durations

DURATIONS = [
    ("wait", SEND + "  - wait: ^99999999999999d\n  - id: bye\n    end: true\n"),
    ("wait_3651d", SEND + "  - wait: ^3651d\n  - id: bye\n    end: true\n"),
    ("wait_combined", SEND + "  - wait: ^3000d900d\n  - id: bye\n    end: true\n"),
    ("until_event_timeout", "  - id: w\n    wait: {until_event: purchase, timeout: ^5000000000000000000000d}\n"
                            + SEND),
    ("wait_5000_digits", SEND + "  - wait: ^" + "9" * 5000 + "s\n  - id: bye\n    end: true\n"),
    ("condition_before", "  - id: c\n    if: {last_order_at: {before: ^4000d}}\n    then: end\n" + SEND),
    ("condition_within", "  - id: c\n    if: {signup_at: {within: ^9999999999999999999999999w}}\n    then: end\n"
                         + SEND),
]


@pytest.mark.parametrize(("name", "steps"), DURATIONS, ids=[d[0] for d in DURATIONS])
def test_a_duration_beyond_ten_years_is_reported_not_an_overflow(project: Project, name: str, steps: str) -> None:
    text = HEAD + steps.replace("^", "")
    anchor = next(line for line in steps.splitlines() if "^" in line).strip()
    assert_reported(project, "rules/journeys/hostile.yaml", text, anchor, "must be at most 3650d (10 years)")


@pytest.mark.parametrize(("section", "anchor"), [
    ("goal: {event: purchase, within: 20000d}\n", "within: ^20000d"),
    ("entry: {reentry: 99999999999999999999999999999999d}\n", "reentry: ^9999"),
])
def test_goal_and_reentry_durations_are_bounded_too(project: Project, section: str, anchor: str) -> None:
    text = HEAD.replace("steps:\n", section + "steps:\n") + SEND
    assert_reported(project, "rules/journeys/hostile.yaml", text, anchor, "at most 3650d (10 years)")


def test_ten_years_exactly_is_accepted(project: Project) -> None:
    project.write("rules/journeys/hostile.yaml", HEAD.replace("steps:\n", "entry: {reentry: 3650d}\nsteps:\n")
                  + SEND + "  - wait: 520w\n  - id: c\n    if: {last_order_at: {before: 3650d}}\n    then: end\n")
    outcome = project.cli("validate")
    assert outcome.exit_code == 0, outcome.stdout + outcome.stderr


def test_a_duration_in_the_loyalty_programme_is_bounded(project: Project) -> None:
    text = (REPO / "rules" / "loyalty.yaml").read_text(encoding="utf-8").replace("expire_after: 365d",
                                                                               "expire_after: 99999999999999999d")
    assert_reported(project, "rules/loyalty.yaml", text, "expire_after: ^9999",
                    "points.expire_after must be at most 3650d (10 years)")


@pytest.mark.parametrize("offset", ["400d", "-367d", "99999999999999999999999999999999d", "1" * 5000 + "d"])
def test_a_date_trigger_offset_is_within_a_year(project: Project, offset: str) -> None:
    text = f"journey: hostile\ntrigger: {{date: birthday, offset: {offset}, at: \"10:00\"}}\nsteps:\n" + SEND
    assert_reported(project, "rules/journeys/hostile.yaml", text, f"offset: ^{offset[:3]}",
                    "trigger.offset must be at most 366d either way")


# --------------------------------------------------------------------------- nesting


def nested_nots(levels: int, inner: str = "{tier: gold}") -> str:
    return "{not: " * levels + inner + "}" * levels


def test_a_condition_nested_33_deep_is_reported_where_it_goes_too_deep(project: Project) -> None:
    condition = nested_nots(33)
    text = HEAD + f"  - id: c\n    if: {condition}\n    then: end\n" + SEND
    column = len("    if: ") + len("{not: ") * 32 + 2  # the 33rd not:
    project.write("rules/journeys/hostile.yaml", text)
    outcome = project.cli("validate")
    assert outcome.exit_code == 1
    found = outcome.at("rules/journeys/hostile.yaml", 5, column)
    assert any("steps[0].if must nest all:, any: and not: at most 32 levels deep" in m and "simplify" in m
               for m in found), outcome.stdout
    assert set(SHIPPED) <= set(project.book().journeys)


def test_a_condition_nested_32_deep_is_accepted(project: Project) -> None:
    condition = nested_nots(31, "{all: [{tier: gold}, {points: {gte: 5}}]}")  # 31 not: and an all:
    project.write("rules/journeys/hostile.yaml", HEAD + f"  - id: c\n    if: {condition}\n    then: end\n" + SEND)
    outcome = project.cli("validate")
    assert outcome.exit_code == 0, outcome.stdout + outcome.stderr


def test_deeply_nested_all_and_any_get_the_condition_message_not_the_yaml_one(project: Project) -> None:
    condition = "{all: [" * 20 + "{any: [" * 20 + "{tier: gold}" + "]}" * 40
    text = HEAD + f"  - id: c\n    if: {condition}\n    then: end\n" + SEND
    project.write("rules/journeys/hostile.yaml", text)
    outcome = project.cli("validate")
    assert outcome.exit_code == 1
    assert "must nest all:, any: and not: at most 32 levels deep, got: any: at level 33" in outcome.stdout


@pytest.mark.parametrize("levels", [5_000, 100_000])
def test_yaml_nested_100_000_deep_is_a_clean_problem(project: Project, levels: int) -> None:
    text = HEAD + "  - id: c\n    if: {tier: " + "[" * levels + "]" * levels + "}\n    then: end\n" + SEND
    assert_reported(project, "rules/journeys/hostile.yaml", text, "    if: {tier: " + "[" * 96 + "^[",
                    "lists and mappings must be nested at most 100 levels deep", "flatten")


def test_block_yaml_nested_too_deep_is_a_clean_problem(project: Project) -> None:
    text = HEAD + SEND + "description:\n" + "".join(f"{'  ' * (i + 1)}k{i}:\n" for i in range(150))
    project.write("rules/journeys/hostile.yaml", text)
    outcome = project.cli("validate")
    assert outcome.exit_code == 1
    assert "nested at most 100 levels deep, got: 101 levels here" in outcome.stdout
    assert "Traceback" not in outcome.stdout + outcome.stderr


def test_segments_named_inside_each_other_count_towards_the_depth(project: Project) -> None:
    segments = (REPO / "rules" / "segments.yaml").read_text(encoding="utf-8")
    segments += f"  deep:\n    condition: {nested_nots(20)}\n"
    project.write("rules/segments.yaml", segments)
    text = HEAD + f"  - id: c\n    if: {nested_nots(15, '{segment: deep}')}\n    then: end\n" + SEND
    assert_reported(project, "rules/journeys/hostile.yaml", text, "{segment: ^deep}",
                    "at most 32 levels deep, counting the segments they use, got: 36 levels through segment 'deep'")


@pytest.mark.slow
def test_a_long_chain_of_segments_is_reported_once_where_it_gets_too_deep(project: Project) -> None:
    segments = (REPO / "rules" / "segments.yaml").read_text(encoding="utf-8")
    segments += "".join(f"  s{i}:\n    condition: {{segment: s{i + 1}}}\n" for i in range(2000))
    segments += "  s2000:\n    condition: {tier: gold}\n"
    project.write("rules/segments.yaml", segments)
    journey = HEAD.replace("{event: signup}", "{segment: s0}") + SEND
    project.write("rules/journeys/hostile.yaml", journey)
    outcome = project.cli("validate")
    assert outcome.exit_code == 1
    assert "Traceback" not in outcome.stdout + outcome.stderr
    crossing = [line for line in outcome.stdout.splitlines() if "counting the segments they use" in line]
    assert len(crossing) == 1 and "in segment 's1967'" in crossing[0], crossing
    assert "segment 's0' has problems of its own in rules/segments.yaml" in outcome.stdout
    book = project.book()
    assert "s0" not in book.segments and "s1968" in book.segments
    assert set(SHIPPED) <= set(book.journeys)


def test_segments_in_a_cycle_are_left_out_so_nothing_evaluates_them(project: Project) -> None:
    segments = (REPO / "rules" / "segments.yaml").read_text(encoding="utf-8")
    segments += "  a:\n    condition: {segment: b}\n  b:\n    condition: {not: {segment: a}}\n"
    project.write("rules/segments.yaml", segments)
    text = HEAD.replace("{event: signup}", "{segment: a}") + SEND
    assert_reported(project, "rules/journeys/hostile.yaml", text, "{segment: ^a}",
                    "segment 'a' has problems of its own in rules/segments.yaml")
    assert "segments refer to each other in a cycle: a → b → a" in project.cli("validate").stdout


# --------------------------------------------------------------------------- aliases and size


BILLION_LAUGHS = "".join(
    f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 10 if i else ['"lol"'] * 10) + "]\n" for i in range(10))


def test_a_billion_laughs_file_is_refused_at_the_alias_that_crosses_the_budget(project: Project) -> None:
    text = HEAD + SEND + BILLION_LAUGHS
    assert_reported(project, "rules/journeys/hostile.yaml", text, "l4: &l4 [*l3,*l3,*l3,*l3,*l3,*l3,*l3,^*l3,",
                    "at most 100,000 values", "counting an alias (*name) as every value it repeats",
                    "write the values out or split the file")


def test_a_billion_laughs_segments_file_is_refused_too(project: Project) -> None:
    text = "segments:\n  x:\n    condition: {tier: gold}\n" + BILLION_LAUGHS
    project.write("rules/segments.yaml", text)
    outcome = project.cli("validate")
    assert outcome.exit_code == 1
    assert "rules/segments.yaml:" in outcome.stdout and "at most 100,000 values" in outcome.stdout


def test_an_alias_inside_what_it_names_is_refused(project: Project) -> None:
    text = HEAD + SEND + "description: &loop [a, *loop]\n"
    assert_reported(project, "rules/journeys/hostile.yaml", text, "[a, ^*loop]", "would repeat forever")


def test_aliases_still_work_within_the_budget(project: Project) -> None:
    text = HEAD.replace("{event: signup}", "{event: signup, where: &gold {tier: gold}}") + SEND + \
        "  - id: c\n    if: *gold\n    then: end\n"
    project.write("rules/journeys/hostile.yaml", text)
    outcome = project.cli("validate")
    assert outcome.exit_code == 0, outcome.stdout + outcome.stderr


def test_an_alias_that_nests_too_deep_once_expanded_is_refused(project: Project) -> None:
    deep = "[" * 60 + "1" + "]" * 60
    text = HEAD + SEND + f"description: &deep {deep}\nname: " + "[" * 50 + "*deep" + "]" * 50 + "\n"
    assert_reported(project, "rules/journeys/hostile.yaml", text, "name: " + "[" * 50 + "^*deep",
                    "nested at most 100 levels deep, got: 111 levels here once the alias *deep is expanded")


def test_a_file_over_one_mebibyte_is_refused_before_it_is_parsed(project: Project) -> None:
    text = HEAD + SEND + "# " + "x" * (1024 * 1024) + "\n"
    assert_reported(project, "rules/journeys/hostile.yaml", text, "^journey: hostile",
                    "a rules file must be at most 1,024 KiB", "split it into smaller files")


def test_a_folder_named_like_a_journey_is_a_problem_not_a_crash(project: Project) -> None:
    (project.rules / "journeys" / "folder.yaml").mkdir()
    outcome = project.cli("validate")
    assert outcome.exit_code == 1
    assert any("the file could not be read" in m for m in outcome.at("rules/journeys/folder.yaml", 1, 1)), \
        outcome.stdout
    assert "Traceback" not in outcome.stdout + outcome.stderr


@pytest.mark.slow
def test_too_many_values_without_aliases_is_refused(project: Project) -> None:
    text = HEAD + SEND + "description: [" + ",".join(["1"] * 100_001) + "]\n"
    project.write("rules/journeys/hostile.yaml", text)
    outcome = project.cli("validate")
    assert outcome.exit_code == 1
    assert "a file may hold at most 100,000 values, and this one has more; split the file" in outcome.stdout


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(("steps", "anchor", "words"), [
    ("  - id: c\n    if: {points: {gt: 9223372036854775808}}\n    then: end\n" + SEND,
     "gt: ^9223372036854775808", ["whole numbers must be between", "(64 bits)", "got: 9223372036854775808"]),
    ("  - id: c\n    if: {points: {gt: " + "9" * 5000 + "}}\n    then: end\n" + SEND,
     "gt: ^9999", ["(64 bits)", "(5,000 characters)"]),
    ("  - id: c\n    if: {attributes.score: {lt: 1.0e999}}\n    then: end\n" + SEND,
     "lt: ^1.0e999", ["number 1.0e999 is too large to store", "infinite"]),
    ("  - id: u\n    update: {points: 1000000001}\n", "points: ^1000000001",
     ["update.points must be between -1,000,000,000 and 1,000,000,000, got: 1,000,000,001"]),
    ("  - id: u\n    update: {points: -99999999999999999999}\n", "points: ^-9999", ["(64 bits)"]),
    ("  - id: s\n    split: [{variant: a, weight: 100}]\n    holdout: 99999999999999999999999\n" + SEND,
     "holdout: ^9999", ["(64 bits)"]),
])
def test_numbers_too_large_for_the_database_are_reported(project: Project, steps: str, anchor: str,
                                                         words: list[str]) -> None:
    assert_reported(project, "rules/journeys/hostile.yaml", HEAD + steps, anchor, *words)


def test_max_per_day_beyond_64_bits_is_reported(project: Project) -> None:
    text = HEAD.replace("steps:\n", "entry: {max_per_day: 18446744073709551616}\nsteps:\n") + SEND
    assert_reported(project, "rules/journeys/hostile.yaml", text, "max_per_day: ^1844", "(64 bits)")


def test_points_earned_per_event_are_bounded(project: Project) -> None:
    text = (REPO / "rules" / "loyalty.yaml").read_text(encoding="utf-8").replace("check_in: 5", "check_in: 5000000000")
    assert_reported(project, "rules/loyalty.yaml", text, "^check_in: 5000000000",
                    "check_in must earn a whole number of points from 1 to 1,000,000,000")


# --------------------------------------------------------------------------- lengths that reach VARCHAR columns

LONG = "x" * 65


@pytest.mark.parametrize(("text", "anchor", "words"), [
    (f"journey: {LONG}\ntrigger: {{event: signup}}\nsteps:\n" + SEND, f"journey: ^{LONG}",
     ["journey id must be at most 64 characters", "got: 65 characters"]),
    (HEAD + f"  - id: {LONG}\n    send: email\n    template: welcome/welcome_email\n", f"id: ^{LONG}",
     ["steps[0].id must be at most 64 characters"]),
    (HEAD + f"  - id: s\n    split: [{{variant: {LONG}, weight: 100}}]\n" + SEND, f"variant: ^{LONG}",
     ["steps[0].split[0].variant must be at most 64 characters"]),
    (HEAD.replace("signup", "e" * 65) + SEND, "event: ^eee", ["trigger.event must be at most 64 characters"]),
    (HEAD + f"  - id: w\n    wait: {{until_event: {LONG}, timeout: 3d}}\n" + SEND, f"until_event: ^{LONG}",
     ["steps[0].wait.until_event must be at most 64 characters"]),
    (HEAD + "  - id: hello\n    send: email\n    template: welcome/" + "w" * 200 + "\n", "template: ^welcome/",
     ["steps[0].template must be at most 200 characters"]),
    (HEAD + "  - id: u\n    update: {tier: " + "t" * 33 + "}\n", "tier: ^ttt",
     ["steps[0].update.tier must be at most 32 characters"]),
])
def test_names_longer_than_their_database_column_are_reported(project: Project, text: str, anchor: str,
                                                               words: list[str]) -> None:
    assert_reported(project, "rules/journeys/hostile.yaml", text, anchor, *words)


def test_a_tier_id_longer_than_its_column_is_reported(project: Project) -> None:
    text = (REPO / "rules" / "loyalty.yaml").read_text(encoding="utf-8").replace("id: diamond", "id: " + "d" * 33)
    assert_reported(project, "rules/loyalty.yaml", text, "id: ^ddd", "tiers[3].id must be at most 32 characters")


# --------------------------------------------------------------------------- loops and large journeys


def big_journey(steps: int) -> str:
    lines = [HEAD.rstrip("\n")]
    for i in range(steps):
        if i % 3 == 0:
            lines += [f"  - id: s{i}", "    send: email", "    template: welcome/welcome_email"]
        elif i % 3 == 1:
            lines += [f"  - id: s{i}", "    wait: 1d"]
        else:
            lines += [f"  - id: s{i}", "    if: {tier: gold}", "    then: end",
                      f"    else: s{i + 1}" if i + 1 < steps else "    else: end"]
    return "\n".join(lines) + "\n"


@pytest.mark.slow
def test_a_3000_step_journey_validates(project: Project) -> None:
    project.write("rules/journeys/hostile.yaml", big_journey(3000))
    outcome = project.cli("validate")
    assert outcome.exit_code == 0, outcome.stdout + outcome.stderr
    assert project.book().journeys["hostile"].steps[-1].id == "s2999"


@pytest.mark.slow
def test_a_loop_without_a_wait_through_3000_steps_is_found(project: Project) -> None:
    steps = [f"  - id: s{i}\n    if: {{tier: gold}}\n    then: s{(i + 1) % 3000}\n    else: end\n" for i in range(3000)]
    text = HEAD + "".join(steps)
    project.write("rules/journeys/hostile.yaml", text)
    outcome = project.cli("validate")
    assert outcome.exit_code == 1
    assert outcome.at("rules/journeys/hostile.yaml", 4, 5) == [
        "steps loop back to 's0' without a wait: add a wait step inside the loop"], outcome.stdout[:2000]


def test_two_separate_loops_are_each_reported_once(project: Project) -> None:
    text = HEAD + (
        "  - id: a\n    if: {tier: gold}\n    then: b\n    else: c\n"
        "  - id: b\n    if: {tier: gold}\n    then: a\n    else: c\n"
        "  - id: c\n    if: {tier: gold}\n    then: c\n    else: d\n"
        "  - id: d\n    send: email\n    template: welcome/welcome_email\n"
        "  - wait: 1d\n  - id: e\n    if: {tier: gold}\n    then: d\n    else: end\n")
    project.write("rules/journeys/hostile.yaml", text)
    outcome = project.cli("validate")
    loops = [line for line in outcome.stdout.splitlines() if "without a wait" in line]
    assert [line.split(": ", 1)[0] for line in loops] == [
        f"rules/journeys/hostile.yaml:{locate(text, '- ^id: a')[0]}:5",
        f"rules/journeys/hostile.yaml:{locate(text, '- ^id: c')[0]}:5"], outcome.stdout


def test_only_the_first_50_mistakes_of_a_file_get_a_suggestion(project: Project) -> None:
    """"Did you mean" compares with every step id; thousands of wrong names must not cost steps x mistakes."""
    steps = [f"  - id: step_{i}\n    if: {{tier: gold}}\n    then: stpe_{i + 1}\n    else: end\n" for i in range(60)]
    project.write("rules/journeys/hostile.yaml", HEAD + "".join(steps) + "  - id: step_60\n    end: true\n")
    outcome = project.cli("validate")
    wrong = [line for line in outcome.stdout.splitlines() if "which does not exist" in line]
    assert len(wrong) == 60
    assert [("did you mean 'step_" in line) for line in wrong] == [True] * 50 + [False] * 10


def test_durations_in_config_yaml_are_bounded(project: Project) -> None:
    (project.root / "config.yaml").write_text(
        f"templates_dir: {REPO / 'templates'}\nscheduler: {{trigger_window: 99999999999999d}}\n"
        "frequency_caps:\n  - {channel: any, max: 3, per: 4000d}\n", encoding="utf-8")
    outcome = project.cli("validate")
    assert outcome.exit_code == 1
    assert "Traceback" not in outcome.stdout + outcome.stderr
    assert outcome.stdout.count("must be at most 3650d (10 years)") == 2, outcome.stdout


# --------------------------------------------------------------------------- the catch-all


def test_a_bug_met_while_checking_one_journey_is_reported_for_that_file_only(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    def buggy(data: object, problems: Problems, source: str = "", **kwargs: bool) -> Journey | None:
        if source.endswith("hostile.yaml"):
            raise KeyError("boom")
        return parse_journey(data, problems, source, **kwargs)

    monkeypatch.setattr("engine.rules.rulebook.parse_journey", buggy)
    project.write("rules/journeys/hostile.yaml", HEAD + SEND)
    outcome = project.cli("validate")
    assert outcome.exit_code == 1
    assert outcome.at("rules/journeys/hostile.yaml", 1, 1) == [
        "this file could not be checked: KeyError: 'boom'; this is a bug in the engine — please report it"]
    assert "Traceback" not in outcome.stdout and "Traceback" not in outcome.stderr
    # The traceback is not lost: `--debug` shows it, for the bug report.
    debugged = project.cli("--debug", "validate")
    assert "hostile.yaml could not be checked\nTraceback" in debugged.stderr and "KeyError: 'boom'" in debugged.stderr
    book = project.book()
    assert set(SHIPPED) <= set(book.journeys) and "hostile" not in book.journeys
    assert any(f.endswith("hostile.yaml") for f in book.broken_files)


@pytest.mark.parametrize(("target", "file"), [("parse_segments", "segments.yaml"),
                                              ("_load_loyalty", "loyalty.yaml")])
def test_a_bug_met_while_checking_segments_or_loyalty_is_a_problem_not_a_crash(
    project: Project, monkeypatch: pytest.MonkeyPatch, target: str, file: str
) -> None:
    def buggy(*args: object) -> object:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(rulebook, target, buggy)
    outcome = project.cli("validate")
    assert outcome.exit_code == 1
    assert any("could not be checked: RecursionError" in m and "please report it" in m
               for m in outcome.at(f"rules/{file}", 1, 1)), outcome.stdout
    assert "Traceback" not in outcome.stdout


# --------------------------------------------------------------------------- the daemon's tick


MEMBERS = """id,name,email,timezone,locale,total_spend,last_order_at,email_opt_in
c1,王芳,wang@example.com,Asia/Shanghai,zh-CN,1200,2025-12-01T00:00:00Z,true
"""


def test_tick_runs_the_good_journeys_beside_hostile_files(project: Project) -> None:
    project.write("rules/journeys/laughs.yaml", HEAD + SEND + BILLION_LAUGHS)
    project.write("rules/journeys/forever.yaml", HEAD.replace("hostile", "forever") + SEND
                  + "  - wait: 99999999999999d\n")
    project.write("rules/journeys/deep.yaml", HEAD.replace("hostile", "deep")
                  + "  - id: c\n    if: " + nested_nots(2000) + "\n    then: end\n")
    project.write("members.csv", MEMBERS)
    assert project.cli("import", "members", "members.csv").exit_code == 0
    outcome = project.cli("tick", "--now", "2026-03-02T12:00:00+08:00")
    assert outcome.exit_code == 0, outcome.stdout + outcome.stderr
    assert "Traceback" not in outcome.stdout + outcome.stderr
    for name in ("laughs", "forever", "deep"):
        assert f"warning: rules/journeys/{name}.yaml:" in outcome.stderr or \
            f"warning: {project.root}/rules/journeys/{name}.yaml:" in outcome.stderr, outcome.stderr
    assert "enrolled=1" in outcome.stdout  # the shipped win-back journey still ran for the lapsed member


# --------------------------------------------------------------------------- stored versions


def test_a_stored_version_valid_before_the_limits_still_loads() -> None:
    """Journey versions already in the database keep running: the new limits apply to files, not to them."""
    long_id = "s" * 70
    definition = {
        "journey": {
            "journey": "old", "trigger": {"date": "birthday", "offset": "-400d", "at": "10:00"},
            "entry": {"reentry": "5000d"},
            "steps": [
                {"id": long_id, "if": {"not": _nested_plain(40)}, "then": "u"},
                {"id": "u", "update": {"points": 5_000_000_000}},
                {"wait": "20000d"},
            ],
        },
        "segments": {"deep": _nested_plain(40)},
    }
    journey = journey_from_definition(definition, "rules/journeys/old.yaml")
    assert journey.steps[0].id == long_id and journey.trigger.offset_days == -400  # type: ignore[union-attr]


def _nested_plain(levels: int) -> dict[str, object]:
    condition: dict[str, object] = {"tier": "gold"}
    for _ in range(levels):
        condition = {"not": condition}
    return condition
