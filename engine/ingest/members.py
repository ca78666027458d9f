"""Members in: reading CSV/JSONL files, validating member rows, and upserting them with the programme's books.

A bad row is reported with its line number and the reason, and skipped; the good rows around it still load.
Events are recorded by engine.ingest.events, which reads files with ``read_rows`` from here.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import phonenumbers
from babel.core import Locale, UnknownLocaleError
from email_validator import EmailNotValidError, validate_email
from sqlalchemy import Connection, bindparam, case, select, update

from engine.domain.timeutil import parse_date, parse_instant, valid_zone
from engine.exceptions import InputError
from engine.programme import intelligence, points
from engine.programme.tiers import load_purchases, window_start
from engine.rules.loyalty import Loyalty
from engine.store.database import Store, insert_for
from engine.store.models import events, members

BATCH = 1000
MEMBER_FIELDS = (
    "id", "name", "email", "phone", "birthday", "timezone", "locale", "signup_at", "tier", "points",
    "total_spend", "order_count", "last_order_at", "email_opt_in", "sms_opt_in",
)
EARNED_TIER = "_earned_tier_order"  # marker on parsed rows whose tier was computed from total_spend
_TRUE = {"true", "1", "yes", "y", "t", "是"}
_FALSE = {"false", "0", "no", "n", "f", "否", ""}
_NUMBER = re.compile(r"^-?(0|[1-9][0-9]*)(\.[0-9]+)?$")


@dataclass
class ImportReport:
    loaded: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)
    triggered: int = 0  # events recorded as a consequence (points_earned, tier_changed)
    tier_changes: int = 0

    def lines(self, file: str) -> list[str]:
        return [f"{file}:{line}: {reason}; row skipped" for line, reason in self.skipped]


class RowError(ValueError):
    pass


# --------------------------------------------------------------------------- reading files


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """Yield (line number, row, error) from a CSV or JSONL file, chosen by extension."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".ndjson"):
        raise InputError(f"{path}: unsupported file type {suffix or '(none)'}; use .csv or .jsonl")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    with path.open(encoding="utf-8-sig", newline="") as handle:
        if suffix == ".csv":
            reader = csv.DictReader(handle)
            if not reader.fieldnames:
                raise InputError(f"{path}: the file is empty; the first line must be the column names")
            start = 2
            for row in reader:
                if None in row:
                    yield start, None, f"{len(row[None]) if row[None] else 1} more value(s) than there are columns"
                elif any(value is None for value in row.values()):
                    missing = sum(value is None for value in row.values())
                    yield start, None, f"{missing} value(s) missing: the row has fewer values than there are columns"
                else:
                    yield start, {k.strip(): v for k, v in row.items() if k is not None}, None
                start = reader.line_num + 1
        else:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield number, None, f"not valid JSON ({exc.msg} at column {exc.colno})"
                    continue
                if not isinstance(value, dict):
                    yield number, None, "each line must be a JSON object"
                    continue
                yield number, value, None


# --------------------------------------------------------------------------- members


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def text_field(value: Any, name: str, limit: int) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise RowError(f"{name} must be text, got: {value!r}")
    text = str(value).strip()
    if len(text) > limit:
        raise RowError(f"{name} must be at most {limit} characters")
    control = _CONTROL.search(text)
    if control:
        raise RowError(f"{name} must not contain line breaks or other control characters, found "
                       f"{control.group()!r} at character {control.start() + 1}")
    return text or None


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise RowError(f"{name} must be true or false, got: {value!r}")


