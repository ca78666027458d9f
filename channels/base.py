"""The channel interface every adapter implements (local ones here, providers beside them)."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum


class Outcome(StrEnum):
    SENT = "sent"  # the provider accepted it
    TRANSIENT = "transient"  # try again later (429, 5xx, timeout)
    PERMANENT = "permanent"  # never retry (invalid number, unsubscribed)


# Values: built once, read by the channels, never changed. Not frozen=True, because a frozen dataclass sets
# every field through object.__setattr__: three times the cost to build, paid per message on the send path.
@dataclass(slots=True)
class OutgoingMessage:
    id: int  # the message log row id: providers get it as an idempotency reference
    channel: str  # "email" | "sms"
    recipient: str
    text: str
    member_id: str
    journey: str
    step: str
    subject: str | None = None
    html: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)  # a value too; not frozen, as OutgoingMessage
class SendResult:
    outcome: Outcome
    provider_id: str | None = None
    error: str | None = None
    retry_after: float | None = None  # seconds, when the provider said so
    # A permanent answer that also means "never send to this address again" (e.g. Twilio 21610, the recipient
    # replied STOP; an address the provider has on its own suppression list): the log row becomes
    # ``suppressed`` with this reason and the address joins our suppression list.
    suppress_reason: str | None = None

    @property
    def sent(self) -> bool:
        return self.outcome is Outcome.SENT


class Channel(abc.ABC):
    """Delivers messages for one channel (email or sms) through one provider."""

    #: provider name as written in config.yaml
    provider: str = ""

    @abc.abstractmethod
    def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        """Send each message; return exactly one result per message, in order.

        Must not raise for a failure of one message: classify it in its result
        instead. May raise only when the channel as a whole is unusable; the
        caller then records every message of the batch as ``unknown``.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Flush and release resources; called once when the engine stops."""
