"""The HTTP service: event and member API, provider webhooks, unsubscribe pages, health and metrics.

A thin layer: it authenticates, checks signatures, parses, and hands plain values
to engine.ingest.members (API) and engine.http.webhooks (state changes). Database work runs in
a worker thread, and every change is committed before the response is sent, so
nothing acknowledged is lost.

The API is all-or-nothing per request: if any item is bad, the answer is 422
listing each bad item's index and reason, and nothing from that request is
stored; a client fixes the items and resends the whole request. Events already
stored (same ``id``, or a purchase's ``order_id``) are reported as duplicates,
not errors, so a client may safely retry.
"""

from __future__ import annotations

import hmac
import html
import json
import logging
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape as xml_escape

from cryptography.exceptions import UnsupportedAlgorithm
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sendgrid.helpers.eventwebhook import EventWebhook
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import ImmutableMultiDict
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from engine.app import App
from engine.domain.unsubscribe import read_token
from engine.exceptions import RulesError
from engine.http import webhooks
from engine.http.metrics import (
    CountRequests,
    Metrics,
)
from engine.ingest.events import EventRecorder, NewEvent, parse_event
from engine.ingest.members import BATCH, ImportReport, RowError, parse_member
from engine.ingest.members import upsert_members as upsert
from engine.rules.loyalty import Loyalty
from engine.store.models import events, members
from engine.tick.health import HealthCollector, TickHealth

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_BODY = 10 * 1024 * 1024  # SendGrid batches are the largest bodies we expect: a few MB
MAX_EVENTS_BODY = 5 * 1024 * 1024  # BATCH events of a few KB each
MAX_SMALL_BODY = 64 * 1024  # one member; a Twilio callback or inbound message (a few hundred bytes)
MAX_JSON_DEPTH = 64  # nesting levels a JSON body may have (an event's properties are a few deep)
FUTURE_SKEW = 300  # seconds a signed timestamp may be ahead of our clock
SG_TIMESTAMP = "X-Twilio-Email-Event-Webhook-Timestamp"
SG_SIGNATURE = "X-Twilio-Email-Event-Webhook-Signature"
EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response/>'


class WebError(Exception):
    """An answer other than success: status, a one-line error, and per-item errors for the API."""

    def __init__(self, status: int, error: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.errors = status, error, errors

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {"error": self.error}
        if self.errors is not None:
            body["errors"] = self.errors
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, self.status, headers=headers)


