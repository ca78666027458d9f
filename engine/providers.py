"""The channel adapter config.yaml names for each channel: the one place engine code names a concrete adapter.

The adapters (package ``channels``) know nothing of config.yaml; this module reads ChannelConfig, checks what each
provider needs (naming the key to set) and builds the adapter. Everything else talks to channels.base.Channel.
"""

from __future__ import annotations

from channels.base import Channel
from channels.local import ConsoleChannel, OutboxChannel
from engine.config import ChannelConfig, Config
from engine.exceptions import ConfigError


def _require(channel: str, settings: ChannelConfig, *keys: str) -> None:
    for key in keys:
        attribute = "sender" if key == "from" else key
        if not getattr(settings, attribute):
            raise ConfigError(f"channels.{channel}.{key} is required for provider {settings.provider}; "
                              f"set it in config.yaml (secrets as ${{ENV_VAR}})")
    if settings.base_url is not None and not settings.base_url.startswith(("http://", "https://")):
        raise ConfigError(f"channels.{channel}.base_url must start with http:// or https://, "
                          f"got: {settings.base_url!r}")


def build_channel(channel: str, config: Config) -> Channel:
    """The adapter config.yaml names for CHANNEL ("email" or "sms")."""
    settings: ChannelConfig = getattr(config.channels, channel)
    if settings.provider == "console":
        return ConsoleChannel()
    if settings.provider == "outbox":
        return OutboxChannel(config.outbox_path(channel))
    if settings.provider == "twilio":
        _require(channel, settings, "account_sid", "auth_token")
        if not settings.sender and not settings.messaging_service_sid:
            raise ConfigError(f"channels.{channel}.from or channels.{channel}.messaging_service_sid is required "
                              "for provider twilio; set the sending number or the Messaging Service SID")
        # Imported here: the provider clients (twilio, sendgrid, requests…) cost every process that imports the
        # engine — the daemon and its compose worker — about 15 MB and start-up time, and most runs use neither.
        from channels.twilio import TwilioSMS

        return TwilioSMS(settings.account_sid or "", settings.auth_token or "", public_url=config.web.public_url,
                         sender=settings.sender, messaging_service_sid=settings.messaging_service_sid,
                         base_url=settings.base_url, rate_per_second=settings.rate_per_second,
                         concurrency=settings.concurrency, timeout=settings.timeout, in_flight=settings.in_flight,
                         reconcile_after=settings.reconcile_after)
    if settings.provider == "sendgrid":
        _require(channel, settings, "api_key", "from")
        from channels.sendgrid import SendGridEmail

        try:
            return SendGridEmail(settings.api_key or "", settings.sender or "", base_url=settings.base_url,
                                 rate_per_second=settings.rate_per_second, concurrency=settings.concurrency,
                                 timeout=settings.timeout, in_flight=settings.in_flight,
                                 reconcile_after=settings.reconcile_after)
        except ValueError as exc:
            raise ConfigError(f"channels.{channel}.{exc}") from None
    raise ConfigError(f"channels.{channel}.provider must be twilio, sendgrid, console or outbox, "
                      f"got: {settings.provider!r}")
