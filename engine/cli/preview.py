"""``run.py preview``: render one step's message for one member, exactly as a send would, without sending."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select

from engine.app import App
from engine.domain import unsubscribe as unsub
from engine.exceptions import NotFound, TemplateRenderError
from engine.rules.journey import SendStep
from engine.rules.problems import did_you_mean
from engine.rules.versions import LiveJourney, computed_needed
from engine.store.computed import computed_columns
from engine.store.models import events, members
from engine.tick.context import ContextBuilder
from engine.tick.safety import Rails


def render_preview(app: App, journey_id: str, step_id: str, member_id: str, now: datetime) -> str:
    book = app.rules()
    journey = book.journeys.get(journey_id)
    if journey is None:
        raise NotFound(f"journey {journey_id!r} not found{did_you_mean(journey_id, book.journeys)}"
                       + (" (it has validation problems)" if book.problems else ""))
    sends = [s for s in journey.steps if isinstance(s, SendStep)]
    step = next((s for s in sends if s.id == step_id), None)
    if step is None:
        hint = did_you_mean(step_id, [s.id for s in sends])
        raise NotFound(f"journey {journey_id} has no send step {step_id!r}{hint}")
    # The computed attributes the journey's conditions use are loaded with the member, as the runner does.
    needed = computed_needed([LiveJourney(journey, 0, book.segment_conditions)])
    extra = computed_columns(needed, now, app.store.dialect)
    with app.store.connect() as conn:
        found_member = conn.execute(select(members, *extra).where(members.c.id == member_id)).mappings().first()
        if found_member is None:
            raise NotFound(f"member {member_id!r} does not exist")
        member = dict(found_member)
        trigger_event = getattr(journey.trigger, "event", None)
        props: dict[str, Any] = {}
        if trigger_event:
            found = conn.execute(select(events.c.properties).where(events.c.member_id == member_id,
                                                                   events.c.type == trigger_event)
                                 .order_by(events.c.id.desc()).limit(1)).scalar()
            props = found or {}
        rails = Rails(app.config)
        rails.prepare(conn, [member], now)
    verdict, address = rails.check(member, step.channel, now)
    contexts = ContextBuilder(book.loyalty, app.config.default_locale, app.config.default_timezone)
    link = unsub.url(app.config.web.public_url, unsub.make_token(app.secret, member_id, step.channel))
    context = contexts.build(member, now, {"id": journey.id, "name": journey.name, "version": 0}, props, link)
    try:
        rendered = app.templates.render(step.template, step.channel, member.get("locale"), context)
    except TemplateRenderError as exc:
        raise TemplateRenderError(f"{exc}; this message would be logged as failed, not sent") from None
    lines = [f"journey {journey.id} / step {step.id} / {step.channel} / template {step.template} "
             f"({rendered.locale}) for member {member_id}"]
    lines.append(f"to: {address or '(no address)'}")
    if verdict.reason:
        lines.append(f"note: if sent now it would be {verdict.status.value}: {verdict.error}")
    if rendered.subject is not None:
        lines.append(f"subject: {rendered.subject}")
    lines += ["", rendered.text]
    return "\n".join(lines)
