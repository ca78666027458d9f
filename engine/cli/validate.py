"""``run.py validate``: which files to check, and every problem in them, sorted by file and line."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from engine.config import Config, load_config
from engine.exceptions import ConfigError, InputError
from engine.rules.problems import Problem
from engine.rules.rulebook import load_rulebook
from engine.rules.templates import Templates

_CONFIG_LINE = r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<message>.*)$"


def _config_problems(error: ConfigError, path: str) -> list[Problem]:
    import re

    out = []
    for line in str(error).splitlines():
        match = re.match(_CONFIG_LINE, line)
        if match:
            out.append(Problem(match["file"], int(match["line"]), int(match["col"]), match["message"]))
        elif out and line.startswith(" "):
            out[-1] = Problem(out[-1].file, out[-1].line, out[-1].col, out[-1].message + "\n" + line)
        else:
            out.append(Problem(path, 1, 1, line))
    return out


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _yaml_files(folder: Path) -> Iterable[Path]:
    return sorted([*folder.rglob("*.yaml"), *folder.rglob("*.yml")])


class _Plan:
    """What the given PATHS ask to check."""

    def __init__(self, config: Config, config_file: Path, paths: tuple[Path, ...]) -> None:
        self.rules = config.rules_path.resolve()
        self.templates = config.templates_path.resolve()
        self.config_file = config_file.resolve()
        self.journeys: list[Path] = []
        self.configs: list[Path] = []
        self.segments: Path | None = None
        self.loyalty: Path | None = None
        self.wanted: list[Path] = []
        for given in paths:
            self._add(given)

    def _add(self, given: Path) -> None:
        if not given.exists():
            raise InputError(f"{given}: no such file or folder")
        path = given.resolve()
        self.wanted.append(path)
        if path.is_dir():
            if not (_within(path, self.rules) or _within(self.rules, path) or _within(path, self.templates)):
                for file in _yaml_files(path):
                    self._file(file.resolve())
            return
        if path.suffix == ".j2":
            if not _within(path, self.templates):
                raise InputError(f"{given}: templates are checked where config.yaml's templates_dir points "
                                 f"({self.templates}); move it there")
            return
        if path.suffix not in (".yaml", ".yml"):
            raise InputError(f"{given}: validate checks .yaml rule files, config.yaml and .j2 templates")
        self._file(path)

    def _file(self, path: Path) -> None:
        if path == self.config_file or path.name == "config.yaml":
            self.configs.append(path)
        elif _within(path, self.rules):
            return  # loaded with the rules anyway
        elif path.name == "segments.yaml":
            self.segments = path
        elif path.name == "loyalty.yaml":
            self.loyalty = path
        else:
            self.journeys.append(path)

    def keep(self, problem: Problem) -> bool:
        if not self.wanted:
            return True
        file = Path(problem.file).resolve()
        return any(_within(file, w) for w in self.wanted)


def validate_paths(config_path: str, db: str | None, explicit: bool,
                   paths: tuple[Path, ...]) -> tuple[list[Problem], str]:
    """Every problem in the configuration, the rules and the templates (or in PATHS), and a summary line."""
    problems: list[Problem] = []
    if explicit and not Path(config_path).exists():
        raise ConfigError(f"{config_path}: no such file; pass --config PATH or create config.yaml")
    try:
        config = load_config(config_path, db, required=explicit)
    except ConfigError as exc:
        problems = _config_problems(exc, config_path)
        config = load_config("/nonexistent/config.yaml")  # defaults, so the rules can still be checked
        config = config.model_copy(update={"base_dir": Path(config_path).resolve().parent})
    plan = _Plan(config, Path(config_path), paths)
    for other in plan.configs:
        if other != plan.config_file:
            try:
                load_config(other)
            except ConfigError as exc:
                problems += _config_problems(exc, str(other))
    templates = Templates(config.templates_path, config.default_locale, config.currency)
    book = load_rulebook(config.rules_path, templates, plan.journeys, segments_path=plan.segments,
                         loyalty_path=plan.loyalty)
    problems += [p for p in book.problems if plan.keep(p)]
    if not plan.wanted:
        problems = sorted(problems, key=lambda p: (p.file, p.line, p.col))
    else:
        problems = sorted([p for p in problems if plan.keep(p)], key=lambda p: (p.file, p.line, p.col))
    templates_count = len(list(config.templates_path.rglob("*.j2"))) if config.templates_path.is_dir() else 0
    summary = (f"ok: {len(book.journeys)} journeys, {len(book.segments)} segments, {len(book.loyalty.tiers)} tiers, "
               f"{templates_count} template files")
    return problems, summary
