"""Locale formatting for templates (money, numbers, dates with Babel, cached per value and locale), the member's
time zone for a render, and the HTML part made from a text one."""

from __future__ import annotations

import html as htmllib
from collections.abc import Mapping
from datetime import date
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

from babel.core import Locale, UnknownLocaleError
from babel.dates import format_date
from babel.numbers import format_currency, format_decimal, get_group_symbol, get_minus_sign_symbol

from engine.domain.timeutil import zone


@lru_cache(maxsize=256)
def babel_locale_for(locale: str) -> Locale:
    """Babel's locale lookup scans its data directory: parse each locale once per process."""
    try:
        return Locale.parse(locale.replace("-", "_"))
    except (UnknownLocaleError, ValueError):
        return Locale.parse("en")


@lru_cache(maxsize=8192)
def cached_money(value: Any, currency: str, locale: str) -> str:
    return str(format_currency(value, currency, locale=babel_locale_for(locale)))


@lru_cache(maxsize=8192)
def cached_number(value: Any, locale: str) -> str:
    return str(format_decimal(value, locale=babel_locale_for(locale)))


# Whole numbers (points, counts) are the filter's common case and take many distinct values, so a cache misses
# often. Where a locale groups digits by threes with one symbol, Python's own grouping gives the same text; each
# locale is checked against Babel on a set of samples before the shortcut is used for it.
_GROUPING_SAMPLES = (0, 7, -7, 12, 999, 1000, 1234, -1234, 12345, 99999, 123456, 1234567, -1234567, 10**9 + 7,
                     -(10**12) - 345)


def grouped(value: int, group: str, minus: str) -> str:
    text = f"{value:,}"
    if group != ",":
        text = text.replace(",", group)
    if value < 0 and minus != "-":
        text = minus + text[1:]
    return text


@lru_cache(maxsize=256)
def plain_grouping(locale: str) -> tuple[str, str] | None:
    """(group symbol, minus sign) if LOCALE writes whole numbers as grouped does, else None (Babel decides)."""
    babel_locale = babel_locale_for(locale)
    try:
        symbols = (str(get_group_symbol(babel_locale)), str(get_minus_sign_symbol(babel_locale)))
    except (KeyError, ValueError):
        return None
    for sample in _GROUPING_SAMPLES:
        if grouped(sample, *symbols) != str(format_decimal(sample, locale=babel_locale)):
            return None
    return symbols


@lru_cache(maxsize=8192)
def cached_date(value: date, fmt: str, locale: str) -> str:
    return str(format_date(value, fmt, locale=babel_locale_for(locale)))


def render_zone(ctx: Any) -> ZoneInfo:
    name = ctx.get("_tz")
    if name is None:
        member = ctx.get("member")
        if isinstance(member, Mapping):
            name = member.get("timezone")
    # timeutil.zone caches by name; a name that is not a zone (or not a string) reads as UTC.
    return zone(name if isinstance(name, str) else None)


def html_from_text(text: str) -> str:
    # Escaping neither makes nor removes blank lines or whitespace-only paragraphs: escape once, then split.
    paragraphs = [p.replace("\n", "<br>\n") for p in htmllib.escape(text).split("\n\n") if p.strip()]
    body = "\n".join(f"<p>{p}</p>" for p in paragraphs)
    return f'<!doctype html>\n<html><body style="font-family: sans-serif; line-height: 1.6">\n{body}\n</body></html>'
