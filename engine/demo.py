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

import heapq
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import click
import phonenumbers
from sqlalchemy import Connection, func, select

from channels.base import Channel
from channels.local import OutboxChannel
from engine import funnel, points
from engine.app import App
from engine.config import Config
from engine.exceptions import InputError
from engine.ingest import ImportReport, parse_member, upsert_members
from engine.loyalty import Loyalty
from engine.models import MessageStatus, members, messages
from engine.recorder import record_events
from engine.report import TickReport
from engine.safety import QuietHours
from engine.simulate import simulate
from engine.store import Store
from engine.tiers import load_purchases, window_start

TICK = timedelta(hours=3)  # 720 ticks for 90 days
NEW_MEMBER_SHARE = 0.1  # of --members, signing up during the window (the welcome journey's audience)
DRIFT = 0.2  # chance that an order is an active member's last for a long while
BATCH = 1000
CHANNELS = ("email", "sms")


# Name and number tables read best as one string each (hence the noqa: SIM905).
SURNAMES = [w.split(":") for w in (  # noqa: SIM905
    "王:wang 李:li 张:zhang 刘:liu 陈:chen 杨:yang 黄:huang 赵:zhao 吴:wu 周:zhou 徐:xu 孙:sun 马:ma 朱:zhu "
    "胡:hu 郭:guo 何:he 高:gao 林:lin 罗:luo 郑:zheng 梁:liang 谢:xie 宋:song 唐:tang 许:xu 韩:han 冯:feng "
    "邓:deng 曹:cao 彭:peng 曾:zeng 肖:xiao 田:tian 董:dong 袁:yuan 潘:pan 蒋:jiang 蔡:cai 余:yu 杜:du 叶:ye "
    "程:cheng 苏:su 魏:wei 吕:lv 丁:ding 沈:shen 姚:yao 卢:lu 姜:jiang 崔:cui 钟:zhong 谭:tan 陆:lu 汪:wang").split()]
# A handful of surnames cover most people: weight by rank, as in the census tables.
SURNAME_WEIGHTS = [1 / (rank + 4) for rank in range(len(SURNAMES))]
GIVEN_NAMES = [w.split(":") for w in (  # noqa: SIM905
    "伟:wei 芳:fang 娜:na 敏:min 静:jing 丽:li 强:qiang 磊:lei 军:jun 洋:yang 勇:yong 艳:yan 杰:jie 娟:juan "
    "涛:tao 明:ming 超:chao 霞:xia 平:ping 刚:gang 雪:xue 琳:lin 斌:bin 颖:ying 鑫:xin 秀英:xiuying "
    "桂英:guiying 建华:jianhua 志强:zhiqiang 海燕:haiyan 丽娟:lijuan 晓东:xiaodong 子涵:zihan 浩然:haoran "
    "欣怡:xinyi 梓轩:zixuan 雨桐:yutong 思远:siyuan 佳怡:jiayi 宇航:yuhang 一鸣:yiming 诗涵:shihan "
    "文博:wenbo 俊杰:junjie 雅琪:yaqi 婷婷:tingting 晓燕:xiaoyan 美玲:meiling 家豪:jiahao 嘉欣:jiaxin").split()]
FIRST_NAMES = ("Oliver Amelia George Isla Harry Ava Jack Mia Charlie Emily James Sophie Thomas Grace "  # noqa: SIM905
               "William Lily Daniel Chloe Michael Emma Ethan Olivia Noah Hannah Lucas Zoe Samuel Ella Ruby").split()
LAST_NAMES = ("Smith Jones Taylor Brown Williams Wilson Johnson Davies Robinson Wright Thompson Evans "  # noqa: SIM905
              "Walker White Roberts Green Hall Wood Jackson Clarke Miller Davis Garcia Martinez Lee").split()
