"""Benchmark, not a test: one engine pass of the win-back journey over N lapsed members.

    python bench/winback.py [--members N] [--db sqlite|postgresql|both] [--batch-size B] [--profile] [--keep]
                            [--daemons D]

It builds N lapsed members in a fresh database (bulk inserts: Core executemany
on SQLite, COPY on PostgreSQL), with a rules folder holding only the win-back
journey, then runs ONE pass in a separate process, so that the peak memory
measured is the pass's own: the entry phase (segment → enrollments) and the
first send (render, audit-log, write to the email outbox). It then checks that
every member got exactly one logged, sent message and that the audit chain
verifies. Figures are printed next to the targets; nothing is asserted.

With --daemons D (PostgreSQL only: on SQLite a second daemon refuses to start), the
entry runs once and then D processes send concurrently, each with its own worker id,
as D `serve` daemons sharing one database would; the send's figures are wall time
from the start of the first to the end of the last.

PostgreSQL: ENGINE_BENCH_PG_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/test);
the bench works in a schema of its own, created and dropped around the run.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import create_engine, func, select, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from engine.app import App  # noqa: E402
from engine.audit import chain as audit  # noqa: E402
from engine.config import Config, load_config  # noqa: E402
from engine.rules.loyalty import Loyalty  # noqa: E402
from engine.store.models import enrollments, members, messages  # noqa: E402
from engine.tick.report import TickReport  # noqa: E402

# 12:00 in Asia/Shanghai, where every bench member lives: quiet hours (21:00-08:00) do not apply,
# without switching them off.
CLOCK = datetime(2026, 6, 15, 4, 0, tzinfo=UTC)
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BATCH = 10_000
COLUMNS = ("id", "name", "email", "phone", "birthday", "timezone", "locale", "signup_at", "tier", "points",
           "total_spend", "order_count", "last_order_at", "email_opt_in", "sms_opt_in", "attributes", "created_at",
           "updated_at", "forgotten_at")
TARGET_SEND = 14_000  # messages/s to the outbox on SQLite
TARGET_TOTAL_1M = 60.0  # seconds for entry + first send at 1,000,000 members
TARGET_RSS_1M = 300.0  # MB peak at 1,000,000 members


@dataclass(frozen=True)
class Options:
    members: int
    batch_size: int | None = None
    profile: bool = False
    keep: bool = False
    analyze: bool = False
    daemons: int = 1
    compose_worker: str | None = None


@dataclass
class Result:
    db: str
    members: int
    load_seconds: float = 0.0
    pass_figures: dict[str, Any] = field(default_factory=dict)
    checks: list[tuple[str, bool]] = field(default_factory=list)
    verify_seconds: float = 0.0


# --------------------------------------------------------------------------- the workspace


def workspace(root: Path, url: str, batch_size: int | None, compose_worker: str | None = None) -> Path:
    """A rules folder with only the win-back journey, the repo's templates, outboxes under ROOT."""
    rules = root / "rules"
    (rules / "journeys").mkdir(parents=True)
    shutil.copy(REPO / "rules" / "journeys" / "winback.yaml", rules / "journeys" / "winback.yaml")
    for name in ("segments.yaml", "loyalty.yaml"):
        shutil.copy(REPO / "rules" / name, rules / name)
    settings: dict[str, Any] = {
        "database": {"url": url},
        "rules_dir": str(rules),
        "templates_dir": str(REPO / "templates"),
        "var_dir": str(root / "var"),
        "default_timezone": "Asia/Shanghai",
        "channels": {"email": {"provider": "outbox", "path": str(root / "outbox" / "email.jsonl")},
                     "sms": {"provider": "outbox", "path": str(root / "outbox" / "sms.jsonl")}},
        "web": {"public_url": "https://crm.example.com"},
        "quiet_hours": {"start": "21:00", "end": "08:00"},
        "frequency_caps": [],
    }
    scheduler: dict[str, Any] = {}
    if batch_size:
        scheduler["batch_size"] = batch_size
    if compose_worker:
        scheduler["compose_worker"] = compose_worker
    if scheduler:
        settings["scheduler"] = scheduler
    path = root / "config.yaml"
    path.write_text(json.dumps(settings, indent=2), encoding="utf-8")  # JSON is YAML
    return path


