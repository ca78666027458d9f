"""Application logging: one line per event, with phone numbers and email addresses masked.

The audit log (the messages table) keeps them; the application log must not.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Callable

_EMAIL = re.compile(r"([A-Za-z0-9._%+-])[A-Za-z0-9._%+-]*@([A-Za-z0-9.-]+\.[A-Za-z]{2,})")
_PHONE = re.compile(r"(\+?\d{2,4})\d{4,9}(\d{2})")


def mask(text: str) -> str:
    text = _EMAIL.sub(lambda m: f"{m.group(1)}***@{m.group(2)}", text)
    return _PHONE.sub(lambda m: f"{m.group(1)}****{m.group(2)}", text)


class MaskingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def setup(debug: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(MaskingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in ("alembic", "apscheduler.executors", "sqlalchemy"):
        logging.getLogger(noisy).setLevel(logging.INFO if debug else logging.WARNING)


class FloodGuard(logging.Filter):
    """At most BURST records of one kind (logger, message template, exception type) per INTERVAL seconds; the
    first one let through after a quiet spell says how many were left out. Put on the loggers that anyone on
    the internet can make speak (the HTTP server's), so a flood of bad requests costs a few lines, not a disk."""

    def __init__(self, burst: int = 5, interval: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst, self.interval, self.clock = burst, interval, clock
        self._kinds: dict[tuple[str, str, str], list[float]] = {}  # kind: [window start, passed, left out]
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self._kinds.clear()

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.name, str(record.msg), record.exc_info[0].__name__ if record.exc_info and
                record.exc_info[0] else "")
        now = self.clock()
        with self._lock:
            if len(self._kinds) > 10_000:  # kinds are message templates: only a bug makes this many
                self._kinds.clear()
            state = self._kinds.setdefault(kind, [now, 0, 0])
            if now - state[0] >= self.interval:
                left_out = int(state[2])
                state[:] = [now, 0, 0]
                if left_out:
                    record.msg = f"{record.getMessage()} (and {left_out} more like this in the last " \
                                 f"{self.interval:g}s, not logged)"
                    record.args = None
            if state[1] >= self.burst:
                state[2] += 1
                return False
            state[1] += 1
            return True


def guard_against_floods(*names: str, burst: int = 5, interval: float = 60.0) -> None:
    """Put one FloodGuard on each logger NAMES (once: calling again changes nothing)."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, FloodGuard) for f in logger.filters):
            logger.addFilter(FloodGuard(burst, interval))
