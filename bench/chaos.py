"""Chaos bench, not a test: kill -9 the sending daemon at random moments and count what the delivery guarantee
promises (README, "Delivery guarantee and safety rails"; issue 13).

    python bench/chaos.py [--db sqlite|postgresql|both] [--channels outbox|providers|both] [--kills N]
                          [--members M] [--batch-size B] [--lease S] [--transient SHARE] [--slow SHARE]
                          [--lost SHARE] [--drop SHARE] [--deliver-after S] [--seed N] [--keep]

Per combination of database and channels it builds a fresh database (a temporary SQLite file, or a PostgreSQL
schema of its own at ENGINE_BENCH_PG_URL, dropped afterwards), a rules folder with one segment-triggered journey
that sends every lapsed member an email and then an SMS, and a config.yaml (tick every second, a short lease,
small batches). With ``--channels providers`` the Twilio and SendGrid stand-ins (engine.testing.standins) run
inside this process, so that they outlive the kills, with the fault shares given, and post their signed delivery
callbacks to the daemon's web service.

Then: one uninterrupted send of a first wave of M members measures how long a full send takes (T); after that,
N times: start ``run.py serve``, wait a random time uniform over 0..T, ``kill -9`` the daemon, note its child
processes (compose worker, multiprocessing's resource tracker) and check 2 s later which still live, and read
what the dead worker left ``sending`` and how much of it lies inside its recorded hand-over (the rows that may
have reached the channel: "unknown per kill before reconciliation"). Once a later daemon has recovered them and
ticked after they could be reconciled, it counts how many are still ``unknown`` ("after reconciliation"). When
less than a wave's worth of enrollments is left to send, another wave of M members is added, so every kill lands
on a daemon with work in hand. After the last kill the providers recover (no more faults), a daemon runs until
nothing is left to do (retry backoffs and failed look-ups are fast-forwarded, as a clock jump would: nothing
that decides *whether* to send is changed), and ``run.py reconcile`` runs.

Printed per combination: duplicates in the log, in the outbox files and at the provider; lost messages; unknown
per kill before and after reconciliation against the channel's window; unknown left at the end with their
reasons; orphan processes; ``run.py audit verify``; and a one-line verdict. Nothing is asserted; the exit status is
non-zero only when a combination could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import Engine, create_engine, func, select, text, update  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from engine.app import App  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.rules.loyalty import Loyalty  # noqa: E402
from engine.store import handovers as in_doubt  # noqa: E402
from engine.store.database import Store  # noqa: E402
from engine.store.models import enrollments, handovers, members, messages  # noqa: E402
from engine.testing.standins import Faults, Hangup, Reply, SendGridSandbox, TwilioSandbox  # noqa: E402

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
JOURNEY = "chaos"
STEPS = {"email_touch": "email", "sms_offer": "sms"}  # step id -> channel, in journey order
FINAL = ("sent", "delivered", "failed", "suppressed", "bounced")  # a row in one of these was settled
HAS_GONE = ("sent", "delivered")  # the channel has it
JOURNEY_YAML = f"""\
journey: {JOURNEY}
name: chaos bench (email, then SMS, to every lapsed member)
status: active
trigger:
  segment: lapsed_60d
entry:
  reentry: never
steps:
  - id: email_touch
    send: email
    template: winback/first_touch
  - id: sms_offer
    send: sms
    template: winback/sms_offer
