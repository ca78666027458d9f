"""What every verb shares: the ``run.py`` group and its global options, the context object, error handling.

Exit 0 on success, 1 on a user error (one clear line per problem; a traceback
only with --debug), 2 on usage errors.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import wraps
from typing import Any, TypeVar

import click

from engine import logs as logsetup
from engine.config import Config, load_config
from engine.domain.timeutil import parse_instant
from engine.exceptions import EngineError, RulesError

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
        """The App for this command, closed when the command ends however it ends (click's call_on_close)."""
        from engine.app import App

        app = App(self.config())
        click.get_current_context().call_on_close(app.close)
        if lock:
            app.store.acquire_process_lock(lock)
        return app

    def command_prefix(self) -> str:
        """How the user called run.py, global options included, so suggested commands hit the same database."""
        program = sys.argv[0] if sys.argv and sys.argv[0].endswith("run.py") else "run.py"
        parts = ["python", program]
        if self.config_explicit and self.config_path != "config.yaml":
            parts += ["--config", self.config_path]
        if self.db:
            parts += ["--db", self.db]
        return " ".join(parts)


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
