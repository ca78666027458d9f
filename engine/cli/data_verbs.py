"""The verbs that take data in: ``validate``, ``import members|events``, ``event``."""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from engine.cli.base import Ctx, handle_errors, instant, main
from engine.exceptions import InputError

# --------------------------------------------------------------------------- validate


@main.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.pass_obj
@handle_errors
def validate(obj: Ctx, paths: tuple[Path, ...]) -> None:
    """Check journeys, segments, loyalty rules, templates and config (all of them, or the PATHS given)."""
    from engine.cli.validate import validate_paths

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
    from engine.ingest.members import import_members

    app = obj.app()
    report = import_members(app.store, file, app.loyalty(), app.config.default_region, datetime.now(UTC))
    _print_import(file, "members", report)


@import_group.command("events")
@click.argument("file", type=click.Path(path_type=Path))
@click.pass_obj
@handle_errors
def import_events_cmd(obj: Ctx, file: Path) -> None:
    """Append events from FILE."""
    from engine.ingest.events import import_events

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
    from engine.ingest.events import record_events
    from engine.ingest.members import attribute_value

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
