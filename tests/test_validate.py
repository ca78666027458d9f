"""`run.py validate` as a marketer meets it: each mistake is reported as FILE:LINE:COL with the fix, exit 1.

Every test runs the real CLI on a throwaway copy of rules/ (the repository is never touched). Broken files
live in tests/fixtures/broken/, one mistake each; expected positions are computed from the fixture text, so
editing a fixture cannot silently leave a test checking the wrong line.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.cli.main import main
from engine.rules.yamlsrc import load_yaml

REPO = Path(__file__).resolve().parent.parent
SHIPPED_JOURNEYS = len(list((REPO / "rules" / "journeys").glob("*.yaml")))
FIXTURES = Path(__file__).resolve().parent / "fixtures"
BROKEN = FIXTURES / "broken"
VALID = FIXTURES / "valid"
PROBLEM = re.compile(r"^(?P<file>\S[^:]*):(?P<line>\d+):(?P<col>\d+): (?P<message>.+)$")


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Project:
    """A folder holding config.yaml and a copy of the shipped rules/; it is the working directory."""

    root: Path
    config: Path

    @property
    def rules(self) -> Path:
        return self.root / "rules"

    @property
    def templates(self) -> Path:
        return self.root / "templates"


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def problems(self) -> list[str]:
        """The FILE:LINE:COL lines, in the order printed (syntax-error context lines left out)."""
        return [line for line in self.stdout.splitlines() if PROBLEM.match(line)]

    def at(self, shown: str, line: int, col: int) -> list[str]:
        prefix = f"{shown}:{line}:{col}: "
        return [p.removeprefix(prefix) for p in self.problems if p.startswith(prefix)]


def write_config(root: Path, templates_dir: Path | str) -> Path:
    config = root / "config.yaml"
    config.write_text(f"rules_dir: rules\ntemplates_dir: {templates_dir}\n", encoding="utf-8")
    return config


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Project:
    shutil.copytree(REPO / "rules", tmp_path / "rules")
    monkeypatch.chdir(tmp_path)
    return Project(tmp_path, write_config(tmp_path, REPO / "templates"))


@pytest.fixture
def own_templates(project: Project) -> Project:
    """The project with its own copy of templates/, for tests that break a template."""
    shutil.copytree(REPO / "templates", project.templates)
    write_config(project.root, "templates")
    return project


def validate(project: Project, *paths: Path | str) -> Outcome:
    result = CliRunner().invoke(main, ["--config", str(project.config), "validate", *map(str, paths)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return Outcome(result.exit_code, result.stdout, result.stderr)


def positions(outcome: Outcome) -> list[tuple[str, int, int]]:
    """(file, line, column) of each problem, in the order printed."""
    found = []
    for problem in outcome.problems:
        match = PROBLEM.match(problem)
        assert match is not None
        found.append((match["file"], int(match["line"]), int(match["col"])))
    return found


def locate(path: Path, anchor: str, occurrence: int = 1) -> tuple[int, int]:
    """Line and column of ANCHOR in PATH; a ^ inside ANCHOR marks the exact column (``status: ^no``).

    Comment lines are skipped: the fixtures explain their mistake in a comment that may quote it.
    """
    before, caret, after = anchor.partition("^")
    needle = before + after if caret else anchor
    offset = len(before) if caret else 0
    seen = 0
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if needle in text and not text.lstrip().startswith("#"):
            seen += 1
            if seen == occurrence:
                return number, text.index(needle) + offset + 1
    raise AssertionError(f"{anchor!r} (occurrence {occurrence}) not in {path}")


def assert_one_problem(outcome: Outcome, shown: str, line: int, col: int, *words: str) -> str:
    """Exit 1, exactly one problem, at SHOWN:LINE:COL, mentioning every one of WORDS."""
    assert outcome.exit_code == 1, outcome.stdout + outcome.stderr
    assert len(outcome.problems) == 1, outcome.stdout
    return assert_problem(outcome, shown, line, col, *words)


def assert_problem(outcome: Outcome, shown: str, line: int, col: int, *words: str) -> str:
    found = outcome.at(shown, line, col)
    assert found, f"nothing reported at {shown}:{line}:{col}; got:\n{outcome.stdout}"
    matching = [message for message in found if all(word in message for word in words)]
    assert matching, f"{found} does not mention all of {words}"
    return matching[0]


def install(project: Project, fixture: str, target: str) -> Path:
    """Put a broken fixture in the project's rules (e.g. as rules/segments.yaml)."""
    path = project.root / target
    shutil.copyfile(BROKEN / fixture, path)
    return path


