#!/usr/bin/env python3
"""Command-line entry point: python run.py VERB ... (python run.py --help lists the verbs)."""

import sys

if sys.version_info < (3, 11):  # noqa: UP036 - run.py must say why on an older Python, not fail to import
    sys.exit("run.py needs Python 3.11 or later (3.11 and 3.12 match events with durable-rules, 3.13 in Python)")

from engine.cli.main import run

if __name__ == "__main__":
    run()
