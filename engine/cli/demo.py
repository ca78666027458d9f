"""``run.py demo``: a fresh SQLite database of generated members, run through a simulated window.

The members look like a real programme: seven in ten are Chinese-speaking,
spend is skewed so most are 普通会员 and a few are 钻石, and a good share have
not ordered for over 60 days (the win-back audience). During the window
members sign up, log in, buy, climb tiers, come back after a win-back
message, and now and then unsubscribe. Everything is drawn from one seeded
generator, so one seed tells one story; the clock ends at the start of the
current UTC hour so that ``run.py log`` shows recent dates.

The demo only ever rebuilds a database it made itself (a marker file sits
beside it), and its messages go to outbox files, never to a provider.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, func, select

from channels.base import Channel
from channels.local import OutboxChannel
from engine.app import App
from engine.cli import funnel
from engine.cli.demo_world import (
    BATCH,
    CHANNELS,
    NEW_MEMBER_SHARE,
    World,
)
from engine.cli.simulate import simulate
from engine.config import Config
from engine.exceptions import InputError
from engine.ingest.events import record_events
from engine.ingest.members import ImportReport, parse_member, upsert_members
from engine.programme import points
from engine.programme.tiers import load_purchases, window_start
from engine.rules.loyalty import Loyalty
from engine.store.database import Store
from engine.store.models import MessageStatus, members, messages
from engine.tick.report import TickReport
from engine.tick.safety import QuietHours

TICK = timedelta(hours=3)  # 720 ticks for 90 days


def _database_file(config: Config) -> Path:
    url = config.database_url
    if not url.startswith("sqlite:///") or url.endswith(":memory:"):
        raise InputError("the demo builds its own SQLite database and never touches another one; "
                         "run it as: python run.py --db sqlite:///var/demo.db demo")
    return Path(url.removeprefix("sqlite:///"))


def _prepare_files(config: Config, db: Path, members: int, seed: int) -> dict[str, Path]:
    """Delete an earlier demo's database and outboxes; refuse to touch files the demo did not make."""
    marker = db.with_name(db.name + ".demo")
    ours = _files_made_by_demo(marker)
    database = [db.with_name(db.name + suffix) for suffix in ("", "-wal", "-shm", ".lock")]
    if any(p.exists() for p in database[:3]) and str(db) not in ours:
        raise InputError(f"{db} already exists and was not made by the demo, which only rebuilds its own "
                         f"databases; run it on another file: python run.py --db sqlite:///var/demo.db demo")
    guard = Store(f"sqlite:///{db}")  # refuses, naming the holder, while a daemon works on this file
    guard.acquire_process_lock("demo")
    guard.close()
    outboxes = {channel: config.outbox_path(channel) for channel in CHANNELS}
    if any(p.exists() and str(p) not in ours for p in outboxes.values()):
        # Never mix demo messages into a real outbox: keep them beside the demo database instead.
        outboxes = {channel: db.with_name(f"{db.stem}-outbox") / f"{channel}.jsonl" for channel in CHANNELS}
    for path in [*database, *outboxes.values()]:
        path.unlink(missing_ok=True)
    db.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"made_by": "run.py demo", "members": members, "seed": seed,
                                  "files": [str(db), *map(str, outboxes.values())]}, indent=2) + "\n",
                      encoding="utf-8")
    return outboxes


def _files_made_by_demo(marker: Path) -> list[str]:
    try:
        files = json.loads(marker.read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):  # no marker, or not one we wrote: nothing is ours
        return []
    return [str(f) for f in files] if isinstance(files, list) else []


class Driver:
    """The simulation's hooks: feed the world's events in before each tick, report progress after."""

    def __init__(self, app: App, world: World, days: int, echo: Callable[[str], None]) -> None:
        self.app, self.world, self.echo = app, world, echo
        self.loyalty = world.loyalty
        self.recorded = ImportReport()
        self.counts: Counter[str] = Counter()
        self.seen_from = world.start
        self.every = timedelta(days=max(10, math.ceil(days / 9)))
        self.next_progress = world.start + self.every

    def before_tick(self, now: datetime) -> None:
        self.world.react(self._sent_since(now), now)
        joined, happened = self.world.due(now)
        region = self.app.config.default_region
        if joined:
            with self.app.store.begin() as conn:
                upsert_members(conn, self.app.store.dialect, [parse_member(r, self.loyalty, region) for r in joined],
                               now, loyalty=self.loyalty)
        if happened:
            report = record_events(self.app.store, ((i, row, None) for i, row in enumerate(happened, 1)),
                                   self.loyalty, now, "demo")
            self.recorded.loaded += report.loaded
            self.recorded.triggered += report.triggered
            self.recorded.tier_changes += report.tier_changes
            self.recorded.skipped += report.skipped

    def _sent_since(self, now: datetime) -> list[tuple[str, str, str, str]]:
        with self.app.store.connect() as conn:
            rows = conn.execute(select(messages.c.member_id, messages.c.journey, messages.c.step, messages.c.channel)
                                .where(messages.c.sent_at >= self.seen_from, messages.c.sent_at < now)
                                .order_by(messages.c.id)).all()
        self.seen_from = now
        return [(str(m), str(j), str(s), str(c)) for m, j, s, c in rows]

    def after_tick(self, report: TickReport) -> None:
        self.counts.update(report.counts)
        if report.now >= self.next_progress or report.now >= self.world.end:
            day = (report.now - self.world.start).days
            total = (self.world.end - self.world.start).days
            self.echo(f"  day {day:>3}/{total}  {report.now:%Y-%m-%d}  events {self.recorded.loaded:,}  "
                      f"sent {self.counts['sent']:,}  deferred {self.counts['queued']:,}  "
                      f"suppressed {self.counts['suppressed']:,}")
            self.next_progress += self.every