# --------------------------------------------------------------------------- the shipped rules


def test_the_shipped_rules_and_templates_are_valid(project: Project) -> None:
    outcome = validate(project)
    assert outcome.exit_code == 0, outcome.stdout + outcome.stderr
    assert outcome.problems == []
    assert outcome.stdout.startswith(f"ok: {SHIPPED_JOURNEYS} journeys, ")


def test_each_shipped_file_is_valid_on_its_own(project: Project) -> None:
    files = [*sorted((project.rules / "journeys").glob("*.yaml")), project.rules / "segments.yaml",
             project.rules / "loyalty.yaml", REPO / "templates"]
    outcome = validate(project, *files)
    assert outcome.exit_code == 0, outcome.stdout + outcome.stderr


def test_a_path_that_does_not_exist_is_an_error(project: Project) -> None:
    outcome = validate(project, "rules/journeys/welcom.yaml")
    assert outcome.exit_code == 1
    assert "rules/journeys/welcom.yaml: no such file or folder" in outcome.stderr


# --------------------------------------------------------------------------- one mistake per journey file

# (fixture, where the problem is: text in the fixture with ^ at the reported column, words the message must hold)
JOURNEY_MISTAKES = [
    ("unknown_key_did_you_mean.yaml", "^templte:", ["unknown key 'templte' in steps[0]", "did you mean 'template'?"]),
    ("bad_duration.yaml", "wait: ^3 days", ["steps[1].wait", "'3 days'", "e.g. 30m, 12h, 7d, 2w"]),
    ("then_points_nowhere.yaml", "then: ^welcom_sms",
     ["steps[1].then names step 'welcom_sms', which does not exist", "did you mean 'welcome_sms'?"]),
    ("unreachable_step.yaml", "- ^id: orphan", ["step 'orphan' can never be reached", "delete it, or point a then:"]),
    ("unknown_template.yaml", "template: ^welcome/welcom_email",
     ["template 'welcome/welcom_email' not found", "templates/zh-CN/welcome/welcom_email.text.j2",
      "did you mean 'welcome/welcome_email'?"]),
    ("unknown_segment.yaml", "segment: ^lapsed_06d",
     ["unknown segment 'lapsed_06d'", "did you mean 'lapsed_60d'?", "rules/segments.yaml"]),
    ("unknown_channel.yaml", "send: ^wechat", ["steps[0].send must be email or sms", "got: 'wechat'"]),
    ("wrong_type_channel.yaml", "send: ^[email, sms]",
     ["steps[0].send must be email or sms", "one channel per step", "fallback:"]),
    ("wait_loop_without_wait.yaml", "- ^id: hello", ["loop back to 'hello' without a wait", "add a wait step"]),
    ("send_step_without_id.yaml", "- ^send: email", ["steps[0] needs an id", "id: first_touch"]),
    ("send_step_without_template.yaml", "send: ^email", ["steps[0] needs template:", "welcome/welcome_email"]),
    ("two_triggers.yaml", "^segment: lapsed_60d",
     ["trigger must have exactly one of event:, segment: or date:", "found event, segment", "keep one"]),
    ("bad_at_time.yaml", 'at: ^"25:00"', ["trigger.at", "24-hour time", '"10:00"', "got: '25:00'"]),
    ("unknown_attribute.yaml", "{^tire: gold}",
     ["unknown attribute 'tire'", "did you mean 'tier'?", "attributes.NAME"]),
    ("before_on_a_number.yaml", "before: ^30d",
     ["trigger.segment.points.before", "only applies to dates and times", "not to points", "gt, gte, lt or lte"]),
    ("event_property_in_segment.yaml", "{^event.amount",
     ["'event.amount' is a property of the triggering event", "trigger.segment cannot use", "where:"]),
    ("yes_instead_of_true.yaml", "sms_opt_in: ^yes", ["trigger.segment.sms_opt_in must be true or false", "'yes'"]),
    ("status_no.yaml", "status: ^no", ["status must be one of active, paused, draft", "got: 'no'"]),
    ("reentry_no.yaml", "reentry: ^no", ["entry.reentry must be never, always or a cooldown such as 180d", "'no'"]),
    ("misspelt_step_kind.yaml", "^sendd:",
     ["exactly one of send:, wait:, if:, split:, update:, end:", "did you mean 'send'?"]),
    ("bad_journey_id.yaml", "journey: ^Welcome-Series", ["only a-z, 0-9 and _", "for example 'welcome_series'"]),
    ("duplicate_step_id.yaml", "{id: ^hello", ["step id 'hello' is used twice", "steps[0]", "its own id"]),
    ("fallback_same_channel.yaml", "fallback: ^email", ["steps[0].fallback must be the other channel"]),
    ("end_with_a_value.yaml", "end: ^now", ["steps[1].end takes no value", "- end: true"]),
    ("goal_within_zero.yaml", "within: ^0d", ["goal.within", "longer than zero"]),
    ("in_on_a_date.yaml", "in: ^[",
     ["trigger.segment.birthday.in", "'in' does not apply to dates", "before or within"]),
    ("missing_trigger.yaml", "^journey: missing_trigger", ["missing 'trigger'", "event:, segment: or date:"]),
    ("octal_looking_time.yaml", "at: ^0800", ["trigger.at", "got: '0800'", '"10:00"']),
]


