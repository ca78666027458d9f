"""The verbs that run the engine: ``tick``, ``simulate``, ``serve``, ``web``, ``reconcile``, ``retry``,
``db upgrade`` and ``demo``."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import click
from sqlalchemy import func, select

from engine.cli.base import Ctx, handle_errors, instant, main
from engine.exceptions import AlreadyRunning
from engine.rules.durations import parse_duration
from engine.store import quarantine
from engine.store.models import MessageStatus, messages
from engine.tick.report import TickReport

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
    from engine.cli.simulate import simulate as run

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
    from engine.cli.daemon import Daemon, WebThread

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
    from engine.cli.daemon import serve_http

    logging.getLogger().setLevel(logging.DEBUG if obj.debug else logging.INFO)
    app = obj.app()
    try:
        serve_http(app, app.config.web.listen)
    finally:
        app.close()

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
    from engine.tick import reconcile

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
    from engine.cli import retry as retry_ops

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

@main.group(name="db")
def db_group() -> None:
    """Database schema (Alembic migrations)."""


@db_group.command("upgrade")
@click.pass_obj
@handle_errors
def db_upgrade(obj: Ctx) -> None:
    """Apply pending migrations."""
    from engine.store.database import Store

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
    from engine.cli.demo import run_demo

    config = obj.config()
    run_demo(config, members=count, days=days, seed=seed, echo=click.echo, command=obj.command_prefix())
