"""Pacing and answer classification shared by the provider adapters (channels.twilio, channels.sendgrid).

A batch goes out through a small thread pool, every request first takes its tokens from one token bucket per
channel instance.

Answers are classified the same way: TRANSIENT only when nothing can have reached the provider (a refusal:
429, 5xx, connection refused, a DNS failure, a connect timeout), UNCERTAIN when the request may have been acted on
(a timeout or a closed connection after it was written, an answer we cannot read, any surprise): the engine then
records the row as ``unknown`` and asks Channel.reconcile() before anything is sent again.
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from channels.base import Channel, Outcome, OutgoingMessage, SendResult

__all__ = ["PacedChannel", "TokenBucket", "causes", "describe_network_error", "limiter_for", "one_line",
           "parse_retry_after"]

log = logging.getLogger(__name__)


class TokenBucket:
    """Paces callers to RATE tokens per second, thread-safe; the clock and the sleep can be replaced in tests.

    A caller reserves its slot under the lock and sleeps outside it, so threads queue up in arrival order
    without holding the lock. A request may cost more than one token (an SMS of three segments costs three):
    it goes as soon as the bucket is not in debt and the debt delays whoever comes next.
    """

    def __init__(self, rate: float, *, burst: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be more than 0 per second, got: {rate!r}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got: {burst!r}")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = burst
        self._stamp = clock()

    def reserve(self, cost: float = 1.0) -> float:
        """Take COST tokens; return how many seconds the caller must wait before it goes (0 = now)."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            wait = max(0.0, 1.0 - self._tokens) / self.rate
            self._tokens -= cost
            return wait

    def acquire(self, cost: float = 1.0) -> None:
        wait = self.reserve(cost)
        if wait > 0:
            self._sleep(wait)


def limiter_for(rate_per_second: float | None, provider_default: float) -> TokenBucket | None:
    """The bucket config asks for: None = the provider's documented default, 0 = no limit."""
    rate = provider_default if rate_per_second is None else rate_per_second
    return TokenBucket(rate) if rate > 0 else None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


def causes(exc: BaseException, *, chained: bool = True) -> list[BaseException]:
    """EXC and what it wraps, outermost first: ``.reason`` (urllib, urllib3), else an exception among its args
    (requests, urllib3's ProtocolError), else (CHAINED) ``__cause__``. Bounded: a cycle cannot loop."""
    chain = [exc]
    for _ in range(8):
        current = chain[-1]
        inner = getattr(current, "reason", None)
        if not isinstance(inner, BaseException):
            inner = next((a for a in reversed(current.args) if isinstance(a, BaseException)), None)
        if inner is None and chained:
            inner = current.__cause__
        if inner is None or any(inner is seen for seen in chain):
            break
        chain.append(inner)
    return chain


def one_line(text: str) -> str:
    """TEXT with its line breaks and runs of spaces folded: log rows and error columns hold one line."""
    return " ".join(text.split())


def describe_network_error(exc: BaseException) -> str:
    """The innermost cause of a network failure, e.g. ``RemoteDisconnected: Remote end closed connection``.

    requests wraps a dropped connection three deep (ConnectionError > MaxRetryError > ProtocolError), and its
    outer text ("Max retries exceeded") misleads an operator: no client here retries.
    """
    current = causes(exc, chained=False)[-1]
    text = one_line(str(current)) or type(current).__name__
    return text if text.startswith(type(current).__name__) else f"{type(current).__name__}: {text}"


class PacedChannel(Channel):
    """Base of the provider adapters: concurrent, rate-limited, one classified result per message in order."""

    #: config.yaml's defaults (ChannelConfig.in_flight, .reconcile_after), for adapters built without config
    in_flight: int | None = 100
    reconcile_after: float = 60.0

    def __init__(self, *, concurrency: int, limiter: TokenBucket | None, in_flight: int | None = None,
                 reconcile_after: float | None = None) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got: {concurrency!r}")
        if in_flight is not None and in_flight < concurrency:
            raise ValueError(f"in_flight must be at least concurrency ({concurrency}), got: {in_flight!r}")
        if reconcile_after is not None and reconcile_after < 0:
            raise ValueError(f"reconcile_after must be 0 or more seconds, got: {reconcile_after!r}")
        self.concurrency = concurrency
        self.limiter = limiter
        if in_flight is not None:
            self.in_flight = in_flight
        if reconcile_after is not None:
            self.reconcile_after = float(reconcile_after)

    @abc.abstractmethod
    def send_one(self, message: OutgoingMessage) -> SendResult:
        """Call the provider once for MESSAGE and classify its answer.

        Must not retry (the engine retries with backoff and records every attempt) and must turn every
        answer the provider can give, and every network failure, into a result.
        """

    def cost(self, message: OutgoingMessage) -> float:
        """Tokens MESSAGE takes from the bucket (what the provider's rate limit counts)."""
        return 1.0

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        if not messages:
            return []
        workers = min(self.concurrency, len(messages))
        if workers == 1:
            return [self._paced(m) for m in messages]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{self.provider}-send") as pool:
            return list(pool.map(self._paced, messages))

    def _paced(self, message: OutgoingMessage) -> SendResult:
        if self.limiter is not None:
            self.limiter.acquire(self.cost(message))
        try:
            return self.send_one(message)
        except Exception as exc:  # one message's surprise must not sink the rest of the batch
            # Nobody knows whether the provider acted on the request: UNCERTAIN makes the row ``unknown`` and
            # reconciled, where a retry could send it twice.
            log.exception("%s: unexpected error sending message %s", self.provider, message.id)
            return SendResult(Outcome.UNCERTAIN, error=one_line(
                f"{self.provider}: unexpected {type(exc).__name__} while sending ({exc}); the request may have "
                "reached the provider: reconciling before any retry"))