"""
OUTBOX_MEMBERS = 10_000  # per wave: a send of a few seconds on SQLite, about twice that on PostgreSQL
PROVIDER_MEMBERS = 1_000  # per wave: the stand-ins' slow answers (1 s timeouts) make a send last half a minute
ORPHAN_GRACE = 2.0  # seconds the daemon's children get to notice its death
SETTLE_TIMEOUT = 180.0  # seconds a kill's in-doubt rows may take to be recovered and reconciled before giving up
CALIBRATION_TIMEOUT = 900.0
DRAIN_TIMEOUT = 900.0
# What reconciliation appends to the error of a row it could not settle (engine.tick.reconcile._SEPARATOR):
# a row in doubt whose error carries it has been asked about since the crash (recovery writes a fresh error
# when it marks it).
RECONCILED_MARK = " — reconciliation: "
TICK_LINE = re.compile(rb"engine\.daemon: tick (\S+): ")


@dataclass(frozen=True)
class Options:
    kills: int
    members: int
    batch_size: int
    lease: int
    transient: float
    slow: float
    lost: float
    drop: float
    seed: int
    keep: bool
    deliver_after: float = 0.5  # the stand-ins' delivery callbacks, seconds after accepting
    timeout: float = 1.0  # providers' client timeout, seconds
    slow_seconds: float = 1.5  # how late a slow answer comes: longer than the timeout
    reconcile_after: float = 3.0  # longer than slow_seconds: a slow request has finished before it is looked up

    def faults(self) -> Faults:
        return Faults(too_many=self.transient / 2, server_error=self.transient / 2, slow=self.slow, drop=self.drop,
                      lost=self.lost, slow_seconds=self.slow_seconds)


# --------------------------------------------------------------------------- provider stand-ins


def _request_kind(reply: Reply | Hangup) -> str:
    """What the client saw of one request, as the stand-in answered it."""
    if isinstance(reply, Hangup):  # CLOSE: dropped unprocessed; RESET: processed, then the connection reset
        return "dropped" if reply is Hangup.CLOSE else "lost"
    if reply.status in (201, 202):
        return "accepted"  # slow answers too: accepted at once, answered late
    return "refused" if reply.status in (429, 500) else f"error {reply.status}"


class JournalTwilio(TwilioSandbox):
    """The Twilio stand-in, keeping what it did with each request about one of our messages (by our id)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.journal: dict[int, list[tuple[float, str]]] = {}  # our id -> [(time.time(), kind)]
        self._journal_lock = threading.Lock()

    def handle(self, method: str, path: str, headers: Message, body: bytes) -> Reply | Hangup:
        reply = super().handle(method, path, headers, body)
        if method == "POST":
            form = {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
            message_id = self.message_id({"status_callback": form.get("StatusCallback")})
            if message_id is not None:
                with self._journal_lock:
                    self.journal.setdefault(message_id, []).append((time.time(), _request_kind(reply)))
        return reply


class RetryingSendGrid(SendGridSandbox):
    """The SendGrid stand-in, keeping what it did with each request about one of our messages, and doing one thing
    SendGrid itself does: an event batch the engine did not take (it was down, or it answered 5xx) is posted
    again later, with the same sg_event_ids, as SendGrid retries its event webhook for up to 24 hours. The
    stand-in alone drops it, and with the engine killed every few seconds many of the callbacks that settle an
    email in doubt would land on a dead daemon."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.journal: dict[int, list[tuple[float, str]]] = {}
        self._journal_lock = threading.Lock()
        self.pending: list[dict[str, Any]] = []  # events not taken yet, oldest first
        self.reposted: set[str] = set()  # sg_event_ids posted more than once
        self._pending_lock = threading.Lock()
        self._retry_stop = threading.Event()
        self._retrier: threading.Thread | None = None

    def handle(self, method: str, path: str, headers: Message, body: bytes) -> Reply | Hangup:
        reply = super().handle(method, path, headers, body)
        if method == "POST":
            try:
                mail = json.loads(body)
            except ValueError:
                mail = None
            message_id = self.message_id(mail) if isinstance(mail, dict) else None
            if message_id is not None:
                with self._journal_lock:
                    self.journal.setdefault(message_id, []).append((time.time(), _request_kind(reply)))
        return reply

    def start(self) -> RetryingSendGrid:
        super().start()
        self._retry_stop.clear()
        self._retrier = threading.Thread(target=self._retry_loop, daemon=True)
        self._retrier.start()
        return self

    def stop(self) -> None:
        self._retry_stop.set()
        if self._retrier is not None:
            self._retrier.join(timeout=5)
        super().stop()

    def deliver(self, records: list[dict[str, Any]]) -> None:
        self._post([self.event(r) for r in records])

    def _post(self, fresh: list[dict[str, Any]]) -> None:
        with self._pending_lock:
            batch, self.pending = self.pending + fresh, []
        if not batch:
            return
        try:
            status: int | None = self.post_events(batch)
        except (OSError, ValueError):
            status = None
        if status is None or status >= 500 or status == 429:
            with self._pending_lock:
                self.pending = batch + self.pending
                self.reposted.update(str(event["sg_event_id"]) for event in batch)

    def _retry_loop(self) -> None:
        while not self._retry_stop.wait(1.0):
            self._post([])


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Proc:
    pid: int
    start: int  # /proc/PID/stat starttime: tells a live process from a new one with a reused pid
    what: str


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, starttime) of PID, or None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data.rsplit(b")", 1)[1].split()
    return fields[0].decode(), int(fields[1]), int(fields[19])


def _what(pid: int) -> str:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"
    if "resource_tracker" in command:
        return "resource tracker"
    if "spawn_main" in command or "--multiprocessing-fork" in command:
        return "compose worker"
    return command[:80]


def descendants(root: int) -> list[Proc]:
    """Every live process below ROOT (children, their children, ...), from a scan of /proc."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _stat(int(entry))
        if stat is not None and stat[0] != "Z":
            children.setdefault(stat[1], []).append(int(entry))
            starts[int(entry)] = stat[2]
    found: list[Proc] = []
    queue = list(children.get(root, []))
    while queue:
        pid = queue.pop()
        found.append(Proc(pid, starts[pid], _what(pid)))
        queue.extend(children.get(pid, []))
    return found


def alive(proc: Proc) -> bool:
    stat = _stat(proc.pid)
    return stat is not None and stat[0] != "Z" and stat[2] == proc.start


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Daemon:
    """One ``run.py serve``, its output in a log file of its own."""

    def __init__(self, number: int, config: Path, logs: Path) -> None:
        self.number = number
        self.log_path = logs / f"serve-{number:03d}.log"
        self._log = self.log_path.open("wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), "--config", str(config), "serve"],
                                     stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=str(config.parent), start_new_session=True)
        self.ticks: list[datetime] = []  # start times of the ticks it finished, as logged
        self._read = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def age(self) -> float:
        return time.monotonic() - self.started

    def poll_ticks(self) -> list[datetime]:
        with self.log_path.open("rb") as handle:
            handle.seek(self._read)
            data = handle.read()
        whole = data[: data.rfind(b"\n") + 1]
        self._read += len(whole)
        for match in TICK_LINE.finditer(whole):
            with contextlib.suppress(ValueError):
                self.ticks.append(datetime.fromisoformat(match.group(1).decode()))
        return self.ticks

    def ticked_since(self, moment: datetime) -> bool:
        """Whether a tick that started at or after MOMENT has finished (ticks are logged to the second, rounded
        down: a logged start at or after MOMENT means a real one at or after it)."""
        return any(start >= moment for start in self.poll_ticks())

    def kill(self) -> tuple[list[Proc], float]:
        """kill -9, after noting the processes below it; returns them and the moment (monotonic)."""
        children = descendants(self.pid)
        os.kill(self.pid, signal.SIGKILL)
        moment = time.monotonic()
        self.proc.wait()
        self._log.close()
        return children, moment

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, a graceful stop; kill -9 if it takes longer than TIMEOUT."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------- one kill


@dataclass
class Kill:
    number: int
    daemon: int  # its serve-NNN.log
    pid: int
    delay: float  # seconds after the daemon's start
    at: datetime  # wall clock of the kill
    children: list[Proc]
    orphans: list[Proc] = field(default_factory=list)
    worker: str | None = None  # the dead daemon's worker id (claimed_by), when it left rows
    sending: int = 0  # rows it left `sending`
    in_doubt: list[int] = field(default_factory=list)  # ... of which inside its recorded hand-over
    doubt_channel: str = ""
    handover: str = ""  # the dead worker's recorded hand-over: channel and id range
    requested: int | None = None  # providers: in-doubt rows the stand-in got a request for after the hand-over
    wrote: int = 0  # message rows the log gained while this daemon ran
    recovered_at: datetime | None = None  # first seen with none of its rows `sending` any more
    after: int | None = None  # its in-doubt rows still unknown once reconciliation could have settled them
    unknown_then: int | None = None  # every unknown row in the log at that moment
    after_reasons: Counter[str] = field(default_factory=Counter)
    late: str = ""  # how "after" was measured when not in the usual way


# --------------------------------------------------------------------------- the database


def pg_url(schema: str) -> str:
    url = make_url(os.environ.get("ENGINE_BENCH_PG_URL", PG_URL))
    return url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)