CN_MOBILE = "130 131 132 133 135 136 137 138 139 150 151 152 153 155 158 159 177 180 186 187 188".split()  # noqa: SIM905
CN_CITIES = "上海 北京 广州 深圳 杭州 成都 南京 武汉 苏州 西安 重庆 天津".split()  # noqa: SIM905
# English-speaking members: (time zone, share, mobile prefixes that libphonenumber accepts, cities)
EN_ZONES = (
    ("Europe/London", 0.45, ("+447911", "+447400", "+447480", "+447552"), ("London", "Manchester", "Leeds")),
    ("America/New_York", 0.35, ("+1212", "+1646", "+1917", "+1617"), ("New York", "Boston")),
    ("America/Los_Angeles", 0.20, ("+1213", "+1310", "+1415", "+1206"), ("Los Angeles", "San Francisco")),
)
EMAIL_DOMAINS = ("example.com", "example.net", "example.org")  # reserved names: no real inbox can receive these
# What a sent message makes members do: (journey, step) -> (chance of an order, mean days until it).
ORDERS_AFTER = {
    ("winback", "first_touch"): (0.06, 5.0), ("winback", "sms_offer"): (0.08, 2.0),
    ("birthday", "birthday_email"): (0.15, 3.0), ("welcome", "welcome_email"): (0.08, 2.0),
    ("welcome", "first_order_coupon"): (0.10, 1.5),
}
UNSUBSCRIBE_CHANCE = {"email": 0.004, "sms": 0.012}  # per message received ("回T退订")


@dataclass
class Shopper:
    """What the simulation knows about a member to decide what they do next."""

    id: str
    zone: ZoneInfo
    spend: float
    rate: float = 0.0  # ordinary orders per day
    logins: float = 0.0  # logins per day
    lapsed: bool = False
    chain: int = 0  # bumped when the pace changes, so that the orders planned at the old pace are dropped