async def _web_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, WebError)
    return exc.response()


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """The raw body (signatures are over the exact bytes), refusing more than LIMIT bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise WebError(413, f"the request body must be at most {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise WebError(413, f"the request body must be at most {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _json(body: bytes) -> Any:
    """The body as JSON: 400 when it is not JSON, or is nested deeper than MAX_JSON_DEPTH levels."""
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WebError(400, f"the body must be JSON: {exc}") from None
    except RecursionError:
        value = None
    else:
        if _depth_within(value, MAX_JSON_DEPTH):
            return value
    raise WebError(400, f"the body is nested too deeply: at most {MAX_JSON_DEPTH} levels of lists and objects")


def _depth_within(value: Any, limit: int) -> bool:
    """Whether VALUE nests lists and objects at most LIMIT levels deep (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return False
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return True


def _parse_events(items: list[Any], now: datetime) -> tuple[list[tuple[int, NewEvent]], list[dict[str, Any]]]:
    parsed: list[tuple[int, NewEvent]] = []
    errors: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            errors.append({"index": index, "error": "each event must be a JSON object"})
            continue
        # Omitted "at" means now: an event sent as it happens needs no clock of its own.
        row = item if item.get("at") not in (None, "") else {**item, "at": now.isoformat()}
        try:
            parsed.append((index, parse_event(row, "api")))
        except RowError as exc:
            errors.append({"index": index, "error": str(exc)})
    return parsed, errors


class Service:
    def __init__(self, app: App, clock: Callable[[], datetime], health: TickHealth | None = None) -> None:
        self.app, self.clock, self.health = app, clock, health
        self.metrics = Metrics(app.store)
        if health is not None:
            self.metrics.registry.register(HealthCollector(health))
        self._sendgrid: EventWebhook | None = None
        self._rules_lock = threading.Lock()

    async def _transact(self, change: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """CHANGE(conn, dialect, ...) in one transaction on a worker thread, committed before we answer."""
        store = self.app.store

        def run() -> T:
            with store.begin() as conn:
                return change(conn, store.dialect, *args, **kwargs)

        return await run_in_threadpool(run)

    # ------------------------------------------------------------------ API

    def _authorise(self, request: Request) -> None:
        token = self.app.config.web.api_token
        if not token:
            raise WebError(503, "the API is disabled: set web.api_token in config.yaml "
                                "(e.g. api_token: ${ENGINE_API_TOKEN}) and restart")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise WebError(401, "missing or wrong bearer token (Authorization: Bearer <web.api_token>)")

    def _loyalty(self) -> Loyalty:
        """The loyalty programme (reloaded when its file changed); called on worker threads, hence the lock."""
        with self._rules_lock:
            try:
                return self.app.loyalty()
            except RulesError as exc:
                raise WebError(503, str(exc)) from None

    async def post_events(self, request: Request) -> Response:
        self._authorise(request)
        payload = _json(await read_body(request, MAX_EVENTS_BODY))
        items = payload.get("events") if isinstance(payload, dict) and "events" in payload else payload
        items = items if isinstance(items, list) else [items]
        if not items:
            raise WebError(422, "no events given", [])
        if len(items) > BATCH:
            raise WebError(413, f"at most {BATCH} events per request, got {len(items)}")
        return JSONResponse(await run_in_threadpool(self._store_events, items), 202)

    def _store_events(self, items: list[Any]) -> dict[str, Any]:
        loyalty, now = self._loyalty(), self.clock()
        parsed, errors = _parse_events(items, now)
        try:
            return self._record(parsed, errors, loyalty, now)
        except IntegrityError:
            # A concurrent request stored one of these ids first: this time it is seen, and reported, as a duplicate.
            return self._record(parsed, errors, loyalty, now)

    def _record(self, parsed: list[tuple[int, NewEvent]], errors: list[dict[str, Any]], loyalty: Loyalty,
                now: datetime) -> dict[str, Any]:
        with self.app.store.begin() as conn:
            ids = [e.external_id for _, e in parsed if e.external_id]
            seen = set(conn.execute(select(events.c.external_id).where(events.c.external_id.in_(ids))).scalars())
            fresh: list[tuple[int, NewEvent]] = []
            duplicates: list[dict[str, Any]] = []
            for index, event in parsed:
                if event.external_id and event.external_id in seen:
                    duplicates.append({"index": index, "id": event.external_id})
                    continue
                if event.external_id:
                    seen.add(event.external_id)
                fresh.append((index, event))
            report = ImportReport()
            if fresh:
                EventRecorder(conn, loyalty, now).record(fresh, report)
            errors = sorted([*errors, *({"index": i, "error": e} for i, e in report.skipped)],
                            key=lambda e: e["index"])
            if errors:
                # Raised inside the transaction: it rolls back, so nothing of this request is stored.
                raise WebError(422, f"{len(errors)} event(s) rejected; nothing was recorded", errors)
        return {"accepted": report.loaded, "duplicates": duplicates, "triggered": report.triggered}

    async def put_member(self, request: Request) -> Response:
        self._authorise(request)
        member_id = request.path_params["member_id"]
        body = _json(await read_body(request, MAX_SMALL_BODY))
        if not isinstance(body, dict):
            raise WebError(422, "the body must be a JSON object of member fields", [
                {"index": 0, "error": "the body must be a JSON object"}])
        if body.get("id") not in (None, member_id):
            raise WebError(422, "the id in the body differs from the id in the URL", [
                {"index": 0, "error": f"id must be {member_id!r} (the URL's), got: {body['id']!r}"}])
        created = await run_in_threadpool(self._upsert_member, {**body, "id": member_id})
        return JSONResponse({"id": member_id, "created": created}, 200)

    def _upsert_member(self, given: dict[str, Any]) -> bool:
        try:
            row = parse_member(given, self._loyalty(), self.app.config.default_region)
        except RowError as exc:
            raise WebError(422, f"member {given['id']} rejected; nothing was recorded",
                           [{"index": 0, "error": str(exc)}]) from None
        with self.app.store.begin() as conn:
            existed = conn.execute(select(members.c.id).where(members.c.id == row["id"])).first() is not None
            upsert(conn, self.app.store.dialect, [row], self.clock(), loyalty=self._loyalty())
        return not existed

    # ------------------------------------------------------------------ health and metrics

    async def healthz(self, _request: Request) -> Response:
        """200 when the database answers and, inside a daemon, its ticks succeed; 503 with the reasons when not:
        the last tick failed, none has succeeded for three intervals, or quarantined work is growing."""
        def ping() -> None:
            with self.app.store.connect() as conn:
                conn.execute(text("SELECT 1"))

        body: dict[str, Any] = {"status": "ok", "database": self.app.store.dialect}
        problems: list[str] = []
        try:
            await run_in_threadpool(ping)
        except SQLAlchemyError as exc:
            problems.append(f"database unreachable: {exc.__class__.__name__}")
        if self.health is not None:
            problems += self.health.problems(self.clock())
            body["ticks"] = self.health.snapshot()
        if problems:
            body.update(status="error", error=problems[0], problems=problems)
            return JSONResponse(body, 503)
        return JSONResponse(body)

    async def metrics_page(self, _request: Request) -> Response:
        body = await run_in_threadpool(generate_latest, self.metrics.registry)
        return Response(body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    # ------------------------------------------------------------------ Twilio

    def _reject(self, provider: str, reason: str, status: int, message: str) -> WebError:
        self.metrics.rejected.labels(provider, reason).inc()
        log.warning("%s webhook refused (%s): %s", provider, reason, message)
        return WebError(status, message)

    async def _twilio_params(self, request: Request) -> ImmutableMultiDict[str, str]:
        """The form parameters, after checking X-Twilio-Signature against our public URL."""
        token = self.app.config.channels.sms.auth_token
        if not token:
            raise self._reject("twilio", "not_configured", 503, "set channels.sms.auth_token to accept Twilio webhooks")
        try:
            # Bounded before anything is parsed: the signature can only be checked over the parsed form.
            params = ImmutableMultiDict(parse_qsl((await read_body(request, MAX_SMALL_BODY)).decode(),
                                                  keep_blank_values=True, max_num_fields=200))
        except (UnicodeDecodeError, ValueError):
            raise self._reject("twilio", "bad_request", 403, "the body is not form data") from None
        url = self.app.config.web.public_url.rstrip("/") + request.url.path
        if request.url.query:
            url += "?" + request.url.query
        if not webhooks.twilio_signature_ok(token, url, params, request.headers.get("X-Twilio-Signature", ""),
                                            request.headers.get("X-Twilio-Webhooks-Signature-Settings")):
            raise self._reject("twilio", "signature", 403, "missing or invalid X-Twilio-Signature")
        return params

    async def twilio_status(self, request: Request) -> Response:
        params = await self._twilio_params(request)
        # Our message id in the callback URL (signed with it) finds the row even before its provider id is stored.
        hint = request.query_params.get("message_id", "")
        result = await self._transact(webhooks.twilio_status, params, now=self.clock(),
                                      message_id=int(hint) if hint.isdigit() else None)
        return JSONResponse({"result": result})

    async def twilio_inbound(self, request: Request) -> Response:
        params = await self._twilio_params(request)
        config = self.app.config
        inbound = await self._transact(webhooks.sms_inbound, sender=params.get("From", ""),
                                       body=params.get("Body", ""), sid=params.get("MessageSid"),
                                       region=config.default_region, help_reply=config.channels.sms.help_reply,
                                       now=self.clock())
        twiml = EMPTY_TWIML
        if inbound.reply:
            twiml = ('<?xml version="1.0" encoding="UTF-8"?>'
                     f"<Response><Message>{xml_escape(inbound.reply)}</Message></Response>")
        return Response(twiml, media_type="text/xml")

    # ------------------------------------------------------------------ SendGrid

    def _sendgrid_verifier(self) -> EventWebhook:
        key = self.app.config.channels.email.webhook_public_key
        if not key:
            raise self._reject("sendgrid", "not_configured", 503,
                               "set channels.email.webhook_public_key to accept SendGrid events")
        if self._sendgrid is None:
            try:
                self._sendgrid = EventWebhook(key)
            except (ValueError, TypeError, UnsupportedAlgorithm):
                raise self._reject("sendgrid", "not_configured", 503, "channels.email.webhook_public_key is not "
                                   "a valid public key (copy it from SendGrid's Mail Settings)") from None
        return self._sendgrid

    def _check_sendgrid(self, body: bytes, request: Request) -> None:
        problem = webhooks.sendgrid_problem(self._sendgrid_verifier(), body, request.headers.get(SG_TIMESTAMP, ""),
                                            request.headers.get(SG_SIGNATURE, ""), self.clock(),
                                            self.app.config.web.webhook_max_age, FUTURE_SKEW)
        if problem == "replay":
            raise self._reject("sendgrid", problem, 403, "the signed timestamp is too old or in the future (replay)")
        if problem:
            raise self._reject("sendgrid", problem, 403, f"missing or invalid {SG_SIGNATURE}")

    async def sendgrid_events(self, request: Request) -> Response:
        body = await read_body(request)
        self._check_sendgrid(body, request)
        items = _json(body)
        if not isinstance(items, list):
            raise WebError(400, "SendGrid events must be a JSON list")
        return JSONResponse(dict(await self._transact(webhooks.sendgrid_events, items, now=self.clock())))

    # ------------------------------------------------------------------ unsubscribe pages

    def _token(self, request: Request) -> tuple[str, str] | None:
        found = read_token(self.app.secret, request.path_params["token"])
        return found if found is not None and found[1] in ("email", "sms") else None

    async def unsubscribe_page(self, request: Request) -> Response:
        # Changes nothing: mail scanners and link previews follow links; only the POST unsubscribes.
        found = self._token(request)
        if found is None:
            return _page(*NOT_FOUND, status=404)
        zh, en = CHANNEL_NAMES[found[1]]
        action = html.escape(request.url.path, quote=True)
        form = (f'<form method="post" action="{action}"><button type="submit">确认退订 / Unsubscribe</button>'
                "</form>")
        return _page("退订确认 / Confirm unsubscribe", f"点击下方按钮，您将不再收到{zh}营销消息。",
                     f"Press the button to stop receiving marketing {en} from us.", form)

    async def unsubscribe(self, request: Request) -> Response:
        # Any POST counts, with or without RFC 8058's "List-Unsubscribe=One-Click" body.
        found = self._token(request)
        if found is None:
            return _page(*NOT_FOUND, status=404)
        member_id, channel = found
        await self._transact(webhooks.unsubscribe_member, member_id, channel, now=self.clock())
        zh, en = CHANNEL_NAMES[channel]
        return _page("已退订 / Unsubscribed", f"您已退订{zh}营销消息。", f"You will no longer receive marketing {en}.")


CHANNEL_NAMES = {"email": ("邮件", "email"), "sms": ("短信", "text messages")}


NOT_FOUND = ("链接无效 / Link not valid", "这个退订链接无效或已损坏。",
             "This unsubscribe link is not valid; it may have been cut short.")


def _page(title: str, zh: str, en: str, extra: str = "", status: int = 200) -> HTMLResponse:
    body = (f'<!doctype html><html lang="zh-CN"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><meta name="robots" '
            f'content="noindex"><title>{html.escape(title)}</title></head><body><h1>{html.escape(title)}</h1>'
            f'<p>{html.escape(zh)}</p><p lang="en">{html.escape(en)}</p>{extra}</body></html>')
    return HTMLResponse(body, status, headers={"Cache-Control": "no-store"})


def _routes(service: Service) -> Iterable[Route]:
    yield Route("/v1/events", service.post_events, methods=["POST"])
    yield Route("/v1/members/{member_id}", service.put_member, methods=["PUT"])
    yield Route("/healthz", service.healthz, methods=["GET"])
    yield Route("/metrics", service.metrics_page, methods=["GET"])
    yield Route("/webhooks/twilio/status", service.twilio_status, methods=["POST"])
    yield Route("/webhooks/twilio/inbound", service.twilio_inbound, methods=["POST"])
    yield Route("/webhooks/sendgrid/events", service.sendgrid_events, methods=["POST"])
    yield Route("/unsubscribe/{token}", service.unsubscribe_page, methods=["GET"])
    yield Route("/unsubscribe/{token}", service.unsubscribe, methods=["POST"])


def create_app(app: App, *, clock: Callable[[], datetime] | None = None, health: TickHealth | None = None) -> Starlette:
    """The ASGI application for APP; CLOCK (default: the wall clock) is for tests and replays of time; HEALTH: the
    daemon's tick record when the service runs inside `serve` (then /healthz reports on the ticks too)."""
    service = Service(app, clock or (lambda: datetime.now(UTC)), health)
    web = Starlette(routes=list(_routes(service)), exception_handlers={WebError: _web_error},
                    middleware=[Middleware(CountRequests, counter=service.metrics.requests)])
    web.state.service = service
    return web
