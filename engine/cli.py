"""The command line: ``python run.py VERB ...`` (see DESIGN.md for the contract).

Exit 0 on success, 1 on a user error (one clear line per problem; a traceback
only with --debug), 2 on usage errors.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click
from sqlalchemy import func, select

from engine import audit, funnel, messagelog, programme_report, quarantine
from engine import logs as logsetup
from engine import members as member_ops
from engine.config import Config, load_config
from engine.durations import parse_duration
from engine.exceptions import AlreadyRunning, EngineError, InputError, RulesError
from engine.models import MessageStatus, messages
from engine.report import TickReport
from engine.timeutil import parse_instant

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Ctx:
    config_path: str
    db: str | None
    debug: bool
    config_explicit: bool = False  # --config was given: a missing file is an error, not "all defaults"

    def config(self) -> Config:
        return load_config(self.config_path, self.db, required=self.config_explicit)

    def app(self, *, lock: str | None = None) -> Any:
        from engine.app import App

        app = App(self.config())
        if lock:
            app.store.acquire_process_lock(lock)
        return app


def handle_errors(func: F) -> F:
    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context().find_object(Ctx)
        try:
            return func(*args, **kwargs)
        except RulesError as exc:
            for problem in exc.problems:
                click.echo(str(problem), err=True)
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except EngineError as exc:
            if ctx is not None and ctx.debug:
                raise
            click.echo(f"error: {exc}", err=True)
            cause = exc.__cause__
            if cause is not None:
                click.echo(f"  caused by: {type(cause).__name__}: {cause}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def instant(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_instant(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", default="config.yaml", show_default=True, help="runtime configuration file")
@click.option("--db", default=None, help="database URL, overriding database.url")
@click.option("--debug", is_flag=True, help="verbose logs and full tracebacks")
@click.pass_context
def main(ctx: click.Context, config_path: str, db: str | None, debug: bool) -> None:
    """Rule-driven marketing automation for membership programmes."""
    logsetup.setup(debug)
    if not debug:
        logging.getLogger().setLevel(logging.WARNING)
    explicit = ctx.get_parameter_source("config_path") is not click.core.ParameterSource.DEFAULT
    ctx.obj = Ctx(config_path, db, debug, explicit)


# --------------------------------------------------------------------------- validate


@main.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.pass_obj
@handle_errors
def validate(obj: Ctx, paths: tuple[Path, ...]) -> None:
    """Check journeys, segments, loyalty rules, templates and config (all of them, or the PATHS given)."""
    from engine.validation import validate_paths

    problems, summary = validate_paths(obj.config_path, obj.db, obj.config_explicit, paths)
    for problem in problems:
        click.echo(f"{_relative(problem.file)}:{problem.line}:{problem.col}: {problem.message}")
    if problems:
        click.echo(f"{len(problems)} problem(s) found", err=True)
        sys.exit(1)
    click.echo(summary)


def _relative(file: str) -> str:
    try:
        return str(Path(file).resolve().relative_to(Path.cwd()))
    except ValueError:
        return file


# --------------------------------------------------------------------------- import and events


@main.group(name="import")
def import_group() -> None:
    """Load members or events from CSV or JSONL."""


def _print_import(file: Path, what: str, report: Any) -> None:
    for line in report.lines(str(file)):
        click.echo(line, err=True)
    extra = f" ({report.tier_changes} tier changes recorded)" if getattr(report, "tier_changes", 0) else ""
    click.echo(f"{what}: {report.loaded} loaded, {len(report.skipped)} skipped{extra}")
    if report.skipped:
        sys.exit(1)


@import_group.command("members")
@click.argument("file", type=click.Path(path_type=Path))
@click.pass_obj
@handle_errors
def import_members_cmd(obj: Ctx, file: Path) -> None:
    """Upsert members (by id) from FILE."""
    from engine.ingest import import_members

    app = obj.app()
    report = import_members(app.store, file, app.loyalty(), app.config.default_region, datetime.now(UTC))
    _print_import(file, "members", report)


@import_group.command("events")
@click.argument("file", type=click.Path(path_type=Path))
@click.pass_obj
@handle_errors
def import_events_cmd(obj: Ctx, file: Path) -> None:
    """Append events from FILE."""
    from engine.recorder import import_events

    app = obj.app()
    report = import_events(app.store, file, app.loyalty(), datetime.now(UTC))
    _print_import(file, "events", report)


_PROP = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


@main.command()
@click.argument("member_id")
@click.argument("event_type")
@click.option("--prop", "props", multiple=True, help="a property, key=value (repeatable)")
@click.option("--at", "at", default=None, help="when it happened (ISO 8601; default now)")
@click.pass_obj
@handle_errors
def event(obj: Ctx, member_id: str, event_type: str, props: tuple[str, ...], at: str | None) -> None:
    """Record one event for a member."""
    from engine.ingest import attribute_value
    from engine.recorder import record_events

    properties: dict[str, Any] = {}
    for prop in props:
        match = _PROP.match(prop)
        if match is None:
            raise click.BadParameter(f"must be key=value, got: {prop!r}", param_hint="--prop")
        properties[match.group(1)] = attribute_value(match.group(2))
    when = instant(at, "--at") or datetime.now(UTC)
    app = obj.app()
    loyalty = app.loyalty()
    row = {"member_id": member_id, "type": event_type, "at": when.isoformat(), "properties": properties}
    report = record_events(app.store, [(1, row, None)], loyalty, datetime.now(UTC), "cli")
    if report.skipped:
        raise InputError(report.skipped[0][1])
    extra = "; it also raised the member's tier (a tier_changed event)" if report.tier_changes else ""
    click.echo(f"recorded {event_type} for {member_id} at {when.isoformat()}{extra}")


# --------------------------------------------------------------------------- running


@main.command()
@click.option("--now", "now_text", default=None, help="the clock for this pass (ISO 8601; default now)")
@click.pass_obj
@handle_errors
def tick(obj: Ctx, now_text: str | None) -> None:
    """One full evaluation pass at the given clock."""
    now = instant(now_text, "--now") or datetime.now(UTC)
    app = obj.app(lock="tick")
    try:
        _warn_rules(app)
        report = app.tick(now)
    finally:
        app.close()
    click.echo(f"tick {now.isoformat()}: {report.summary()} ({report.seconds:.2f}s)")
    _tick_problems(report)
    if report.errors:
        sys.exit(1)


def _tick_problems(report: Any) -> None:
    """Units set aside (the tick went on without them) and phases that failed, one line each, on stderr."""
    for problem in report.problems:
        click.echo(f"set aside: {problem}", err=True)
    if report.counts.get("quarantined"):
        click.echo(f"{report.counts['quarantined']} unit(s) quarantined: `run.py log --status quarantined` shows them, "
                   "`run.py retry` runs them again after a fix", err=True)
    for error in report.errors:
        click.echo(f"error: the {error} (the other phases ran; run with --debug for the traceback)", err=True)


def _warn_rules(app: Any) -> None:
    book = app.rules()
    for problem in book.problems:
        click.echo(f"warning: {problem}", err=True)
    if book.problems:
        click.echo("warning: files with problems were skipped; their last good versions keep running "
                   "(run `python run.py validate`)", err=True)


@main.command()
@click.option("--from", "start", required=True, help="start of the window (ISO 8601)")
@click.option("--to", "end", required=True, help="end of the window (ISO 8601)")
@click.option("--every", default="1h", show_default=True, help="time between ticks (e.g. 15m, 1h, 1d)")
@click.pass_obj
@handle_errors
def simulate(obj: Ctx, start: str, end: str, every: str) -> None:
    """Run ticks over a window on a virtual clock."""
    from engine.simulate import simulate as run

    first, last = instant(start, "--from"), instant(end, "--to")
    assert first is not None and last is not None
    try:
        step = parse_duration(every)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--every") from None
    if last < first:
        raise click.BadParameter("must not be before --from", param_hint="--to")
    app = obj.app(lock="simulate")
    try:
        _warn_rules(app)
        total = run(app, first, last, step, after_tick=lambda r: _tick_line(r))
    finally:
        app.close()
    click.echo(f"simulated {first.isoformat()} → {last.isoformat()} every {every}: {total.summary()}")


def _tick_line(report: Any) -> None:
    if report.counts:
        click.echo(f"  {report.now.isoformat()}: {report.summary()}")


@main.command()
@click.option("--no-web", is_flag=True,
              help="do not start the HTTP service (when `run.py web` serves it, or several daemons share a host)")
@click.pass_obj
@handle_errors
def serve(obj: Ctx, no_web: bool) -> None:
    """Run the scheduler daemon, and the HTTP service on web.listen, until SIGTERM/SIGINT."""
    from engine.daemon import Daemon, WebThread

    logging.getLogger().setLevel(logging.DEBUG if obj.debug else logging.INFO)
    app = obj.app()
    # The HTTP side gets an App of its own: its rule reloads never race the tick's thread over templates.
    web_app = None if no_web else obj.app()
    try:
        app.secret  # noqa: B018 - created once here, before two threads could race to create var/secret.key
        thread = WebThread(web_app, web_app.config.web.listen) if web_app is not None else None
        Daemon(app, thread).run()
    finally:
        if web_app is not None:
            web_app.close()
        app.close()


@main.command()
@click.pass_obj
@handle_errors
def web(obj: Ctx) -> None:
    """Run only the HTTP service (event API, webhooks, unsubscribe pages, health, metrics) until SIGTERM/SIGINT."""
    from engine.daemon import serve_http

    logging.getLogger().setLevel(logging.DEBUG if obj.debug else logging.INFO)
    app = obj.app()
    try:
        serve_http(app, app.config.web.listen)
    finally:
        app.close()


# --------------------------------------------------------------------------- looking


@main.command()
@click.argument("journey_id")
@click.argument("step_id")
@click.option("--member", "member_id", required=True, help="the member to render for")
@click.pass_obj
@handle_errors
def preview(obj: Ctx, journey_id: str, step_id: str, member_id: str) -> None:
    """Render a step's message for a member, without sending."""
    from engine.preview import render_preview

    app = obj.app()
    try:
        click.echo(render_preview(app, journey_id, step_id, member_id, datetime.now(UTC)))
    finally:
        app.close()


