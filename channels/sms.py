"""SMS segment counting: what a message costs (GSM-7: 160 characters, 153 per part; UCS-2: 70, 67 per part)."""

from __future__ import annotations

import math

_GSM7_BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM7_EXTENDED = set("^{}\\[~]|€\f")


def encoding(text: str) -> str:
    """``gsm7`` if every character fits the GSM 03.38 alphabet, else ``ucs2`` (Chinese always does)."""
    return "gsm7" if all(ch in _GSM7_BASIC or ch in _GSM7_EXTENDED for ch in text) else "ucs2"


def segments(text: str) -> tuple[int, str]:
    """(number of parts, encoding) for TEXT."""
    kind = encoding(text)
    if kind == "gsm7":
        units = sum(2 if ch in _GSM7_EXTENDED else 1 for ch in text)
        single, multi = 160, 153
    else:
        units = len(text.encode("utf-16-le")) // 2  # characters outside the BMP take two units
        single, multi = 70, 67
    if units <= single:
        return 1, kind
    return math.ceil(units / multi), kind


_HINTS = ("回T退订", "退订回T", "回TD退订", "退订", "STOP")


def has_opt_out_hint(text: str) -> bool:
    upper = text.upper()
    return any(hint in upper for hint in _HINTS)