def run_demo(config: Config, members: int, days: int, seed: int, echo: Callable[[str], None], *,
             command: str = "python run.py") -> None:
    """Build a fresh demo database of MEMBERS generated members and simulate DAYS days ending this hour."""
    started = time.perf_counter()
    db = _database_file(config)
    outboxes = _prepare_files(config, db, members, seed)
    # Outbox channels whatever config.yaml says: demo members must never reach a real provider.
    channels: dict[str, Channel] = {name: OutboxChannel(path) for name, path in outboxes.items()}
    try:
        app = App(config, channels=channels)
    except BaseException:
        for channel in channels.values():
            channel.close()
        raise
    try:
        app.store.acquire_process_lock("demo")
        loyalty = app.require_valid_rules().loyalty
        end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        start = end - timedelta(days=days)
        world = World(random.Random(seed), loyalty, start, end)
        joining = max(1, round(members * NEW_MEMBER_SHARE))
        _insert(app, world.existing(members - joining), loyalty, start, random.Random(seed + 1))
        world.plan_signups(members - joining, joining)
        echo(f"demo: {members:,} members ({members - joining:,} before the window, {joining:,} joining during it), "
             f"seed {seed}")
        echo(f"simulating {start:%Y-%m-%d %H:%M} → {end:%Y-%m-%d %H:%M} UTC, a tick every "
             f"{TICK.total_seconds() / 3600:g}h")
        driver = Driver(app, world, days, echo)
        simulate(app, start, end, TICK, before_tick=driver.before_tick, after_tick=driver.after_tick)
        echo(f"done in {time.perf_counter() - started:.1f}s: {driver.recorded.loaded:,} events recorded, "
             f"{driver.recorded.tier_changes:,} tier upgrades")
        if driver.recorded.skipped:
            echo(f"warning: {len(driver.recorded.skipped)} generated events were rejected, e.g.: "
                 f"{driver.recorded.skipped[0][1]}")
        with app.store.connect() as conn:
            for line in _summary(conn, db, outboxes, loyalty, app.config, command):
                echo(line)
    finally:
        app.close()


def _insert(app: App, rows: Iterator[dict[str, Any]], loyalty: Loyalty, now: datetime, rng: random.Random) -> None:
    """Generated members, through parse_member so they are validated exactly like an import. Their balances
    become ledger lots earned over the year before the window (not on the import day), so some expire during
    the demo and the points-expiry reminder has work to do."""
    region = app.config.default_region
    batch: list[dict[str, Any]] = []
    lots: list[points.Movement] = []

    def flush(conn: Connection) -> None:
        upsert_members(conn, app.store.dialect, batch, now, loyalty=loyalty)
        points.write(conn, loyalty, lots, now)
        points.apply_deltas(conn, {m.member_id: m.points for m in lots}, now)
        points.seal_balances(conn, [m.member_id for m in lots])
        batch.clear()
        lots.clear()

    with app.store.begin() as conn:
        for raw in rows:
            held = int(raw.pop("points", 0) or 0)
            member = parse_member(raw, loyalty, region)
            batch.append(member)
            if held > 0:
                earned = now - timedelta(days=rng.uniform(1, 364), hours=rng.uniform(0, 24))
                lots.append(points.Movement(member["id"], points.Kind.EARN, held, earned,
                                            "points earned before the demo window"))
            if len(batch) >= BATCH:
                flush(conn)
        flush(conn)


