"""The schema. Alembic migrations under engine/store/migrations must produce exactly this.

All times are stored as naive UTC and handed back as aware UTC datetimes.
"""

from __future__ import annotations

import enum
from datetime import UTC, date, datetime
from typing import Any, ClassVar, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Integer on SQLite so that the primary key is the rowid (autoincrement); BIGINT elsewhere.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Aware datetimes in, naive UTC in the database, aware UTC out."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} given; the engine only stores aware times")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class MessageStatus(enum.StrEnum):
    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    DELIVERED = "delivered"
    FAILED = "failed"
    BOUNCED = "bounced"
    SUPPRESSED = "suppressed"
    UNKNOWN = "unknown"


class EnrollmentStatus(enum.StrEnum):
    ACTIVE = "active"
    COMPLETED = "completed"
    EXITED = "exited"


NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class Member(Base):
    __tablename__ = "members"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    email: Mapped[str | None] = mapped_column(String(320))
    phone: Mapped[str | None] = mapped_column(String(32))
    birthday: Mapped[date | None] = mapped_column(Date)
    timezone: Mapped[str | None] = mapped_column(String(64))
    locale: Mapped[str | None] = mapped_column(String(16))
    signup_at: Mapped[datetime | None]
    tier: Mapped[str | None] = mapped_column(String(32))
    points: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    #: HMAC under the audit key over the balance and the newest ledger row's seal (engine.store.seal.balance_mac)
    points_mac: Mapped[str | None] = mapped_column(String(64))
    total_spend: Mapped[float] = mapped_column(Float, default=0.0, server_default=text("0"))
    order_count: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    last_order_at: Mapped[datetime | None]
    last_login_at: Mapped[datetime | None]
    # The loyalty programme (engine.rules.loyalty, engine.programme.points): when the current tier was
    # reached and next reviewed.
    tier_since: Mapped[datetime | None]
    tier_review_at: Mapped[datetime | None]
    # Spend and orders over the qualification window, as of the member's latest purchase or review.
    qualifying_spend: Mapped[float] = mapped_column(Float, default=0.0, server_default=text("0"))
    qualifying_orders: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    points_next_expiry_at: Mapped[datetime | None]  # engine.programme.points keeps these with the ledger
    points_next_expiry: Mapped[int | None] = mapped_column(Integer)
    # Member intelligence (engine.programme.intelligence): refreshed in SQL on a schedule and when the
    # member's events arrive.
    lifecycle_stage: Mapped[str | None] = mapped_column(String(16))
    rfm_r: Mapped[int | None] = mapped_column(Integer)
    rfm_f: Mapped[int | None] = mapped_column(Integer)
    rfm_m: Mapped[int | None] = mapped_column(Integer)
    rfm_segment: Mapped[str | None] = mapped_column(String(32))
    aov: Mapped[float | None] = mapped_column(Float)
    predicted_clv: Mapped[float | None] = mapped_column(Float)
    churn_risk: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    churn_reasons: Mapped[str | None] = mapped_column(String(64))
    email_opt_in: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    sms_opt_in: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    forgotten_at: Mapped[datetime | None]

    __table_args__ = (
        Index(None, "last_order_at"), Index(None, "signup_at"),
        Index(None, "phone"), Index(None, "email"),  # inbound SMS and provider opt-outs find members by address
        Index("ix_members_tier_review", "tier_review_at"),
    )


class Event(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    external_id: Mapped[str | None] = mapped_column(String(128), unique=True)
    member_id: Mapped[str] = mapped_column(String(64), ForeignKey("members.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(64))
    occurred_at: Mapped[datetime]
    properties: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    source: Mapped[str] = mapped_column(String(32), default="api")
    recorded_at: Mapped[datetime]
    handled_at: Mapped[datetime | None]

    __table_args__ = (
        Index(None, "member_id", "occurred_at"),
        Index("ix_events_unhandled", "occurred_at", sqlite_where=text("handled_at IS NULL"),
              postgresql_where=text("handled_at IS NULL")),
    )


class JourneyVersion(Base):
    __tablename__ = "journey_versions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    journey_id: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    checksum: Mapped[str] = mapped_column(String(64))
    definition: Mapped[dict[str, Any]] = mapped_column(JSON)
    source_path: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime]

    __table_args__ = (
        UniqueConstraint("journey_id", "version"),
        UniqueConstraint("journey_id", "checksum"),
    )


class JourneyState(Base):
    """Per-journey bookkeeping; its row is also the lock that serialises a journey's entry phase."""

    __tablename__ = "journey_state"

    journey_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    current_version: Mapped[int] = mapped_column(Integer)
    source_path: Mapped[str] = mapped_column(String(500))
    date_cursor: Mapped[datetime | None]
    retired_at: Mapped[datetime | None]  # its file was removed: no new entries, no sends
    updated_at: Mapped[datetime]


class Enrollment(Base):
    __tablename__ = "enrollments"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    journey_id: Mapped[str] = mapped_column(String(64))
    journey_version: Mapped[int] = mapped_column(Integer)
    member_id: Mapped[str] = mapped_column(String(64), ForeignKey("members.id", ondelete="CASCADE"))
    trigger_key: Mapped[str] = mapped_column(String(64))
    event_id: Mapped[int | None] = mapped_column(BigId)
    status: Mapped[str] = mapped_column(String(16))
    step: Mapped[str | None] = mapped_column(String(64))
    next_run_at: Mapped[datetime | None]
    entered_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]
    exit_reason: Mapped[str | None] = mapped_column(String(200))
    converted_at: Mapped[datetime | None]
    variant: Mapped[str | None] = mapped_column(String(64))
    waiting_for: Mapped[str | None] = mapped_column(String(64))  # wait until_event: the event type awaited
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    claimed_until: Mapped[datetime | None]
    # Runs of its due step that failed in a row (engine.store.quarantine): 0 in the common case, so the runner knows
    # without a query which enrollments have a quarantine entry to settle when their step finally goes through.
    failures: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))

    __table_args__ = (
        UniqueConstraint("journey_id", "member_id", "trigger_key"),
        # A member is never twice at once in the same journey.
        Index("uq_enrollments_one_active", "journey_id", "member_id", unique=True,
              sqlite_where=text("status = 'active'"), postgresql_where=text("status = 'active'")),
        Index("ix_enrollments_due", "next_run_at", "id", sqlite_where=text("status = 'active'"),
              postgresql_where=text("status = 'active'")),
        Index(None, "member_id"),
    )