@pytest.mark.parametrize(("fixture", "anchor", "words"), JOURNEY_MISTAKES, ids=[c[0] for c in JOURNEY_MISTAKES])
def test_a_journey_mistake_is_reported_where_it_is_with_the_fix(
    project: Project, fixture: str, anchor: str, words: list[str]
) -> None:
    path = BROKEN / fixture
    line, col = locate(path, anchor)
    outcome = validate(project, path)
    assert_one_problem(outcome, str(path), line, col, *words)
    assert outcome.stderr.strip().endswith("1 problem(s) found")


def test_every_broken_fixture_is_used_by_a_test() -> None:
    """A fixture added to the corpus without a test would check nothing."""
    used = {c[0] for c in [*JOURNEY_MISTAKES, *SYNTAX_MISTAKES, *SEGMENT_MISTAKES, *LOYALTY_MISTAKES,
                           *TEMPLATE_MISTAKES]} | set(OTHER_FIXTURES)
    on_disk = {p.relative_to(BROKEN).as_posix().removeprefix("templates/") for p in BROKEN.rglob("*.*")}
    assert on_disk == used


OTHER_FIXTURES = (
    "config_passed_as_a_journey.yaml", "duplicate_key.yaml", "empty_journey.yaml", "gbk_encoded.yaml",
    "journey_id_taken.yaml", "three_mistakes.yaml", "mistakes_in_every_check.yaml",
    "segments_broken_segment_in_use.yaml", "loyalty_two_mistakes.yaml",
)


def test_a_problem_names_the_file_as_the_user_wrote_it(project: Project) -> None:
    """A file under the working directory is shown relative to it, as the marketer typed it."""
    shutil.copyfile(BROKEN / "bad_duration.yaml", project.root / "draft.yaml")
    line, col = locate(project.root / "draft.yaml", "wait: ^3 days")
    outcome = validate(project, "draft.yaml")
    assert_one_problem(outcome, "draft.yaml", line, col, "steps[1].wait")


