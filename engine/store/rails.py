"""What the safety rails read and write: the suppression list, and the marketing messages each member has had
lately (the frequency caps count them)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import Connection, func, select

from engine.store.database import insert_for
from engine.store.models import MessageStatus, messages, suppressions
from engine.store.queries import among, chunked


def marketing_counts(conn: Connection, member_ids: Sequence[str], since: datetime,
                     statuses: Iterable[MessageStatus]) -> dict[tuple[str, str], int]:
    """Per (member, channel): marketing messages created after SINCE in one of STATUSES."""
    stmt = (select(messages.c.member_id, messages.c.channel, func.count())
            .where(messages.c.member_id.in_(list(member_ids)), messages.c.created_at > since,
                   messages.c.category == "marketing", messages.c.status.in_([s.value for s in statuses]))
            .group_by(messages.c.member_id, messages.c.channel))
    return {(str(member_id), str(channel)): int(count) for member_id, channel, count in conn.execute(stmt)}


def add_suppressions(conn: Connection, dialect: str, entries: Iterable[tuple[str, str, str]], source: str,
                     now: datetime) -> None:
    """Add (channel, address, reason) entries; an address already listed keeps its first reason."""
    rows = [{"channel": c, "address": a, "reason": r, "source": source, "created_at": now} for c, a, r in entries if a]
    if rows:
        insert = insert_for(dialect)
        conn.execute(insert(suppressions).on_conflict_do_nothing(), rows)


def suppressed_addresses(conn: Connection, pairs: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
    by_channel: dict[str, set[str]] = defaultdict(set)
    for channel, address in pairs:
        by_channel[channel].add(address)
    found: set[tuple[str, str]] = set()
    dialect = conn.dialect.name
    for channel, addresses in by_channel.items():
        for chunk in chunked(sorted(addresses), dialect):
            # (channel, address) is the unique index: one index probe per address.
            rows = conn.execute(select(suppressions.c.address).where(
                suppressions.c.channel == channel, among(suppressions.c.address, chunk, dialect)))
            found.update((channel, a) for a in rows.scalars())
    return found
