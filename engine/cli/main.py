"""The command line: ``python run.py VERB ...`` (the verbs and their options: README, "Commands").

Exit 0 on success, 1 on a user error (one clear line per problem; a traceback
only with --debug), 2 on usage errors. The verbs live by group in data_verbs, run_verbs and look_verbs.
"""

from __future__ import annotations

from engine.cli import data_verbs, look_verbs, run_verbs
from engine.cli.base import Ctx, main

VERB_MODULES = (data_verbs, run_verbs, look_verbs)  # importing them registers their verbs on ``main``


def run() -> None:
    main(prog_name="run.py")


__all__ = ["Ctx", "main", "run"]
