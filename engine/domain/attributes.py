"""The member attributes that conditions and templates can use, and their types.

Built-in attributes are columns of ``members``; marketers' own attributes
(unknown columns in an import) live in the JSON ``attributes`` column and are
written ``attributes.NAME`` in conditions, so that a typo in a built-in name
is caught by validation instead of silently matching nobody.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


class Kind(enum.StrEnum):
    STRING = "string"
    NUMBER = "number"
    BOOL = "bool"
    DATE = "date"
    DATETIME = "datetime"
    ANY = "any"  # free-form attribute: type decided by the value it is compared with


@dataclass(frozen=True)
class Attribute:
    name: str
    kind: Kind
    column: str | None = None  # members column; None for free-form attributes
    json_key: str | None = None  # key in members.attributes
    event_key: str | None = None  # key in the event's properties
    computed: bool = False  # derived in SQL (engine.store.computed); loaders put its value in the member mapping
    choices: tuple[str, ...] = ()  # the only values it takes (validation catches a typo that would match nobody)

    @property
    def is_time(self) -> bool:
        return self.kind in (Kind.DATE, Kind.DATETIME)


# Member intelligence values (engine.programme.intelligence computes them).
STAGES = ("new", "active", "silent", "churned")
RFM_SEGMENTS = ("champions", "loyal", "cannot_lose", "at_risk", "potential_loyalists", "new_customers", "promising",
                "hibernating", "needs_attention")

BUILTIN: dict[str, Attribute] = {
    a.name: a
    for a in (
        Attribute("id", Kind.STRING, "id"),
        Attribute("name", Kind.STRING, "name"),
        Attribute("email", Kind.STRING, "email"),
        Attribute("phone", Kind.STRING, "phone"),
        Attribute("birthday", Kind.DATE, "birthday"),
        Attribute("timezone", Kind.STRING, "timezone"),
        Attribute("locale", Kind.STRING, "locale"),
        Attribute("signup_at", Kind.DATETIME, "signup_at"),
        Attribute("tier", Kind.STRING, "tier"),
        Attribute("points", Kind.NUMBER, "points"),
        Attribute("total_spend", Kind.NUMBER, "total_spend"),
        Attribute("order_count", Kind.NUMBER, "order_count"),
        Attribute("last_order_at", Kind.DATETIME, "last_order_at"),
        Attribute("last_login_at", Kind.DATETIME, "last_login_at"),
        Attribute("tier_since", Kind.DATETIME, "tier_since"),
        Attribute("tier_review_at", Kind.DATETIME, "tier_review_at"),
        Attribute("qualifying_spend", Kind.NUMBER, "qualifying_spend"),
        Attribute("qualifying_orders", Kind.NUMBER, "qualifying_orders"),
        Attribute("points_next_expiry_at", Kind.DATETIME, "points_next_expiry_at"),
        Attribute("points_next_expiry", Kind.NUMBER, "points_next_expiry"),
        Attribute("lifecycle_stage", Kind.STRING, "lifecycle_stage", choices=STAGES),
        Attribute("rfm_r", Kind.NUMBER, "rfm_r"),
        Attribute("rfm_f", Kind.NUMBER, "rfm_f"),
        Attribute("rfm_m", Kind.NUMBER, "rfm_m"),
        Attribute("rfm_segment", Kind.STRING, "rfm_segment", choices=RFM_SEGMENTS),
        Attribute("aov", Kind.NUMBER, "aov"),
        Attribute("predicted_clv", Kind.NUMBER, "predicted_clv"),
        Attribute("churn_risk", Kind.BOOL, "churn_risk"),
        Attribute("churn_reasons", Kind.STRING, "churn_reasons"),
        Attribute("email_opt_in", Kind.BOOL, "email_opt_in"),
        Attribute("sms_opt_in", Kind.BOOL, "sms_opt_in"),
    )
}

DATE_ATTRIBUTES = ("birthday", "signup_at")


COMPUTED = re.compile(r"^(days_since_signup|days_since_last_order|(orders|spend)_last_([1-9][0-9]{0,3})_days"
                      r"|points_expiring_([1-9][0-9]{0,3})_days)$")
COMPUTED_EXAMPLES = ("days_since_signup", "days_since_last_order", "orders_last_30_days", "spend_last_365_days",
                     "points_expiring_30_days")


def resolve(name: str, *, allow_event: bool = False) -> Attribute | None:
    """The attribute a condition key names, or None if it names nothing."""
    if name in BUILTIN:
        return BUILTIN[name]
    if COMPUTED.match(name):
        return Attribute(name, Kind.NUMBER, computed=True)
    prefix, _, rest = name.partition(".")
    if prefix == "attributes" and rest:
        return Attribute(name, Kind.ANY, json_key=rest)
    if prefix == "event" and rest and allow_event:
        return Attribute(name, Kind.ANY, event_key=rest)
    return None
