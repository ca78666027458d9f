"""Channel adapters: one small interface (channels.base.Channel), one module per kind of provider."""

from __future__ import annotations

from typing import TYPE_CHECKING

from channels.base import Channel, Outcome, OutgoingMessage, SendResult
from channels.local import ConsoleChannel, OutboxChannel

if TYPE_CHECKING:
    from engine.config import Config

__all__ = ["Channel", "Outcome", "OutgoingMessage", "SendResult", "build_channel"]


def build_channel(channel: str, config: Config) -> Channel:
    """The adapter config.yaml names for CHANNEL ("email" or "sms")."""
    from engine.exceptions import ConfigError

    settings = getattr(config.channels, channel)
    if settings.provider == "console":
        return ConsoleChannel()
    if settings.provider == "outbox":
        return OutboxChannel(config.outbox_path(channel))
    raise ConfigError(
        f"channels.{channel}.provider {settings.provider!r} is not available in this version yet; "
        "use console or outbox"
    )