def member_rows(wave: int, count: int, loyalty: Loyalty, now: datetime, seed: int) -> list[dict[str, Any]]:
    """COUNT lapsed members: last order 90-400 days ago, a unique valid email and E.164 mobile number, both
    consents, Asia/Shanghai, zh-CN and en alternately; no points (so the points ledger check of audit verify
    holds)."""
    rng = random.Random(seed * 1_000 + wave)
    rows = []
    for i in range(count):
        n = wave * count + i
        spend = round(rng.lognormvariate(7.65, 1.6), 2)
        last = now - timedelta(days=rng.uniform(90, 400))
        zh = n % 2 == 0
        rows.append({
            "id": f"K{wave:03d}-{i:06d}", "name": f"会员{n:07d}" if zh else f"Member {n}",
            "email": f"chaos{n}@example.com", "phone": f"+86138{n:08d}", "birthday": None,
            "timezone": "Asia/Shanghai", "locale": "zh-CN" if zh else "en",
            "signup_at": last - timedelta(days=rng.uniform(30, 900)), "tier": loyalty.tier_for_spend(spend).id,
            "points": 0, "total_spend": spend, "order_count": max(1, int(spend // 300)), "last_order_at": last,
            "email_opt_in": True, "sms_opt_in": True, "attributes": {}, "created_at": now, "updated_at": now,
            "forgotten_at": None})
    return rows


# --------------------------------------------------------------------------- one combination


@dataclass
class Figures:
    db: str
    channels: str
    ran: bool = False
    error: str = ""
    seconds: float = 0.0
    calibration: float = 0.0
    waves: int = 0
    members: int = 0
    kills: list[Kill] = field(default_factory=list)
    window: int = 0
    window_note: str = ""
    exited_alone: list[str] = field(default_factory=list)  # daemons that died without being killed
    log_duplicates: list[tuple[Any, ...]] = field(default_factory=list)
    member_step_duplicates: list[tuple[Any, ...]] = field(default_factory=list)
    channel_duplicates: dict[str, dict[int, int]] = field(default_factory=dict)  # channel -> {id: times}
    torn_lines: dict[str, int] = field(default_factory=dict)
    torn_cut: int = 0  # writes a kill cut short, whose partial line the next batch dropped (daemons' logs)
    lost: list[tuple[str, str, str]] = field(default_factory=list)  # (member, step, what)
    disagreements: list[tuple[int, str, str]] = field(default_factory=list)  # (id, channel, what)
    # (id, channel, why it is unknown at the end, what the channel says, verdict: "ok" = the channel cannot tell,
    # "settleable" = the channel could have told, "suspect" = nothing made it uncertain)
    unknown_end: list[tuple[int, str, str, str, str]] = field(default_factory=list)
    statuses: Counter[tuple[str, str]] = field(default_factory=Counter)
    doubt_outcomes: Counter[str] = field(default_factory=Counter)  # what became of the rows in doubt at the kills
    reasons: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (channel, status, reason) not sent
    accepted: dict[str, int] = field(default_factory=dict)  # provider -> messages accepted
    reposted_callbacks: int = 0
    fast_forwarded: int = 0
    drain_seconds: float = 0.0
    drain_note: str = ""
    reconcile_output: str = ""
    audit: tuple[int, str] = (0, "")
    kept: str = ""


class Combination:
    def __init__(self, db: str, channels: str, options: Options) -> None:
        self.db, self.channels, self.options = db, channels, options
        self.name = f"{db}/{channels}"
        self.figures = Figures(db, channels)
        self.rng = random.Random(f"{options.seed}:{db}:{channels}")
        self.root = Path(tempfile.mkdtemp(prefix=f"chaos-{db}-{channels}-"))
        self.logs = self.root / "logs"
        self.logs.mkdir()
        self.schema = f"chaos_{uuid.uuid4().hex[:10]}"
        self.admin: Engine | None = None
        self.twilio: JournalTwilio | None = None
        self.sendgrid: RetryingSendGrid | None = None
        self.store: Store | None = None
        self.loyalty: Loyalty | None = None
        self.config_path = self.root / "config.yaml"
        self.daemons = 0
        self.waves = 0
        self.pending: list[Kill] = []
        self.reconcile_after = 0.0  # what the channels use: the outbox settles at once

    # ------------------------------------------------------------------ set-up and tear-down

    def say(self, line: str) -> None:
        print(f"[{self.name}] {line}", flush=True)

    def setup(self) -> None:
        options = self.options
        if self.db == "postgresql":
            url = pg_url(self.schema)
            self.admin = create_engine(make_url(url).difference_update_query(["options"]))
            with self.admin.begin() as conn:
                conn.execute(text(f'CREATE SCHEMA "{self.schema}"'))
        else:
            url = f"sqlite:///{self.root / 'chaos.db'}"
        port = free_port()
        web = f"http://127.0.0.1:{port}"
        if self.channels == "providers":
            common: dict[str, Any] = {"faults": options.faults(), "callback_url": web,
                                      "deliver_after": options.deliver_after}
            self.twilio = JournalTwilio(seed=options.seed, **common).start()
            self.sendgrid = RetryingSendGrid(seed=options.seed + 1, **common).start()
            paced = {"rate_per_second": 0, "timeout": options.timeout, "reconcile_after": options.reconcile_after}
            channels: dict[str, Any] = {
                "sms": {"provider": "twilio", "account_sid": self.twilio.account_sid,
                        "auth_token": self.twilio.auth_token, "from": "+15005550006", "base_url": self.twilio.url,
                        **paced},
                "email": {"provider": "sendgrid", "api_key": self.sendgrid.api_key,
                          "from": "会员中心 <members@example.com>", "base_url": self.sendgrid.url,
                          "webhook_public_key": self.sendgrid.public_key, **paced}}
            self.reconcile_after = options.reconcile_after
        else:
            channels = {name: {"provider": "outbox", "path": str(self.root / "outbox" / f"{name}.jsonl")}
                        for name in ("email", "sms")}
        rules = self.root / "rules"
        (rules / "journeys").mkdir(parents=True)
        for name in ("segments.yaml", "loyalty.yaml"):
            shutil.copy(REPO / "rules" / name, rules / name)
        (rules / "journeys" / f"{JOURNEY}.yaml").write_text(JOURNEY_YAML, encoding="utf-8")
        settings = {
            "database": {"url": url},
            "rules_dir": str(rules),
            "templates_dir": str(REPO / "templates"),
            "var_dir": str(self.root / "var"),
            "default_timezone": "Asia/Shanghai",
            "scheduler": {"interval": 1, "batch_size": options.batch_size, "lease_seconds": options.lease},
            "channels": channels,
            "web": {"listen": f"127.0.0.1:{port}", "public_url": web},
            "quiet_hours": None,  # the daemon runs on the wall clock: no quiet hours in the way at any hour
            "frequency_caps": [],
        }
        self.config_path.write_text(json.dumps(settings, indent=2, ensure_ascii=False), encoding="utf-8")
        config = load_config(self.config_path)
        app = App(config)  # creates the schema
        self.loyalty = app.require_valid_rules().loyalty
        app.store.close()
        self.store = Store(config.database_url, page_cache_mb=4)
        if self.channels == "providers":
            settings_sms = config.channels.sms
            self.figures.window = settings_sms.in_flight
            effective = min(settings_sms.in_flight,
                            int(settings_sms.concurrency * options.lease / 2 / settings_sms.timeout))
            self.figures.window_note = (f"channels.*.in_flight {settings_sms.in_flight}; with concurrency "
                                        f"{settings_sms.concurrency}, timeout {settings_sms.timeout:g} s and a "
                                        f"{options.lease} s lease the engine hands over {effective} at a time")
        else:
            self.figures.window = options.batch_size
            self.figures.window_note = (f"the outbox takes a whole batch ({options.batch_size}) in one write; "
                                        "none of it may stay unknown")

    def teardown(self) -> None:
        for box in (self.twilio, self.sendgrid):
            if box is not None:
                box.stop()
        if self.store is not None:
            self.store.close()
        if self.admin is not None:
            if not self.options.keep:
                with self.admin.begin() as conn:
                    conn.execute(text(f'DROP SCHEMA "{self.schema}" CASCADE'))
            self.admin.dispose()
        if self.options.keep:
            self.figures.kept = str(self.root) + (f" and schema {self.schema}" if self.admin is not None else "")
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ the database, read from here

    @property
    def db_store(self) -> Store:
        assert self.store is not None
        return self.store

    def add_wave(self) -> None:
        assert self.loyalty is not None
        rows = member_rows(self.waves, self.options.members, self.loyalty, datetime.now(UTC), self.options.seed)
        with self.db_store.begin() as conn:
            conn.execute(members.insert(), rows)
        self.waves += 1

    def to_enter_or_send(self) -> int:
        """Members not enrolled yet, plus enrollments still active: the work a daemon has in front of it."""
        with self.db_store.connect() as conn:
            total = conn.execute(select(func.count()).select_from(members)).scalar_one()
            enrolled = conn.execute(select(func.count()).select_from(enrollments)
                                    .where(enrollments.c.journey_id == JOURNEY)).scalar_one()
            active = conn.execute(select(func.count()).select_from(enrollments)
                                  .where(enrollments.c.journey_id == JOURNEY,
                                         enrollments.c.status == "active")).scalar_one()
        return int(total - enrolled + active)

    def status_counts(self) -> Counter[str]:
        with self.db_store.connect() as conn:
            return Counter({str(s): int(n) for s, n in conn.execute(
                select(messages.c.status, func.count()).group_by(messages.c.status))})

    def stranded(self, kill: Kill) -> None:
        """What the dead daemon left: its worker id, its `sending` rows, those inside its recorded hand-over
        (engine.store.handovers.stranded_messages, asked as if every claim had run out; nothing else runs now), their
        channel, the hand-over itself and (providers) how many of them the stand-in got a request for."""
        with self.db_store.begin() as conn:
            rows = in_doubt.stranded_messages(conn, datetime.now(UTC) + timedelta(days=1))
            mine = [s for s in rows if s.worker.rsplit(":", 2)[-2:-1] == [str(kill.pid)]]
            hand = conn.execute(select(handovers).where(handovers.c.worker == mine[0].worker)).first() \
                if mine else None
        doubt = [s for s in mine if s.handed_at is not None]
        kill.worker = mine[0].worker if mine else None
        kill.sending, kill.in_doubt = len(mine), [s.id for s in doubt]
        kill.doubt_channel = "+".join(sorted({s.channel for s in doubt}))
        if hand is not None:
            kill.handover = f"{hand.channel} ids {hand.first_id}..{hand.last_id}"
            box = {"sms": self.twilio, "email": self.sendgrid}.get(str(hand.channel))
            if box is not None:
                since = _aware(hand.handed_at).timestamp() - 1.0
                kill.requested = sum(1 for i in kill.in_doubt
                                     if any(at >= since for at, _ in box.journal.get(i, [])))

    # ------------------------------------------------------------------ kills settling

    def settle_pending(self, daemon: Daemon | None) -> None:
        """For each kill whose in-doubt rows are not measured yet: once a later daemon has recovered them (none of
        the dead worker's rows is `sending`) and reconciliation has been through each one still unknown (its error
        carries what the channel said), or failing that a tick that started after they became due has finished,
        count those still unknown."""
        if not self.pending:
            return
        ids = sorted({i for k in self.pending for i in k.in_doubt})
        now = datetime.now(UTC)
        with self.db_store.connect() as conn:
            status: dict[int, tuple[str, str | None]] = {}
            for start in range(0, len(ids), 500):
                status.update({int(r.id): (str(r.status), r.error) for r in conn.execute(
                    select(messages.c.id, messages.c.status, messages.c.error)
                    .where(messages.c.id.in_(ids[start:start + 500])))})
            workers = [k.worker for k in self.pending if k.worker]
            still = {str(w): int(n) for w, n in conn.execute(
                select(messages.c.claimed_by, func.count()).where(messages.c.status == "sending",
                                                                    messages.c.claimed_by.in_(workers))
                .group_by(messages.c.claimed_by))} if workers else {}
            unknown_now = conn.execute(select(func.count()).select_from(messages)
                                       .where(messages.c.status == "unknown")).scalar_one()
        for kill in list(self.pending):
            if kill.worker and still.get(kill.worker):
                continue  # not recovered yet (PostgreSQL: its lease has not run out, or no tick since)
            if kill.recovered_at is None:
                kill.recovered_at = now
            open_ = [i for i in kill.in_doubt if status.get(i, ("?", None))[0] == "unknown"]
            asked = all(RECONCILED_MARK in (status[i][1] or "") for i in open_)
            due = max(kill.at + timedelta(seconds=self.reconcile_after), kill.recovered_at)
            if open_ and not asked and not (daemon is not None and daemon.ticked_since(due)):
                continue
            kill.after, kill.unknown_then = len(open_), int(unknown_now)
            kill.after_reasons = Counter(_reason(status[i][1]) for i in open_)
            self.pending.remove(kill)

    # ------------------------------------------------------------------ waiting with a daemon running

    def wait(self, daemon: Daemon, until: Callable[[], bool], timeout: float, poll: float = 0.1,
             every: Callable[[], None] | None = None) -> bool:
        """Poll UNTIL (and settle pending kills) while DAEMON runs; False on TIMEOUT or if the daemon exits."""
        deadline = time.monotonic() + timeout
        last_settle = 0.0
        while time.monotonic() < deadline:
            if until():
                return True
            if daemon.proc.poll() is not None:
                return False
            if time.monotonic() - last_settle >= 0.5:
                self.settle_pending(daemon)
                if every is not None:
                    every()
                last_settle = time.monotonic()
            time.sleep(poll)
        return False

    def start(self) -> Daemon:
        self.daemons += 1
        return Daemon(self.daemons, self.config_path, self.logs)

    def died(self, daemon: Daemon) -> None:
        rc = daemon.stop()
        note = f"serve-{daemon.number:03d} exited on its own (exit {rc}) after {daemon.age:.1f}s"
        self.figures.exited_alone.append(note)
        self.say(f"{note}; its log ends:\n{daemon.tail()}")

    # ------------------------------------------------------------------ the phases

    def calibrate(self) -> float:
        """One wave sent without a kill: seconds from the daemon's start until every member of it has both
        messages written and none is `sending` (retries of refused requests may still be queued)."""
        self.add_wave()
        daemon = self.start()
        expected = len(STEPS) * self.options.members

        def sent_once() -> bool:
            counts = self.status_counts()
            return sum(counts.values()) >= expected and not counts["sending"] and self.to_enter_or_send() == 0

        if not self.wait(daemon, sent_once, CALIBRATION_TIMEOUT, poll=0.05):
            if daemon.proc.poll() is not None:
                self.died(daemon)
            else:
                daemon.stop()
            raise RuntimeError(f"the first wave was not sent within {CALIBRATION_TIMEOUT:.0f}s; see {daemon.log_path}")
        seconds = daemon.age
        daemon.stop()
        return seconds

    def one_kill(self, number: int, span: float) -> Kill:
        if self.to_enter_or_send() < self.options.members:
            self.add_wave()
        rows_before = sum(self.status_counts().values())
        daemon = self.start()
        delay = self.rng.uniform(0.0, span)
        while not self.wait(daemon, lambda d=daemon: d.age >= delay, delay + 5.0, poll=0.02):
            self.died(daemon)  # it must not happen; start another and kill that one
            daemon = self.start()
        children, moment = daemon.kill()
        kill = Kill(number, daemon.number, daemon.pid, delay, datetime.now(UTC), children)
        self.stranded(kill)
        kill.wrote = sum(self.status_counts().values()) - rows_before
        time.sleep(max(0.0, moment + ORPHAN_GRACE - time.monotonic()))
        kill.orphans = [p for p in children if alive(p)]
        for orphan in kill.orphans:  # noted; ended so that the next run starts clean
            with contextlib.suppress(ProcessLookupError):
                os.kill(orphan.pid, signal.SIGKILL)
        if kill.in_doubt or kill.sending:
            self.pending.append(kill)
        else:
            kill.after, kill.unknown_then = 0, None
        return kill

    def drain(self) -> None:
        """The providers recover; a daemon runs until nothing is left to do; then `run.py reconcile`."""
        started = time.monotonic()
        for box in (self.twilio, self.sendgrid):
            if box is not None:
                box.faults = Faults()
        daemon = self.start()
        quiet_since: list[float] = []

        def idle() -> bool:
            with self.db_store.connect() as conn:
                busy = conn.execute(select(func.count()).select_from(messages).where(
                    messages.c.status.in_(["queued", "sending"]))).scalar_one()
                due_unknown = conn.execute(select(func.count()).select_from(messages).where(
                    messages.c.status == "unknown", messages.c.next_attempt_at.is_not(None))).scalar_one()
            waiting = self.to_enter_or_send() + busy + due_unknown + len(self.pending)
            waiting += len(self.sendgrid.pending) if self.sendgrid is not None else 0
            if waiting:
                quiet_since.clear()
                return False
            quiet_since.append(time.monotonic())
            return quiet_since[-1] - quiet_since[0] >= 3.0  # callbacks still on their way get 3 s

        while not self.wait(daemon, idle, DRAIN_TIMEOUT - (time.monotonic() - started), poll=0.5,
                            every=self.fast_forward):
            if daemon.proc.poll() is None:
                self.figures.drain_note = f"still busy after {DRAIN_TIMEOUT:.0f}s"
                break
            self.died(daemon)
            daemon = self.start()
        daemon.stop()
        done = subprocess.run([sys.executable, str(REPO / "run.py"), "--config", str(self.config_path), "reconcile"],
                              capture_output=True, text=True, check=False, cwd=str(self.root))
        self.figures.reconcile_output = (done.stdout + done.stderr).strip()
        self.settle_pending(None)
        for kill in self.pending:  # not measurable by a daemon's tick any more: as the end left them
            kill.late = "measured after the final reconcile"
        self._measure_rest()
        self.figures.drain_seconds = time.monotonic() - started

    def _measure_rest(self) -> None:
        ids = sorted({i for k in self.pending for i in k.in_doubt})
        with self.db_store.connect() as conn:
            status = {int(r.id): (str(r.status), r.error) for r in conn.execute(
                select(messages.c.id, messages.c.status, messages.c.error).where(messages.c.id.in_(ids)))} \
                if ids else {}
            unknown_now = conn.execute(select(func.count()).select_from(messages)
                                       .where(messages.c.status == "unknown")).scalar_one()
        for kill in self.pending:
            open_ = [i for i in kill.in_doubt if status.get(i, ("?", None))[0] == "unknown"]
            kill.after, kill.unknown_then = len(open_), int(unknown_now)
            kill.after_reasons = Counter(_reason(status[i][1]) for i in open_)
        self.pending = []

    def fast_forward(self) -> None:
        """Drain only: retries of refused requests and look-ups that failed go now rather than after their backoff
        (up to minutes). Unknown rows still inside reconcile_after of their hand-over are left alone: looking
        them up early could miss a request still in progress at the provider."""
        now = datetime.now(UTC)
        guard = now + timedelta(seconds=self.reconcile_after + 2)
        with self.db_store.begin() as conn:
            moved = conn.execute(update(messages).where(messages.c.status == "queued", messages.c.next_attempt_at > now)
                                 .values(next_attempt_at=now)).rowcount
            moved += conn.execute(update(messages).where(messages.c.status == "unknown",
                                                         messages.c.next_attempt_at > guard)
                                  .values(next_attempt_at=now)).rowcount
        self.figures.fast_forwarded += max(0, moved)

    # ------------------------------------------------------------------ the count

    def count(self) -> None:
        f = self.figures
        with self.db_store.connect() as conn:
            f.log_duplicates = [tuple(r) for r in conn.execute(
                select(messages.c.journey, messages.c.enrollment_id, messages.c.step, func.count())
                .group_by(messages.c.journey, messages.c.enrollment_id, messages.c.step)
                .having(func.count() > 1))]
            f.member_step_duplicates = [tuple(r) for r in conn.execute(
                select(messages.c.member_id, messages.c.step, func.count()).where(messages.c.journey == JOURNEY)
                .group_by(messages.c.member_id, messages.c.step).having(func.count() > 1))]
            rows = [r._asdict() for r in conn.execute(
                select(messages.c.id, messages.c.member_id, messages.c.step, messages.c.channel, messages.c.status,
                       messages.c.reason, messages.c.error, messages.c.next_attempt_at)
                .where(messages.c.journey == JOURNEY))]
            audience = [str(m) for m in conn.execute(select(members.c.id)).scalars()]
        f.members = len(audience)
        f.waves = self.waves
        by_key = {(r["member_id"], r["step"]): r for r in rows}
        for r in rows:
            f.statuses[(r["channel"], r["status"])] += 1
            if r["status"] in ("failed", "suppressed", "bounced"):
                f.reasons[(r["channel"], r["status"], _reason(r["error"] or r["reason"]))] += 1
        for member in audience:
            for step in STEPS:
                row = by_key.get((member, step))
                if row is None:
                    f.lost.append((member, step, "no message row"))
                elif row["status"] not in (*FINAL, "unknown"):
                    f.lost.append((member, step, f"left {row['status']}"))
        # What the channels have, against what the log says.
        have: dict[str, Counter[int]] = {}
        if self.channels == "outbox":
            f.torn_cut = sum(path.read_text(encoding="utf-8", errors="replace").count("of a line cut short")
                             for path in self.logs.glob("*.log"))
            for name in ("email", "sms"):
                counts, torn = _outbox_ids(self.root / "outbox" / f"{name}.jsonl")
                have[name], f.torn_lines[name] = counts, torn
        else:
            assert self.twilio is not None and self.sendgrid is not None
            for name, box in (("sms", self.twilio), ("email", self.sendgrid)):
                have[name] = Counter(i for i in map(box.message_id, box.messages()) if i is not None)
                f.accepted[box.name] = len(box.messages())
            f.reposted_callbacks = len(self.sendgrid.reposted)
        in_kills = {i for k in f.kills for i in k.in_doubt}
        for r in rows:
            if r["id"] in in_kills:
                f.doubt_outcomes[_doubt_outcome(r)] += 1
        for name, counts in have.items():
            f.channel_duplicates[name] = {i: n for i, n in counts.items() if n > 1}
        if self.twilio is not None and self.sendgrid is not None:  # the stand-ins' own count
            f.channel_duplicates = {"sms": self.twilio.duplicates(), "email": self.sendgrid.duplicates()}
        for r in rows:
            there = have[r["channel"]].get(r["id"], 0) > 0
            if r["status"] in HAS_GONE and not there:
                f.disagreements.append((r["id"], r["channel"], f"logged {r['status']}, the channel has no record"))
                f.lost.append((r["member_id"], r["step"], f"logged {r['status']} but never reached the channel"))
            elif there and r["status"] not in (*HAS_GONE, "unknown"):
                f.disagreements.append((r["id"], r["channel"], f"the channel has it, logged {r['status']}"))
            if r["status"] == "unknown":
                f.unknown_end.append((r["id"], r["channel"], _reason(r["error"]),
                                      *self._unknown_verdict(r["id"], r["channel"], there, in_kills)))
        done = subprocess.run([sys.executable, str(REPO / "run.py"), "--config", str(self.config_path), "audit",
                               "verify"], capture_output=True, text=True, check=False, cwd=str(self.root))
        f.audit = (done.returncode, (done.stdout + done.stderr).strip().splitlines()[-1:][0]
                   if (done.stdout + done.stderr).strip() else "")

    def _unknown_verdict(self, message_id: int, channel: str, there: bool, in_kills: set[int]) -> tuple[str, str]:
        """What the channel says about a message still unknown at the end, and whether it could have settled it.

        The outbox file and Twilio's look-ups always tell; SendGrid tells only through the event webhook, so only
        about what it accepted. A SendGrid message it never accepted may rightly stay unknown when something made
        its fate uncertain: a kill during its hand-over, or a request closed without an answer; otherwise the
        engine had an answer (or never sent it) and should not have left it unknown."""
        if self.channels == "outbox":
            return ("in the outbox file" if there else "not in the outbox file"), "settleable"
        box = self.twilio if channel == "sms" else self.sendgrid
        assert box is not None
        kinds = Counter(kind for _, kind in box.journal.get(message_id, []))
        seen = ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items())) or "no request"
        if channel == "sms" or there or kinds["lost"]:
            return f"{box.name} has it ({seen})" if there else f"{box.name}: {seen}", "settleable"
        if message_id in in_kills:
            return f"in a hand-over at a kill; sendgrid never took it ({seen})", "ok"
        if kinds["dropped"]:
            return f"a request closed without an answer; sendgrid never took it ({seen})", "ok"
        return f"no kill and no unanswered request; sendgrid never took it ({seen})", "suspect"

    # ------------------------------------------------------------------ all of it

    def run(self) -> Figures:
        f = self.figures
        started = time.monotonic()
        try:
            self.setup()
            f.calibration = self.calibrate()
            span = f.calibration
            self.say(f"a full send of {self.options.members:,} members ({len(STEPS) * self.options.members:,} "
                     f"messages) took {span:.1f}s from the daemon's start; kills land uniformly within 0..{span:.1f}s")
            for number in range(1, self.options.kills + 1):
                kill = self.one_kill(number, span)
                f.kills.append(kill)
                orphans = ", ".join(f"{p.what} {p.pid}" for p in kill.orphans) or "none"
                requested = f", {kill.requested} requested at the provider" if kill.requested is not None else ""
                self.say(f"kill {number}/{self.options.kills} at {kill.delay:.2f}s (+{kill.wrote:,} rows): "
                         f"{kill.sending} left sending, {len(kill.in_doubt)} in the hand-over"
                         f"{f' ({kill.handover}{requested})' if kill.handover else ''}; "
                         f"{len(kill.children)} child process(es), orphans: {orphans}")
            self.say("last kill done; the providers recover, a daemon runs to the end, then run.py reconcile")
            self.drain()
            self.count()
            f.ran = True
        except Exception as exc:  # noqa: BLE001 - one combination failing to run must not stop the others
            f.error = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        finally:
            f.seconds = time.monotonic() - started
            with contextlib.suppress(Exception):
                self.teardown()
        return f


