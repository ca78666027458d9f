"""Jinja2's filters, bounded: the same results as the stock filters, but none may build more than a render allows
(engine.rules.sandbox_limits)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from functools import update_wrapper
from typing import Any

import jinja2
from jinja2 import filters as jfilters
from jinja2.utils import generate_lorem_ipsum
from markupsafe import soft_str

# ----------------------------------------------------------------- bounds of one render
# Templates are written by marketers, not attackers, but a slip (a loop inside a loop, a width typed as a huge
# number) must fail that one message quickly, never stall or exhaust the process that sends a million others.
#: Characters one part of a message (subject, text or html) may render, and the most any single step of a template
#: (``*``, ``%``, a format width, ``replace``, ``join``…) may build. A rich newsletter is a few hundred KB of HTML:
#: 1 MiB leaves it room three times over, and is already ten times what Gmail shows before clipping a message.
from engine.rules.sandbox_limits import (
    CONTAINERS,
    MAX_LOOP_ITERATIONS,
    MAX_PART_CHARS,
    RenderBoundError,
    check_digits,
    check_printf,
    check_size,
    oversized,
    printed_size,
    replace_size,
    too_big,
)


def _text_of(value: Any, what: str) -> str:
    """VALUE as the filter WHAT will read it: str(), once a list or dict is known to print at a bounded size."""
    if isinstance(value, CONTAINERS):
        check_size(what, printed_size(value))
    return str(value)


def _center(value: Any, width: int = 80) -> str:
    if isinstance(width, int):
        check_size("center", max(width, len(_text_of(value, "center"))))
    return jfilters.do_center(value, width)


def _indent(s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    text = _text_of(s, "indent")
    pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    check_size("indent", len(text) + (text.count("\n") + 2) * max(pad, 0))
    return jfilters.do_indent(s, width, first, blank)


@jinja2.pass_eval_context
def _replace_filter(eval_ctx: Any, s: Any, old: Any, new: Any, count: int | None = None) -> str:
    texts = (_text_of(s, "replace"), _text_of(old, "replace"), _text_of(new, "replace"))
    check_size("replace", replace_size(*texts, count))
    return jfilters.do_replace(eval_ctx, s, old, new, count)


def _format_filter(value: Any, *args: Any, **kwargs: Any) -> str:
    check_printf("format", _text_of(value, "format"), kwargs or args)
    return jfilters.do_format(value, *args, **kwargs)


@jinja2.pass_environment
def _wordwrap(environment: Any, s: Any, width: int = 79, break_long_words: bool = True,
              wrapstring: str | None = None, break_on_hyphens: bool = True) -> str:
    text = _text_of(s, "wordwrap")
    joint = len(wrapstring) if isinstance(wrapstring, str) else len(environment.newline_sequence)
    if isinstance(width, int) and width > 0:
        # Two lines in a row hold more than WIDTH characters (else they would be one): at most 2n/width lines.
        lines = 2 * len(text) // width + text.count("\n") + 1
        check_size("wordwrap", len(text) + lines * joint)
    return jfilters.do_wordwrap(environment, s, width, break_long_words, wrapstring, break_on_hyphens)


@jinja2.pass_eval_context
def _join_filter(eval_ctx: Any, value: Iterable[Any], d: str = "", attribute: str | int | None = None) -> str:
    if type(value) is list and type(d) is str and attribute is None and not eval_ctx.autoescape:
        # The common case (a tier's perks): text joined with text, counted and joined in C.
        try:
            size = sum(map(len, value)) + len(d) * len(value)
        except TypeError:
            pass  # numbers among the items
        else:
            if size > MAX_PART_CHARS:
                raise too_big("join", size)
            try:
                return d.join(value)
            except TypeError:  # lists among the items: str.join refuses anything but text before it allocates
                pass
    items = value if type(value) is list else list(value)
    if attribute is not None:
        items = list(map(jfilters.make_attrgetter(eval_ctx.environment, attribute), items))
    size = len(str(d)) * len(items)
    for item in items:
        size += len(item) if type(item) is str else printed_size(item)
    check_size("join", size)
    return jfilters.sync_do_join(eval_ctx, items, d)


def _batch(value: Iterable[Any], linecount: int, fill_with: Any = None) -> Iterator[list[Any]]:
    if fill_with is not None and isinstance(linecount, int):
        check_size("batch", linecount * (2 + printed_size(fill_with)))
    return jfilters.do_batch(value, linecount, fill_with)


def _slice(value: Any, slices: int, fill_with: Any = None) -> Iterator[list[Any]]:
    if isinstance(slices, int) and slices > MAX_LOOP_ITERATIONS:
        raise RenderBoundError(f"slice({slices:,}) would make more than {MAX_LOOP_ITERATIONS:,} slices")
    return jfilters.sync_do_slice(value, slices, fill_with)


def _round(value: Any, precision: int = 0, method: str = "common") -> float:
    if isinstance(precision, int):
        check_digits("round", abs(precision))
    return jfilters.do_round(value, precision, method)  # type: ignore[arg-type]


@jinja2.pass_environment
def _sum(environment: Any, iterable: Iterable[Any], attribute: str | int | None = None, start: Any = 0) -> Any:
    if type(start) is list or type(start) is tuple:
        # sum() of lists copies the growing total at every item; chain them instead, after counting.
        items = list(iterable if attribute is None else map(jfilters.make_attrgetter(environment, attribute),
                                                            iterable))
        if all(type(item) is type(start) for item in items):
            check_size("sum", printed_size(start) + sum(printed_size(item) for item in items))
            return type(start)(itertools.chain(start, *items))
        iterable, attribute = items, None
    return jfilters.sync_do_sum(environment, iterable, attribute, start)


def _stringified(name: str, convert: Callable[..., str]) -> Callable[..., str]:
    """A filter that prints its value (string, pprint), refusing a value that would print too large."""

    def bounded(value: Any, *args: Any, **kwargs: Any) -> str:
        if isinstance(value, CONTAINERS):
            check_size(name, printed_size(value))
        text = convert(value, *args, **kwargs)
        check_size(name, len(text))  # pprint doubles a text's backslashes each time
        return text

    return update_wrapper(bounded, convert)


@jinja2.pass_eval_context
def _tojson(eval_ctx: Any, value: Any, indent: int | None = None) -> Any:
    check_size("tojson", printed_size(value) * (1 + (indent if isinstance(indent, int) and indent > 0 else 0)))
    text = jfilters.do_tojson(eval_ctx, value, indent)
    check_size("tojson", len(text))  # escaped for html: "<" becomes "\u003c"
    return text


def bounded_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    if all(isinstance(x, int) for x in (n, min, max)):
        check_size("lipsum", n * (min if min > max else max) * 12)  # a word and its space: at most 12 characters
    return generate_lorem_ipsum(n, html, min, max)


BOUNDED_FILTERS: dict[str, Callable[..., Any]] = {
    "center": _center, "indent": _indent, "replace": _replace_filter, "format": _format_filter,
    "wordwrap": _wordwrap, "join": _join_filter, "batch": _batch, "slice": _slice, "round": _round, "sum": _sum,
    "string": _stringified("string", soft_str), "pprint": _stringified("pprint", jfilters.do_pprint), "tojson": _tojson,
}


def bounded_measured(name: str, bare: Callable[..., Any]) -> Callable[..., Any]:
    """Filter BARE, refusing text it returns larger than a message part, or a list that would print larger (list,
    sort… of one value many times over)."""

    def measured(*args: Any, **kwargs: Any) -> Any:
        result = bare(*args, **kwargs)
        if isinstance(result, str):
            if len(result) > MAX_PART_CHARS:
                raise too_big(name, len(result))
        elif isinstance(result, CONTAINERS):
            check_size(name, printed_size(result))
        return result

    return update_wrapper(measured, bare)  # keeps Jinja's pass_context / pass_environment mark


def bounded_concat(chunks: Iterable[str]) -> str:
    """``"".join`` for whole parts, macros and blocks, refusing past MAX_PART_CHARS while it reads the chunks."""
    if type(chunks) is list:
        if sum(map(len, chunks)) > MAX_PART_CHARS:
            raise oversized()
        return "".join(chunks)
    kept: list[str] = []
    keep = kept.append
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > MAX_PART_CHARS:
            raise oversized()
        keep(chunk)
    return "".join(kept)