class Message(Base):
    """The message log: one row per message and per message not sent. Append-only apart from status."""

    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=False)
    enrollment_id: Mapped[int] = mapped_column(BigId)
    member_id: Mapped[str] = mapped_column(String(64))
    journey: Mapped[str] = mapped_column(String(64))
    journey_version: Mapped[int] = mapped_column(Integer)
    step: Mapped[str] = mapped_column(String(64))
    channel: Mapped[str] = mapped_column(String(16))
    template: Mapped[str | None] = mapped_column(String(200))
    locale: Mapped[str | None] = mapped_column(String(16))
    variant: Mapped[str | None] = mapped_column(String(64))
    recipient: Mapped[str | None] = mapped_column(String(320))
    subject: Mapped[str | None] = mapped_column(Text)
    body: Mapped[str | None] = mapped_column(Text)
    html: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    provider_id: Mapped[str | None] = mapped_column(String(128))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]  # queued rows: not before this time (quiet hours, retries)
    created_at: Mapped[datetime]
    sent_at: Mapped[datetime | None]
    updated_at: Mapped[datetime]
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    claimed_until: Mapped[datetime | None]
    content_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    prev_hash: Mapped[str] = mapped_column(String(64))
    redacted: Mapped[bool] = mapped_column(Boolean, default=False)
    #: HMAC under the audit key over the row's state (engine.store.seal): status, reason, error, provider id,
    #: sent time, erasure
    state_mac: Mapped[str | None] = mapped_column(String(64))
    segments: Mapped[int | None] = mapped_column(Integer)  # SMS: parts billed (GSM-7 160/153, UCS-2 70/67)
    encoding: Mapped[str | None] = mapped_column(String(8))  # SMS: gsm7 | ucs2
    category: Mapped[str] = mapped_column(String(16), default="marketing", server_default="marketing")

    __table_args__ = (
        # Also serves the at-most-once check before appending a batch (audit._existing_keys): journey, then the
        # batch's enrollment ids.
        UniqueConstraint("journey", "enrollment_id", "step", name="uq_messages_once"),
        Index(None, "member_id", "created_at"),
        Index(None, "status"),
        Index("ix_messages_queued", "next_attempt_at", sqlite_where=text("status = 'queued'"),
              postgresql_where=text("status = 'queued'")),
        Index(None, "journey", "created_at"),
        Index(None, "created_at"),
        # Provider webhooks find their message by the provider's id. Rows get one only once a provider has
        # answered, so the rows in flight (and suppressed ones, which never get one) stay out of the index.
        Index("ix_messages_provider_id", "provider_id", sqlite_where=text("provider_id IS NOT NULL"),
              postgresql_where=text("provider_id IS NOT NULL")),
    )


class Handover(Base):
    """Messages a worker has handed to a channel and whose answers it has not recorded yet: one row per worker.

    Written before the channel is called, in the transaction that writes the batch or records the answers of
    the chunk before; deleted with the last answers. After a crash, the worker's ``sending`` rows of this
    channel with ids in [first_id, last_id] are the only ones that may have reached the channel: they become
    ``unknown`` and are reconciled with it. Its other ``sending`` rows were never handed over: they go back to
    the queue and are sent once.
    """

    __tablename__ = "handovers"

    worker: Mapped[str] = mapped_column(String(64), primary_key=True)
    channel: Mapped[str] = mapped_column(String(16))
    first_id: Mapped[int] = mapped_column(BigId)
    last_id: Mapped[int] = mapped_column(BigId)
    position: Mapped[str | None] = mapped_column(String(200))  # Channel.position() just before the hand-over
    handed_at: Mapped[datetime]