def _number(value: Any, name: str, *, integer: bool = False) -> float | int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise RowError(f"{name} must be a number, got: {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RowError(f"{name} must be a number, got: {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise RowError(f"{name} must be a number of 0 or more, got: {value!r}")
    if integer:
        if number != int(number):
            raise RowError(f"{name} must be a whole number, got: {value!r}")
        return int(number)
    return number


def normalise_email(value: Any) -> str | None:
    text = text_field(value, "email", 320)
    if text is None:
        return None
    try:
        return str(validate_email(text, check_deliverability=False).normalized)
    except EmailNotValidError as exc:
        raise RowError(f"email {text!r} is not a valid address: {exc}") from None


def normalise_phone(value: Any, region: str) -> str | None:
    text = text_field(value, "phone", 32)
    if text is None:
        return None
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        raise RowError(f"phone {text!r} is not a phone number") from None
    if not phonenumbers.is_valid_number(number):
        raise RowError(f"phone {text!r} is not a valid number (write it with +country code if it is not in {region})")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _locale(value: Any) -> str | None:
    text = text_field(value, "locale", 16)
    if text is None:
        return None
    try:
        Locale.parse(text.replace("-", "_"))
    except (UnknownLocaleError, ValueError):
        raise RowError(f"locale must be a language tag such as zh-CN or en, got: {value!r}") from None
    return text.replace("_", "-")


def attribute_value(value: Any) -> Any:
    """CSV cells are text: numbers and true/false become typed so conditions can compare them."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if _NUMBER.match(text):
        return float(text) if "." in text else int(text)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_member(row: dict[str, Any], loyalty: Loyalty, region: str) -> dict[str, Any]:
    """Validate one member row into column values (only the columns the row gives)."""
    if not text_field(row.get("id"), "id", 64):
        raise RowError("id is missing")
    out: dict[str, Any] = {"id": text_field(row["id"], "id", 64)}
    problems: list[str] = []

    def take(name: str, parse: Any) -> None:
        if name in row:
            try:
                out[name] = parse(row[name])
            except (RowError, ValueError) as exc:
                message = str(exc)
                problems.append(message if message.startswith(name) else f"{name} {message}")

    take("name", lambda v: text_field(v, "name", 200))
    take("email", normalise_email)
    take("phone", lambda v: normalise_phone(v, region))
    take("birthday", lambda v: None if v in (None, "") else parse_date(v))
    take("timezone", lambda v: _zone_text(v))
    take("locale", _locale)
    take("signup_at", lambda v: None if v in (None, "") else parse_instant(v))
    take("last_order_at", lambda v: None if v in (None, "") else parse_instant(v))
    take("points", lambda v: _number(v, "points", integer=True) or 0)
    take("total_spend", lambda v: float(_number(v, "total_spend") or 0))
    take("order_count", lambda v: _number(v, "order_count", integer=True) or 0)
    take("email_opt_in", lambda v: _bool(v, "email_opt_in"))
    take("sms_opt_in", lambda v: _bool(v, "sms_opt_in"))
    if "tier" in row and row["tier"] not in (None, ""):
        tier_ids = [t.id for t in loyalty.tiers]
        if row["tier"] not in tier_ids:
            problems.append(f"tier must be one of {', '.join(tier_ids)} (rules/loyalty.yaml), got: {row['tier']!r}")
        else:
            out["tier"] = row["tier"]
    elif "total_spend" in out:
        # Earned from spend: on an update it may raise the stored tier but never lower it (that is a review's job).
        out["tier"] = loyalty.tier_for(out["total_spend"], int(out.get("order_count") or 0)).id
        out[EARNED_TIER] = tuple(t.id for t in loyalty.tiers)
    extra = {k: attribute_value(v) for k, v in row.items() if k not in MEMBER_FIELDS and k != "attributes" and k}
    if isinstance(row.get("attributes"), dict):
        extra.update(row["attributes"])
    if extra:
        out["attributes"] = extra
    if problems:
        raise RowError("; ".join(problems))
    return out


def _zone_text(value: Any) -> str | None:
    text = text_field(value, "timezone", 64)
    if text is not None and not valid_zone(text):
        raise RowError(f"timezone must be an IANA zone such as Asia/Shanghai or Europe/London, got: {value!r}")
    return text


def upsert_members(conn: Connection, dialect: str, rows: list[dict[str, Any]], now: datetime, *,
                   loyalty: Loyalty) -> None:
    """Insert or update validated member rows (see parse_member) in one statement per column shape.

    Around the upsert, the loyalty programme's books follow: a ``points`` value becomes a ledger adjustment of
    the difference, added spend becomes a ``spend_imported`` event at the last order time (so it counts for tier
    qualification like a purchase made then), and tier review dates and member intelligence are set.
    """
    if not rows:
        return
    ids = [row["id"] for row in rows]
    old = {r.id: r for r in conn.execute(select(members.c.id, members.c.points, members.c.total_spend,
                                                members.c.order_count, members.c.last_order_at)
                                         .where(members.c.id.in_(ids)))}
    _upsert(conn, dialect, rows, now)
    _programme_books(conn, rows, old, now, loyalty)


def _programme_books(conn: Connection, rows: list[dict[str, Any]], old: dict[str, Any], now: datetime,
                     loyalty: Loyalty) -> None:
    moves: list[points.Movement] = []
    spent: list[dict[str, Any]] = []
    for row in rows:
        before = old.get(row["id"])
        if "points" in row:
            delta = int(row["points"]) - (int(before.points or 0) if before is not None else 0)
            if delta:
                moves.append(points.Movement(row["id"], points.Kind.ADJUST, delta, now,
                                             f"member import: balance set to {row['points']}"))
        if "total_spend" in row:
            extra = float(row["total_spend"]) - (float(before.total_spend or 0) if before is not None else 0.0)
            orders = int(row.get("order_count") or 0) - (int(before.order_count or 0) if before is not None else 0)
            if extra > 0:
                at = row.get("last_order_at") or (before.last_order_at if before is not None else None) or now
                spent.append({"external_id": None, "member_id": row["id"], "type": "spend_imported",
                              "occurred_at": min(at, now), "properties": {"amount": round(extra, 2),
                                                                          "orders": max(0, orders)},
                              "source": "import", "recorded_at": now, "handled_at": now})
    points.write(conn, loyalty, moves, now)
    points.seal_balances(conn, [m.member_id for m in moves])
    if spent:
        conn.execute(events.insert(), spent)
    ids = [row["id"] for row in rows]
    lowest = loyalty.tiers[0].id
    every = loyalty.qualification.review_every
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        conn.execute(update(members).where(members.c.id.in_(chunk), members.c.tier_since.is_(None))
                     .values(tier_since=now))
        conn.execute(update(members).where(members.c.id.in_(chunk), members.c.tier_review_at.is_(None),
                                           members.c.tier != lowest).values(tier_review_at=now + every))
    spend_rows = [row["id"] for row in rows if "total_spend" in row]
    if spend_rows:
        start_at = window_start(loyalty, now)
        if start_at is None:
            conn.execute(update(members).where(members.c.id.in_(spend_rows)).values(
                qualifying_spend=members.c.total_spend, qualifying_orders=members.c.order_count))
        else:
            history = load_purchases(conn, spend_rows, start_at)
            totals = [{"_id": m, "_s": t[0], "_o": t[1]} for m in spend_rows
                      for t in [history[m].totals(start_at, now) if m in history else (0.0, 0)]]
            conn.execute(update(members).where(members.c.id == bindparam("_id")).values(
                qualifying_spend=bindparam("_s"), qualifying_orders=bindparam("_o")), totals)
    intelligence.refresh(conn, loyalty, now, ids)


def _upsert(conn: Connection, dialect: str, rows: list[dict[str, Any]], now: datetime) -> None:
    insert = insert_for(dialect)
    # Rows that give different columns cannot share one executemany statement.
    by_shape: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        by_shape.setdefault(tuple(sorted(row)), []).append(row)
    for shape, group in by_shape.items():
        order = group[0].get(EARNED_TIER)
        columns = tuple(c for c in shape if c != EARNED_TIER)
        values = [{"attributes": {}, **{c: row[c] for c in columns}, "created_at": now, "updated_at": now}
                  for row in group]
        stmt = insert(members)
        updates: dict[str, Any] = {c: stmt.excluded[c] for c in columns if c != "id" and c != "attributes"}
        updates["updated_at"] = stmt.excluded.updated_at
        if order:
            rank = {tier: i for i, tier in enumerate(order)}
            earned, stored = case(rank, value=stmt.excluded.tier, else_=-1), case(rank, value=members.c.tier, else_=-1)
            updates["tier"] = case((earned > stored, stmt.excluded.tier), else_=members.c.tier)
        if "attributes" in shape:
            if dialect == "sqlite":
                from sqlalchemy import func

                updates["attributes"] = func.json_patch(members.c.attributes, stmt.excluded.attributes)
            else:
                from sqlalchemy import cast
                from sqlalchemy.dialects.postgresql import JSON, JSONB

                updates["attributes"] = cast(
                    cast(members.c.attributes, JSONB).op("||")(cast(stmt.excluded.attributes, JSONB)), JSON
                )
        conn.execute(stmt.on_conflict_do_update(index_elements=["id"], set_=updates), values)


def import_members(store: Store, path: Path, loyalty: Loyalty, region: str, now: datetime) -> ImportReport:
    report = ImportReport()
    batch: list[dict[str, Any]] = []
    seen_in_batch: set[str] = set()
    with store.begin() as conn:
        for line, row, error in read_rows(path):
            if error or row is None:
                report.skipped.append((line, error or "empty row"))
                continue
            try:
                member = parse_member(row, loyalty, region)
            except RowError as exc:
                report.skipped.append((line, str(exc)))
                continue
            if member["id"] in seen_in_batch:
                upsert_members(conn, store.dialect, batch, now, loyalty=loyalty)
                batch, seen_in_batch = [], set()
            batch.append(member)
            seen_in_batch.add(member["id"])
            report.loaded += 1
            if len(batch) >= BATCH:
                upsert_members(conn, store.dialect, batch, now, loyalty=loyalty)
                batch, seen_in_batch = [], set()
        upsert_members(conn, store.dialect, batch, now, loyalty=loyalty)
    return report
