"""The safety rails applied to every message before it may go out.

Consent per channel, the suppression list, a usable address, frequency caps
across journeys, and quiet hours in the member's time zone (defer, never drop).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Any

from sqlalchemy import Connection

from engine.config import Config, FrequencyCap
from engine.domain.timeutil import zone
from engine.store import rails as rails_rows
from engine.store.models import MessageStatus
from engine.store.rails import suppressed_addresses

#: statuses that count against a frequency cap: everything that went, or will go, out
COUNTED = (MessageStatus.QUEUED, MessageStatus.SENDING, MessageStatus.SENT, MessageStatus.DELIVERED,
           MessageStatus.UNKNOWN)


class Reason:
    CONSENT = "consent"
    INVALID_ADDRESS = "invalid_address"
    SUPPRESSED_ADDRESS = "suppression_list"
    FREQUENCY_CAP = "frequency_cap"
    QUIET_HOURS = "quiet_hours"
    TEMPLATE_ERROR = "template_error"
    HOLDOUT = "holdout"


@dataclass(frozen=True)
class Verdict:
    status: MessageStatus
    reason: str | None = None
    error: str | None = None
    not_before: datetime | None = None


#: the common verdict, made once: a frozen dataclass costs about a microsecond to build, per message
SEND_NOW = Verdict(MessageStatus.SENDING)


def _hhmm(text: str) -> time:
    hours, minutes = text.split(":")
    return time(int(hours), int(minutes))


_EMAIL_SHAPE = re.compile(r"^[^@\s]+@[^@\s.]+(\.[^@\s.]+)+$")


def _valid_email(address: str) -> bool:
    """Imports validate addresses fully (email-validator); this cheap shape check at send time catches rows that
    reached the table another way, without costing a fifth of a large send."""
    return _EMAIL_SHAPE.match(address) is not None


class QuietHours:
    def __init__(self, start: str, end: str) -> None:
        self.start, self.end = _hhmm(start), _hhmm(end)
        self._known: dict[tuple[datetime, Any, str | None, str], datetime | None] = {}

    def release(self, now: datetime, tz_name: str | None, default_tz: str) -> datetime | None:
        """When a message due NOW may go out for a member in TZ_NAME, or None if it may go now."""
        key = (now, now.tzinfo, tz_name, default_tz)
        if key in self._known:  # a batch shares one clock and a few time zones
            return self._known[key]
        if len(self._known) > 1024:
            self._known.clear()
        release = self._known[key] = self._release(now, tz_name, default_tz)
        return release

    def _release(self, now: datetime, tz_name: str | None, default_tz: str) -> datetime | None:
        tz = zone(tz_name, default_tz)
        local = now.astimezone(tz)
        t = local.timetz().replace(tzinfo=None)
        if self.start <= self.end:
            inside = self.start <= t < self.end
        else:  # wraps midnight, e.g. 21:00-08:00
            inside = t >= self.start or t < self.end
        if not inside:
            return None
        day = local.date() if t < self.end else local.date() + timedelta(days=1)
        # Local wall time → aware datetime; fold=0 picks the first of an ambiguous hour, a gap moves forward.
        release = datetime.combine(day, self.end, tzinfo=tz)
        return release.astimezone(now.tzinfo)


class CapCounter:
    """Messages per member and channel already counted against each cap, plus the ones added this batch."""

    def __init__(self, caps: list[FrequencyCap]) -> None:
        self.caps = caps
        self.counts: dict[tuple[int, str, str], int] = defaultdict(int)

    def load(self, conn: Connection, member_ids: Iterable[str], now: datetime) -> None:
        ids = list(set(member_ids))
        if not self.caps or not ids:
            return
        for index, cap in enumerate(self.caps):
            for (member_id, channel), count in rails_rows.marketing_counts(conn, ids, now - cap.window,
                                                                           COUNTED).items():
                self.counts[(index, member_id, channel)] += count

    def exceeded(self, member_id: str, channel: str) -> FrequencyCap | None:
        for index, cap in enumerate(self.caps):
            if cap.channel == "any":
                used = sum(self.counts[(index, member_id, c)] for c in ("email", "sms"))
            elif cap.channel == channel:
                used = self.counts[(index, member_id, channel)]
            else:
                continue
            if used >= cap.max:
                return cap
        return None

    def add(self, member_id: str, channel: str) -> None:
        for index in range(len(self.caps)):
            self.counts[(index, member_id, channel)] += 1


class Rails:
    """Decides, per message, whether it goes now, later, or not at all (and why)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        quiet = config.quiet_hours
        self.quiet = QuietHours(quiet.start, quiet.end) if quiet is not None else None
        self.caps = CapCounter(list(config.frequency_caps))
        self.suppressed: set[tuple[str, str]] = set()

    def prepare(self, conn: Connection, members: Iterable[Mapping[str, Any]], now: datetime) -> None:
        rows = list(members)
        self.caps = CapCounter(list(self.config.frequency_caps))
        self.caps.load(conn, (m["id"] for m in rows), now)
        pairs = [("email", m["email"]) for m in rows if m.get("email")]
        pairs += [("sms", m["phone"]) for m in rows if m.get("phone")]
        self.suppressed = suppressed_addresses(conn, pairs) if pairs else set()

    def check(self, member: Mapping[str, Any], channel: str, now: datetime,
              category: str = "marketing") -> tuple[Verdict, str | None]:
        """The verdict and the recipient address for one message."""
        address = member.get("email") if channel == "email" else member.get("phone")
        if not address:
            kind = "email address" if channel == "email" else "phone number"
            return Verdict(MessageStatus.SUPPRESSED, Reason.INVALID_ADDRESS, f"member has no {kind}"), None
        if channel == "email" and not _valid_email(address):
            return Verdict(MessageStatus.SUPPRESSED, Reason.INVALID_ADDRESS,
                           f"{address!r} is not a valid email address"), address
        opted_in = member.get("email_opt_in") if channel == "email" else member.get("sms_opt_in")
        if not opted_in:
            return Verdict(MessageStatus.SUPPRESSED, Reason.CONSENT, f"member has not opted in to {channel}"), address
        if (channel, address) in self.suppressed:
            return Verdict(MessageStatus.SUPPRESSED, Reason.SUPPRESSED_ADDRESS,
                           f"{channel} address is on the suppression list"), address
        if category == "marketing":
            cap = self.caps.exceeded(member["id"], channel)
            if cap is not None:
                return Verdict(MessageStatus.SUPPRESSED, Reason.FREQUENCY_CAP,
                               f"frequency cap: at most {cap.max} {cap.channel} messages per {cap.per}"), address
            self.caps.add(member["id"], channel)
        if self.quiet is not None:
            release = self.quiet.release(now, member.get("timezone"), self.config.default_timezone)
            if release is not None:
                return Verdict(MessageStatus.QUEUED, Reason.QUIET_HOURS,
                               f"quiet hours {self.config.quiet_hours.start}-{self.config.quiet_hours.end} "  # type: ignore[union-attr]
                               "in the member's time zone; deferred", release), address
        return SEND_NOW, address