def _summary(conn: Connection, db: Path, outboxes: dict[str, Path], loyalty: Loyalty, config: Config,
             run: str) -> list[str]:
    lines = [f"{'journey':<14}{'entered':>9}{'active':>8}{'completed':>11}{'exited':>8}{'converted':>11}"]
    for f in funnel.figures(conn):
        lines.append(f"{f.journey:<14}{f.entered:>9,}{f.active:>8,}{f.completed:>11,}{f.exited:>8,}"
                     f"{f.converted:>11,}")
    counts = {(c, s): int(n) for c, s, n in conn.execute(
        select(messages.c.channel, messages.c.status, func.count()).group_by(messages.c.channel, messages.c.status))}
    statuses = [s.value for s in MessageStatus if any(k[1] == s.value for k in counts)]
    lines.append(f"{'messages':<14}" + "".join(f"{s:>12}" for s in statuses))
    for channel in CHANNELS:
        lines.append(f"  {channel:<12}" + "".join(f"{counts.get((channel, s), 0):>12,}" for s in statuses))
    reasons = conn.execute(select(messages.c.reason, func.count()).where(messages.c.status == "suppressed")
                           .group_by(messages.c.reason).order_by(func.count().desc())).all()
    if reasons:
        lines.append("  suppressed because: " + ", ".join(f"{r} {int(n):,}" for r, n in reasons))
    tiers: dict[str, int] = {str(t): int(n) for t, n in conn.execute(
        select(members.c.tier, func.count()).group_by(members.c.tier))}
    stages: dict[str | None, int] = {s: int(n) for s, n in conn.execute(
        select(members.c.lifecycle_stage, func.count()).group_by(members.c.lifecycle_stage))}
    held = conn.execute(select(func.coalesce(func.sum(members.c.points), 0))).scalar_one()
    lines.append("programme: " + ", ".join(f"{t} {int(n):,}" for t, n in sorted(
        tiers.items(), key=lambda kv: -int(kv[1]))) + "; " + ", ".join(
        f"{s} {int(n):,}" for s, n in stages.items() if s) + f"; {int(held):,} points held")
    lines.append(f"database: {db}")
    lines.append(f"outboxes: {outboxes['email']}, {outboxes['sms']}")
    lines.append("try next:")
    lines += [f"  {run} log --format jsonl | head", f"  {run} log --status suppressed", f"  {run} report",
              f"  {run} report --programme"]
    showcase = _showcase_member(conn)
    if showcase:
        lines.append(f"  {run} member show {showcase}")
    near = _near_next_tier(conn, loyalty, config)
    if near is not None:
        member_id, needed = near
        lines.append(f"  {run} member show {member_id}   # {needed:,.2f} short of the next tier; then:")
        lines.append(f"  {run} event {member_id} purchase --prop amount={int(needed) + 1} --prop order_id=DEMO-1 "
                     f"&& {run} tick")
    lines.append(f"  {run} audit verify")
    return lines


def _near_next_tier(conn: Connection, loyalty: Loyalty, config: Config) -> tuple[str, float] | None:
    """A member of the lowest tier with email consent whose spend over the qualification window right now is
    closest below the next tier (a purchase of the shortfall upgrades them), preferring one outside quiet hours
    now, so that the congratulation goes at once rather than in the morning."""
    if len(loyalty.tiers) < 2:
        return None
    target = loyalty.tiers[1]
    rows = conn.execute(select(members.c.id, members.c.timezone, members.c.total_spend, members.c.order_count)
                        .where(members.c.tier == loyalty.tiers[0].id, members.c.email_opt_in.is_(True),
                               members.c.email.is_not(None))
                        .order_by(members.c.total_spend.desc(), members.c.id).limit(500)).all()
    now = datetime.now(UTC)
    start = window_start(loyalty, now)
    history = load_purchases(conn, [r.id for r in rows], start) if start is not None else {}
    quiet = config.quiet_hours
    hours = QuietHours(quiet.start, quiet.end) if quiet is not None else None
    best: tuple[bool, float, str] | None = None
    for row in rows:
        if start is None:
            spend, orders = float(row.total_spend or 0), int(row.order_count or 0)
        else:
            spend, orders = history[row.id].totals(start, now) if row.id in history else (0.0, 0)
        short = target.min_spend - spend
        if short <= 0 or not target.qualifies(spend + math.ceil(short), orders + 1):
            continue
        awake = hours is None or hours.release(now, row.timezone, config.default_timezone) is None
        key = (not awake, short, str(row.id))
        if best is None or key < best:
            best = key
    return None if best is None else (best[2], best[1])


def _showcase_member(conn: Connection) -> str | None:
    """The member whose story spans the most journeys: the most interesting one to look at."""
    row = conn.execute(select(messages.c.member_id).where(messages.c.status == "sent")
                       .group_by(messages.c.member_id)
                       .order_by(func.count(func.distinct(messages.c.journey)).desc(), func.count().desc(),
                                 messages.c.member_id).limit(1)).first()
    return None if row is None else str(row[0])