@main.command(name="log")
@click.option("--member", default=None)
@click.option("--journey", default=None)
@click.option("--status", type=click.Choice([*messagelog.STATUSES, "quarantined"]), default=None,
              help="a message status, or quarantined: the units of work set aside after failing")
@click.option("--since", default=None, help="ISO 8601")
@click.option("--until", default=None, help="ISO 8601")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "jsonl"]), default="table", show_default=True)
@click.pass_obj
@handle_errors
def log_cmd(obj: Ctx, member: str | None, journey: str | None, status: str | None, since: str | None,
            until: str | None, fmt: str) -> None:
    """Query the message log (or, with --status quarantined, the work set aside after failing)."""
    flt = messagelog.LogFilter(member, journey, status, instant(since, "--since"), instant(until, "--until"))
    app = obj.app()
    held = 0
    try:
        with app.store.connect() as conn:
            if status == "quarantined":
                count = messagelog.write_quarantine(sys.stdout, quarantine.entries(conn, journey=journey,
                                                                                   member=member), fmt)
            else:
                count = messagelog.write(sys.stdout, messagelog.rows(conn, flt), fmt)
                held = quarantine.quarantined_total(conn) if fmt == "table" else 0
    except BrokenPipeError:  # `| head` closed the pipe: that is fine
        sys.stderr.close()
        return
    finally:
        app.store.close()
    if fmt == "table":
        what = "unit(s) set aside" if status == "quarantined" else "message(s)"
        click.echo(f"{count} {what}", err=True)
        if held:
            click.echo(f"and {held} unit(s) of work quarantined: `run.py log --status quarantined`", err=True)


