"""Problems found in marketer-owned files, reported as FILE:LINE:COL: message."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

from engine.rules.yamlsrc import Mark


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

    # "Did you mean" compares a word with every choice (~130 µs against the 40 attribute names; more where the
    # choices grow with the file: step ids, segments, tiers). A file of 80,000 mistakes would take minutes; only
    # the first SUGGESTIONS mistakes of a file get a suggestion.
    SUGGESTIONS = 50

    def __init__(self, file: str) -> None:
        self.file = file
        self.items: list[Problem] = []
        self._suggestions = 0

    def add(self, mark: Mark, message: str) -> None:
        self.items.append(Problem(self.file, mark.line, mark.col, message))

    def suggest(self, word: str, choices: Iterable[str]) -> str:
        """``did_you_mean``, for the first SUGGESTIONS mistakes in this file only."""
        self._suggestions += 1
        return did_you_mean(word, choices) if self._suggestions <= self.SUGGESTIONS else ""

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


def shown(value: object, limit: int = 60) -> str:
    """VALUE as a message quotes it: a pasted megabyte of digits or a huge list is cut, not repeated in full."""
    text = repr(value)
    if len(text) <= limit:
        return text
    if isinstance(value, str):
        return f"{text[: limit - 10]}…' ({len(value):,} characters)"
    return f"{text[: limit - 10]}…"