def test_a_broken_journey_in_the_rules_folder_is_found_without_naming_it(project: Project) -> None:
    install(project, "unknown_channel.yaml", "rules/journeys/unknown_channel.yaml")
    line, col = locate(project.rules / "journeys" / "unknown_channel.yaml", "send: ^wechat")
    outcome = validate(project)
    assert_one_problem(outcome, "rules/journeys/unknown_channel.yaml", line, col, "must be email or sms")


# --------------------------------------------------------------------------- YAML syntax and surprises


SYNTAX_MISTAKES = [
    ("yaml_syntax_error.yaml", "     template^:", ["YAML syntax error", "check indentation"]),
    ("unclosed_quote.yaml", 'name: ^"', ["quote opened here is never closed", "add the closing quote"]),
    ("full_width_colon.yaml", "^send：email", ["not a `key: value` pair", "English colon ':'", "'：'"]),
    ("missing_space_after_colon.yaml", "^send:email", ["not a `key: value` pair", "put a space after ':'"]),
    ("tab_indentation.yaml", "^\tevent", ["tab characters", "indent with spaces"]),
]


@pytest.mark.parametrize(("fixture", "anchor", "words"), SYNTAX_MISTAKES, ids=[c[0] for c in SYNTAX_MISTAKES])
def test_a_yaml_syntax_error_points_at_the_line_to_fix_and_shows_it(
    project: Project, fixture: str, anchor: str, words: list[str]
) -> None:
    path = BROKEN / fixture
    line, col = locate(path, anchor)
    outcome = validate(project, path)
    assert_one_problem(outcome, str(path), line, col, *words)
    bad_line = path.read_text(encoding="utf-8").splitlines()[line - 1]
    assert f">{line:5d} | {bad_line}" in outcome.stdout  # the offending line, shown with its number


def test_a_duplicate_key_names_both_lines(project: Project) -> None:
    path = BROKEN / "duplicate_key.yaml"
    first, _ = locate(path, "send: email")
    line, col = locate(path, "^send: sms")
    outcome = validate(project, path)
    assert_one_problem(outcome, str(path), line, col, "duplicate key 'send'", f"first given on line {first}",
                       "keep only one")


def test_a_file_not_saved_as_utf8_is_reported_not_a_crash(project: Project) -> None:
    path = BROKEN / "gbk_encoded.yaml"
    outcome = validate(project, path)
    assert_one_problem(outcome, str(path), 1, 1, "not UTF-8", "save it as UTF-8")


def test_an_empty_journey_file_is_reported_not_passed(project: Project) -> None:
    """A file of comments only would otherwise validate as "ok" and then never run."""
    path = BROKEN / "empty_journey.yaml"
    outcome = validate(project, path)
    assert_one_problem(outcome, str(path), 1, 1, "the file is empty", "journey:, trigger: and steps:")


def test_an_unquoted_time_is_still_a_time(project: Project) -> None:
    """`at: 10:00` without quotes: YAML 1.1 would read 600 (sexagesimal); here it stays 10:00."""
    outcome = validate(project, VALID / "unquoted_time.yaml")
    assert outcome.exit_code == 0, outcome.stdout
    assert outcome.stdout.startswith(f"ok: {SHIPPED_JOURNEYS + 1} journeys")


def test_date_looking_values_stay_text(project: Project) -> None:
    """A name, an event property and a date test written as 2026-01-01 are not turned into date objects."""
    outcome = validate(project, VALID / "date_looking_values.yaml")
    assert outcome.exit_code == 0, outcome.stdout
    assert outcome.stdout.startswith(f"ok: {SHIPPED_JOURNEYS + 1} journeys")


def test_no_is_not_read_as_false(project: Project) -> None:
    """YAML 1.1 reads `status: no` as false; the message must quote what the marketer wrote."""
    path = BROKEN / "status_no.yaml"
    outcome = validate(project, path)
    line, col = locate(path, "status: ^no")
    message = assert_one_problem(outcome, str(path), line, col, "active, paused, draft")
    assert "False" not in message