@main.command()
@click.option("--journey", default=None)
@click.option("--format", "fmt", type=click.Choice(["table", "json", "html"]), default="table", show_default=True)
@click.option("--programme", is_flag=True, help="the loyalty programme instead: tiers, lifecycle, points, movements")
@click.option("--from", "from_text", default=None, help="with --programme: start of the period (default: 30 days ago)")
@click.option("--to", "to_text", default=None, help="with --programme: end of the period (default: now)")
@click.pass_obj
@handle_errors
def report(obj: Ctx, journey: str | None, fmt: str, programme: bool, from_text: str | None,
           to_text: str | None) -> None:
    """Funnel and conversion figures per journey, or with --programme the loyalty programme's."""
    app = obj.app()
    if programme:
        until = instant(to_text, "--to") or datetime.now(UTC)
        since = instant(from_text, "--from") or until - timedelta(days=30)
        loyalty = app.rules().loyalty
        with app.store.connect() as conn:
            item = programme_report.figures(conn, loyalty, since, until)
        app.store.close()
        locale = app.config.default_locale
        click.echo(programme_report.as_json(item) if fmt == "json" else
                   programme_report.as_html(item, loyalty, locale) if fmt == "html" else
                   programme_report.as_table(item, loyalty, locale))
        return
    with app.store.connect() as conn:
        items = funnel.figures(conn, journey)
    app.store.close()
    render = {"table": funnel.as_table, "json": funnel.as_json, "html": funnel.as_html}[fmt]
    click.echo(render(items))


