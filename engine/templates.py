"""Message templates: Jinja2's sandbox, strict about undefined variables, per locale.

Layout: ``templates/<locale>/<name>.<part>.j2`` where part is ``subject``,
``text`` (both channels) or ``html`` (email, optional: derived from the text
when absent). ``html`` files are autoescaped. A member's locale falls back to
its language (``en-US`` → ``en``) and then to ``default_locale``.

Templates render in the bounded, immutable sandbox of engine.sandbox; a template past one of its bounds, or
failing in any other way, fails that message with a TemplateRenderError naming the file, the line and why.
"""

from __future__ import annotations

import html as htmllib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import jinja2
from babel.core import Locale, UnknownLocaleError
from babel.dates import format_date, format_datetime
from babel.numbers import format_currency, format_decimal, get_group_symbol, get_minus_sign_symbol
from jinja2 import meta

from engine.exceptions import TemplateRenderError
from engine.problems import Problem, did_you_mean
from engine.sandbox import (
    _BUDGET,
    _METERED,
    _STREAMS,
    MAX_PART_CHARS,
    _bounded_concat,
    _oversized,
    _Sandbox,
    new_budget,
)
from engine.timeutil import zone

SUFFIX = ".j2"
PARTS = {"email": ("subject", "text", "html"), "sms": ("text",)}
REQUIRED = {"email": ("subject", "text"), "sms": ("text",)}
# Exactly what engine.context.ContextBuilder.build provides; anything else fails at send time.
CONTEXT_NAMES = frozenset({"member", "tier", "next_tier", "event", "journey", "now", "unsubscribe_url"})


@dataclass(frozen=True)
class Rendered:
    locale: str
    text: str
    subject: str | None = None
    html: str | None = None


@lru_cache(maxsize=256)
def _babel_locale(locale: str) -> Locale:
    """Babel's locale lookup scans its data directory: parse each locale once per process."""
    try:
        return Locale.parse(locale.replace("-", "_"))
    except (UnknownLocaleError, ValueError):
        return Locale.parse("en")