# --------------------------------------------------------------------------- several mistakes at once


def test_three_mistakes_are_all_reported_each_on_its_line(project: Project) -> None:
    path = BROKEN / "three_mistakes.yaml"
    expected = [
        (*locate(path, "template: ^welcome/welcome_emial"), "did you mean 'welcome/welcome_email'?"),
        (*locate(path, "wait: ^2 days"), "steps[1].wait"),
        (*locate(path, "then: ^coupon_email"), "did you mean 'coupon'?"),
    ]
    outcome = validate(project, path)
    assert outcome.exit_code == 1
    assert len(outcome.problems) == 3, outcome.stdout
    assert len({line for line, _, _ in expected}) == 3
    for line, col, words in expected:
        assert_problem(outcome, str(path), line, col, words)
    assert outcome.stderr.strip().endswith("3 problem(s) found")


def test_a_mistake_of_each_kind_does_not_hide_the_others(project: Project) -> None:
    """A bad value, a jump to nowhere, an unknown segment and an unknown template, all in one run."""
    path = BROKEN / "mistakes_in_every_check.yaml"
    expected = [
        (*locate(path, "status: ^live"), "status must be one of"),
        (*locate(path, "segment: ^lapsed_6od"), "did you mean 'lapsed_60d'?"),
        (*locate(path, "template: ^winback/frist_touch"), "did you mean 'winback/first_touch'?"),
        (*locate(path, "then: ^sms_ofer"), "did you mean 'sms_offer'?"),
    ]
    outcome = validate(project, path)
    assert outcome.exit_code == 1
    assert positions(outcome) == [(str(path), line, col) for line, col, _ in expected]  # all four, in line order
    for line, col, words in expected:
        assert_problem(outcome, str(path), line, col, words)


def test_a_journey_id_used_twice_names_the_other_file(project: Project) -> None:
    path = BROKEN / "journey_id_taken.yaml"
    line, col = locate(path, "journey: ^welcome")
    outcome = validate(project, path)
    assert_one_problem(outcome, str(path), line, col, "journey id 'welcome' is also used by",
                       str(project.rules / "journeys" / "welcome.yaml"), "its own id")


# --------------------------------------------------------------------------- rules/segments.yaml


SEGMENT_MISTAKES = [
    ("segments_unknown_reference.yaml", "segment: ^high_valu",
     ["in segment 'high_value_lapsed'", "unknown segment 'high_valu'", "did you mean 'high_value'?"]),
    ("segments_cycle.yaml", "^vip_a:", ["cycle: vip_a → vip_b → vip_a", "remove one of these segment: references"]),
    ("segments_without_condition.yaml", "^big_spenders:", ["segment 'big_spenders' has no condition:", "add one"]),
    ("segments_unknown_key.yaml", "^condtion:", ["unknown key 'condtion'", "did you mean 'condition'?"]),
]


@pytest.mark.parametrize(("fixture", "anchor", "words"), SEGMENT_MISTAKES, ids=[c[0] for c in SEGMENT_MISTAKES])
def test_a_segments_mistake_is_reported_in_segments_yaml(
    project: Project, fixture: str, anchor: str, words: list[str]
) -> None:
    path = install(project, fixture, "rules/segments.yaml")
    line, col = locate(path, anchor)
    outcome = validate(project, "rules/segments.yaml")
    assert_one_problem(outcome, "rules/segments.yaml", line, col, *words)


def test_a_journey_using_a_broken_segment_is_told_to_fix_the_segment(project: Project) -> None:
    """Not "unknown segment": it exists, it is just wrong; and the segment's own mistake is reported too."""
    segments = install(project, "segments_broken_segment_in_use.yaml", "rules/segments.yaml")
    winback = project.rules / "journeys" / "winback.yaml"
    outcome = validate(project)
    assert outcome.exit_code == 1
    assert len(outcome.problems) == 2, outcome.stdout
    assert_problem(outcome, "rules/segments.yaml", *locate(segments, "^last_ordr_at"),
                   "unknown attribute 'last_ordr_at'", "did you mean 'last_order_at'?")
    message = assert_problem(outcome, "rules/journeys/winback.yaml", *locate(winback, "segment: ^lapsed_60d"),
                             "segment 'lapsed_60d' has problems of its own in rules/segments.yaml")
    assert "unknown segment" not in message


