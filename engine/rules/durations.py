"""Durations written by marketers: ``30m``, ``12h``, ``7d``, ``2w`` (and combinations like ``1d12h``).

Every duration in the rules and the configuration is bounded by ``HORIZON`` (10 years): nothing a marketing
programme schedules waits longer, and the bound keeps ``now + duration`` far inside what ``datetime`` can hold.
The bound is checked on the digits before any number is built, so ``99999999999999d`` is a clear "too long",
never an OverflowError.
"""

from __future__ import annotations

import re
from datetime import timedelta

from engine.rules.problems import shown

_PART = re.compile(r"(\d+)([smhdw])")
_WHOLE = re.compile(r"^(?:\d+[smhdw])+$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

HORIZON_DAYS = 3650
HORIZON = timedelta(days=HORIZON_DAYS)
# timedelta's own ceiling (999,999,999 days): the bound for definitions stored before HORIZON existed.
_LARGEST = timedelta.max.days * 86400
# 3650d is 315,360,000 seconds (9 digits) and timedelta.max ~8.6e13 s (14 digits): a part with more digits than
# this is over any bound, and is rejected without converting it (int() refuses over 4,300 digits anyway).
_MAX_DIGITS = 15


class DurationTooLong(ValueError):
    """A well-formed duration beyond the horizon: its message says the bound, which callers pass on as it is."""


def parse_duration(text: object, *, bounded: bool = True) -> timedelta:
    """Parse a duration; raise ValueError with a message that says what is accepted.

    BOUNDED False is for journey versions stored before durations were bounded: they were valid when stored, so
    they keep loading as long as ``timedelta`` can hold them.
    """
    cleaned = text.strip() if isinstance(text, str) else None
    if cleaned is None or not _WHOLE.match(cleaned):
        raise ValueError(
            f"duration must be a number followed by s, m, h, d or w (e.g. 30m, 12h, 7d, 2w), got: {shown(text)}"
        )
    parts = _PART.findall(cleaned)
    limit = HORIZON.days * 86400 if bounded else _LARGEST
    if any(len(n.lstrip("0")) > _MAX_DIGITS for n, _ in parts):
        raise _too_long(text, bounded)
    seconds = sum(int(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"duration must be longer than zero, got: {shown(text)}")
    if seconds > limit:
        raise _too_long(text, bounded)
    return timedelta(seconds=seconds)


def _too_long(text: object, bounded: bool) -> DurationTooLong:
    if bounded:
        return DurationTooLong(f"duration must be at most {HORIZON_DAYS}d (10 years), got: {shown(text)}; "
                               "write a shorter one")
    return DurationTooLong(f"duration must be at most {timedelta.max.days}d, got: {shown(text)}")


def format_duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit, size in (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