class QuarantineEntry(Base):
    """A unit of work that failed: retried at later ticks, then quarantined until ``run.py retry``.

    kind: ``enrollment`` (its due step could not be composed or written), ``event`` (matching failed),
    ``journey`` (its compiled form failed at run time: paused), ``message`` (a queued message could not be
    prepared for its channel). ref: the unit's id. One row per unit, kept once settled (status resolved or
    abandoned) as the history of what went wrong.
    """

    __tablename__ = "quarantine"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    ref: Mapped[str] = mapped_column(String(64))
    journey_id: Mapped[str | None] = mapped_column(String(64))
    journey_version: Mapped[int | None] = mapped_column(Integer)
    member_id: Mapped[str | None] = mapped_column(String(64))
    step: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))  # retrying | quarantined | resolved | abandoned
    error: Mapped[str] = mapped_column(Text)  # one line: what went wrong
    detail: Mapped[str | None] = mapped_column(Text)  # the traceback, for whoever fixes it
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    first_failed_at: Mapped[datetime]
    last_failed_at: Mapped[datetime]
    next_attempt_at: Mapped[datetime | None]  # retrying: the tick that tries again
    settled_at: Mapped[datetime | None]

    __table_args__ = (UniqueConstraint("kind", "ref"), Index(None, "status"))


class TemplateVersion(Base):
    """Every distinct good version of a template file: a file saved broken keeps its last good version in use."""

    __tablename__ = "template_versions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    path: Mapped[str] = mapped_column(String(300))  # under templates/, e.g. zh-CN/winback/first_touch.text.j2
    checksum: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]

    __table_args__ = (UniqueConstraint("path", "checksum"),)


class WebhookReceipt(Base):
    """Provider callbacks already applied: providers retry and resend, each is applied once."""

    __tablename__ = "webhook_receipts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    provider: Mapped[str] = mapped_column(String(32))
    event_key: Mapped[str] = mapped_column(String(200))
    received_at: Mapped[datetime]

    __table_args__ = (UniqueConstraint("provider", "event_key"),)


class AuditHead(Base):
    """The tip of the message log's hash chain; locking this row serialises appends."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_seq: Mapped[int] = mapped_column(BigId)
    last_hash: Mapped[str] = mapped_column(String(64))
    #: the first row whose links are HMACs under the audit key (rows before it predate migration 0007)
    keyed_from: Mapped[int | None] = mapped_column(BigId)
    #: HMAC over last_seq, last_hash and keyed_from: the head cannot be rewritten without the key
    mac: Mapped[str | None] = mapped_column(String(64))


class PointsEntry(Base):
    """One movement of points. The ledger is append-only; a member's balance is the sum of their rows.

    Positive rows are lots (earned or added) that may expire at ``expires_at``; negative rows (redeemed, expired,
    taken away) consume lots soonest-expiring first. ``members.points`` caches the sum, written in the same
    transaction as the rows.
    """

    __tablename__ = "points_ledger"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    member_id: Mapped[str] = mapped_column(String(64), ForeignKey("members.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))  # earn | redeem | adjust | expire
    points: Mapped[int] = mapped_column(Integer)
    occurred_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    reason: Mapped[str] = mapped_column(String(200))
    event_id: Mapped[int | None] = mapped_column(BigId)
    created_at: Mapped[datetime]
    #: HMAC under the audit key, chained to the member's previous row (engine.store.seal.ledger_mac)
    mac: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (Index(None, "member_id", "expires_at"), Index(None, "expires_at"))


class ProgrammeState(Base):
    """When the programme's scheduled work (expiry, tier reviews, RFM) last ran; its row is also that work's lock."""

    __tablename__ = "programme_state"

    task: Mapped[str] = mapped_column(String(32), primary_key=True)
    ran_at: Mapped[datetime]


class Suppression(Base):
    __tablename__ = "suppressions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    channel: Mapped[str] = mapped_column(String(16))
    address: Mapped[str] = mapped_column(String(320))
    reason: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]

    __table_args__ = (UniqueConstraint("channel", "address"),)


members = cast(Table, Member.__table__)
events = cast(Table, Event.__table__)
journey_versions = cast(Table, JourneyVersion.__table__)
journey_state = cast(Table, JourneyState.__table__)
enrollments = cast(Table, Enrollment.__table__)
messages = cast(Table, Message.__table__)
audit_head = cast(Table, AuditHead.__table__)
suppressions = cast(Table, Suppression.__table__)
points_ledger = cast(Table, PointsEntry.__table__)
programme_state = cast(Table, ProgrammeState.__table__)
webhook_receipts = cast(Table, WebhookReceipt.__table__)
handovers = cast(Table, Handover.__table__)
quarantine = cast(Table, QuarantineEntry.__table__)
template_versions = cast(Table, TemplateVersion.__table__)
