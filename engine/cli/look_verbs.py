"""The verbs that look without changing the sending: ``preview``, ``log``, ``report``, ``audit verify``,
``member show|forget``."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click

from engine.audit import anchors, messagelog
from engine.audit import chain as audit
from engine.cli import funnel
from engine.cli import members as member_ops
from engine.cli.base import Ctx, handle_errors, instant, main
from engine.exceptions import EngineError
from engine.programme import report as programme_report
from engine.store import quarantine

# --------------------------------------------------------------------------- looking


@main.command()
@click.argument("journey_id")
@click.argument("step_id")
@click.option("--member", "member_id", required=True, help="the member to render for")
@click.pass_obj
@handle_errors
def preview(obj: Ctx, journey_id: str, step_id: str, member_id: str) -> None:
    """Render a step's message for a member, without sending."""
    from engine.cli.preview import render_preview

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

@main.group(name="audit")
def audit_group() -> None:
    """Check the message log's integrity."""


@audit_group.command("verify")
@click.option("--anchor", "anchor_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="a file of anchors (from `audit anchor`): every anchored row must still be there, unchanged")
@click.pass_obj
@handle_errors
def audit_verify(obj: Ctx, anchor_file: Path | None) -> None:
    """Check the log's keyed hash chain, each row's state seal, the head (and anchors), and that every points
    balance equals its ledger; exit 1 naming what is wrong."""
    from engine.programme import points

    app = obj.app()
    try:
        kept = anchors.read(anchor_file) if anchor_file is not None else []
    except anchors.BadAnchor as exc:
        raise click.UsageError(str(exc)) from None
    with app.store.connect() as conn:
        result = audit.verify(conn)
        anchored = anchors.check(conn, kept) if result.ok else None
        checked, wrong = points.verify_ledger(conn)
    app.store.close()
    if anchored:
        click.echo(f"audit FAILED: {anchored}", err=True)
        sys.exit(1)
    if not result.ok:
        where = f"row {result.first_bad_id}" if result.first_bad_id is not None else "the log"
        click.echo(f"audit FAILED at {where}: {result.problem}", err=True)
        sys.exit(1)
    if wrong:
        for problem in wrong:
            click.echo(f"audit FAILED: {problem}", err=True)
        sys.exit(1)
    extra = f" ({result.redacted} erased by `member forget`, hashes kept)" if result.redacted else ""
    if result.unkeyed:
        extra += (f"; the first {result.unkeyed} rows were logged before the chain was keyed (plain SHA-256 links: "
                  "keep an anchor from now on)")
    if kept:
        extra += f"; {len(kept)} anchors match"
    click.echo(f"audit ok: {result.rows} rows, hash chain intact{extra}; {checked} points balances equal their "
               "ledgers")


@audit_group.command("export")
@click.option("--since", default=None, help="first creation time (ISO 8601), inclusive")
@click.option("--until", default=None, help="last creation time (ISO 8601), exclusive")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True)
@click.pass_obj
@handle_errors
def audit_export(obj: Ctx, since: str | None, until: str | None, fmt: str) -> None:
    """Write the log with its proofs (hashes, links, seals) to standard output, for an auditor to check offline
    with docs/verify_export.py."""
    flt = messagelog.LogFilter(since=instant(since, "--since"), until=instant(until, "--until"))
    app = obj.app()
    try:
        with app.store.connect() as conn:
            count = messagelog.write_proofs(sys.stdout, messagelog.rows(conn, flt), fmt)
    except BrokenPipeError:
        sys.stderr.close()
        return
    finally:
        app.store.close()
    click.echo(f"{count} row(s) exported", err=True)


@audit_group.command("anchor")
@click.option("--append", "append_to", type=click.Path(dir_okay=False, path_type=Path),
              help="also add the anchor as a line to this file")
@click.pass_obj
@handle_errors
def audit_anchor(obj: Ctx, append_to: Path | None) -> None:
    """Print the chain's head (rows, last hash, time) as one JSON line, to keep somewhere the database's writers
    cannot reach; `audit verify --anchor FILE` then catches rows deleted from the end."""
    app = obj.app()
    with app.store.connect() as conn:
        anchor = anchors.take(conn, datetime.now(UTC))
    app.store.close()
    if append_to is not None:
        anchors.append(append_to, anchor)
    click.echo(anchor.line())


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
    # After the commit: the database is what a crash must not leave half done; the files are erased next (and a
    # second `member forget` erases whatever a crash between the two left).
    copies = 0
    for name in ("email", "sms"):
        try:
            copies += app.channel(name).forget(member_id)
        except (EngineError, OSError) as exc:
            click.echo(f"warning: the {name} channel's own copies were not erased: {exc}", err=True)
    app.close()
    click.echo(f"member {member_id} forgotten: {counts['messages']} log rows redacted, {counts['events']} events "
               f"cleared, {counts['enrollments']} journeys ended, {copies} outbox lines erased")
