"""Prometheus metrics for /metrics: figures read from the database at scrape time, the tick's own, and requests
counted by route."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import Connection, func, literal_column, select
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.store.database import Store
from engine.store.models import enrollments, events, messages
from engine.store.quarantine import open_counts

log = logging.getLogger(__name__)


class DatabaseCollector:
    """Counts read from the database at scrape time, so every daemon's and web process's numbers agree."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("engine_database_up", "1 if the database answered this scrape, else 0")
        try:
            with self.store.connect() as conn:
                families = list(self._families(conn))
        except SQLAlchemyError as exc:
            log.warning("metrics: database unreachable: %s", exc.__class__.__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    @staticmethod
    def _families(conn: Connection) -> Iterator[Metric]:
        by_status = GaugeMetricFamily("engine_messages", "Messages in the log, by channel and status",
                                      labels=["channel", "status"])
        for channel, status, count in conn.execute(select(messages.c.channel, messages.c.status, func.count())
                                                   .group_by(messages.c.channel, messages.c.status)):
            by_status.add_metric([channel, status], count)
        yield by_status
        active = GaugeMetricFamily("engine_enrollments_active", "Members currently in a journey, by journey",
                                   labels=["journey"])
        # A literal, not a parameter: lets SQLite use the partial index on active enrollments.
        for journey, count in conn.execute(select(enrollments.c.journey_id, func.count())
                                           .where(enrollments.c.status == literal_column("'active'"))
                                           .group_by(enrollments.c.journey_id)):
            active.add_metric([journey], count)
        yield active
        unhandled = conn.execute(select(func.count()).select_from(events).where(events.c.handled_at.is_(None)))
        yield GaugeMetricFamily("engine_events_unhandled", "Events recorded but not yet seen by a tick",
                                value=unhandled.scalar_one())
        unknown = conn.execute(select(func.count()).select_from(messages)
                               .where(messages.c.status == literal_column("'unknown'")))
        yield GaugeMetricFamily("engine_messages_unknown", "Messages in doubt: handed to a channel, answer not "
                                "known; reconciliation settles them", value=unknown.scalar_one())
        quarantined = GaugeMetricFamily("engine_quarantined", "Units of work set aside after failing, by journey, "
                                        "kind (enrollment, event, journey, message) and status (retrying, "
                                        "quarantined)", labels=["journey", "kind", "status"])
        for (journey, kind, status), count in sorted(open_counts(conn).items()):
            quarantined.add_metric([journey, kind, status], count)
        yield quarantined


class Metrics:
    def __init__(self, store: Store) -> None:
        # A registry per service: several apps in one process (tests, serve) must not share counters.
        self.registry = CollectorRegistry()
        self.registry.register(DatabaseCollector(store))
        self.requests = Counter("engine_http_requests", "HTTP requests answered", ["method", "route", "status"],
                                registry=self.registry)
        self.rejected = Counter("engine_webhooks_rejected", "Provider webhooks refused (signature, replay, config)",
                                ["provider", "reason"], registry=self.registry)


class CountRequests:
    """Counts requests by route template (not raw path: tokens would make unbounded label values)."""

    def __init__(self, app: ASGIApp, counter: Counter) -> None:
        self.app, self.counter = app, counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.counter.labels(scope["method"], route, str(status)).inc()