def generated(count: int, loyalty: Loyalty) -> Iterator[dict[str, Any]]:
    """N lapsed members: last order 90-400 days before the clock, a valid unique email, opted in."""
    rng = random.Random(20260615)
    for i in range(count):
        spend = round(rng.lognormvariate(7.65, 1.6), 2)
        last = CLOCK - timedelta(days=rng.uniform(90, 400))
        zh = i % 2 == 0
        yield {"id": f"B{i:07d}", "name": f"会员{i:07d}" if zh else f"Member {i}", "email": f"bench{i}@example.com",
               "phone": None, "birthday": None, "timezone": "Asia/Shanghai", "locale": "zh-CN" if zh else "en",
               "signup_at": last - timedelta(days=rng.uniform(30, 900)), "tier": loyalty.tier_for_spend(spend).id,
               "points": int(spend * 0.6), "total_spend": spend, "order_count": max(1, int(spend // 300)),
               "last_order_at": last, "email_opt_in": True, "sms_opt_in": False, "attributes": {},
               "created_at": CLOCK, "updated_at": CLOCK, "forgotten_at": None}


def load_members(app: App, count: int) -> float:
    """Bulk-load COUNT generated members: Core executemany on SQLite, COPY on PostgreSQL; seconds taken."""
    loyalty = app.require_valid_rules().loyalty
    started = time.perf_counter()
    rows = generated(count, loyalty)
    if app.store.dialect == "postgresql":
        _copy(app, rows)
    else:
        _executemany(app, rows)
    return time.perf_counter() - started


def _executemany(app: App, rows: Iterator[dict[str, Any]]) -> None:
    with app.store.begin() as conn:
        batch: list[dict[str, Any]] = []
        for row in rows:
            batch.append(row)
            if len(batch) >= BATCH:
                conn.execute(members.insert(), batch)
                batch = []
        if batch:
            conn.execute(members.insert(), batch)


def _copy(app: App, rows: Iterator[dict[str, Any]]) -> None:
    # COPY bypasses SQLAlchemy's types: hand over storage form (naive UTC, JSON text) ourselves.
    raw = app.store.engine.raw_connection()
    try:
        psycopg_connection: Any = raw.driver_connection
        statement = f"COPY members ({', '.join(COLUMNS)}) FROM STDIN"
        with psycopg_connection.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row([_stored(row[c]) for c in COLUMNS])
        raw.commit()
    finally:
        raw.close()


def _stored(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).replace(tzinfo=None)
    if isinstance(value, dict):
        return json.dumps(value)
    return value


# --------------------------------------------------------------------------- the pass (child process)


def one_pass(config_path: str, profile_to: str | None, analyze: bool, phase: str = "all") -> dict[str, Any]:
    """Entry phase and first send at CLOCK (PHASE "entry" or "send": only that one); runs in its own process."""
    config = load_config(config_path)
    app = App(config, migrate=False)
    app.require_valid_rules()
    rss_before = _peak_mb()
    profiler = cProfile.Profile() if profile_to else None
    if profiler:
        profiler.enable()
    report = TickReport(CLOCK)
    started = time.perf_counter()
    app.runner.start_worker_early()  # as App.tick does first: its start-up overlaps the entry phase
    live = app.live_journeys(CLOCK)
    synced = time.perf_counter()
    if phase != "send":
        app.entry.enter(CLOCK, live, report)
    entered = time.perf_counter()
    analyzed = 0.0
    if analyze and phase != "send":  # what-if: fresh planner statistics, which the engine does not gather itself
        with app.store.begin() as conn:
            conn.execute(text("ANALYZE"))
        analyzed = time.perf_counter() - entered
        entered = time.perf_counter()
    cpu_before = time.process_time()
    if phase != "entry":
        app.runner.run_due(CLOCK, live, report, lambda: False)
    sent = time.perf_counter()
    send_cpu = time.process_time() - cpu_before
    if profiler:
        profiler.disable()
        profiler.dump_stats(str(profile_to))
    worker_peak = _worker_peak_mb(app)
    worker_cpu = _worker_cpu_s(app)
    app.close()
    return {"sync_s": synced - started, "entry_s": entered - synced, "send_s": sent - entered,
            "total_s": sent - started - analyzed, "analyze_s": analyzed, "rss_before_mb": rss_before,
            "rss_peak_mb": _peak_mb(), "rss_worker_peak_mb": worker_peak,
            "send_cpu_s": send_cpu, "worker_cpu_s": worker_cpu,
            "enrolled": report.counts["enrolled"], "sent": report.counts["sent"]}


def _hwm_mb(pid: int | str = "self") -> float | None:
    """The process's own peak resident set (VmHWM), or None where /proc does not tell. Unlike ru_maxrss it starts
    afresh at exec, so it does not carry the high-water mark of the parent that forked it."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None


def _peak_mb() -> float:
    own = _hwm_mb()
    return own if own is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB


def _worker_peak_mb(app: App) -> float:
    """The compose worker's peak, read before the App closes it; 0 if none ran."""
    worker = app.runner.compose_worker
    return sum(_hwm_mb(pid) or 0.0 for pid in worker.pids()) if worker is not None else 0.0


def _worker_cpu_s(app: App) -> float:
    """CPU seconds (user + system) the compose worker has used in its life, read before the App closes it."""
    worker = app.runner.compose_worker
    if worker is None:
        return 0.0
    total = 0.0
    for pid in worker.pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def _pass_command(config_path: Path, profile_to: Path | None, analyze: bool, phase: str) -> list[str]:
    command = [sys.executable, __file__, "--pass", str(config_path), "--phase", phase]
    if profile_to:
        command += ["--profile-to", str(profile_to)]
    if analyze:
        command.append("--analyze")
    return command


def _figures(returncode: int, stdout: str, stderr: str) -> dict[str, Any]:
    if returncode != 0:
        sys.exit(f"the engine pass failed:\n{stderr}")
    figures: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return figures


def _run(command: list[str]) -> dict[str, Any]:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    return _figures(done.returncode, done.stdout, done.stderr)


def run_pass(config_path: Path, profile_to: Path | None, analyze: bool, daemons: int = 1) -> dict[str, Any]:
    """One pass in a child process; with DAEMONS > 1, the entry in one child, then DAEMONS sending at once."""
    if daemons == 1:
        return _run(_pass_command(config_path, profile_to, analyze, "all"))
    figures = _run(_pass_command(config_path, None, analyze, "entry"))
    # Each daemon's output goes to files of its own: a pipe read one daemon after another could fill up and
    # stall a daemon that is still sending.
    with contextlib.ExitStack() as files:
        outputs = [tuple(files.enter_context(tempfile.TemporaryFile("w+")) for _ in ("stdout", "stderr"))
                   for _ in range(daemons)]
        started = time.perf_counter()
        senders = [subprocess.Popen(_pass_command(config_path, None, False, "send"), stdout=out, stderr=err,
                                    text=True) for out, err in outputs]
        for sender in senders:
            sender.wait()
        send_s = time.perf_counter() - started
        each = []
        for sender, (out, err) in zip(senders, outputs, strict=True):
            out.seek(0)
            err.seek(0)
            each.append(_figures(sender.returncode, out.read(), err.read()))
    figures.update(send_s=send_s, total_s=figures["total_s"] + send_s, sent=sum(f["sent"] for f in each),
                   rss_before_mb=max(f["rss_before_mb"] for f in each),
                   rss_peak_mb=max(f["rss_peak_mb"] for f in each),
                   rss_worker_peak_mb=max(f.get("rss_worker_peak_mb", 0) for f in each),
                   send_cpu_s=sum(f.get("send_cpu_s", 0) for f in each),
                   worker_cpu_s=sum(f.get("worker_cpu_s", 0) for f in each),
                   sent_by_daemon=[f["sent"] for f in each])
    return figures


# --------------------------------------------------------------------------- checks


def check(app: App, config: Config, count: int) -> tuple[list[tuple[str, bool]], float]:
    with app.store.connect() as conn:
        statuses = {str(s): int(n) for s, n in conn.execute(
            select(messages.c.status, func.count()).group_by(messages.c.status))}
        enrolled = conn.execute(select(func.count()).select_from(enrollments)).scalar_one()
        started = time.perf_counter()
        verified = audit.verify(conn)
        verify_seconds = time.perf_counter() - started
    outbox = config.outbox_path("email")
    lines = _count_lines(outbox) if outbox.exists() else 0
    return [
        (f"enrollments = {count:,} (got {enrolled:,})", enrolled == count),
        (f"message rows all 'sent', {count:,} of them (got {statuses})", statuses == {"sent": count}),
        (f"email outbox lines = {count:,} (got {lines:,})", lines == count),
        (f"audit verify: {'ok' if verified.ok else verified.problem} ({verified.rows:,} rows)",
         verified.ok and verified.rows == count),
    ], verify_seconds


def _count_lines(path: Path) -> int:
    lines = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            lines += chunk.count(b"\n")
    return lines


# --------------------------------------------------------------------------- one database


def pg_url(schema: str) -> str:
    url = make_url(os.environ.get("ENGINE_BENCH_PG_URL", PG_URL))
    return url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)


def bench(db: str, options: Options) -> Result:
    count = options.members
    root = Path(tempfile.mkdtemp(prefix=f"winback-bench-{db}-"))
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = None
    if db == "postgresql":
        url = pg_url(schema)
        admin = create_engine(make_url(url).difference_update_query(["options"]))
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    else:
        url = f"sqlite:///{root / 'bench.db'}"
    result = Result(db, count)
    try:
        config = load_config(workspace(root, url, options.batch_size, options.compose_worker))
        app = App(config)
        result.load_seconds = load_members(app, count)
        print(f"[{db}] {count:,} members loaded in {result.load_seconds:.1f}s; running one engine pass…",
              flush=True)
        result.pass_figures = run_pass(root / "config.yaml", root / "pass.prof" if options.profile else None,
                                       options.analyze, options.daemons if db == "postgresql" else 1)
        result.checks, result.verify_seconds = check(app, config, count)
        app.store.close()
        if options.profile:
            _print_profile(root / "pass.prof")
    finally:
        if admin is not None and not options.keep:
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        if admin is not None:
            admin.dispose()
        if options.keep:
            print(f"[{db}] kept {root}" + (f" and schema {schema}" if admin is not None else ""))
        else:
            shutil.rmtree(root, ignore_errors=True)
    return result


def _print_profile(path: Path, top: int = 25) -> None:
    """The engine's own functions by cumulative time, then anything by self time, as shares of the pass."""
    stats: dict[tuple[str, int, str], tuple[Any, ...]] = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    # The phases one_pass calls directly have no profiled caller: together they are the whole pass.
    total = sum(ct for _, _, _, ct, callers in stats.values() if not callers) or 1.0

    def name(key: tuple[str, int, str]) -> str:
        file, line, function = key
        short = file.removeprefix(str(REPO) + "/").split("site-packages/")[-1]
        return f"{short}:{line}:{function}"

    ours = [(k, v) for k, v in stats.items() if k[0].startswith(str(REPO)) and "/.venv/" not in k[0]]
    print(f"profile of the pass ({total:.1f}s under cProfile); engine functions by cumulative time:")
    for key, (_, calls, _, cumulative, _) in sorted(ours, key=lambda kv: -kv[1][3])[:top]:
        print(f"  {cumulative / total:6.1%} {cumulative:7.2f}s {calls:>9,}x  {name(key)}")
    print("any function by self time:")
    for key, (_, calls, own, _, _) in sorted(stats.items(), key=lambda kv: -kv[1][2])[:15]:
        print(f"  {own / total:6.1%} {own:7.2f}s {calls:>9,}x  {name(key)}")


# --------------------------------------------------------------------------- output


def _both_mb(figures: dict[str, Any]) -> float:
    return float(figures["rss_peak_mb"]) + float(figures.get("rss_worker_peak_mb", 0))


def table(results: list[Result]) -> list[str]:
    n = results[0].members
    scale = 1_000_000 / n
    rows: list[tuple[str, list[str], str]] = [
        ("members loaded (bulk), s", [f"{r.load_seconds:.1f}" for r in results], ""),
        ("entry phase, s", [f"{r.pass_figures['entry_s']:.2f}" for r in results], ""),
        ("  members evaluated / s", [f"{n / r.pass_figures['entry_s']:,.0f}" for r in results], ""),
        ("first send, s", [f"{r.pass_figures['send_s']:.2f}" for r in results], ""),
        ("  messages / s", [f"{r.pass_figures['sent'] / r.pass_figures['send_s']:,.0f}" for r in results],
         f">= {TARGET_SEND:,} (SQLite)"),
        ("  CPU s: sending process", [f"{r.pass_figures.get('send_cpu_s', 0):.1f}" for r in results], ""),
        ("  CPU s: compose worker", [f"{r.pass_figures.get('worker_cpu_s', 0):.1f}" for r in results], ""),
        ("pass total (sync+entry+send), s", [f"{r.pass_figures['total_s']:.2f}" for r in results],
         f"<= {TARGET_TOTAL_1M:.0f} s at 1,000,000" if n == 1_000_000 else ""),
        ("  projected to 1,000,000, s", [f"{r.pass_figures['total_s'] * scale:.0f}" for r in results],
         f"<= {TARGET_TOTAL_1M:.0f} s at 1,000,000"),
        ("RSS after start-up, MB", [f"{r.pass_figures['rss_before_mb']:.0f}" for r in results], ""),
        ("peak RSS of the pass, MB", [f"{r.pass_figures['rss_peak_mb']:.0f}" for r in results], ""),
        ("  of its compose worker, MB", [f"{r.pass_figures.get('rss_worker_peak_mb', 0):.0f}" for r in results],
         ""),
        ("  both together, MB", [f"{_both_mb(r.pass_figures):.0f}" for r in results],
         f"< {TARGET_RSS_1M:.0f} MB at 1,000,000"),
        ("audit verify, s", [f"{r.verify_seconds:.1f}" for r in results], ""),
        ("checks", ["pass" if all(ok for _, ok in r.checks) else "FAIL" for r in results], "all pass"),
    ]
    if n == 1_000_000:
        rows = [row for row in rows if not row[0].startswith("  projected")]
    if results[0].pass_figures.get("analyze_s"):
        rows.insert(3, ("ANALYZE (what-if, not counted), s", [f"{r.pass_figures['analyze_s']:.2f}" for r in results],
                        ""))
    head = f"{'':<34}" + "".join(f"{r.db:>14}" for r in results) + "   target"
    what_if = " (what-if: ANALYZE before the send, not counted)" if results[0].pass_figures.get("analyze_s") else ""
    lines = [f"win-back bench: {n:,} lapsed members, one pass at 12:00 Asia/Shanghai{what_if}", head]
    lines += [f"{label:<34}" + "".join(f"{v:>14}" for v in values) + (f"   {goal}" if goal else "")
              for label, values, goal in rows]
    if n != 1_000_000:
        lines.append("(projections assume linear scaling; run with --members 1000000 to measure)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="sqlite")
    parser.add_argument("--batch-size", type=int, default=None, help="scheduler.batch_size (default: engine's)")
    parser.add_argument("--compose-worker", choices=["auto", "on", "off"], default=None,
                        help="scheduler.compose_worker (default: engine's, auto)")
    parser.add_argument("--profile", action="store_true", help="cProfile the pass and print the top functions")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and PostgreSQL schema")
    parser.add_argument("--analyze", action="store_true",
                        help="what-if: run ANALYZE between entry and send (the engine does not do this itself)")
    parser.add_argument("--daemons", type=int, default=1,
                        help="PostgreSQL: D processes send concurrently after one entry phase (default 1)")
    parser.add_argument("--pass", dest="pass_config", help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=["all", "entry", "send"], default="all", help=argparse.SUPPRESS)
    parser.add_argument("--profile-to", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pass_config:  # the child: one pass, figures as one JSON line
        print(json.dumps(one_pass(args.pass_config, args.profile_to, args.analyze, args.phase)))
        return
    if args.members < 1:
        parser.error("--members must be 1 or more")
    if args.daemons < 1:
        parser.error("--daemons must be 1 or more")
    if args.daemons > 1 and args.db != "postgresql":
        parser.error("--daemons needs --db postgresql: on SQLite a second daemon refuses to start")
    if args.daemons > 1 and args.profile:
        parser.error("--profile profiles one process: use it without --daemons")
    dbs = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    options = Options(args.members, args.batch_size, args.profile, args.keep, args.analyze, args.daemons,
                      args.compose_worker)
    results = [bench(db, options) for db in dbs]
    for line in table(results):
        print(line)
    for r in results:
        split = r.pass_figures.get("sent_by_daemon")
        if split:
            print(f"[{r.db}] {len(split)} daemons sent concurrently: " + " + ".join(f"{n:,}" for n in split))
        for label, ok in r.checks:
            print(f"[{r.db}] {'ok  ' if ok else 'FAIL'} {label}")


if __name__ == "__main__":
    main()