@pytest.mark.parametrize(("fixture", "anchor", "words"), [
    ("segments_cycle.yaml", "^segments:", ["holds segments, not a journey", "rules/segments.yaml"]),
    ("loyalty_unknown_key.yaml", "^tiers:", ["holds loyalty tiers, not a journey", "rules/loyalty.yaml"]),
    ("config_passed_as_a_journey.yaml", "^database:", ["looks like a config.yaml", "--config FILE validate"]),
], ids=["segments", "loyalty", "config"])
def test_a_file_of_another_kind_passed_as_a_journey_gets_one_clear_message(
    project: Project, fixture: str, anchor: str, words: list[str]
) -> None:
    path = BROKEN / fixture
    outcome = validate(project, path)
    assert_one_problem(outcome, str(path), *locate(path, anchor), *words)


# --------------------------------------------------------------------------- rules/loyalty.yaml


LOYALTY_MISTAKES = [
    ("loyalty_thresholds_go_down.yaml", "min_spend: ^2000", 1,
     ["tiers[2].min_spend must be higher than the tier before it", "silver: 5000", "got: 2000",
      "lowest to highest"]),
    ("loyalty_first_tier_not_zero.yaml", "min_spend: ^100", 1, ["first (lowest) tier must have min_spend: 0"]),
    ("loyalty_duplicate_tier_id.yaml", "id: ^silver", 2, ["tier id 'silver' is used twice", "its own id"]),
    ("loyalty_unknown_key.yaml", "^pionts:", 1, ["unknown key 'pionts'", "did you mean 'points'?"]),
    ("loyalty_discount_as_zhe.yaml", "discount: ^8", 1,
     ["tiers[1].discount must be a number between 0.01 and 1.0", "0.8 means 8折", "got: 8"]),
]


@pytest.mark.parametrize(("fixture", "anchor", "occurrence", "words"), LOYALTY_MISTAKES,
                         ids=[c[0] for c in LOYALTY_MISTAKES])
def test_a_loyalty_mistake_is_reported_in_loyalty_yaml(
    project: Project, fixture: str, anchor: str, occurrence: int, words: list[str]
) -> None:
    path = install(project, fixture, "rules/loyalty.yaml")
    line, col = locate(path, anchor, occurrence)
    outcome = validate(project, "rules/loyalty.yaml")
    assert_one_problem(outcome, "rules/loyalty.yaml", line, col, *words)


def test_an_empty_loyalty_file_is_reported_not_silently_replaced_by_defaults(project: Project) -> None:
    (project.rules / "loyalty.yaml").write_text("# tiers to follow\n", encoding="utf-8")
    outcome = validate(project, "rules/loyalty.yaml")
    assert_one_problem(outcome, "rules/loyalty.yaml", 1, 1, "loyalty.yaml is empty", "tiers:")


def test_a_misspelt_loyalty_key_does_not_hide_a_tier_order_mistake(project: Project) -> None:
    path = install(project, "loyalty_two_mistakes.yaml", "rules/loyalty.yaml")
    outcome = validate(project, "rules/loyalty.yaml")
    assert outcome.exit_code == 1
    assert len(outcome.problems) == 2, outcome.stdout
    assert_problem(outcome, "rules/loyalty.yaml", *locate(path, "min_spend: ^5000", 2),
                   "tiers[2].min_spend must be higher", "got: 5000")
    assert_problem(outcome, "rules/loyalty.yaml", *locate(path, "^per_curency_unit"),
                   "did you mean 'per_currency_unit'?")


# --------------------------------------------------------------------------- templates


def put_template(project: Project, fixture: str, target: str) -> Path:
    path = project.templates / target
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(BROKEN / "templates" / fixture, path)
    return path


