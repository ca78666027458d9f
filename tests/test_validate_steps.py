"""Validation of the step types added with the full journey language: each mistake named with its line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.cli.main import main
from engine.testing import REPO

HEAD = "journey: x\nname: x\ntrigger: {event: signup}\nsteps:\n"
CASES = [
    ("  - id: s\n    split:\n      - {variant: a, weight: 50, then: a1}\n"
     "      - {variant: b, weight: 30, then: nowhere}\n    holdout: 10\n"
     "  - id: a1\n    send: email\n    template: review/ask\n",
     [(7, "weights plus holdout must add up to 100, got: 90"), (8, "names step 'nowhere', which does not exist")]),
    ("  - wait: {until: \"25:00\"}\n  - id: a\n    send: email\n    template: review/ask\n",
     [(5, "quoted 24-hour time")]),
    ("  - wait: {until: \"10:00\", weekdays: [monday]}\n  - id: a\n    send: email\n    template: review/ask\n",
     [(5, "weekdays must be a list of mon, tue")]),
    ("  - id: w\n    wait: {until_event: review_submitted}\n    then: a\n  - id: a\n    send: email\n"
     "    template: review/ask\n", [(6, "missing 'timeout'")]),
    ("  - wait: 3d\n    then: a\n  - id: a\n    send: email\n    template: review/ask\n",
     [(6, "then only applies to wait: {until_event")]),
    ("  - id: u\n    update: {tier: platinum}\n", [(6, "unknown tier 'platinum'")]),
    ("  - id: u\n    update: {points: 0}\n", [(6, "points must be a whole number")]),
]


@pytest.mark.parametrize(("steps", "expected"), CASES)
def test_step_mistakes_are_reported_with_their_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, steps: str,
                                                    expected: list[tuple[int, str]]) -> None:
    shutil.copytree(REPO / "rules", tmp_path / "rules")
    (tmp_path / "config.yaml").write_text(f"templates_dir: {REPO / 'templates'}\n", encoding="utf-8")
    journey = tmp_path / "rules" / "journeys" / "x.yaml"
    journey.write_text(HEAD + steps, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["--config", str(tmp_path / "config.yaml"), "validate"])
    assert result.exit_code == 1
    lines = [line for line in result.stdout.splitlines() if line.startswith("rules/journeys/x.yaml:")]
    for line_no, words in expected:
        assert any(line.startswith(f"rules/journeys/x.yaml:{line_no}:") and words in line for line in lines), \
            f"{line_no}: {words!r} not in:\n" + "\n".join(lines)