class World:
    """The generated members and, on the simulation's clock, what each does next."""

    def __init__(self, rng: random.Random, loyalty: Loyalty, start: datetime, end: datetime) -> None:
        self.rng, self.loyalty, self.start, self.end = rng, loyalty, start, end
        self.shoppers: dict[str, Shopper] = {}
        self.joining: dict[str, dict[str, Any]] = {}  # members who sign up later in the window, not yet inserted
        self.queue: list[tuple[datetime, int, str, str, int]] = []  # (at, seq, kind, member id, chain)
        self.emails: set[str] = set()
        self.seq = 0

    # ------------------------------------------------------------------ people

    def person(self, number: int) -> dict[str, Any]:
        rng = self.rng
        if rng.random() < 0.7:
            (surname, s_py), (given, g_py) = rng.choices(SURNAMES, SURNAME_WEIGHTS)[0], rng.choice(GIVEN_NAMES)
            abroad = rng.random() < 0.1
            zone = "Asia/Singapore" if abroad else "Asia/Shanghai"
            phone = _valid_phone(rng, "+65" + rng.choice("89"), 7) if abroad else \
                _valid_phone(rng, rng.choice(CN_MOBILE), 8)  # written the Chinese way, without +86
            city = "新加坡" if abroad else rng.choice(CN_CITIES)
            raw: dict[str, Any] = {"name": surname + given, "locale": "zh-CN", "timezone": zone, "phone": phone,
                                   "city": city}
            local = rng.choice([f"{s_py}{g_py}{rng.randint(1, 999)}", f"{g_py}.{s_py}{rng.randint(60, 99)}"])
        else:
            first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
            zone, _, prefixes, cities = rng.choices(EN_ZONES, [z[1] for z in EN_ZONES])[0]
            digits = 6 if prefixes[0].startswith("+44") else 7
            raw = {"name": f"{first} {last}", "locale": "en", "timezone": zone, "city": rng.choice(cities),
                   "phone": _valid_phone(rng, rng.choice(prefixes), digits)}
            local = f"{first}.{last}{rng.randint(1, 99)}".lower()
        email = f"{local}@{rng.choice(EMAIL_DOMAINS)}"
        while email in self.emails:
            email = f"{local}{rng.randint(100, 9999)}@{rng.choice(EMAIL_DOMAINS)}"
        self.emails.add(email)
        raw.update(id=f"M{100000 + number}", email=email if rng.random() > 0.06 else "",
                   phone=raw["phone"] if rng.random() > 0.08 else "", birthday=self._birthday(),
                   email_opt_in=rng.random() < 0.85, sms_opt_in=rng.random() < 0.65)
        return raw

    def _birthday(self) -> str:
        rng = self.rng
        if rng.random() < 0.05:
            return ""
        if rng.random() < 0.004:
            return f"{rng.choice(range(1964, 2005, 4))}-02-29"  # celebrated on 28 February in other years
        return (date(rng.randint(1962, 2006), 1, 1) + timedelta(days=rng.randint(0, 364))).isoformat()

    def history(self, raw: dict[str, Any]) -> None:
        """Sign-up, spend and last order of a member who joined in the two years before the window."""
        rng = self.rng
        tenure = rng.uniform(1, 730)
        raw["signup_at"] = (self.start - timedelta(days=tenure)).isoformat()
        roll = rng.random()
        if roll < 0.08:  # signed up, never ordered
            raw.update(total_spend=0, order_count=0, points=0, last_order_at="")
            return
        spend = round(rng.lognormvariate(7.65, 1.6) + 30, 2)  # median ~2,100: most regular, ~1% diamond
        basket = rng.lognormvariate(math.log(220), 0.35) * (1 + math.log10(1 + spend / 5000))
        lapsed = roll < 0.45 and tenure > 75
        gap = rng.uniform(61, tenure) if lapsed else rng.uniform(0, min(60, tenure))
        raw.update(total_spend=spend, order_count=max(1, round(spend / basket)),
                   points=int(spend * rng.uniform(0.1, 0.9)), last_order_at=(self.start - timedelta(days=gap))
                   .isoformat())

    def existing(self, count: int) -> Iterator[dict[str, Any]]:
        """Members already in the programme when the window opens, with their plans for the window."""
        for number in range(count):
            raw = self.person(number)
            self.history(raw)
            last = raw["last_order_at"]
            gap = (self.start - datetime.fromisoformat(last)).days if last else 999
            # The longer since the last order, the likelier the member has already drifted away.
            lapsed = gap > 60 or self.rng.random() < gap / 90
            self._enrol(raw, float(raw["total_spend"]), lapsed, self.start)
            yield raw

    def plan_signups(self, first_number: int, count: int) -> None:
        span = (self.end - self.start).total_seconds()
        for offset in range(count):
            raw = self.person(first_number + offset)
            at = self.start + timedelta(seconds=self.rng.uniform(0, span - 9 * 3600))  # still in after _awake
            raw.update(signup_at=at.isoformat(), total_spend=0, order_count=0, points=0, last_order_at="")
            self.joining[raw["id"]] = raw
            self._push(self._awake(at, ZoneInfo(raw["timezone"])), "signup", raw["id"])

    def _enrol(self, raw: dict[str, Any], spend: float, lapsed: bool, now: datetime) -> None:
        shopper = Shopper(raw["id"], ZoneInfo(raw["timezone"]), spend)
        self._pace(shopper, lapsed)
        self.shoppers[shopper.id] = shopper
        self._schedule(shopper, "order", now)
        self._schedule(shopper, "login", now)

    def _pace(self, shopper: Shopper, lapsed: bool) -> None:
        # Better customers order more often; members who drifted away rarely come back on their own.
        rank = self.loyalty.rank(self.loyalty.tier_for_spend(shopper.spend).id)
        shopper.rate = 1 / self.rng.uniform(250, 500) if lapsed else self.rng.lognormvariate(0, 0.5) * 1.5**rank / 30
        shopper.logins = 1 / 150 if lapsed else shopper.rate * 2 + 1 / 60
        shopper.lapsed, shopper.chain = lapsed, shopper.chain + 1

    # ------------------------------------------------------------------ the clock

    def _push(self, at: datetime, kind: str, member_id: str, chain: int = 0) -> None:
        if at <= self.end:
            self.seq += 1
            heapq.heappush(self.queue, (at, self.seq, kind, member_id, chain))

    def _schedule(self, shopper: Shopper, kind: str, after: datetime, mean_days: float | None = None) -> None:
        rate = shopper.rate if kind == "order" else shopper.logins
        days = self.rng.expovariate(1 / mean_days) if mean_days else self.rng.expovariate(rate)
        at = self._awake(after + timedelta(days=min(days, 3650)), shopper.zone)
        self._push(at, kind, shopper.id, shopper.chain if kind == "order" else 0)

    def _awake(self, at: datetime, zone: ZoneInfo) -> datetime:
        """People shop and log in while awake: move night-time moments to the morning, member-local."""
        hour = at.astimezone(zone).hour
        return at + timedelta(hours=8 - hour) if hour < 8 else at

    def due(self, now: datetime) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Members who join and events that happen up to NOW, in time order."""
        joined: list[dict[str, Any]] = []
        happened: list[dict[str, Any]] = []
        while self.queue and self.queue[0][0] <= now:
            at, _, kind, member_id, chain = heapq.heappop(self.queue)
            if kind == "signup":
                raw = self.joining.pop(member_id)
                joined.append(raw)
                # "app" sign-ups get the A/B-tested welcome (welcome_ab); the others the classic series.
                happened.append(_event(member_id, "signup", at, {"source": self.rng.choice(
                    ["store", "mini_program", "web", "app", "app"])}))
                self._enrol(raw, 0.0, False, at)
                if self.rng.random() < 0.1:  # some order at once, before the welcome series goes on
                    self._schedule(self.shoppers[member_id], "bought", at, mean_days=1.5)
            elif kind == "login":
                via = self.rng.choice(["app", "mini_program", "web"])
                happened.append(_event(member_id, "login", at, {"via": via}))
                self._schedule(self.shoppers[member_id], "login", at)
            elif kind.startswith("unsubscribe:"):
                happened.append(_event(member_id, "unsubscribe", at, {"channel": kind.partition(":")[2]}))
            elif kind == "review":
                happened.append(_event(member_id, "review_submitted", at, {"stars": self.rng.choice((4, 5, 5, 3))}))
            elif kind == "bought" or chain == self.shoppers[member_id].chain:
                happened.append(self._order(self.shoppers[member_id], at, ordinary=kind == "order"))
        return joined, happened

    def _order(self, shopper: Shopper, at: datetime, *, ordinary: bool) -> dict[str, Any]:
        rank = self.loyalty.rank(self.loyalty.tier_for_spend(shopper.spend).id)
        amount = self.rng.lognormvariate(math.log(180 * 2.2 ** rank), 0.6)
        amount = float(max(19, int(amount) // 10 * 10 + self.rng.choice((8, 9))))  # shop prices end in 8 or 9
        shopper.spend += amount
        # A lapsed member who orders is back; any ordinary order may be the last before a member drifts away.
        changed = shopper.lapsed or (ordinary and self.rng.random() < DRIFT)
        if changed:
            self._pace(shopper, not shopper.lapsed)
        if changed or ordinary:
            self._schedule(shopper, "order", at)
        self.seq += 1
        return _event(shopper.id, "purchase", at, {"amount": amount, "order_id": f"D{self.seq:08d}"})

    def react(self, sent: list[tuple[str, str, str, str]], now: datetime) -> None:
        """Messages change behaviour: some members order after an offer, a few unsubscribe."""
        for member_id, journey, step, channel in sent:
            shopper = self.shoppers[member_id]
            chance, mean_days = ORDERS_AFTER.get((journey, step), (0.0, 1.0))
            if self.rng.random() < chance:
                self._schedule(shopper, "bought", now, mean_days=mean_days)
            if step == "ask_review" and self.rng.random() < 0.3:  # about a third write the review asked for
                self._push(now + timedelta(days=self.rng.uniform(0.2, 9)), "review", member_id)
            if self.rng.random() < UNSUBSCRIBE_CHANCE[channel]:
                self._push(now + timedelta(hours=self.rng.uniform(0.1, 6)), f"unsubscribe:{channel}", member_id)


def _valid_phone(rng: random.Random, prefix: str, digits: int) -> str:
    """PREFIX and random digits, drawn again until libphonenumber accepts the number (imports check it)."""
    for _ in range(200):
        text = prefix + "".join(rng.choice("0123456789") for _ in range(digits))
        if phonenumbers.is_valid_number(phonenumbers.parse(text, "CN")):
            return text
    raise AssertionError(f"no valid phone number starts with {prefix}")  # the prefixes above are all valid


def _event(member_id: str, kind: str, at: datetime, properties: dict[str, Any]) -> dict[str, Any]:
    return {"member_id": member_id, "type": kind, "at": at.isoformat(), "properties": properties}


# --------------------------------------------------------------------------- files: only ever rebuild our own


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


# --------------------------------------------------------------------------- the run


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


def run_demo(config: Config, members: int, days: int, seed: int, echo: Callable[[str], None]) -> None:
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
            for line in _summary(conn, db, outboxes, loyalty, app.config):
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


def _summary(conn: Connection, db: Path, outboxes: dict[str, Path], loyalty: Loyalty, config: Config) -> list[str]:
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
    run = _command_prefix()
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


def _command_prefix() -> str:
    """How the user called run.py, global options included, so the next commands hit the same database."""
    program = sys.argv[0] if sys.argv and sys.argv[0].endswith("run.py") else "run.py"
    parts = ["python", program]
    context = click.get_current_context(silent=True)
    params = context.find_root().params if context is not None else {}
    if params.get("config_path") not in (None, "config.yaml"):
        parts += ["--config", str(params["config_path"])]
    if params.get("db"):
        parts += ["--db", str(params["db"])]
    return " ".join(parts)
