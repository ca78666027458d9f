"""What a template sees: the member, their tier and its perks, the triggering event, the journey, local now."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from engine.attributes import BUILTIN, COMPUTED
from engine.loyalty import Loyalty
from engine.timeutil import zone

MEMBER_COLUMNS = tuple(a.column for a in BUILTIN.values() if a.column)


def member_view(row: Mapping[str, Any]) -> dict[str, Any]:
    """Columns plus free-form attributes (columns win a name clash), and ``attributes`` itself."""
    attributes = row.get("attributes") or {}
    view = dict(attributes)
    for column in MEMBER_COLUMNS:
        view[column] = row.get(column)
    for key, value in row.items():  # computed attributes loaded with the member (e.g. points_expiring_30_days)
        if COMPUTED.match(key):
            view[key] = value
    view["attributes"] = attributes
    return view


class ContextBuilder:
    """Builds template contexts; per-tier, per-locale parts are computed once."""

    def __init__(self, loyalty: Loyalty, default_locale: str, default_timezone: str) -> None:
        self.loyalty = loyalty
        self.default_locale = default_locale
        self.default_timezone = default_timezone
        self._tiers: dict[tuple[str | None, str], dict[str, Any]] = {}

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
        view = member_view(member)
        next_tier = self.loyalty.next_tier(member.get("tier"))
        upcoming = None
        if next_tier is not None:
            upcoming = dict(self.tier(next_tier.id, locale))
            counted = member.get("qualifying_spend", member.get("total_spend"))
            upcoming["spend_needed"] = max(0.0, next_tier.min_spend - float(counted or 0))
        event_view = dict(event or {})
        for key in ("from", "to"):
            if isinstance(event_view.get(key), str) and event_view.get(key) in {t.id for t in self.loyalty.tiers}:
                event_view[f"{key}_name"] = self.tier(event_view[key], locale)["name"]
        tz = zone(member.get("timezone"), self.default_timezone)
        return {
            "_tz": tz.key,  # the zone the date filters use: the member's, else default_timezone
            "member": view,
            "tier": self.tier(member.get("tier"), locale),
            "next_tier": upcoming,
            "event": event_view,
            "journey": journey,
            "now": now.astimezone(tz),
            "unsubscribe_url": unsubscribe_url,
        }