TEMPLATE_MISTAKES = [
    ("syntax_error.text.j2", "^{% if", ["template syntax error", "endfi"]),
    ("unknown_variable.text.j2", "{{ ^customer.name", ["unknown variable 'customer'", "templates can use", "member"]),
    ("unknown_filter.text.j2", "^You have", ["unknown filter 'nubmer'", "did you mean 'number'?"]),
    ("step_variable.text.j2", "{{ ^step.id", ["unknown variable 'step'", "templates can use"]),  # never provided
]


@pytest.mark.parametrize(("fixture", "anchor", "words"), TEMPLATE_MISTAKES, ids=[c[0] for c in TEMPLATE_MISTAKES])
def test_a_template_mistake_is_reported_in_the_template_file(
    own_templates: Project, fixture: str, anchor: str, words: list[str]
) -> None:
    path = put_template(own_templates, fixture, "en/winback/first_touch.text.j2")
    line, col = locate(path, anchor)
    outcome = validate(own_templates)
    assert_one_problem(outcome, "templates/en/winback/first_touch.text.j2", line, col, *words)


def test_validating_a_template_file_checks_it(own_templates: Project) -> None:
    path = put_template(own_templates, "unknown_variable.text.j2", "zh-CN/welcome/day1_sms.text.j2")
    outcome = validate(own_templates, path)
    assert_one_problem(outcome, "templates/zh-CN/welcome/day1_sms.text.j2", *locate(path, "{{ ^customer"),
                       "unknown variable 'customer'")


def test_an_email_template_without_its_subject_is_reported_at_the_step(own_templates: Project) -> None:
    (own_templates.templates / "zh-CN" / "winback" / "first_touch.subject.j2").unlink()
    winback = own_templates.rules / "journeys" / "winback.yaml"
    outcome = validate(own_templates)
    assert_one_problem(outcome, "rules/journeys/winback.yaml", *locate(winback, "template: ^winback/first_touch"),
                       "template 'winback/first_touch' for email needs",
                       "templates/zh-CN/winback/first_touch.subject.j2")


def test_a_template_missing_in_the_default_locale_is_reported(own_templates: Project) -> None:
    """birthday/sms exists in en only: zh-CN members (the default) would get nothing."""
    (own_templates.templates / "zh-CN" / "birthday" / "sms.text.j2").unlink()
    birthday = own_templates.rules / "journeys" / "birthday.yaml"
    outcome = validate(own_templates)
    assert_one_problem(outcome, "rules/journeys/birthday.yaml", *locate(birthday, "template: ^birthday/sms"),
                       "template 'birthday/sms' has no zh-CN version (the default locale)",
                       "add templates/zh-CN/birthday/sms.text.j2")


def test_a_template_file_named_without_its_part_is_reported(own_templates: Project) -> None:
    (own_templates.templates / "zh-CN" / "welcome" / "spring_sale.j2").write_text("春季特卖\n", encoding="utf-8")
    outcome = validate(own_templates)
    assert_one_problem(outcome, "templates/zh-CN/welcome/spring_sale.j2", 1, 1,
                       ".subject.j2, .text.j2 or .html.j2", "rename")


def test_a_template_not_saved_as_utf8_is_reported_not_a_crash(own_templates: Project) -> None:
    (own_templates.templates / "zh-CN" / "welcome" / "day1_sms.text.j2").write_bytes("欢迎".encode("gbk"))
    outcome = validate(own_templates)
    assert_one_problem(outcome, "templates/zh-CN/welcome/day1_sms.text.j2", 1, 1, "not UTF-8")


# --------------------------------------------------------------------------- validate with no paths


