"""Member intelligence, computed in SQL and stored on the member so that audiences select on plain columns.

Per member (refreshed for a member whenever their events or import rows arrive, and for everyone on the
schedule ``intelligence.refresh_every``):

- ``lifecycle_stage``: ``new`` (signed up within ``lifecycle.new_for``), else ``active`` (ordered or logged in
  within ``active_within``), ``silent`` (last order or login, or else sign-up, within ``churned_after``), or
  ``churned``.
- ``aov``: average order value, total spend / orders (NULL with no orders).
- ``predicted_clv``: aov × orders per year so far × ``clv_horizon_years`` × a retention factor by stage
  (new and active 1, silent 0.5, churned 0). Orders per year = orders × 365 / days since sign-up (at least 30;
  365 when the sign-up date is unknown).
- ``churn_risk`` with ``churn_reasons``: ``no_login`` (the last login is older than ``churn_risk.no_login_for``;
  members never seen logging in are not flagged) and ``aov_drop`` (the average order over ``churn_risk.recent``
  is below ``aov_drop`` × the average order before it).

Over the whole base, on the schedule only: RFM quintiles among members with at least one order. R ranks last
order time, F order count, M total spend; each score is ``1 + (rank - 1) × 5 ÷ n`` with tied values sharing the
lowest rank, so equal members always get equal scores. ``rfm_segment`` names the combination (see SEGMENTS).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Float,
    String,
    and_,
    bindparam,
    case,
    cast,
    literal,
    or_,
    text,
    update,
)

from engine.rules.loyalty import Loyalty
from engine.store.computed import days_since_sql, purchases_between
from engine.store.models import UTCDateTime, members

# First match wins; r, f, m are the quintile scores 1-5.
SEGMENTS = (
    ("champions", "r >= 4 AND f >= 4 AND m >= 4"),
    ("loyal", "r >= 3 AND f >= 4"),
    ("cannot_lose", "r <= 2 AND f >= 4 AND m >= 4"),
    ("at_risk", "r <= 2 AND f >= 3"),
    ("potential_loyalists", "r >= 4 AND f >= 2"),
    ("new_customers", "r >= 4"),
    ("promising", "r = 3 AND f <= 2"),
    ("hibernating", "r <= 2"),
    ("needs_attention", "1 = 1"),
)
SEGMENT_NAMES = tuple(name for name, _ in SEGMENTS)  # == attributes.RFM_SEGMENTS (tested)


def _latest(a: Any, b: Any) -> Any:
    return case((a.is_(None), b), (b.is_(None), a), (a > b, a), else_=b)


def _stage(new_cut: Any, active_cut: Any, churn_cut: Any) -> Any:
    active = _latest(members.c.last_order_at, members.c.last_login_at)
    seen = case((active.is_(None), members.c.signup_at), else_=active)
    return case(
        (members.c.signup_at >= new_cut, literal("new")),
        (active >= active_cut, literal("active")),
        (or_(seen.is_(None), seen >= churn_cut), literal("silent")),
        else_=literal("churned"),
    )


def _values(dialect: str) -> dict[str, Any]:
    """The SET clause; every threshold is a bound parameter (see _params), so it is built once per dialect."""
    stage = _stage(bindparam("new_cut", type_=UTCDateTime()), bindparam("active_cut", type_=UTCDateTime()),
                   bindparam("churn_cut", type_=UTCDateTime()))
    orders = cast(members.c.order_count, Float)
    aov = case((members.c.order_count > 0, members.c.total_spend / orders), else_=None)
    now_sql = (bindparam("now_text", type_=String()) if dialect == "sqlite"
               else bindparam("now", type_=UTCDateTime()))
    tenure = days_since_sql(members.c.signup_at, now_sql, dialect)
    tenure = case((tenure.is_(None), 365), (tenure < 30, 30), else_=tenure)
    retention = case((stage == "churned", 0.0), (stage == "silent", 0.5), else_=1.0)
    # aov × orders per year is spend per year.
    clv = case((members.c.order_count > 0, members.c.total_spend * 365.0 / cast(tenure, Float)
                * bindparam("horizon", type_=Float()) * retention), else_=None)
    no_login = and_(members.c.last_login_at.is_not(None),
                    members.c.last_login_at < bindparam("login_cut", type_=UTCDateTime()))
    recent_n, recent_s = purchases_between(bindparam("recent_cut", type_=UTCDateTime()),
                                           bindparam("now", type_=UTCDateTime()), dialect)
    earlier_n = members.c.order_count - recent_n
    drop = and_(recent_n > 0, earlier_n > 0,
                cast(recent_s, Float) / cast(recent_n, Float)
                < bindparam("aov_drop", type_=Float()) * (members.c.total_spend - recent_s) / cast(earlier_n, Float))
    reasons = case((and_(no_login, drop), literal("no_login,aov_drop")), (no_login, literal("no_login")),
                   (drop, literal("aov_drop")), else_=None)
    return {"lifecycle_stage": stage, "aov": aov, "predicted_clv": clv, "churn_risk": or_(no_login, drop),
            "churn_reasons": reasons}


def _params(loyalty: Loyalty, now: datetime) -> dict[str, Any]:
    life, churn = loyalty.lifecycle, loyalty.churn
    return {"new_cut": now - life.new_for, "active_cut": now - life.active_within,
            "churn_cut": now - life.churned_after, "login_cut": now - churn.no_login_for,
            "recent_cut": now - churn.recent, "now": now,
            "now_text": now.astimezone(UTC).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f"),
            "horizon": loyalty.intelligence.clv_horizon_years, "aov_drop": churn.aov_drop}


@functools.cache
def _statements(dialect: str) -> tuple[Any, Any]:
    everyone = update(members).values(_values(dialect))
    return everyone, everyone.where(members.c.id.in_(bindparam("ids", expanding=True)))


def refresh(conn: Connection, loyalty: Loyalty, now: datetime, member_ids: Iterable[str] | None = None) -> int:
    """Recompute the per-member values for MEMBER_IDS (everyone when None); return rows updated."""
    everyone, some = _statements(conn.dialect.name)
    params = _params(loyalty, now)
    if member_ids is None:
        return int(conn.execute(everyone, params).rowcount or 0)
    ids = sorted(set(member_ids))
    done = 0
    for start in range(0, len(ids), 500):
        done += int(conn.execute(some, params | {"ids": ids[start:start + 500]}).rowcount or 0)
    return done


def refresh_rfm(conn: Connection) -> int:
    """Recompute RFM quintile scores and segments over the whole member base; return members scored."""
    segment = "CASE " + " ".join(f"WHEN {rule} THEN '{name}'" for name, rule in SEGMENTS) + " END"
    scored = f"""
        WITH ranked AS (
            SELECT id,
                   RANK() OVER (ORDER BY last_order_at) AS r_rank,
                   RANK() OVER (ORDER BY order_count) AS f_rank,
                   RANK() OVER (ORDER BY total_spend) AS m_rank,
                   COUNT(*) OVER () AS n
            FROM members WHERE order_count > 0 AND last_order_at IS NOT NULL
        ), scores AS (
            SELECT id, 1 + (r_rank - 1) * 5 / n AS r, 1 + (f_rank - 1) * 5 / n AS f, 1 + (m_rank - 1) * 5 / n AS m
            FROM ranked
        ), named AS (
            SELECT id, r, f, m, {segment} AS segment FROM scores
        )
        UPDATE members SET rfm_r = named.r, rfm_f = named.f, rfm_m = named.m, rfm_segment = named.segment
        FROM named WHERE members.id = named.id
    """
    done = int(conn.execute(text(scored)).rowcount or 0)
    conn.execute(text("UPDATE members SET rfm_r = NULL, rfm_f = NULL, rfm_m = NULL, rfm_segment = NULL "
                      "WHERE rfm_r IS NOT NULL AND NOT (order_count > 0 AND last_order_at IS NOT NULL)"))
    return done