class Templates:
    """Compiled templates, cached; ``refresh()`` drops the cache so edited files are picked up."""

    def __init__(self, root: Path, default_locale: str, currency: str = "CNY") -> None:
        self.root = root
        self.default_locale = default_locale
        self.currency = currency
        self.env = _Sandbox(
            loader=jinja2.FileSystemLoader(str(root)),
            undefined=jinja2.StrictUndefined,
            autoescape=lambda name: bool(name and name.endswith(".html" + SUFFIX)),
            auto_reload=True,
            keep_trailing_newline=False,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(money=self._money, date=self._date, datetime=self._datetime,
                                discount=self._discount, number=self._number)
        self._compiled: dict[str, tuple[jinja2.Template, dict[str, Any], bool, bool]] = {}
        self._resolved: dict[tuple[str, str], str | None] = {}
        self._exists: dict[str, bool] = {}
        self._plans: dict[tuple[str, str, str | None], tuple[str, tuple[tuple[str, str | None], ...]]] = {}

    def refresh(self) -> None:
        self._compiled.clear()
        self._resolved.clear()
        self._exists.clear()
        self._plans.clear()

    # ----------------------------------------------------------------- lookup

    def locales(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def _path(self, locale: str, name: str, part: str) -> str:
        return f"{locale}/{name}.{part}{SUFFIX}"

    def _has(self, locale: str, name: str, part: str) -> bool:
        path = self._path(locale, name, part)
        found = self._exists.get(path)
        if found is None:
            found = self._exists[path] = (self.root / path).is_file()
        return found

    def resolve_locale(self, locale: str | None, name: str) -> str | None:
        """The locale whose version of NAME a member with LOCALE gets, or None if none exists."""
        key = (locale or "", name)
        if key not in self._resolved:
            candidates = []
            if locale:
                candidates += [locale, locale.split("-")[0]]
            candidates += [self.default_locale, self.default_locale.split("-")[0]]
            found = None
            for candidate in candidates:
                if self._has(candidate, name, "text"):
                    found = candidate
                    break
            self._resolved[key] = found
        return self._resolved[key]

    def _compiled_template(self, path: str) -> tuple[jinja2.Template, dict[str, Any], bool, bool]:
        """The compiled template, a plain copy of its globals (a ChainMap, slow to list per render), whether its
        output also streams from other templates or blocks and whether it loops or calls (see _STREAMS)."""
        found = self._compiled.get(path)
        if found is None:
            template = self.env.get_template(path)
            module = template.root_render_func.__globals__  # type: ignore[attr-defined]
            found = self._compiled[path] = (template, dict(template.globals), bool(module.get(_STREAMS)),
                                            module.get(_METERED) is not False)
        return found

    # ----------------------------------------------------------------- rendering

    def _plan(self, name: str, channel: str, locale: str | None) -> tuple[str, tuple[tuple[str, str | None], ...]]:
        """The locale chosen for a member with LOCALE and, per part of CHANNEL, its file (None: no html file)."""
        key = (name, channel, locale)
        plan = self._plans.get(key)
        if plan is None:
            chosen = self.resolve_locale(locale, name)
            if chosen is None:
                raise TemplateRenderError(f"template {name!r} does not exist for {locale or self.default_locale} "
                                          f"or {self.default_locale} under {self.root}")
            parts = tuple((part, None if part == "html" and not self._has(chosen, name, part)
                           else self._path(chosen, name, part)) for part in PARTS[channel])
            plan = self._plans[key] = (chosen, parts)
        return plan

    def render(self, name: str, channel: str, locale: str | None, context: Mapping[str, Any]) -> Rendered:
        chosen, plan = self._plan(name, channel, locale)
        # What Template.render does per part (a fresh Context over the environment's globals and these variables,
        # then its root render function), with one variables dict shared by the parts of this message: the
        # parts only read it (a template's own {% set %} goes into its Context, not into this dict).
        variables = {**self.env.globals, **context, "_locale": chosen}
        parts: dict[str, str | None] = {}
        # Loop iterations and time are counted for all the parts of this message together, from the first part
        # that loops or calls: a part that does neither cannot run long, and pays nothing for the budget.
        budget: list[float] | None = None
        token = None
        try:
            for part, path in plan:
                if path is None:
                    parts[part] = None
                    continue
                try:
                    compiled = self._compiled_template(path)
                    if compiled[3]:
                        if budget is None:
                            budget = new_budget()
                            token = _BUDGET.set(budget)
                        budget[2] = 0  # the size bound is per part
                    parts[part] = self._render_part(compiled, variables).strip()
                except Exception as exc:  # noqa: BLE001 - whatever a template does fails this message only
                    raise self._failure(path, channel, exc) from None
        finally:
            if token is not None:
                _BUDGET.reset(token)
        text = parts["text"] or ""
        if channel == "sms":
            return Rendered(chosen, text)
        html = parts.get("html") or _html_from_text(text)
        return Rendered(chosen, text, parts.get("subject") or "", html)

    def _failure(self, path: str, channel: str, exc: Exception) -> TemplateRenderError:
        """What went wrong rendering the part at PATH, for the message log: the file, the line and the reason."""
        if isinstance(exc, jinja2.TemplateNotFound):
            return TemplateRenderError(f"{path}: missing; a {channel} template needs {' and '.join(REQUIRED[channel])}")
        where = self._where(path, exc)
        if isinstance(exc, jinja2.UndefinedError):
            return TemplateRenderError(f"{where}: {exc.message}")
        if isinstance(exc, jinja2.TemplateError):  # syntax, the sandbox's SecurityError, RenderBoundError
            return TemplateRenderError(f"{where}: {exc}")
        if isinstance(exc, RecursionError):
            return TemplateRenderError(f"{where}: RecursionError: macros, includes or recursive loops call "
                                       "themselves too deeply")
        if isinstance(exc, MemoryError):
            return TemplateRenderError(f"{where}: MemoryError: the template built something too large")
        return TemplateRenderError(f"{where}: {type(exc).__name__}: {exc}")

    def _render_part(self, compiled: tuple[jinja2.Template, dict[str, Any], bool, bool],
                     variables: dict[str, Any]) -> str:
        template, template_globals, streams, _ = compiled
        # template.new_context(variables, shared=True), given the globals as a dict.
        context = self.env.context_class(self.env, variables, template.name, template.blocks, globals=template_globals)
        try:
            chunks = template.root_render_func(context)  # type: ignore[attr-defined]
            if streams:
                return _bounded_concat(chunks)
            # Every value the template writes was counted as it was made (see _BoundedCodeGenerator): what is left
            # to check is its own text, known in size once joined.
            text = "".join(chunks)
            if len(text) > MAX_PART_CHARS:
                raise _oversized()
            return text
        except Exception:  # noqa: BLE001 - re-raised by handle_exception, as Template.render does
            # As Template.render: the traceback is rewritten to point at the template's own lines.
            self.env.handle_exception()

    def _where(self, path: str, exc: BaseException) -> str:
        """FILE:LINE of the template line that failed (Jinja puts template frames in the traceback)."""
        line = None
        tb = exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename.endswith(SUFFIX):
                line = tb.tb_lineno
            tb = tb.tb_next
        shown = self.root / path
        return f"{shown}:{line}" if line else str(shown)

    # ----------------------------------------------------------------- filters

    @jinja2.pass_context
    def _money(self, ctx: Any, value: Any, currency: str | None = None) -> str:
        return _cached_money(value, currency or self.currency, ctx.get("_locale", "en"))

    @jinja2.pass_context
    def _number(self, ctx: Any, value: Any) -> str:
        locale = ctx.get("_locale", "en")
        if type(value) is int:
            symbols = _plain_grouping(locale)
            if symbols is not None:
                return _grouped(value, *symbols)
        return _cached_number(value, locale)

    @jinja2.pass_context
    def _date(self, ctx: Any, value: date | datetime | None, fmt: str = "long") -> str:
        if value is None:
            return ""
        if isinstance(value, datetime):
            value = value.astimezone(_zone(ctx)).date()
        return _cached_date(value, fmt, ctx.get("_locale", "en"))

    @jinja2.pass_context
    def _datetime(self, ctx: Any, value: datetime | None, fmt: str = "medium") -> str:
        if value is None:
            return ""
        return format_datetime(value, fmt, tzinfo=_zone(ctx), locale=_babel_locale(ctx.get("_locale", "en")))

    @jinja2.pass_context
    def _discount(self, ctx: Any, rate: float) -> str:
        """0.8 → 8折 in Chinese, "20% off" otherwise."""
        if str(ctx.get("_locale", "")).startswith("zh"):
            tenths = round(rate * 10, 1)
            return f"{tenths:g}折"
        return f"{round((1 - rate) * 100):g}% off"

    # ----------------------------------------------------------------- validation

    def check(self, name: str, channel: str) -> list[str]:
        """Problems with template NAME for CHANNEL, as messages (the caller positions them)."""
        messages: list[str] = []
        locales = [loc for loc in self.locales() if self._has(loc, name, "text") or self._has(loc, name, "subject")]
        if not locales:
            return [f"template {name!r} not found: expected {self.root.name}/{self.default_locale}/{name}.text{SUFFIX}"
                    + (f" and .subject{SUFFIX}" if channel == "email" else "")
                    + did_you_mean(name, self._names())]
        if self.default_locale not in locales:
            messages.append(f"template {name!r} has no {self.default_locale} version (the default locale); "
                            f"add {self.root.name}/{self.default_locale}/{name}.text{SUFFIX}")
        for locale in locales:
            for part in REQUIRED[channel]:
                if not self._has(locale, name, part):
                    messages.append(f"template {name!r} for {channel} needs "
                                    f"{self.root.name}/{locale}/{name}.{part}{SUFFIX}")
        return messages

    def _names(self) -> set[str]:
        """Every template name that has a file in some locale, e.g. welcome/welcome_email."""
        names = set()
        for locale in self.locales():
            for path in (self.root / locale).rglob(f"*{SUFFIX}"):
                stem, _, part = path.relative_to(self.root / locale).as_posix()[: -len(SUFFIX)].rpartition(".")
                if stem and part in PARTS["email"]:
                    names.add(stem)
        return names

    def syntax_problems(self) -> list[Problem]:
        """Every template file that does not compile or uses a variable the engine never provides."""
        problems: list[Problem] = []
        if not self.root.is_dir():
            return problems
        for path in sorted(self.root.rglob(f"*{SUFFIX}")):
            rel = path.relative_to(self.root).as_posix()
            shown = str(path)
            part = rel[: -len(SUFFIX)].rpartition(".")[2]
            if part not in PARTS["email"] or "/" not in rel:
                problems.append(Problem(shown, 1, 1, "template files are named templates/<locale>/<name>.subject.j2, "
                                        ".text.j2 or .html.j2; rename this file so the engine can find it"))
                continue
            try:
                source = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                problems.append(Problem(shown, 1, 1, "file is not UTF-8 text; save it as UTF-8"))
                continue
            try:
                ast = self.env.parse(source, rel, rel)
                self.env.compile(source, rel, rel)
            except jinja2.TemplateSyntaxError as exc:
                problems.append(Problem(shown, exc.lineno or 1, 1, f"template syntax error: {self._explain(exc)}"))
                continue
            for var in sorted(meta.find_undeclared_variables(ast) - CONTEXT_NAMES):
                line, col = _find_name(source, var)
                hint = did_you_mean(var, CONTEXT_NAMES, list_choices=False)
                problems.append(Problem(shown, line, col, f"unknown variable {var!r}{hint or ';'} "
                                        f"{'T' if hint else 't'}emplates can use: {', '.join(sorted(CONTEXT_NAMES))}"))
        return problems

    def _explain(self, exc: jinja2.TemplateSyntaxError) -> str:
        match = re.match(r"No filter named '([^']+)'", exc.message or "")
        if match:
            return f"unknown filter {match.group(1)!r}{did_you_mean(match.group(1), self.env.filters)}"
        return str(exc.message)


def _find_name(source: str, name: str) -> tuple[int, int]:
    """Line and column of the first use of variable NAME (a whole word, not part of a longer name)."""
    pattern = re.compile(rf"(?<![\w.]){re.escape(name)}\b")
    for number, text in enumerate(source.splitlines(), 1):
        match = pattern.search(text)
        if match:
            return number, match.start() + 1
    return 1, 1


# Babel formatting costs tens of microseconds a call; amounts, point balances and dates repeat a lot across
# members, so a large send formats each distinct value once per locale.


@lru_cache(maxsize=8192)
def _cached_money(value: Any, currency: str, locale: str) -> str:
    return str(format_currency(value, currency, locale=_babel_locale(locale)))


@lru_cache(maxsize=8192)
def _cached_number(value: Any, locale: str) -> str:
    return str(format_decimal(value, locale=_babel_locale(locale)))


# Whole numbers (points, counts) are the filter's common case and take many distinct values, so a cache misses
# often. Where a locale groups digits by threes with one symbol, Python's own grouping gives the same text; each
# locale is checked against Babel on a set of samples before the shortcut is used for it.
_GROUPING_SAMPLES = (0, 7, -7, 12, 999, 1000, 1234, -1234, 12345, 99999, 123456, 1234567, -1234567, 10**9 + 7,
                     -(10**12) - 345)


def _grouped(value: int, group: str, minus: str) -> str:
    text = f"{value:,}"
    if group != ",":
        text = text.replace(",", group)
    if value < 0 and minus != "-":
        text = minus + text[1:]
    return text


@lru_cache(maxsize=256)
def _plain_grouping(locale: str) -> tuple[str, str] | None:
    """(group symbol, minus sign) if LOCALE writes whole numbers as _grouped does, else None (Babel decides)."""
    babel_locale = _babel_locale(locale)
    try:
        symbols = (str(get_group_symbol(babel_locale)), str(get_minus_sign_symbol(babel_locale)))
    except (KeyError, ValueError):
        return None
    for sample in _GROUPING_SAMPLES:
        if _grouped(sample, *symbols) != str(format_decimal(sample, locale=babel_locale)):
            return None
    return symbols


@lru_cache(maxsize=8192)
def _cached_date(value: date, fmt: str, locale: str) -> str:
    return str(format_date(value, fmt, locale=_babel_locale(locale)))


def _zone(ctx: Any) -> ZoneInfo:
    name = ctx.get("_tz")
    if name is None:
        member = ctx.get("member")
        if isinstance(member, Mapping):
            name = member.get("timezone")
    # timeutil.zone caches by name; a name that is not a zone (or not a string) reads as UTC.
    return zone(name if isinstance(name, str) else None)


def _html_from_text(text: str) -> str:
    # Escaping neither makes nor removes blank lines or whitespace-only paragraphs: escape once, then split.
    paragraphs = [p.replace("\n", "<br>\n") for p in htmllib.escape(text).split("\n\n") if p.strip()]
    body = "\n".join(f"<p>{p}</p>" for p in paragraphs)
    return f'<!doctype html>\n<html><body style="font-family: sans-serif; line-height: 1.6">\n{body}\n</body></html>'
