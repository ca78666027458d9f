"""Message templates: Jinja2's sandbox, strict about undefined variables, per locale.

Layout: ``templates/<locale>/<name>.<part>.j2`` where part is ``subject``,
``text`` (both channels) or ``html`` (email, optional: derived from the text
when absent). ``html`` files are autoescaped. A member's locale falls back to
its language (``en-US`` → ``en``) and then to ``default_locale``.

Templates render in the bounded, immutable sandbox of engine.rules.sandbox; a template past one of its bounds, or
failing in any other way, fails that message with a TemplateRenderError naming the file, the line and why.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

import jinja2
from babel.dates import format_datetime
from jinja2 import meta

from engine.exceptions import TemplateRenderError
from engine.rules.formatting import (
    babel_locale_for,
    cached_date,
    cached_money,
    cached_number,
    grouped,
    html_from_text,
    plain_grouping,
    render_zone,
)
from engine.rules.problems import Problem, did_you_mean
from engine.rules.sandbox import METERED, STREAMS, BoundedSandbox
from engine.rules.sandbox_filters import bounded_concat
from engine.rules.sandbox_limits import BUDGET, MAX_PART_CHARS, new_budget, oversized

SUFFIX = ".j2"
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def one_line(text: str) -> str:
    """A header value from rendered text: line breaks and other control characters become one space, so no
    data in a template (a member's name with CR/LF) can start a header of its own."""
    return _CONTROLS.sub(" ", text).strip()


PARTS = {"email": ("subject", "text", "html"), "sms": ("text",)}
REQUIRED = {"email": ("subject", "text"), "sms": ("text",)}


# Exactly what engine.tick.context.ContextBuilder.build provides; anything else fails at send time.
CONTEXT_NAMES = frozenset({"member", "tier", "next_tier", "event", "journey", "now", "unsubscribe_url"})


@dataclass(frozen=True)
class Rendered:
    locale: str
    text: str
    subject: str | None = None
    html: str | None = None


#: a template file larger than this is not loaded (one part may render at most sandbox.MAX_PART_CHARS)
MAX_FILE_BYTES = 1024 * 1024


class Templates:
    """The templates in use, compiled and cached.

    They are rules like the journeys: read from the files, checked, and only good ones go into use. ``load()``
    (re)reads the folder: a file that does not compile, uses a variable no message has, or is not UTF-8 text is a
    problem and stays out of ``sources``; the App then puts that file's last good version back in (``keep()``),
    so that a template saved broken while the daemon runs does not fail the messages that use it. Rendering reads
    only ``sources``, never the files, so the compose worker (``use()``) renders exactly what the daemon does.
    """

    def __init__(self, root: Path, default_locale: str, currency: str = "CNY") -> None:
        self.root = root
        self.default_locale = default_locale
        self.currency = currency
        self.env = BoundedSandbox(
            loader=jinja2.FunctionLoader(self._source),
            undefined=jinja2.StrictUndefined,
            autoescape=lambda name: bool(name and name.endswith(".html" + SUFFIX)),
            auto_reload=False,
            keep_trailing_newline=False,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(money=self._money, date=self._date, datetime=self._datetime,
                                discount=self._discount, number=self._number)
        #: the source in use per path under the root (e.g. zh-CN/winback/first_touch.text.j2)
        self.sources: dict[str, str] = {}
        #: every template file found, good or not (a journey naming a broken one is still a valid journey)
        self.present: set[str] = set()
        #: why a file is not in use as written, by path
        self.broken: dict[str, Problem] = {}
        self._problems: list[Problem] = []
        self._loaded = False
        self._compiled: dict[str, tuple[jinja2.Template, dict[str, Any], bool, bool]] = {}
        self._resolved: dict[tuple[str, str], str | None] = {}
        self._plans: dict[tuple[str, str, str | None], tuple[str, tuple[tuple[str, str | None], ...]]] = {}

    def refresh(self) -> None:
        """Read the files again at the next use."""
        self._loaded = False
        self._forget()

    def _forget(self) -> None:
        self._compiled.clear()
        self._resolved.clear()
        self._plans.clear()
        self.env.cache.clear()  # type: ignore[union-attr]

    def _ensure(self) -> None:
        if not self._loaded:
            self.load()

    def _source(self, path: str) -> tuple[str, str, Callable[[], bool]] | None:
        self._ensure()
        source = self.sources.get(path)
        if source is None:
            return None
        return source, str(self.root / path), lambda: True  # reloads are ours (load, keep, use), not Jinja's

    # ----------------------------------------------------------------- loading

    def load(self) -> dict[str, str]:
        """Read and check every file under the root; put the good ones in use. Returns them, by path."""
        good: dict[str, str] = {}
        problems: list[Problem] = []
        broken: dict[str, Problem] = {}
        present: set[str] = set()
        if self.root.is_dir():
            for path in sorted(self.root.rglob(f"*{SUFFIX}")):
                rel = path.relative_to(self.root).as_posix()
                found = self._check_file(path, rel)
                if isinstance(found, str):
                    good[rel] = found
                    present.add(rel)
                    continue
                problems += found
                if found and _named_right(rel):
                    present.add(rel)
                    broken[rel] = found[0]
        self.sources, self.present, self.broken, self._problems = good, present, broken, problems
        self._loaded = True
        self._forget()
        return dict(good)

    def keep(self, path: str, source: str, note: str) -> None:
        """Use SOURCE (its last good version) for the broken file at PATH; NOTE says so in its problem."""
        self.sources[path] = source
        problem = self.broken.get(path)
        if problem is not None:
            self._annotate(path, note)
        self._forget()

    def _annotate(self, path: str, note: str) -> None:
        shown = str(self.root / path)
        self._problems = [Problem(p.file, p.line, p.col, f"{p.message}; {note}") if p.file == shown else p
                          for p in self._problems]

    def note_no_good_version(self, path: str) -> None:
        self._annotate(path, "it has no good version yet: messages that use it wait (tried again, then "
                             "quarantined) until it is fixed")

    def use(self, sources: Mapping[str, str]) -> None:
        """Exactly these sources (the compose worker gets the daemon's, last good versions included)."""
        self.sources, self.present, self.broken, self._problems = dict(sources), set(sources), {}, []
        self._loaded = True
        self._forget()

    def _check_file(self, path: Path, rel: str) -> str | list[Problem]:
        """The file's source if it is good, else its problems."""
        shown = str(path)
        if not _named_right(rel):
            return [Problem(shown, 1, 1, "template files are named templates/<locale>/<name>.subject.j2, "
                            ".text.j2 or .html.j2; rename this file so the engine can find it")]
        try:
            with path.open("rb") as handle:
                raw = handle.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            return [Problem(shown, 1, 1, f"cannot be read: {exc.strerror or exc}")]
        if len(raw) > MAX_FILE_BYTES:
            return [Problem(shown, 1, 1, f"a template file may be at most {MAX_FILE_BYTES // 1024:,} KiB; split it "
                            "or move long text out of it")]
        try:
            source = raw.decode("utf-8")
        except UnicodeDecodeError:
            return [Problem(shown, 1, 1, "file is not UTF-8 text; save it as UTF-8")]
        try:
            ast = self.env.parse(source, rel, rel)
            self.env.compile(source, rel, rel)
        except jinja2.TemplateSyntaxError as exc:
            return [Problem(shown, exc.lineno or 1, 1, f"template syntax error: {self._explain(exc)}")]
        problems = []
        for var in sorted(meta.find_undeclared_variables(ast) - CONTEXT_NAMES):
            line, col = _find_name(source, var)
            hint = did_you_mean(var, CONTEXT_NAMES, list_choices=False)
            problems.append(Problem(shown, line, col, f"unknown variable {var!r}{hint or ';'} "
                                    f"{'T' if hint else 't'}emplates can use: {', '.join(sorted(CONTEXT_NAMES))}"))
        return problems or source

    # ----------------------------------------------------------------- lookup

    def locales(self) -> list[str]:
        self._ensure()
        return sorted({p.split("/", 1)[0] for p in self.present})

    def _path(self, locale: str, name: str, part: str) -> str:
        return f"{locale}/{name}.{part}{SUFFIX}"

    def _has(self, locale: str, name: str, part: str) -> bool:
        """Whether the file exists (good or broken): what a journey that names the template needs."""
        self._ensure()
        return self._path(locale, name, part) in self.present

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
        output also streams from other templates or blocks and whether it loops or calls (see STREAMS)."""
        found = self._compiled.get(path)
        if found is None:
            template = self.env.get_template(path)
            module = template.root_render_func.__globals__  # type: ignore[attr-defined]
            found = self._compiled[path] = (template, dict(template.globals), bool(module.get(STREAMS)),
                                            module.get(METERED) is not False)
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
                            token = BUDGET.set(budget)
                        budget[2] = 0  # the size bound is per part
                    parts[part] = self._render_part(compiled, variables).strip()
                except Exception as exc:  # noqa: BLE001 - whatever a template does fails this message only
                    raise self._failure(path, channel, exc) from None
        finally:
            if token is not None:
                BUDGET.reset(token)
        text = parts["text"] or ""
        if channel == "sms":
            return Rendered(chosen, text)
        html = parts.get("html") or html_from_text(text)
        return Rendered(chosen, text, one_line(parts.get("subject") or ""), html)

    def _failure(self, path: str, channel: str, exc: Exception) -> TemplateRenderError:
        """What went wrong rendering the part at PATH, for the message log: the file, the line and the reason."""
        if isinstance(exc, jinja2.TemplateNotFound):
            problem = self.broken.get(path)
            if problem is not None:
                return TemplateRenderError(f"{problem.file}:{problem.line}: {problem.message.split('; ')[0]} (it has "
                                           "no good version yet)")
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
                return bounded_concat(chunks)
            # Every value the template writes was counted as it was made (see _BoundedCodeGenerator): what is left
            # to check is its own text, known in size once joined.
            text = "".join(chunks)
            if len(text) > MAX_PART_CHARS:
                raise oversized()
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
        return cached_money(value, currency or self.currency, ctx.get("_locale", "en"))

    @jinja2.pass_context
    def _number(self, ctx: Any, value: Any) -> str:
        locale = ctx.get("_locale", "en")
        if type(value) is int:
            symbols = plain_grouping(locale)
            if symbols is not None:
                return grouped(value, *symbols)
        return cached_number(value, locale)

    @jinja2.pass_context
    def _date(self, ctx: Any, value: date | datetime | None, fmt: str = "long") -> str:
        if value is None:
            return ""
        if isinstance(value, datetime):
            value = value.astimezone(render_zone(ctx)).date()
        return cached_date(value, fmt, ctx.get("_locale", "en"))

    @jinja2.pass_context
    def _datetime(self, ctx: Any, value: datetime | None, fmt: str = "medium") -> str:
        if value is None:
            return ""
        return format_datetime(value, fmt, tzinfo=render_zone(ctx), locale=babel_locale_for(ctx.get("_locale", "en")))

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
        self._ensure()
        names = set()
        for path in self.present:
            stem, _, part = path.split("/", 1)[1][: -len(SUFFIX)].rpartition(".")
            if stem and part in PARTS["email"]:
                names.add(stem)
        return names

    def syntax_problems(self) -> list[Problem]:
        """Every template file that is not in use as written (does not compile, uses a variable the engine never
        provides, is not UTF-8, is misnamed or too large), as of the last load."""
        self._ensure()
        return list(self._problems)

    def _explain(self, exc: jinja2.TemplateSyntaxError) -> str:
        match = re.match(r"No filter named '([^']+)'", exc.message or "")
        if match:
            return f"unknown filter {match.group(1)!r}{did_you_mean(match.group(1), self.env.filters)}"
        return str(exc.message)


def _named_right(rel: str) -> bool:
    """templates/<locale>/<name>.<part>.j2 with a known part."""
    return "/" in rel and rel[: -len(SUFFIX)].rpartition(".")[2] in PARTS["email"]


def _find_name(source: str, name: str) -> tuple[int, int]:
    """Line and column of the first use of variable NAME (a whole word, not part of a longer name)."""
    pattern = re.compile(rf"(?<![\w.]){re.escape(name)}\b")
    for number, text in enumerate(source.splitlines(), 1):
        match = pattern.search(text)
        if match:
            return number, match.start() + 1
    return 1, 1