def test_validate_without_paths_checks_everything_sorted_by_file_and_line(own_templates: Project) -> None:
    install(own_templates, "segments_without_condition.yaml", "rules/segments.yaml")
    install(own_templates, "loyalty_thresholds_go_down.yaml", "rules/loyalty.yaml")
    install(own_templates, "three_mistakes.yaml", "rules/journeys/three_mistakes.yaml")
    put_template(own_templates, "unknown_variable.text.j2", "en/welcome/day1_sms.text.j2")

    outcome = validate(own_templates)

    assert outcome.exit_code == 1
    found = positions(outcome)
    assert found == sorted(found)
    assert {file for file, _, _ in found} == {
        "rules/loyalty.yaml", "rules/segments.yaml", "rules/journeys/three_mistakes.yaml",
        "templates/en/welcome/day1_sms.text.j2",
    }
    assert len(found) == 6  # 1 loyalty + 1 segments + 3 journey + 1 template
    assert outcome.stderr.strip().endswith("6 problem(s) found")


def test_validate_with_a_path_reports_only_that_file(project: Project) -> None:
    install(project, "segments_without_condition.yaml", "rules/segments.yaml")
    path = BROKEN / "bad_duration.yaml"
    outcome = validate(project, path)
    assert [file for file, _, _ in positions(outcome)] == [str(path)]


# --------------------------------------------------------------------------- the YAML loader itself


@pytest.mark.parametrize(("text", "value"), [
    ("at: 10:00", "10:00"),  # YAML 1.1: the number 600
    ("at: 08:30", "08:30"),
    ("at: 0800", "0800"),  # YAML 1.1: an octal-looking int
    ("status: no", "no"),  # YAML 1.1: false
    ("opt_in: yes", "yes"),  # YAML 1.1: true
    ("day: 2026-01-01", "2026-01-01"),  # YAML 1.1: a date object
    ("opt_in: true", True),
    ("points: 100", 100),
    ("rate: 0.8", 0.8),
])
def test_yaml_values_are_read_as_written(text: str, value: object) -> None:
    loaded = load_yaml(text)
    assert list(loaded.values()) == [value]
    assert type(next(iter(loaded.values()))) is type(value)


def test_a_folder_outside_the_rules_is_checked_not_waved_through(project: Project) -> None:
    """`validate drafts/` on journeys kept outside rules/ loads and checks every YAML file in that folder."""
    drafts = project.root / "drafts"
    drafts.mkdir()
    (drafts / "good.yaml").write_text((REPO / "rules" / "journeys" / "winback.yaml").read_text(encoding="utf-8")
                                      .replace("journey: winback", "journey: winback_copy"), encoding="utf-8")
    shutil.copy(BROKEN / "bad_duration.yaml", drafts / "bad_duration.yaml")
    outcome = validate(project, "drafts")
    assert outcome.exit_code == 1
    assert [file for file, _, _ in positions(outcome)] == ["drafts/bad_duration.yaml"]


def test_segments_and_loyalty_files_outside_the_rules_are_checked_as_what_they_are(project: Project) -> None:
    candidate = project.root / "proposal"
    candidate.mkdir()
    (candidate / "loyalty.yaml").write_text(
        "tiers:\n  - {id: regular, name: 普通会员, min_spend: 0}\n  - {id: gold, name: 金卡, min_spend: 20000}\n"
        "  - {id: silver, name: 银卡, min_spend: 5000}\n", encoding="utf-8")
    (candidate / "segments.yaml").write_text("segments:\n  loop: {condition: {segment: loop}}\n", encoding="utf-8")
    outcome = validate(project, "proposal/loyalty.yaml", "proposal/segments.yaml")
    assert outcome.exit_code == 1
    files = {file for file, _, _ in positions(outcome)}
    assert files == {"proposal/loyalty.yaml", "proposal/segments.yaml"}
    assert any("min_spend must be higher" in p for p in outcome.problems)
    assert any("cycle" in p for p in outcome.problems)


def test_a_file_validate_cannot_check_is_refused(project: Project) -> None:
    (project.root / "notes.txt").write_text("journey ideas", encoding="utf-8")
    outcome = validate(project, "notes.txt")
    assert outcome.exit_code == 1
    assert "validate checks .yaml rule files" in outcome.stderr