@main.command(name="reconcile")
@click.pass_obj
@handle_errors
def reconcile_cmd(obj: Ctx) -> None:
    """Settle messages in doubt (status unknown) with their channels, and print what was resolved."""
    app = obj.app()
    try:
        exclusive = _try_lock(app, "reconcile")
        report = TickReport(datetime.now(UTC))
        settled = app.recover(report.now, report, everything=True) if exclusive or app.store.dialect != "sqlite" \
            else _reconcile_only(app, report.now)
        with app.store.connect() as conn:
            left = conn.execute(select(func.count()).select_from(messages)
                                .where(messages.c.status == MessageStatus.UNKNOWN.value)).scalar_one()
    finally:
        app.close()
    if report.counts.get("requeued") or report.counts.get("unknown"):
        click.echo(f"after a crash: {report.counts['requeued']} message(s) never handed to a channel were queued "
                   f"again; {report.counts['unknown']} handed over without an answer are in doubt")
    for (channel, outcome), n in sorted(settled.by_channel.items()):
        click.echo(f"{channel}: {n} {RECONCILED_WORDS[outcome]}")
    for reason, n in settled.reasons.most_common():
        click.echo(f"  {n} still unknown: {reason}")
    if not settled.by_channel:
        click.echo("nothing to reconcile" if not left else "")
    click.echo(f"{settled.resolved} settled, {left} still unknown"
               + (" (run.py log --status unknown)" if left else ""))


RECONCILED_WORDS = {"sent": "sent (the channel has them: logged sent)",
                    "resent": "never reached the channel: queued to be sent at the next tick",
                    "failed": "never reached the channel and their attempts are used up: logged failed",
                    "unresolved": "the channel cannot tell yet: left unknown"}


def _try_lock(app: Any, what: str) -> bool:
    """Take the engine lock when nothing else holds it (SQLite): then crash recovery can run here too."""
    if app.store.dialect != "sqlite":
        return False
    try:
        app.store.acquire_process_lock(what)
    except AlreadyRunning:
        return False
    return True


def _reconcile_only(app: Any, now: datetime) -> Any:
    """The daemon runs (SQLite): it recovers crashed work itself; here only the unknown rows are reconciled."""
    from engine import reconcile

    return reconcile.reconcile(app.store, app.channel, app.worker, now, everything=True,
                               max_attempts=app.runner.delivery.max_attempts,
                               lease=timedelta(seconds=app.config.scheduler.lease_seconds))


@main.command()
@click.option("--journey", default=None, help="only units of this journey")
@click.option("--member", default=None, help="only units of this member")
@click.option("--kind", type=click.Choice([k.value for k in quarantine.Kind]), default=None)
@click.option("--id", "entry_ids", type=int, multiple=True, help="a quarantine entry id (repeatable; see `log "
              "--status quarantined`)")
@click.option("--abandon", is_flag=True, help="give the units up instead: an enrollment leaves its journey (its "
              "message logged failed), a message is logged failed, an event is closed")
@click.option("--now", "now_text", default=None, help="the clock for the run (ISO 8601; default now)")
@click.pass_obj
@handle_errors
def retry(obj: Ctx, journey: str | None, member: str | None, kind: str | None, entry_ids: tuple[int, ...],
          abandon: bool, now_text: str | None) -> None:
    """Run quarantined work again after a fix (each unit once more), or give it up with --abandon."""
    from engine import retry as retry_ops

    now = instant(now_text, "--now") or datetime.now(UTC)
    app = obj.app()
    try:
        with app.store.connect() as conn:
            entries = quarantine.entries(conn, kinds=[quarantine.Kind(kind)] if kind else [], journey=journey,
                                         member=member, ids=entry_ids)
        if not entries:
            click.echo("nothing is quarantined" + (" that matches" if journey or member or kind or entry_ids else ""))
            return
        if abandon:
            outcomes = retry_ops.abandon(app, entries, now)
        else:
            run_now = app.store.dialect != "sqlite" or _try_lock(app, "retry")
            outcomes = retry_ops.retry(app, entries, now, run_now=run_now)
            if not run_now:
                click.echo("a daemon is running on this database: it runs them at its next tick", err=True)
    finally:
        app.close()
    for outcome in outcomes:
        e = outcome.entry
        where = " ".join(x for x in (e["journey_id"] and f"journey {e['journey_id']}",
                                     e["step"] and f"step {e['step']}",
                                     e["member_id"] and f"member {e['member_id']}") if x)
        click.echo(f"#{e['id']} {e['kind']} {e['ref']} ({where}): {outcome.result}")
    again = sum(1 for o in outcomes if o.result.startswith("failed again"))
    if again:
        sys.exit(1)


