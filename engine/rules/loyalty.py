"""The loyalty programme (rules/loyalty.yaml): tiers and how they are earned and reviewed, their benefits,
points earning and expiry, and the thresholds of the member intelligence (lifecycle, churn risk, value).

Tiers are qualified by spend (and optionally order count) over a rolling window. A purchase that qualifies for
a higher tier upgrades the member at once; a member only goes down at a review, one review period after they
reached their tier, and by at most ``max_drop`` tiers per review (the grace rule).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeGuard

from engine.rules.durations import DurationTooLong, format_duration, parse_duration
from engine.rules.problems import Problems, shown
from engine.rules.yamlsrc import UNKNOWN, YMap

TIER_ID = re.compile(r"^[a-z0-9_]+$")
EVENT_TYPE = re.compile(r"^[a-z0-9_]+$")
# Column widths and sizes the values are written to (engine/store/models.py): members.tier is VARCHAR(32), event types
# VARCHAR(64), and points go into 32-bit INTEGER columns on PostgreSQL.
MAX_TIER_ID = 32
MAX_EVENT_TYPE = 64
MAX_EARN = 1_000_000_000


@dataclass(frozen=True)
class Tier:
    id: str
    names: dict[str, str]  # locale -> display name
    min_spend: float
    discount: float = 1.0  # price multiplier: 0.8 is 8折 / 20% off
    points_multiplier: float = 1.0
    perks: dict[str, tuple[str, ...]] = field(default_factory=dict)  # locale -> perks
    min_orders: int = 0
    requires: str = "all"  # all: min_spend and min_orders; any: either is enough

    def name(self, locale: str, default_locale: str) -> str:
        return _localised(self.names, locale, default_locale) or self.id

    def perk_list(self, locale: str, default_locale: str) -> list[str]:
        return list(_localised(self.perks, locale, default_locale) or ())

    def qualifies(self, spend: float, orders: int) -> bool:
        if self.requires == "any" and self.min_orders > 0:
            return spend >= self.min_spend or orders >= self.min_orders
        return spend >= self.min_spend and orders >= self.min_orders


def _localised(values: dict[str, Any], locale: str, default_locale: str) -> Any:
    for candidate in (locale, locale.split("-")[0], default_locale, default_locale.split("-")[0]):
        if candidate in values:
            return values[candidate]
    return next(iter(values.values()), None)


@dataclass(frozen=True)
class Qualification:
    window: timedelta | None = timedelta(days=365)  # None: lifetime spend and orders
    review_every: timedelta = timedelta(days=365)
    max_drop: int = 1


@dataclass(frozen=True)
class Points:
    per_currency_unit: float = 1.0  # points per currency unit spent, before the tier's multiplier
    expire_after: timedelta | None = timedelta(days=365)  # None: points never expire
    earn: dict[str, int] = field(default_factory=dict)  # other event types -> points (check_in: 5)


@dataclass(frozen=True)
class Lifecycle:
    new_for: timedelta = timedelta(days=30)  # signed up this recently: new
    active_within: timedelta = timedelta(days=30)  # ordered or logged in this recently: active
    churned_after: timedelta = timedelta(days=180)  # no order or login for this long: churned; between: silent


@dataclass(frozen=True)
class ChurnRisk:
    no_login_for: timedelta = timedelta(days=30)
    recent: timedelta = timedelta(days=90)  # the window whose average order is compared with the member's usual
    aov_drop: float = 0.5  # flagged when the recent average order is below this share of the lifetime average


@dataclass(frozen=True)
class Intelligence:
    refresh_every: timedelta = timedelta(days=1)  # lifecycle, RFM quintiles, value and churn flags of everyone
    clv_horizon_years: float = 3.0


@dataclass(frozen=True)
class Loyalty:
    tiers: tuple[Tier, ...]
    qualification: Qualification = Qualification()
    points: Points = Points()
    lifecycle: Lifecycle = Lifecycle()
    churn: ChurnRisk = ChurnRisk()
    intelligence: Intelligence = Intelligence()

    def tier_for(self, spend: float, orders: int) -> Tier:
        """The highest tier that SPEND (and ORDERS) over the qualification window earn."""
        chosen = self.tiers[0]
        for tier in self.tiers:
            if tier.qualifies(spend, orders):
                chosen = tier
        return chosen

    def tier_for_spend(self, spend: float, orders: int = 0) -> Tier:
        return self.tier_for(spend, orders)

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

    def points_for(self, amount: float, tier_id: str | None) -> int:
        return int(amount * self.points.per_currency_unit * self.tier(tier_id).points_multiplier)

    @property
    def window_days(self) -> int | None:
        window = self.qualification.window
        return None if window is None else max(1, round(window.total_seconds() / 86400))


DEFAULT = Loyalty(
    tiers=(
        Tier("regular", {"zh-CN": "普通会员", "en": "Member"}, 0),
        Tier("silver", {"zh-CN": "银卡会员", "en": "Silver"}, 5_000, 0.8, 1.2),
        Tier("gold", {"zh-CN": "金卡会员", "en": "Gold"}, 20_000, 0.7, 1.5),
        Tier("diamond", {"zh-CN": "钻石会员", "en": "Diamond"}, 100_000, 0.5, 2.0),
    )
)

_TOP = ("tiers", "qualification", "points", "lifecycle", "churn_risk", "intelligence")
_TIER_KEYS = ("id", "name", "min_spend", "min_orders", "requires", "discount", "points_multiplier", "perks")
Reader = Callable[[Any], Any]


def _duration(none_word: str | None = None) -> Reader:
    def read(value: Any) -> timedelta | None:
        if none_word is not None and value == none_word:
            return None
        try:
            return parse_duration(value)
        except DurationTooLong as exc:
            raise ValueError(str(exc).removeprefix("duration ")) from None
        except ValueError:
            also = f", or {none_word}" if none_word else ""
            raise ValueError(f"must be a duration such as 30d, 12h or 52w{also}, got: {value!r}") from None
    return read


def _num(low: float, high: float | None = None, *, integer: bool = False, hint: str = "") -> Reader:
    def read(value: Any) -> float | int:
        ok = _number(value) and value >= low and (high is None or value <= high)
        if integer and ok and float(value) != int(value):
            ok = False
        if not ok:
            what = "a whole number" if integer else "a number"
            bound = f"between {low:g} and {high:g}" if high is not None else f"{low:g} or more"
            raise ValueError(f"must be {what} {bound}{hint}, got: {value!r}")
        return int(value) if integer else float(value)
    return read


def _earn(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        raise ValueError("must map event types to points, e.g. {check_in: 5, review_submitted: 20}")
    out: dict[str, int] = {}
    for kind, points in value.items():
        if not isinstance(kind, str) or not EVENT_TYPE.match(kind):
            raise ValueError(f"event type {shown(kind)} must use a-z, 0-9 and _")
        if len(kind) > MAX_EVENT_TYPE:
            raise ValueError(f"event type must be at most {MAX_EVENT_TYPE} characters (the database holds no more), "
                             f"got: {len(kind):,} characters; shorten it")
        if kind == "purchase":
            raise ValueError("purchases earn per_currency_unit points (times the tier's points_multiplier); "
                             "remove purchase from earn")
        if isinstance(points, bool) or not isinstance(points, int) or not 0 < points <= MAX_EARN:
            raise ValueError(f"{kind} must earn a whole number of points from 1 to {MAX_EARN:,}, "
                             f"got: {shown(points)}")
        out[kind] = points
    return out


def _section(data: Any, key: str, fields: dict[str, Reader], problems: Problems, example: str) -> dict[str, Any]:
    """The readable values of mapping DATA[KEY]; every unknown key and bad value is a problem with its line."""
    raw = data.get(key, {})
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.add(_vmark(data, key), f"{key} must be a mapping such as {example}")
        return {}
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in fields:
            problems.add(_kmark(raw, name), f"unknown key {name!r} in {key}{problems.suggest(name, fields)}")
            continue
        try:
            out[name] = fields[name](value)
        except ValueError as exc:
            problems.add(_vmark(raw, name), f"{key}.{name} {exc}" if str(exc).startswith("must") else
                         f"{key}.{name}: {exc}")
    return out


def parse_loyalty(data: Any, problems: Problems) -> Loyalty | None:
    before = len(problems.items)
    if not isinstance(data, dict):
        problems.add(getattr(data, "mark", UNKNOWN), "loyalty.yaml must be a mapping with tiers: and points:")
        return None
    for key in data:
        if key not in _TOP:
            problems.add(_kmark(data, key), f"unknown key {key!r}{problems.suggest(key, _TOP)}")
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
    qual = _section(data, "qualification", {"window": _duration("lifetime"), "review": _passthrough}, problems,
                    "{window: 365d, review: {every: 365d, max_drop: 1}}")
    review = _section(data["qualification"], "review", {"every": _duration(), "max_drop": _num(
        1, integer=True, hint=" (how many tiers one review may take a member down)")}, problems,
        "{every: 365d, max_drop: 1}") if "review" in qual else {}
    points = _section(data, "points", {"per_currency_unit": _num(0), "expire_after": _duration("never"),
                                       "earn": _earn}, problems, "{per_currency_unit: 1, expire_after: 365d}")
    life = _section(data, "lifecycle", {"new_for": _duration(), "active_within": _duration(),
                                        "churned_after": _duration()}, problems,
                    "{new_for: 30d, active_within: 30d, churned_after: 180d}")
    lifecycle = Lifecycle(**life)
    if lifecycle.churned_after <= lifecycle.active_within and {"churned_after", "active_within"} & set(life):
        problems.add(_vmark(data.get("lifecycle"), "churned_after") if "churned_after" in life else
                     _vmark(data.get("lifecycle"), "active_within"),
                     f"lifecycle.churned_after ({format_duration(lifecycle.churned_after)}) must be longer than "
                     f"active_within ({format_duration(lifecycle.active_within)}); members in between are silent")
    churn = _section(data, "churn_risk", {"no_login_for": _duration(), "recent": _duration(),
                                          "aov_drop": _num(0.01, 1, hint=" (0.5: flag a drop to half)")},
                     problems, "{no_login_for: 30d, recent: 90d, aov_drop: 0.5}")
    intel = _section(data, "intelligence", {"refresh_every": _duration(), "clv_horizon_years": _num(0.1, 50)},
                     problems, "{refresh_every: 1d, clv_horizon_years: 3}")
    if len(problems.items) > before:
        return None
    qualification = Qualification(**{k: v for k, v in (("window", qual.get("window", ...)),
                                                       ("review_every", review.get("every", ...)),
                                                       ("max_drop", review.get("max_drop", ...))) if v is not ...})
    return Loyalty(tuple(tiers), qualification, Points(**points), lifecycle, ChurnRisk(**churn), Intelligence(**intel))


def _passthrough(value: Any) -> Any:
    return value



def _tier(raw: Any, index: int, raw_tiers: Any, problems: Problems) -> Tier | None:
    """One entry of ``tiers``: every problem in it reported, the tier only when there is none."""
    where = f"tiers[{index}]"
    mark = raw_tiers.item_mark(index) if hasattr(raw_tiers, "item_mark") else UNKNOWN
    if not isinstance(raw, dict):
        problems.add(mark, f"{where} must be a mapping with id, name and min_spend")
        return None
    before = len(problems.items)
    _tier_keys(raw, where, problems)
    tier_id = _tier_id(raw, where, mark, problems)
    names = _tier_names(raw, where, mark, problems)
    values = _tier_numbers(raw, where, mark, problems)
    perks = raw.get("perks", {})
    if not isinstance(perks, dict) or not all(isinstance(v, list) for v in perks.values()):
        problems.add(_vmark(raw, "perks"), f"{where}.perks must map locales to lists, e.g. {{en: [Free shipping]}}")
    requires = raw.get("requires", "all")
    if requires not in ("all", "any"):
        problems.add(_vmark(raw, "requires"), f"{where}.requires must be all (min_spend and min_orders) or any "
                                              f"(either one), got: {requires!r}")
    if len(problems.items) > before or tier_id is None or names is None or values is None:
        return None
    return Tier(tier_id, names, values["min_spend"], values["discount"], values["points_multiplier"],
                {str(k): tuple(str(p) for p in v) for k, v in perks.items()}, int(values["min_orders"]), requires)


def _tier_keys(raw: dict[str, Any], where: str, problems: Problems) -> None:
    for key in raw:
        if key not in _TIER_KEYS:
            problems.add(_kmark(raw, key), f"unknown key {key!r} in {where}{problems.suggest(key, _TIER_KEYS)}")


def _tier_id(raw: dict[str, Any], where: str, mark: Any, problems: Problems) -> str | None:
    tier_id = raw.get("id")
    if not isinstance(tier_id, str) or not TIER_ID.match(tier_id):
        problems.add(_vmark(raw, "id") if "id" in raw else mark,
                     f"{where}.id must use a-z, 0-9 and _, got: {shown(tier_id)}")
        return None
    if len(tier_id) > MAX_TIER_ID:
        problems.add(_vmark(raw, "id"), f"{where}.id must be at most {MAX_TIER_ID} characters (the database holds "
                     f"no more), got: {len(tier_id):,} characters; shorten it")
        return None
    return tier_id


def _tier_names(raw: dict[str, Any], where: str, mark: Any, problems: Problems) -> dict[str, str] | None:
    names = raw.get("name")
    if isinstance(names, str):
        names = {"zh-CN": names}
    if not isinstance(names, dict) or not names or not all(isinstance(v, str) for v in names.values()):
        problems.add(_vmark(raw, "name") if "name" in raw else mark,
                     f"{where}.name must map locales to names, e.g. {{zh-CN: 金卡会员, en: Gold}}")
        return None
    return dict(names)


def _tier_numbers(raw: dict[str, Any], where: str, mark: Any, problems: Problems) -> dict[str, float] | None:
    """min_spend, discount, points_multiplier and min_orders, each within its bounds (defaults filled in)."""
    values: dict[str, float] = {}
    ok = True
    for key, default, low, high in (("min_spend", None, 0, None), ("discount", 1.0, 0.01, 1.0),
                                    ("points_multiplier", 1.0, 0, None), ("min_orders", 0, 0, None)):
        value = raw.get(key, default)
        if not _number(value) or value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"{low} or more"
            hint = " (0.8 means 8折, 20% off)" if key == "discount" else ""
            problems.add(_vmark(raw, key) if key in raw else mark,
                         f"{where}.{key} must be a number {bound}{hint}, got: {value!r}")
            ok = False
        elif key == "min_orders" and float(value) != int(value):
            problems.add(_vmark(raw, key), f"{where}.min_orders must be a whole number, got: {value!r}")
            ok = False
        else:
            values[key] = float(value)
    return values if ok else None


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
        if index > 0 and tier.min_orders < tiers[index - 1].min_orders:
            problems.add(_vmark(raw, "min_orders"),
                         f"tiers[{index}].min_orders must not be lower than the tier before it "
                         f"({tiers[index - 1].id}: {tiers[index - 1].min_orders}), got: {tier.min_orders}")


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _vmark(data: Any, key: str) -> Any:
    return data.value_mark(key) if isinstance(data, YMap) else UNKNOWN


def _kmark(data: Any, key: str) -> Any:
    return data.key_mark(key) if isinstance(data, YMap) else UNKNOWN