def _doubt_outcome(row: dict[str, Any]) -> str:
    """What became of a row that was in doubt at a kill, in words."""
    if row["status"] == "unknown":
        return "still unknown"
    if row["reason"] == "reconciled":
        return f"{row['status']}: found at the channel by reconciliation"
    if row["reason"] == "retry":  # reconciliation found no record of it and queued it again (or a later retry)
        return f"{row['status']}: not at the channel, sent again"
    return f"{row['status']}: settled by a delivery callback or a later answer"


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _reason(error: str | None) -> str:
    """An error or reason text made groupable: ids, numbers, addresses and times taken out."""
    if not error:
        return "-"
    text_ = re.sub(r"\S+@\S+|\+\d{6,}|\b[0-9a-f]{32}\b|SM[0-9a-f]{32}", "…", error)
    text_ = re.sub(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d\S*", "…", text_)
    return re.sub(r"\d+", "N", text_)[:300]


def _outbox_ids(path: Path) -> tuple[Counter[int], int]:
    """{message id: lines} of an outbox file, and how many lines are not whole JSON objects."""
    counts: Counter[int] = Counter()
    torn = 0
    if not path.exists():
        return counts, 0
    with path.open("rb") as handle:
        for line in handle:
            try:
                record = json.loads(line)
                counts[int(record["id"])] += 1
            except (ValueError, KeyError, TypeError):
                torn += 1
    return counts, torn


# --------------------------------------------------------------------------- output


def _stats(values: list[int]) -> str:
    if not values:
        return "n/a"
    return f"max {max(values):,}, mean {sum(values) / len(values):.1f}"


def verdict(f: Figures) -> tuple[bool, list[str]]:
    misses = []
    duplicates = len(f.log_duplicates) + len(f.member_step_duplicates) + sum(
        len(d) for d in f.channel_duplicates.values())
    if duplicates:
        misses.append(f"{duplicates} duplicate(s)")
    if f.lost:
        misses.append(f"{len(f.lost)} lost")
    over = [k for k in f.kills if len(k.in_doubt) > f.window]
    if over:
        misses.append(f"{len(over)} kill(s) left more unknown than the window ({f.window})")
    if f.channels == "outbox":
        after = [k for k in f.kills if k.after]
        if after:
            misses.append(f"{len(after)} kill(s) left outbox messages unknown after reconciliation")
    settleable = [u for u in f.unknown_end if u[4] == "settleable"]
    if settleable:
        misses.append(f"{len(settleable)} unknown at the end that the channel could have settled")
    suspect = [u for u in f.unknown_end if u[4] == "suspect"]
    if suspect:
        misses.append(f"{len(suspect)} unknown at the end with no kill and no unanswered request behind them")
    orphans = sum(len(k.orphans) for k in f.kills)
    if orphans:
        misses.append(f"{orphans} orphan process(es)")
    if f.audit[0] != 0:
        misses.append("audit verify failed")
    if f.disagreements:
        misses.append(f"{len(f.disagreements)} log/channel disagreement(s)")
    if f.exited_alone:
        misses.append(f"{len(f.exited_alone)} daemon(s) died on their own")
    return not misses, misses


def report(f: Figures, options: Options) -> list[str]:
    name = f"{f.db}/{f.channels}"
    if not f.ran:
        return [f"== {name}: could not run: {f.error} ({f.seconds:.0f}s)"]
    kills = f.kills
    messages_total = sum(f.statuses.values())
    lines = [f"== {name}: {len(kills)} kills, {f.waves} wave(s) of {options.members:,} members ({f.members:,} members, "
             f"{messages_total:,} message rows), batch {options.batch_size}, lease {options.lease}s; "
             f"{f.seconds:.0f}s in all"]
    if f.channels == "providers":
        lines.append(f"  stand-ins: 429 {options.transient / 2:g}, 500 {options.transient / 2:g}, slow "
                     f"{options.slow:g} ({options.slow_seconds:g}s against a {options.timeout:g}s timeout), lost "
                     f"{options.lost:g}, drop "
                     f"{options.drop:g}; callbacks {options.deliver_after:g}s after accepting")
        lines.append(f"  accepted: {', '.join(f'{k} {v:,}' for k, v in f.accepted.items())}; "
                     f"{f.reposted_callbacks:,} SendGrid events posted again (the engine was down or refused them)")
    delays = [k.delay for k in kills]
    lines.append(f"  full send of one wave (calibration): {f.calibration:.1f}s; kills {min(delays):.2f}–"
                 f"{max(delays):.2f}s (mean {sum(delays) / len(delays):.2f}s) after the daemon's start")
    children = Counter(p.what for k in kills for p in k.children)
    orphans = [(k.number, p) for k in kills for p in k.orphans]
    lines.append(f"  child processes at the kills: {', '.join(f'{w} {n}' for w, n in children.items()) or 'none'}; "
                 f"orphans {ORPHAN_GRACE:g}s later: {len(orphans)}"
                 + "".join(f"\n    kill {n}: {p.what} pid {p.pid} still alive" for n, p in orphans[:10]))
    dup_channel = sum(len(d) for d in f.channel_duplicates.values())
    where = "outbox files (an id on two lines)" if f.channels == "outbox" else "provider (accepted twice)"
    lines.append(f"  duplicates: log {len(f.log_duplicates)} (journey, enrollment, step twice), member+step "
                 f"{len(f.member_step_duplicates)}, {where} {dup_channel}"
                 + (f" {dict((c, list(d.items())[:10]) for c, d in f.channel_duplicates.items() if d)}"
                    if dup_channel else ""))
    if f.channels == "outbox":
        lines.append(f"  outbox writes cut short by a kill (the next batch dropped the partial line): {f.torn_cut}; "
                     f"lines that are not whole JSON now: {sum(f.torn_lines.values())}")
    lines.append(f"  lost: {len(f.lost)} of {f.members * len(STEPS):,} member-steps"
                 + "".join(f"\n    {m} {s}: {w}" for m, s, w in f.lost[:10]))
    for msg_id, channel, what in f.disagreements[:10]:
        lines.append(f"  disagreement: message {msg_id} ({channel}): {what}")
    landed = [k for k in kills if k.in_doubt]
    lines.append(f"  unknown per kill before reconciliation (left sending inside the hand-over): "
                 f"{_stats([len(k.in_doubt) for k in kills])}; {len(landed)} kill(s) landed in a hand-over; "
                 f"window {f.window}: {sum(1 for k in kills if len(k.in_doubt) > f.window)} over"
                 f"\n    ({f.window_note}); left sending in all: {_stats([k.sending for k in kills])}")
    for k in [k for k in kills if k.in_doubt or k.after][:15]:
        requested = f", {k.requested} requested at the provider" if k.requested is not None else ""
        lines.append(f"    kill {k.number} at {k.delay:.2f}s (serve-{k.daemon:03d}): {len(k.in_doubt)} in doubt of "
                     f"{k.sending} left sending, hand-over {k.handover}{requested}; after reconciliation "
                     f"{k.after if k.after is not None else '?'}{f' ({k.late})' if k.late else ''}")
    if f.doubt_outcomes:
        lines.append("    what became of them: "
                     + "; ".join(f"{n:,} {what}" for what, n in f.doubt_outcomes.most_common()))
    measured = [k for k in kills if k.after is not None]
    late = [k for k in kills if k.late]
    lines.append(f"  unknown per kill after reconciliation: {_stats([k.after or 0 for k in measured])}"
                 f" ({sum(1 for k in measured if k.after)} kill(s) with any); all unknown rows in the log at those "
                 f"moments: {_stats([k.unknown_then for k in measured if k.unknown_then is not None])}"
                 + (f"; {len(late)} measured only at the end" if late else ""))
    reasons = Counter()
    for k in measured:
        reasons.update(k.after_reasons)
    for reason, n in reasons.most_common(4):
        lines.append(f"    {n} × {reason}")
    verdicts = Counter(u[4] for u in f.unknown_end)
    lines.append(f"  unknown at the end: {len(f.unknown_end)} ({verdicts['settleable']} the channel could have "
                 f"settled, {verdicts['suspect']} with nothing to make them uncertain, {verdicts['ok']} the channel "
                 "cannot tell)")
    for (channel, says, judged), n in Counter((u[1], _reason(u[3]), u[4]) for u in f.unknown_end).most_common(8):
        lines.append(f"    {channel}: {n} × [{judged}] {says}")
    for (channel, why), n in Counter((u[1], u[2]) for u in f.unknown_end).most_common(4):
        lines.append(f"    {channel}: {n} × logged: {why}")
    statuses = ", ".join(f"{c} {s} {n:,}" for (c, s), n in sorted(f.statuses.items()))
    lines.append(f"  final statuses: {statuses}")
    for (channel, status, reason), n in f.reasons.most_common(4):
        lines.append(f"    {channel} {status} {n:,} × {reason}")
    lines.append(f"  drain: {f.drain_seconds:.0f}s, {f.fast_forwarded:,} backoff(s) fast-forwarded"
                 + (f" — {f.drain_note}" if f.drain_note else ""))
    still: Counter[str] = Counter()
    for line in f.reconcile_output.splitlines():
        match = re.match(r"\s*(\d+) still unknown: (.*)", line)
        if match:
            still[_reason(match.group(2))] += int(match.group(1))
        elif line.strip():
            lines.append(f"    run.py reconcile: {line.strip()}")
    for reason, n in still.most_common(4):
        lines.append(f"    run.py reconcile: {n} still unknown: {reason}")
    lines.append(f"  audit verify: exit {f.audit[0]}: {f.audit[1]}")
    for note in f.exited_alone:
        lines.append(f"  {note}")
    ok, misses = verdict(f)
    lines.append(f"  verdict: {'PASS' if ok else 'FAIL'} — " + ("0 duplicates, 0 lost, unknown per kill within the "
                 "window, none left unknown that the channel could settle, 0 orphans, audit ok" if ok
                 else "; ".join(misses)))
    if f.kept:
        lines.append(f"  kept {f.kept}")
    return lines


def summary(results: list[Figures]) -> list[str]:
    def row(label: str, values: Iterator[str], target: str = "") -> str:
        return f"{label:<34}" + "".join(f"{v:>22}" for v in values) + (f"   {target}" if target else "")

    ran = [r for r in results if r.ran]
    if not ran:
        return []
    head = f"{'':<34}" + "".join(f"{r.db + '/' + r.channels:>22}" for r in ran) + "   target"
    return ["chaos summary", head,
            row("kills", (str(len(r.kills)) for r in ran)),
            row("run time, s", (f"{r.seconds:.0f}" for r in ran)),
            row("duplicates (log / channel)", (f"{len(r.log_duplicates) + len(r.member_step_duplicates)} / "
                                               f"{sum(len(d) for d in r.channel_duplicates.values())}" for r in ran),
                "0 / 0"),
            row("lost", (str(len(r.lost)) for r in ran), "0"),
            row("unknown/kill before: max", (str(max((len(k.in_doubt) for k in r.kills), default=0)) for r in ran),
                "<= window"),
            row("  mean", (f"{sum(len(k.in_doubt) for k in r.kills) / max(1, len(r.kills)):.1f}" for r in ran)),
            row("  window / kills over", (f"{r.window} / {sum(1 for k in r.kills if len(k.in_doubt) > r.window)}"
                                          for r in ran), "0 over"),
            row("unknown/kill after: max", (str(max((k.after or 0 for k in r.kills), default=0)) for r in ran),
                "0 on the outbox"),
            row("  mean", (f"{sum(k.after or 0 for k in r.kills) / max(1, len(r.kills)):.2f}" for r in ran)),
            row("unknown at the end (settleable)",
                (f"{len(r.unknown_end)} ({sum(1 for u in r.unknown_end if u[4] != 'ok')})" for r in ran), "(0)"),
            row("orphans", (str(sum(len(k.orphans) for k in r.kills)) for r in ran), "0"),
            row("audit verify", ("ok" if r.audit[0] == 0 else "FAILED" for r in ran), "ok"),
            row("verdict", ("PASS" if verdict(r)[0] else "FAIL" for r in ran))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/chaos.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="sqlite")
    parser.add_argument("--channels", choices=["outbox", "providers", "both"], default="outbox")
    parser.add_argument("--kills", type=int, default=50, help="kills per combination (default 50)")
    parser.add_argument("--members", type=int, default=None,
                        help="members per wave; each gets an email and an SMS (default: 10,000 with the outbox, "
                             f"{PROVIDER_MEMBERS:,} with the providers, whose faults make a send much slower)")
    parser.add_argument("--batch-size", type=int, default=200, help="scheduler.batch_size (default 200)")
    parser.add_argument("--lease", type=int, default=10, help="scheduler.lease_seconds (default 10)")
    parser.add_argument("--transient", type=float, default=0.3, metavar="SHARE",
                        help="providers: share of requests answered 429 or 500, half each (default 0.3)")
    parser.add_argument("--slow", type=float, default=0.05, metavar="SHARE",
                        help="providers: share processed but answered after 1.5 s, past the 1 s timeout (0.05)")
    parser.add_argument("--lost", type=float, default=0.01, metavar="SHARE",
                        help="providers: share processed, then reset without an answer (default 0.01)")
    parser.add_argument("--drop", type=float, default=0.01, metavar="SHARE",
                        help="providers: share closed unprocessed without an answer (default 0.01)")
    parser.add_argument("--deliver-after", type=float, default=0.5, metavar="SECONDS",
                        help="providers: the stand-ins' delivery callbacks come this long after accepting (0.5)")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders (logs, outboxes, database) "
                        "and PostgreSQL schemas")
    args = parser.parse_args(argv)
    if args.kills < 1 or (args.members is not None and args.members < 1) or args.batch_size < 1 or args.lease < 1:
        parser.error("--kills, --members, --batch-size and --lease must be 1 or more")
    try:
        options = Options(args.kills, args.members or 0, args.batch_size, args.lease, args.transient, args.slow,
                          args.lost, args.drop, args.seed, args.keep, args.deliver_after)
        options.faults()
    except ValueError as exc:
        parser.error(str(exc))
    dbs = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    kinds = ["outbox", "providers"] if args.channels == "both" else [args.channels]
    # "could not post callbacks": the engine is down
    logging.getLogger("engine.testing").setLevel(logging.ERROR)
    results = []
    for db in dbs:
        for kind in kinds:
            chosen = dataclasses.replace(options, members=args.members or (
                OUTBOX_MEMBERS if kind == "outbox" else PROVIDER_MEMBERS))
            results.append(Combination(db, kind, chosen).run())
            for line in report(results[-1], chosen):
                print(line, flush=True)
    for line in summary(results):
        print(line)
    return 0 if all(r.ran for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
