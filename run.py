#!/usr/bin/env python3
"""Command-line entry point: python run.py VERB ... (python run.py --help lists the verbs)."""

import sys

if sys.version_info < (3, 11) or sys.version_info >= (3, 13):
    sys.exit("run.py needs Python 3.11 or 3.12 (durable-rules does not import on 3.13)")

from engine.cli import run

if __name__ == "__main__":
    run()
