"""Durations written by marketers: ``30m``, ``12h``, ``7d``, ``2w`` (and combinations like ``1d12h``)."""

from __future__ import annotations

import re
from datetime import timedelta

_PART = re.compile(r"(\d+)([smhdw])")
_WHOLE = re.compile(r"^(?:\d+[smhdw])+$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: object) -> timedelta:
    """Parse a duration; raise ValueError with a message that says what is accepted."""
    if not isinstance(text, str) or not _WHOLE.match(text.strip()):
        raise ValueError(
            f"duration must be a number followed by s, m, h, d or w (e.g. 30m, 12h, 7d, 2w), got: {text!r}"
        )
    seconds = sum(int(n) * _UNITS[u] for n, u in _PART.findall(text.strip()))
    if seconds <= 0:
        raise ValueError(f"duration must be longer than zero, got: {text!r}")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit, size in (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
