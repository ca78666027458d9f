"""Time parsing at the edges: ISO 8601 in, aware UTC out (a time without offset is UTC)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


def parse_instant(value: object) -> datetime:
    """Parse ISO 8601; raise ValueError naming the expected form."""
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"must be an ISO 8601 time such as 2026-03-01T10:00:00+08:00, got: {value!r}") from None
    else:
        raise ValueError(f"must be an ISO 8601 time such as 2026-03-01T10:00:00+08:00, got: {value!r}")
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def parse_date(value: object) -> date:
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise ValueError(f"must be a date written YYYY-MM-DD, got: {value!r}")


# What ZoneInfo raises for a name that is not a zone: also OSError, for a name that is a folder of the zone
# database ("America") or too long to be a file name.
_NOT_A_ZONE = (ZoneInfoNotFoundError, ValueError, OSError)


@lru_cache(maxsize=1024)
def zone(name: str | None, default: str = "UTC") -> ZoneInfo:
    """The member's time zone, falling back to DEFAULT when missing or unknown."""
    for candidate in (name, default, "UTC"):
        if candidate:
            try:
                return ZoneInfo(candidate)
            except _NOT_A_ZONE:
                continue
    return ZoneInfo("UTC")


def valid_zone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except _NOT_A_ZONE:
        return False
    return True

