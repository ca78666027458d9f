"""What a template sees: the member, their tier and its perks, the triggering event, the journey, local now."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import datetime
from operator import itemgetter
from typing import Any
from zoneinfo import ZoneInfo

from engine.domain.attributes import BUILTIN, COMPUTED
from engine.domain.timeutil import zone
from engine.rules.loyalty import Loyalty, Tier

MEMBER_COLUMNS = tuple(a.column for a in BUILTIN.values() if a.column)
_COLUMN_SET = frozenset(MEMBER_COLUMNS)
_ALL_COLUMNS = itemgetter(*MEMBER_COLUMNS)


def member_view(row: Mapping[str, Any], computed: Collection[str] | None = None) -> dict[str, Any]:
    """Columns plus free-form attributes (columns win a name clash), and ``attributes`` itself.

    COMPUTED names the computed attributes loaded with the member (points_expiring_30_days); None finds them
    among the row's keys.
    """
    attributes = row.get("attributes") or {}
    try:
        columns = dict(zip(MEMBER_COLUMNS, _ALL_COLUMNS(row), strict=True))
    except KeyError:  # a row without every column (an unsaved member in a preview)
        get = row.get
        columns = {column: get(column) for column in MEMBER_COLUMNS}
    view = {**attributes, **columns} if attributes else columns
    if computed is None:
        computed = [key for key in row.keys() - _COLUMN_SET if COMPUTED.match(key)]
    for key in computed:
        if key in row:
            view[key] = row[key]
    view["attributes"] = attributes
    return view


class ContextBuilder:
    """Builds template contexts; per-tier, per-locale parts are computed once."""

    def __init__(self, loyalty: Loyalty, default_locale: str, default_timezone: str,
                 computed: Collection[str] | None = None) -> None:
        """COMPUTED: the computed attributes loaded with every member (None: whichever a row carries)."""
        self.loyalty = loyalty
        self.computed = computed
        self.default_locale = default_locale
        self.default_timezone = default_timezone
        self._tiers: dict[tuple[str | None, str], dict[str, Any]] = {}
        self._tier_ids = frozenset(t.id for t in loyalty.tiers)
        self._next: dict[str | None, Tier | None] = {}
        self._local_now: dict[tuple[datetime, ZoneInfo], datetime] = {}

    def tier(self, tier_id: str | None, locale: str) -> dict[str, Any]:
        key = (tier_id, locale)
        if key not in self._tiers:
            tier = self.loyalty.tier(tier_id)
            self._tiers[key] = {
                "id": tier.id, "name": tier.name(locale, self.default_locale), "min_spend": tier.min_spend,
                "discount": tier.discount, "points_multiplier": tier.points_multiplier,
                "perks": tier.perk_list(locale, self.default_locale),
            }
        return self._tiers[key]

    def build(self, member: Mapping[str, Any], now: datetime, journey: Mapping[str, Any],
              event: Mapping[str, Any] | None, unsubscribe_url: str) -> dict[str, Any]:
        locale = member.get("locale") or self.default_locale
        view = member_view(member, self.computed)
        tier_id = member.get("tier")
        if tier_id in self._next:
            next_tier = self._next[tier_id]
        else:
            next_tier = self._next[tier_id] = self.loyalty.next_tier(tier_id)
        upcoming = None
        if next_tier is not None:
            upcoming = dict(self.tier(next_tier.id, locale))
            counted = member.get("qualifying_spend", member.get("total_spend"))
            upcoming["spend_needed"] = max(0.0, next_tier.min_spend - float(counted or 0))
        event_view = dict(event) if event else {}
        if event_view:
            for key in ("from", "to"):
                if isinstance(event_view.get(key), str) and event_view.get(key) in self._tier_ids:
                    event_view[f"{key}_name"] = self.tier(event_view[key], locale)["name"]
        tz = zone(member.get("timezone"), self.default_timezone)
        local_now = self._local_now.get((now, tz))
        if local_now is None:  # a batch shares one clock and a few zones
            if len(self._local_now) > 1024:
                self._local_now.clear()
            local_now = self._local_now[(now, tz)] = now.astimezone(tz)
        return {
            "_tz": tz.key,  # the zone the date filters use: the member's, else default_timezone
            "member": view,
            "tier": self.tier(tier_id, locale),
            "next_tier": upcoming,
            "event": event_view,
            "journey": journey,
            "now": local_now,
            "unsubscribe_url": unsubscribe_url,
        }
