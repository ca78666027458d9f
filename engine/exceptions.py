"""Exception hierarchy.

Each class's docstring is its default message; the CLI prints the message
(and its cause chain) as one or two lines, with a traceback only in --debug.
"""

from __future__ import annotations

from collections.abc import Sequence


class EngineError(Exception):
    """The engine could not complete the request."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(EngineError):
    """config.yaml is invalid."""


class RulesError(EngineError):
    """The rules under rules/ or templates/ are invalid."""

    def __init__(self, problems: Sequence[object], message: str | None = None) -> None:
        self.problems = problems
        super().__init__(message or f"{len(problems)} problem(s) in the rules; run `python run.py validate`")


class InputError(EngineError):
    """The input given on the command line or in a file is invalid."""


class NotFound(EngineError):
    """The requested object does not exist."""


class AlreadyRunning(EngineError):
    """Another engine process already works on this SQLite database."""


class TemplateRenderError(EngineError):
    """A message template could not be rendered."""
