"""Journey versions: every distinct definition of a journey is stored once and numbered.

Members finish a journey on the version they entered. A journey whose file is
broken keeps running its last good stored version; a journey whose file was
removed is retired (no new entries, no further sends).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, func, select, update

from engine.exceptions import EngineError
from engine.rules.conditions import Condition, computed_names
from engine.rules.journey import Journey
from engine.rules.rulebook import Rulebook, journey_conditions, journey_from_definition, snapshot, stored_segments
from engine.store.database import insert_for
from engine.store.models import journey_state, journey_versions, template_versions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiveJourney:
    journey: Journey
    version: int
    segments: dict[str, Condition]

    @property
    def id(self) -> str:
        return self.journey.id


def computed_needed(journeys: Iterable[LiveJourney]) -> set[str]:
    """Computed attributes any condition of these journeys uses: loaded with each member on the Python paths."""
    needed: set[str] = set()
    for live in journeys:
        for condition in journey_conditions(live.journey):
            needed |= computed_names(condition, live.segments)
    return needed


class VersionUnreadable(EngineError):
    """A stored journey version could not be rebuilt (a bug, or a database edited by hand)."""


class VersionCache:
    """Parsed stored versions, by (journey id, version); versions never change once stored."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int], LiveJourney] = {}

    def get(self, conn: Connection, journey_id: str, version: int) -> LiveJourney | None:
        """The stored version; None if there is none. VersionUnreadable if it is there but cannot be rebuilt: the
        caller sets aside what depends on it, never treats it as missing (that would end its members' journeys)."""
        key = (journey_id, version)
        if key not in self._cache:
            row = conn.execute(select(journey_versions.c.definition, journey_versions.c.source_path).where(
                journey_versions.c.journey_id == journey_id, journey_versions.c.version == version)).first()
            if row is None:
                return None
            try:
                journey = journey_from_definition(row.definition, row.source_path)
                segments = stored_segments(row.definition)
            except Exception as exc:
                raise VersionUnreadable(f"journey {journey_id} version {version} (from {row.source_path}) cannot be "
                                        f"read back from the database: {type(exc).__name__}: {exc}") from exc
            self._cache[key] = LiveJourney(journey, version, segments)
        return self._cache[key]

    def put(self, live: LiveJourney) -> None:
        self._cache[(live.id, live.version)] = live

    def all_live(self) -> list[LiveJourney]:
        """Every version loaded so far (current ones and those members are still finishing)."""
        return list(self._cache.values())


def sync(conn: Connection, dialect: str, book: Rulebook, cache: VersionCache, now: datetime) -> dict[str, LiveJourney]:
    """Register new versions of valid journeys; return every journey that should run, by id."""
    insert = insert_for(dialect)
    live: dict[str, LiveJourney] = {}
    segments = book.segments
    for journey in book.journeys.values():
        definition, checksum = snapshot(journey, segments)
        version = conn.execute(select(journey_versions.c.version).where(
            journey_versions.c.journey_id == journey.id, journey_versions.c.checksum == checksum)).scalar()
        if version is None:
            latest = conn.execute(select(func.max(journey_versions.c.version)).where(
                journey_versions.c.journey_id == journey.id)).scalar() or 0
            conn.execute(insert(journey_versions).values(
                journey_id=journey.id, version=latest + 1, checksum=checksum, definition=definition,
                source_path=journey.source, created_at=now).on_conflict_do_nothing())
            version = conn.execute(select(journey_versions.c.version).where(
                journey_versions.c.journey_id == journey.id, journey_versions.c.checksum == checksum)).scalar_one()
            log.info("journey %s: registered version %s from %s", journey.id, version, journey.source)
        stmt = insert(journey_state).values(journey_id=journey.id, current_version=version,
                                            source_path=journey.source, updated_at=now, retired_at=None)
        conn.execute(stmt.on_conflict_do_update(index_elements=["journey_id"], set_={
            "current_version": version, "source_path": journey.source, "retired_at": None, "updated_at": now}))
        item = LiveJourney(journey, version, {n: s.condition for n, s in segments.items()})
        cache.put(item)
        live[journey.id] = item
    for row in conn.execute(select(journey_state).where(journey_state.c.retired_at.is_(None))).mappings():
        if row["journey_id"] in live:
            continue
        if row["source_path"] in book.broken_files:
            kept = cache.get(conn, row["journey_id"], row["current_version"])
            if kept is not None:
                live[kept.id] = kept
                log.warning("journey %s: %s has errors; still running version %s (run `validate`)",
                            kept.id, row["source_path"], kept.version)
            continue
        conn.execute(update(journey_state).where(journey_state.c.journey_id == row["journey_id"])
                     .values(retired_at=now, updated_at=now))
        log.warning("journey %s: its file %s is gone; retired (no new entries or sends)",
                    row["journey_id"], row["source_path"])
    return live


# --------------------------------------------------------------------------- template versions


def register_templates(conn: Connection, dialect: str, sources: Mapping[str, str], now: datetime) -> int:
    """Store each good template source not stored yet (by path and checksum); returns how many were new."""
    if not sources:
        return 0
    insert = insert_for(dialect)
    checksums = {path: hashlib.sha256(source.encode()).hexdigest() for path, source in sources.items()}
    known = {(str(p), str(c)) for p, c in conn.execute(select(template_versions.c.path, template_versions.c.checksum)
                                                         .where(template_versions.c.path.in_(sorted(sources))))}
    fresh = [{"path": path, "checksum": checksum, "source": sources[path], "created_at": now}
             for path, checksum in sorted(checksums.items()) if (path, checksum) not in known]
    if fresh:
        conn.execute(insert(template_versions).on_conflict_do_nothing(), fresh)
    return len(fresh)


def last_good_templates(conn: Connection, paths: Iterable[str]) -> dict[str, tuple[str, datetime]]:
    """The newest stored good version of each of PATHS that has one: (source, when it was stored)."""
    wanted = sorted(set(paths))
    if not wanted:
        return {}
    newest = (select(template_versions.c.path, func.max(template_versions.c.id).label("id"))
              .where(template_versions.c.path.in_(wanted)).group_by(template_versions.c.path).subquery())
    rows = conn.execute(select(template_versions.c.path, template_versions.c.source, template_versions.c.created_at)
                        .join(newest, newest.c.id == template_versions.c.id))
    return {str(path): (str(source), created) for path, source, created in rows}
