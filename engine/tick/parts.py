"""What the tick phases use of the application, and nothing more: engine.app.App provides it.

The phases are built with a Parts, not with the App: they cannot reach into the CLI, the HTTP service or the
other phases, and a test can hand them any object with these members.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from channels.base import Channel
from engine.config import Config
from engine.rules.rulebook import Rulebook
from engine.rules.templates import Templates
from engine.rules.versions import LiveJourney, VersionCache
from engine.store.database import Store
from engine.tick.report import TickReport


class Parts(Protocol):
    config: Config
    store: Store
    templates: Templates
    versions: VersionCache

    @property
    def secret(self) -> bytes:
        """The key unsubscribe links are signed with."""

    @property
    def rules_stamp(self) -> tuple[tuple[str, float], ...]:
        """The modification times of the files the loaded rulebook was read from."""

    def rules(self, *, reload: bool = False) -> Rulebook:
        """The rulebook, reloaded when a file under rules/ or templates/ changed."""

    def channel(self, name: str) -> Channel:
        """The channel adapter for NAME (``sms``, ``email``), built once."""

    def pause(self, journey: LiveJourney, exc: BaseException, what: str, now: datetime, report: TickReport) -> None:
        """Pause JOURNEY: its compiled form failed at run time (WHAT) with EXC."""
