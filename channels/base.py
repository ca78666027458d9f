"""The channel interface every adapter implements (local ones here, providers beside them)."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum


class Outcome(StrEnum):
    SENT = "sent"  # the provider accepted it
    TRANSIENT = "transient"  # refused, nothing was sent: try again later (429, 5xx, connection refused)
    PERMANENT = "permanent"  # never retry (invalid number, unsubscribed)
    # The request may have reached the provider (a timeout or a reset after it was written, an answer we cannot
    # read): the row becomes ``unknown`` and is reconciled with the channel before anything is sent again.
    UNCERTAIN = "uncertain"


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


@dataclass(slots=True)
class InDoubt:
    """A message handed to the channel whose answer was never recorded (the engine died, or the request timed
    out after it was written): reconciliation asks the channel what became of it."""

    id: int  # the message log row id
    recipient: str
    text: str
    subject: str | None
    handed_at: datetime  # when it was handed over, at the latest (aware, UTC); look-ups search from before it
    position: str | None = None  # what Channel.position() said just before the hand-over, when known


class Found(StrEnum):
    SENT = "sent"  # the channel has it: it went out (provider_id says which)
    ABSENT = "absent"  # the channel has no record of it: nothing went out, it may be sent again
    UNKNOWN = "unknown"  # the channel cannot tell (yet)


@dataclass(slots=True)
class Reconciled:
    """What reconciliation learned about one message in doubt."""

    found: Found
    provider_id: str | None = None
    detail: str = ""  # one line for the log: how it was resolved, or why it could not be
    # UNKNOWN only: ask again after this many seconds; None = only a delivery webhook or an operator can tell.
    retry_after: float | None = None


class Channel(abc.ABC):
    """Delivers messages for one channel (email or sms) through one provider."""

    #: provider name as written in config.yaml
    provider: str = ""
    #: Messages the runner hands over at once before it records their answers: the most that a crash can leave
    #: in doubt. None: a whole delivery chunk at once (local channels, whose hand-over is one write and whose
    #: reconciliation is exact).
    in_flight: int | None = None
    #: Seconds after a hand-over before a look-up can be trusted: a request that timed out may still be
    #: completing at the provider, and asking too early would find nothing and send it twice.
    reconcile_after: float = 0.0

    @abc.abstractmethod
    def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        """Send each message; return exactly one result per message, in order.

        Must not raise for a failure of one message: classify it in its result
        instead (UNCERTAIN when the provider may have acted on it). May raise
        only when the channel as a whole is unusable; the caller then records
        every message of the batch as ``unknown`` and reconciles them.
        """

    def position(self) -> str | None:
        """Where the channel stands just before a hand-over (the outbox: its file's length), stored with the
        hand-over and given back to reconcile() so that a look-up need not search everything; None if unused."""
        return None

    def reconcile(self, messages: Sequence[InDoubt]) -> list[Reconciled]:
        """What became of each message in doubt, one result per message, in order.

        Must not raise for one message (UNKNOWN with the reason instead) and must never answer ABSENT unless the
        channel really has no record of it: ABSENT makes the engine send the message again. The default: this
        channel cannot look messages up, so only a delivery webhook or an operator can settle them.
        """
        return [Reconciled(Found.UNKNOWN, detail=f"{self.provider or 'this channel'} cannot look messages up; "
                           "only a delivery callback or an operator can settle it") for _ in messages]

    def forget(self, member_id: str) -> int:
        """Erase the copies of MEMBER_ID's messages this channel itself keeps (a local file); how many it erased.
        Providers keep their own copies under their own retention (Twilio, SendGrid): nothing to do here."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional hook
        """Flush and release resources; called once when the engine stops."""
