"""Problems found in marketer-owned files, reported as FILE:LINE:COL: message."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

from engine.yamlsrc import Mark


@dataclass(frozen=True, order=True)
class Problem:
    file: str
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.message}"


class Problems:
    """Collects every problem in one file instead of stopping at the first."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.items: list[Problem] = []

    def add(self, mark: Mark, message: str) -> None:
        self.items.append(Problem(self.file, mark.line, mark.col, message))

    def __bool__(self) -> bool:
        return bool(self.items)


def did_you_mean(word: str, choices: Iterable[str], *, list_choices: bool = True) -> str:
    choices = list(choices)
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    if list_choices and choices and len(choices) <= 12:
        return f"; expected one of: {', '.join(sorted(choices))}"
    return ""