@main.group(name="audit")
def audit_group() -> None:
    """Check the message log's integrity."""


@audit_group.command("verify")
@click.pass_obj
@handle_errors
def audit_verify(obj: Ctx) -> None:
    """Check the log's hash chain and that every points balance equals its ledger; exit 1 naming what is wrong."""
    from engine import points

    app = obj.app()
    with app.store.connect() as conn:
        result = audit.verify(conn)
        checked, wrong = points.mismatches(conn)
    app.store.close()
    if not result.ok:
        where = f"row {result.first_bad_id}" if result.first_bad_id is not None else "the log"
        click.echo(f"audit FAILED at {where}: {result.problem}", err=True)
        sys.exit(1)
    if wrong:
        for member_id, cached, total in wrong:
            click.echo(f"audit FAILED: member {member_id} shows {cached} points but the ledger sums to {total}",
                       err=True)
        sys.exit(1)
    extra = f" ({result.redacted} erased by `member forget`, hashes kept)" if result.redacted else ""
    click.echo(f"audit ok: {result.rows} rows, hash chain intact{extra}; {checked} points balances equal their "
               "ledgers")


@main.group(name="member")
def member_group() -> None:
    """Look at or erase one member."""


@member_group.command("show")
@click.argument("member_id")
@click.option("--at", "at", default=None, help="the clock for windows and expiries (ISO 8601; default now)")
@click.pass_obj
@handle_errors
def member_show(obj: Ctx, member_id: str, at: str | None) -> None:
    """Member state and history: profile, tier and progress, points and expiries, lifecycle, value, journeys."""
    app = obj.app()
    book = app.rules()
    now = instant(at, "--at") or datetime.now(UTC)
    with app.store.connect() as conn:
        click.echo(member_ops.show(conn, member_id, book.loyalty, app.config.default_locale, now))
    app.store.close()


@member_group.command("forget")
@click.argument("member_id")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@click.pass_obj
@handle_errors
def member_forget(obj: Ctx, member_id: str, yes: bool) -> None:
    """Erase a member's personal data (log rows keep their hashes)."""
    if not yes and sys.stdin.isatty():
        click.confirm(f"Erase all personal data of member {member_id}? This cannot be undone", abort=True)
    app = obj.app()
    with app.store.begin() as conn:
        counts = member_ops.forget(conn, member_id, datetime.now(UTC))
    app.store.close()
    click.echo(f"member {member_id} forgotten: {counts['messages']} log rows redacted, {counts['events']} events "
               f"cleared, {counts['enrollments']} journeys ended")


@main.group(name="db")
def db_group() -> None:
    """Database schema (Alembic migrations)."""


@db_group.command("upgrade")
@click.pass_obj
@handle_errors
def db_upgrade(obj: Ctx) -> None:
    """Apply pending migrations."""
    from engine.store import Store

    store = Store(obj.config().database_url)
    applied = store.migrate()
    click.echo(f"schema at {store.current_revision()}" + (" (upgraded)" if applied else " (already current)"))


@main.command()
@click.option("--members", "count", default=3000, show_default=True, type=click.IntRange(10, 1_000_000))
@click.option("--days", default=90, show_default=True, type=click.IntRange(1, 730))
@click.option("--seed", default=7, show_default=True, help="random seed (the same seed gives the same demo)")
@click.pass_obj
@handle_errors
def demo(obj: Ctx, count: int, days: int, seed: int) -> None:
    """Build a demo database with generated members and run it through a simulated window."""
    from engine.demo import run_demo

    config = obj.config()
    run_demo(config, members=count, days=days, seed=seed, echo=click.echo)


def run() -> None:
    main(prog_name="run.py")


__all__ = ["main", "run", "timedelta"]
