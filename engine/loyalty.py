"""The loyalty programme (rules/loyalty.yaml): tiers by spend, their benefits, points earning."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from engine.problems import Problems, did_you_mean
from engine.yamlsrc import UNKNOWN, YMap

TIER_ID = re.compile(r"^[a-z0-9_]+$")


@dataclass(frozen=True)
class Tier:
    id: str
    names: dict[str, str]  # locale -> display name
    min_spend: float
    discount: float = 1.0  # price multiplier: 0.8 is 8折 / 20% off
    points_multiplier: float = 1.0
    perks: dict[str, tuple[str, ...]] = field(default_factory=dict)  # locale -> perks

    def name(self, locale: str, default_locale: str) -> str:
        return _localised(self.names, locale, default_locale) or self.id

    def perk_list(self, locale: str, default_locale: str) -> list[str]:
        return list(_localised(self.perks, locale, default_locale) or ())


def _localised(values: dict[str, Any], locale: str, default_locale: str) -> Any:
    for candidate in (locale, locale.split("-")[0], default_locale, default_locale.split("-")[0]):
        if candidate in values:
            return values[candidate]
    return next(iter(values.values()), None)


@dataclass(frozen=True)
class Loyalty:
    tiers: tuple[Tier, ...]
    points_per_unit: float = 1.0  # points earned per currency unit spent (before the tier multiplier)

    def tier_for_spend(self, spend: float) -> Tier:
        chosen = self.tiers[0]
        for tier in self.tiers:
            if spend >= tier.min_spend:
                chosen = tier
        return chosen

    def tier(self, tier_id: str | None) -> Tier:
        for tier in self.tiers:
            if tier.id == tier_id:
                return tier
        return self.tiers[0]

    def rank(self, tier_id: str | None) -> int:
        for i, tier in enumerate(self.tiers):
            if tier.id == tier_id:
                return i
        return 0

    def next_tier(self, tier_id: str | None) -> Tier | None:
        i = self.rank(tier_id)
        return self.tiers[i + 1] if i + 1 < len(self.tiers) else None


DEFAULT = Loyalty(
    tiers=(
        Tier("regular", {"zh-CN": "普通会员", "en": "Member"}, 0),
        Tier("silver", {"zh-CN": "银卡会员", "en": "Silver"}, 5_000, 0.8, 1.2),
        Tier("gold", {"zh-CN": "金卡会员", "en": "Gold"}, 20_000, 0.7, 1.5),
        Tier("diamond", {"zh-CN": "钻石会员", "en": "Diamond"}, 100_000, 0.5, 2.0),
    )
)

_TOP = ("tiers", "points")
_TIER_KEYS = ("id", "name", "min_spend", "discount", "points_multiplier", "perks")


def parse_loyalty(data: Any, problems: Problems) -> Loyalty | None:
    before = len(problems.items)
    if not isinstance(data, dict):
        problems.add(getattr(data, "mark", UNKNOWN), "loyalty.yaml must be a mapping with tiers: and points:")
        return None
    for key in data:
        if key not in _TOP:
            problems.add(_kmark(data, key), f"unknown key {key!r}{did_you_mean(key, _TOP)}")
    raw_tiers = data.get("tiers")
    if not isinstance(raw_tiers, list) or not raw_tiers:
        problems.add(_vmark(data, "tiers"), "tiers must be a non-empty list, lowest tier first")
        return None
    tiers: list[Tier] = []
    for index, raw in enumerate(raw_tiers):
        tier = _tier(raw, index, raw_tiers, problems)
        if tier is not None:
            tiers.append(tier)
    if len(tiers) == len(raw_tiers):  # order is checked whenever every tier itself is readable
        _check_order(tiers, raw_tiers, problems)
    points = 1.0
    raw_points = data.get("points", {})
    if not isinstance(raw_points, dict):
        problems.add(_vmark(data, "points"), "points must be a mapping such as {per_currency_unit: 1}")
    else:
        for key in raw_points:
            if key != "per_currency_unit":
                problems.add(_kmark(raw_points, key), f"unknown key {key!r} in points"
                             f"{did_you_mean(key, ['per_currency_unit'])}")
        value = raw_points.get("per_currency_unit", 1)
        if not _number(value) or value < 0:
            problems.add(_vmark(raw_points, "per_currency_unit"),
                         f"points.per_currency_unit must be a number of 0 or more, got: {value!r}")
        else:
            points = float(value)
    if len(problems.items) > before:
        return None
    return Loyalty(tuple(tiers), points)


def _tier(raw: Any, index: int, raw_tiers: Any, problems: Problems) -> Tier | None:
    where = f"tiers[{index}]"
    mark = raw_tiers.item_mark(index) if hasattr(raw_tiers, "item_mark") else UNKNOWN
    if not isinstance(raw, dict):
        problems.add(mark, f"{where} must be a mapping with id, name and min_spend")
        return None
    ok = True
    for key in raw:
        if key not in _TIER_KEYS:
            problems.add(_kmark(raw, key), f"unknown key {key!r} in {where}{did_you_mean(key, _TIER_KEYS)}")
            ok = False
    tier_id = raw.get("id")
    if not isinstance(tier_id, str) or not TIER_ID.match(tier_id):
        problems.add(_vmark(raw, "id") if "id" in raw else mark,
                     f"{where}.id must use a-z, 0-9 and _, got: {tier_id!r}")
        ok = False
    names = raw.get("name")
    if isinstance(names, str):
        names = {"zh-CN": names}
    if not isinstance(names, dict) or not names or not all(isinstance(v, str) for v in names.values()):
        problems.add(_vmark(raw, "name") if "name" in raw else mark,
                     f"{where}.name must map locales to names, e.g. {{zh-CN: 金卡会员, en: Gold}}")
        ok = False
    values: dict[str, float] = {}
    for key, default, low, high in (("min_spend", None, 0, None), ("discount", 1.0, 0.01, 1.0),
                                    ("points_multiplier", 1.0, 0, None)):
        value = raw.get(key, default)
        if not _number(value) or value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"{low} or more"
            hint = " (0.8 means 8折, 20% off)" if key == "discount" else ""
            problems.add(_vmark(raw, key) if key in raw else mark,
                         f"{where}.{key} must be a number {bound}{hint}, got: {value!r}")
            ok = False
        else:
            values[key] = float(value)
    perks = raw.get("perks", {})
    if not isinstance(perks, dict) or not all(isinstance(v, list) for v in perks.values()):
        problems.add(_vmark(raw, "perks"), f"{where}.perks must map locales to lists, e.g. {{en: [Free shipping]}}")
        ok = False
    if not ok or not isinstance(tier_id, str) or not isinstance(names, dict):
        return None
    return Tier(tier_id, dict(names), values["min_spend"], values["discount"], values["points_multiplier"],
                {str(k): tuple(str(p) for p in v) for k, v in perks.items()})


def _check_order(tiers: list[Tier], raw_tiers: Any, problems: Problems) -> None:
    seen: set[str] = set()
    for index, tier in enumerate(tiers):
        raw = raw_tiers[index]
        if tier.id in seen:
            problems.add(_vmark(raw, "id"), f"tier id {tier.id!r} is used twice; give each tier its own id")
        seen.add(tier.id)
        if index == 0 and tier.min_spend != 0:
            problems.add(_vmark(raw, "min_spend"),
                         "the first (lowest) tier must have min_spend: 0 so every member has a tier")
        if index > 0 and tier.min_spend <= tiers[index - 1].min_spend:
            problems.add(_vmark(raw, "min_spend"),
                         f"tiers[{index}].min_spend must be higher than the tier before it "
                         f"({tiers[index - 1].id}: {tiers[index - 1].min_spend:g}), got: {tier.min_spend:g}; "
                         "list tiers from lowest to highest")


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _vmark(data: Any, key: str) -> Any:
    return data.value_mark(key) if isinstance(data, YMap) else UNKNOWN


def _kmark(data: Any, key: str) -> Any:
    return data.key_mark(key) if isinstance(data, YMap) else UNKNOWN
