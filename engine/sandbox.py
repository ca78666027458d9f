"""The bounded Jinja2 sandbox message templates render in.

Jinja's immutable sandbox: a template cannot reach Python's internals, nor change the lists and dicts it is
given (a tier's perks are shared by every message of a batch). A render is bounded: loop iterations and
wall-clock time per message, characters per part, and what any one step (``*``, ``%``, a format width,
``replace``…) may build. Past a bound, the render raises RenderBoundError (a TemplateRuntimeError), which
engine.templates turns into the TemplateRenderError of that one message.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from functools import update_wrapper
from time import monotonic
from types import BuiltinMethodType, MethodType
from typing import Any

import jinja2
from jinja2 import filters as jfilters
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter
from jinja2.utils import generate_lorem_ipsum
from markupsafe import Markup, soft_str

# ----------------------------------------------------------------- bounds of one render
# Templates are written by marketers, not attackers, but a slip (a loop inside a loop, a width typed as a huge
# number) must fail that one message quickly, never stall or exhaust the process that sends a million others.

#: Characters one part of a message (subject, text or html) may render, and the most any single step of a template
#: (``*``, ``%``, a format width, ``replace``, ``join``…) may build. A rich newsletter is a few hundred KB of HTML:
#: 1 MiB leaves it room three times over, and is already ten times what Gmail shows before clipping a message.
MAX_PART_CHARS = 1024 * 1024
#: Loop iterations in one message, every loop and nested loop together. A newsletter's loop over 50 products, each
#: with 20 options, is 1,050 iterations; Jinja's sandbox already stops a single range() at 100,000 items, and this
#: applies the same count to loops nested in loops, which otherwise multiply (100,000 × 100,000 never ends).
MAX_LOOP_ITERATIONS = 100_000
#: Wall-clock seconds one message may take to render, checked at every loop iteration and every call (macros
#: included). The shipped templates render in 4–25 µs a message (bench/render.py), a newsletter with a 50-product
#: loop and a 300 KB body in about 2 ms: 2 s leaves room for a loaded machine, yet stops a runaway template (a
#: macro calling itself twice per call) before one message holds up the send for long.
RENDER_SECONDS = 2.0
#: Digits a number computed in a template may have: Python itself refuses to print a longer int
#: (sys.int_info.default_max_str_digits), so a larger one can never reach a message, only cost time to compute.
MAX_NUMBER_DIGITS = 4300

_CONTAINERS = (list, tuple, dict, set, frozenset)
_TEXT = (str, bytes)
_SEQUENCES = (str, bytes, list, tuple)


class RenderBoundError(jinja2.TemplateRuntimeError):
    """A template went past one of the bounds of a render (size, loop iterations, time)."""


def _too_big(what: str, size: int | float) -> RenderBoundError:
    return RenderBoundError(f"{what} would make {size:,.0f} characters, more than the 1 MiB "
                            f"({MAX_PART_CHARS:,} characters) a message part may hold")


def _size(value: Any, limit: int = MAX_PART_CHARS) -> int:
    """About how many characters ``str(VALUE)`` takes: the length of text; for lists, tuples, dicts and sets the sum
    over their items (an item listed twice counts twice, as it prints twice); one for anything else. Counting stops
    a little past LIMIT."""
    if type(value) is str:
        return len(value)
    return _weigh(value, {}, limit)


def _weigh(value: Any, seen: dict[int, int], limit: int) -> int:
    if isinstance(value, _TEXT):
        return len(value)
    if not isinstance(value, _CONTAINERS):
        return 1
    known = seen.get(id(value))  # every object walked stays alive under VALUE: ids are not reused meanwhile
    if known is not None:
        return known
    total = 2
    if isinstance(value, dict):
        for key, item in value.items():
            total += 4 + _weigh(key, seen, limit) + _weigh(item, seen, limit)
            if total > limit:
                break
    else:
        for item in value:
            total += 2 + _weigh(item, seen, limit)
            if total > limit:
                break
    seen[id(value)] = total
    return total


def _check_size(what: str, size: int | float) -> None:
    if size > MAX_PART_CHARS:
        raise _too_big(what, size)


def _check_digits(what: str, digits: float) -> None:
    if digits > MAX_NUMBER_DIGITS:
        raise RenderBoundError(f"{what} would make a number of {digits:,.0f} digits; a template's numbers may have "
                               f"at most {MAX_NUMBER_DIGITS:,}")


#: The budget of the message being rendered, set by Templates.render: [loop iterations left and the deadline on
#: the monotonic clock, both for the whole message; characters the current part's loops wrote as their own text].
#: A list: the cheapest thing to make once per message.
_BUDGET: ContextVar[list[float] | None] = ContextVar("engine_template_budget", default=None)


def new_budget() -> list[float]:
    return [MAX_LOOP_ITERATIONS, monotonic() + RENDER_SECONDS, 0]


def _too_slow() -> RenderBoundError:
    return RenderBoundError(f"took longer than {RENDER_SECONDS:g} s to render; look for loops nested in loops or a "
                            "macro that calls itself")


#: A list or tuple this short is charged in one go as its loop starts, without a generator between the loop and
#: each item (the perks of a tier, say): between two looks at the clock its iterations can do little, as every
#: loop and call inside them looks again.
_CHARGED_AT_ONCE = 16


def _metered(iterable: Iterable[Any], static: int = 0) -> Iterable[Any]:
    """What every ``{% for %}`` loops over: the items of ITERABLE, each charged to the message's budget, with STATIC
    characters of the loop body's own text."""
    budget = _BUDGET.get() or new_budget()  # rendered outside Templates.render: this loop alone is bounded
    if (type(iterable) is list or type(iterable) is tuple) and len(iterable) <= _CHARGED_AT_ONCE:
        _spend(budget, len(iterable), static)
        return iterable
    return _charge(iterable, budget, static)


def _charge(iterable: Iterable[Any], budget: list[float], static: int) -> Iterator[Any]:
    for item in iterable:
        _spend(budget, 1, static)
        yield item


def _spend(budget: list[float], iterations: int, static: int) -> None:
    budget[0] -= iterations
    if budget[0] < 0:
        raise RenderBoundError(f"more than {MAX_LOOP_ITERATIONS:,} loop iterations in one message; a loop goes "
                               "over too many items, or loops are nested in loops")
    if monotonic() > budget[1]:
        raise _too_slow()
    if static:
        budget[2] += static * iterations
        if budget[2] > MAX_PART_CHARS:
            raise _oversized()


# ------------------------------------------- what one step of a template may build


def _check_repeat(left: Any, right: Any) -> None:
    """``*``: text or a list repeated, or a product of whole numbers."""
    if isinstance(left, int) and isinstance(right, int):
        _check_digits("'*'", (left.bit_length() + right.bit_length()) * math.log10(2))
        return
    sequence, count = (right, left) if isinstance(left, int) else (left, right)
    if isinstance(count, int) and isinstance(sequence, _SEQUENCES):
        _check_size("'*'", _size(sequence) * max(count, 0))


def _check_plus(left: Any, right: Any) -> None:
    """``+``: text or lists joined (a loop that doubles a text each time would otherwise outgrow memory)."""
    if isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
        _check_size("'+'", _size(left) + _size(right))


def _check_power(base: Any, exponent: Any) -> None:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        _check_digits("'**'", exponent * math.log10(abs(base)))


def _printf_size(fmt: str | bytes, values: Any) -> int:
    """About how many characters ``FMT % VALUES`` makes: the format, plus per directive the larger of its width and
    precision and the size of the value it shows."""
    text = fmt.decode("latin-1") if isinstance(fmt, bytes) else fmt
    positional = values if isinstance(values, tuple) else (values,)
    taken = 0
    total = len(text)
    start = text.find("%")
    while start >= 0:
        at, key = start + 1, None
        if text.startswith("(", at):  # %(name)s: the key may hold balanced parentheses
            depth, end = 1, at + 1
            while end < len(text) and depth:
                depth += (text[end] == "(") - (text[end] == ")")
                end += 1
            key, at = text[at + 1:end - 1], end
        while at < len(text) and text[at] in "#0- +":
            at += 1
        numbers = []
        for _ in range(2):  # width, then precision after a dot
            if text.startswith("*", at):
                star = positional[taken] if taken < len(positional) else 0
                numbers.append(abs(star) if isinstance(star, int) else 0)  # a negative width pads on the right
                taken, at = taken + 1, at + 1
            else:
                digits = re.match(r"\d*", text[at:at + 24]).group()  # type: ignore[union-attr]
                numbers.append(int(digits) if digits else 0)
                at += len(digits)
            if not text.startswith(".", at):
                break
            at += 1
        while at < len(text) and text[at] in "hlL":
            at += 1
        conversion = text[at:at + 1]
        if conversion != "%":
            if key is not None:
                value = values.get(key) if isinstance(values, Mapping) else None
            else:
                value = positional[taken] if taken < len(positional) else None
                taken += 1
            total += max(numbers) + _size(value)
        start = text.find("%", at + 1)
    return total


def _check_printf(what: str, fmt: Any, values: Any) -> None:
    if isinstance(fmt, _TEXT) and ("%" in fmt if isinstance(fmt, str) else b"%" in fmt):
        _check_size(what, _printf_size(fmt, values))


_SPEC_NUMBER = re.compile(r"\d+")


class _BoundedFields(SandboxedFormatter):
    """The sandbox's ``str.format``: a field wider than a message part is refused before it is made, and the fields
    of one call may not add up to more than a part either."""

    made = 0

    def vformat(self, format_string: str, args: Any, kwargs: Any) -> str:
        self.made = 0
        return super().vformat(format_string, args, kwargs)

    def format_field(self, value: Any, format_spec: str) -> Any:
        room = MAX_PART_CHARS - self.made
        for number in _SPEC_NUMBER.findall(format_spec):  # width and precision, resolved ({:>{w}} included)
            if len(number) > 7 or int(number) > room:
                raise _too_big(f"format {{:{format_spec[:40]}}}", int(number) if len(number) <= 30 else math.inf)
        if isinstance(value, _CONTAINERS):
            _check_size("format", self.made + _size(value))
        text = super().format_field(value, format_spec)
        self.made += len(text)
        _check_size("format", self.made)
        return text


class _BoundedEscapeFields(_BoundedFields, SandboxedEscapeFormatter):
    """The same for ``Markup.format`` (html templates), which escapes each field."""


# Methods reachable from templates that can make far more than they are given, by name; each check gets the object
# the method belongs to and the call's arguments, and returns the arguments to call with (``join`` reads its
# argument once, so it is materialised for counting).
_Args = tuple[Any, ...]


def _padded(owner: Any, args: _Args, kwargs: dict[str, Any], name: str) -> _Args:
    width = args[0] if args else 0
    if isinstance(owner, _TEXT) and isinstance(width, int):
        _check_size(f"{name}()", max(width, len(owner)))
    return args


def _expandtabs(owner: Any, args: _Args, kwargs: dict[str, Any], name: str) -> _Args:
    size = args[0] if args else kwargs.get("tabsize", 8)
    if isinstance(owner, _TEXT) and isinstance(size, int):
        tabs = owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")
        _check_size("expandtabs()", len(owner) + tabs * max(size, 0))
    return args


def _replace_size(text: Any, old: Any, new: Any, count: Any) -> int:
    kind = str if isinstance(text, str) else bytes if isinstance(text, bytes) else None
    if kind is None or not isinstance(old, kind) or not isinstance(new, kind):
        return 0  # replace() refuses mixed types itself
    found = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    return len(text) + found * (len(new) - len(old))


def _replace(owner: Any, args: _Args, kwargs: dict[str, Any], name: str) -> _Args:
    if len(args) >= 2:
        count = args[2] if len(args) > 2 else kwargs.get("count", -1)
        _check_size("replace()", _replace_size(owner, args[0], args[1], count))
    return args


def _join_method(owner: Any, args: _Args, kwargs: dict[str, Any], name: str) -> _Args:
    if not isinstance(owner, _TEXT) or len(args) != 1:
        return args
    items = list(args[0])
    _check_size("join()", len(owner) * max(len(items) - 1, 0) + sum(len(i) for i in items if isinstance(i, _TEXT)))
    return (items,)


def _translate(owner: Any, args: _Args, kwargs: dict[str, Any], name: str) -> _Args:
    table = args[0] if args else None
    if isinstance(owner, str) and isinstance(table, Mapping | list | tuple):
        values = table.values() if isinstance(table, Mapping) else table
        longest = max((len(v) for v in values if isinstance(v, str)), default=1)
        _check_size("translate()", len(owner) * max(longest, 1))
    return args


def _to_bytes(owner: Any, args: _Args, kwargs: dict[str, Any], name: str) -> _Args:
    length = args[0] if args else kwargs.get("length", 1)
    if isinstance(owner, int) and isinstance(length, int):
        _check_size("to_bytes()", length)
    return args


def _fromkeys(owner: Any, args: _Args, kwargs: dict[str, Any], name: str) -> _Args:
    if not (isinstance(owner, type) and issubclass(owner, dict) and args):
        return args
    keys = list(args[0])
    value = args[1] if len(args) > 1 else None
    _check_size("fromkeys()", len(keys) * (4 + _size(value)) + _size(keys))
    return (keys, *args[1:])


_METHOD_CHECKS: dict[str, Callable[[Any, _Args, dict[str, Any], str], _Args]] = {
    "ljust": _padded, "rjust": _padded, "center": _padded, "zfill": _padded, "expandtabs": _expandtabs,
    "replace": _replace, "join": _join_method, "translate": _translate, "to_bytes": _to_bytes,
    "fromkeys": _fromkeys,
}


# The built-in filters that can make far more than they are given, in front of Jinja's own.

def _text_of(value: Any, what: str) -> str:
    """VALUE as the filter WHAT will read it: str(), once a list or dict is known to print at a bounded size."""
    if isinstance(value, _CONTAINERS):
        _check_size(what, _size(value))
    return str(value)


def _center(value: Any, width: int = 80) -> str:
    if isinstance(width, int):
        _check_size("center", max(width, len(_text_of(value, "center"))))
    return jfilters.do_center(value, width)


def _indent(s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    text = _text_of(s, "indent")
    pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    _check_size("indent", len(text) + (text.count("\n") + 2) * max(pad, 0))
    return jfilters.do_indent(s, width, first, blank)


@jinja2.pass_eval_context
def _replace_filter(eval_ctx: Any, s: Any, old: Any, new: Any, count: int | None = None) -> str:
    texts = (_text_of(s, "replace"), _text_of(old, "replace"), _text_of(new, "replace"))
    _check_size("replace", _replace_size(*texts, count))
    return jfilters.do_replace(eval_ctx, s, old, new, count)


def _format_filter(value: Any, *args: Any, **kwargs: Any) -> str:
    _check_printf("format", _text_of(value, "format"), kwargs or args)
    return jfilters.do_format(value, *args, **kwargs)


@jinja2.pass_environment
def _wordwrap(environment: Any, s: Any, width: int = 79, break_long_words: bool = True,
              wrapstring: str | None = None, break_on_hyphens: bool = True) -> str:
    text = _text_of(s, "wordwrap")
    joint = len(wrapstring) if isinstance(wrapstring, str) else len(environment.newline_sequence)
    if isinstance(width, int) and width > 0:
        # Two lines in a row hold more than WIDTH characters (else they would be one): at most 2n/width lines.
        lines = 2 * len(text) // width + text.count("\n") + 1
        _check_size("wordwrap", len(text) + lines * joint)
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
                raise _too_big("join", size)
            try:
                return d.join(value)
            except TypeError:  # lists among the items: str.join refuses anything but text before it allocates
                pass
    items = value if type(value) is list else list(value)
    if attribute is not None:
        items = list(map(jfilters.make_attrgetter(eval_ctx.environment, attribute), items))
    size = len(str(d)) * len(items)
    for item in items:
        size += len(item) if type(item) is str else _size(item)
    _check_size("join", size)
    return jfilters.sync_do_join(eval_ctx, items, d)


def _batch(value: Iterable[Any], linecount: int, fill_with: Any = None) -> Iterator[list[Any]]:
    if fill_with is not None and isinstance(linecount, int):
        _check_size("batch", linecount * (2 + _size(fill_with)))
    return jfilters.do_batch(value, linecount, fill_with)


def _slice(value: Any, slices: int, fill_with: Any = None) -> Iterator[list[Any]]:
    if isinstance(slices, int) and slices > MAX_LOOP_ITERATIONS:
        raise RenderBoundError(f"slice({slices:,}) would make more than {MAX_LOOP_ITERATIONS:,} slices")
    return jfilters.sync_do_slice(value, slices, fill_with)


def _round(value: Any, precision: int = 0, method: str = "common") -> float:
    if isinstance(precision, int):
        _check_digits("round", abs(precision))
    return jfilters.do_round(value, precision, method)  # type: ignore[arg-type]


@jinja2.pass_environment
def _sum(environment: Any, iterable: Iterable[Any], attribute: str | int | None = None, start: Any = 0) -> Any:
    if type(start) is list or type(start) is tuple:
        # sum() of lists copies the growing total at every item; chain them instead, after counting.
        items = list(iterable if attribute is None else map(jfilters.make_attrgetter(environment, attribute),
                                                            iterable))
        if all(type(item) is type(start) for item in items):
            _check_size("sum", _size(start) + sum(_size(item) for item in items))
            return type(start)(itertools.chain(start, *items))
        iterable, attribute = items, None
    return jfilters.sync_do_sum(environment, iterable, attribute, start)


def _stringified(name: str, convert: Callable[..., str]) -> Callable[..., str]:
    """A filter that prints its value (string, pprint), refusing a value that would print too large."""

    def bounded(value: Any, *args: Any, **kwargs: Any) -> str:
        if isinstance(value, _CONTAINERS):
            _check_size(name, _size(value))
        text = convert(value, *args, **kwargs)
        _check_size(name, len(text))  # pprint doubles a text's backslashes each time
        return text

    return update_wrapper(bounded, convert)


@jinja2.pass_eval_context
def _tojson(eval_ctx: Any, value: Any, indent: int | None = None) -> Any:
    _check_size("tojson", _size(value) * (1 + (indent if isinstance(indent, int) and indent > 0 else 0)))
    text = jfilters.do_tojson(eval_ctx, value, indent)
    _check_size("tojson", len(text))  # escaped for html: "<" becomes "\u003c"
    return text


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    if all(isinstance(x, int) for x in (n, min, max)):
        _check_size("lipsum", n * (min if min > max else max) * 12)  # a word and its space: at most 12 characters
    return generate_lorem_ipsum(n, html, min, max)


_BOUNDED_FILTERS: dict[str, Callable[..., Any]] = {
    "center": _center, "indent": _indent, "replace": _replace_filter, "format": _format_filter,
    "wordwrap": _wordwrap, "join": _join_filter, "batch": _batch, "slice": _slice, "round": _round, "sum": _sum,
    "string": _stringified("string", soft_str), "pprint": _stringified("pprint", jfilters.do_pprint), "tojson": _tojson,
}


def _measured(name: str, bare: Callable[..., Any]) -> Callable[..., Any]:
    """Filter BARE, refusing text it returns larger than a message part, or a list that would print larger (list,
    sort… of one value many times over)."""

    def measured(*args: Any, **kwargs: Any) -> Any:
        result = bare(*args, **kwargs)
        if isinstance(result, str):
            if len(result) > MAX_PART_CHARS:
                raise _too_big(name, len(result))
        elif isinstance(result, _CONTAINERS):
            _check_size(name, _size(result))
        return result

    return update_wrapper(measured, bare)  # keeps Jinja's pass_context / pass_environment mark


def _bounded_concat(chunks: Iterable[str]) -> str:
    """``"".join`` for whole parts, macros and blocks, refusing past MAX_PART_CHARS while it reads the chunks."""
    if type(chunks) is list:
        if sum(map(len, chunks)) > MAX_PART_CHARS:
            raise _oversized()
        return "".join(chunks)
    kept: list[str] = []
    keep = kept.append
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > MAX_PART_CHARS:
            raise _oversized()
        keep(chunk)
    return "".join(kept)


def _oversized() -> RenderBoundError:
    return RenderBoundError(f"rendered more than 1 MiB ({MAX_PART_CHARS:,} characters); a message part must be "
                            "smaller")


#: Set in the module of every compiled template: whether its output also comes from other templates or blocks
#: (``extends``, ``block``, ``include``), streams not counted where they are written, so the part is counted chunk
#: by chunk as it is joined (see _BoundedCodeGenerator); and whether it loops, calls anything (macros included) or
#: brings in another template, the only ways a render can run long, which need the budget of the render.
_STREAMS = "engine_streams_other_templates"
_METERED = "engine_loops_or_calls"
_STREAMING_NODES = (nodes.Extends, nodes.Block, nodes.Include)
_METERED_NODES = (nodes.For, nodes.Call, nodes.CallBlock, nodes.Include, nodes.Import, nodes.FromImport,
                  nodes.Extends)
#: A plain-text template with no more ``{{ … }}`` than this, and nothing that loops, calls or brings in another
#: template (most messages: the shipped ones write 1 to 9 values), has its values counted once joined instead of
#: one by one: each is at most MAX_PART_CHARS (every step that builds text is bounded), so at most this many MiB
#: exist before the part is refused, and the values cost nothing to write (~35 ns each when counted).
_UNCOUNTED_VALUES = 16
_NOT_STRAIGHT = (*_METERED_NODES, nodes.Macro, nodes.EvalContextModifier)


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator with the bounds of a render compiled in.

    - every ``{% for %}`` iterates through ``environment.meter(items, static)``: the message's loop budget, the
      clock, and STATIC characters of the loop body's own text per iteration;
    - every value written out (``{{ … }}``, a call block, an included template's chunk…) is counted, in a local of
      the function writing it (``_n`` in root and block functions, ``t_1n`` beside a buffer ``t_1``), before the
      next is made: a part stops at MAX_PART_CHARS however its loops and macros multiply it. Text is counted inline;
      anything else (a list printed whole) by ``environment.measure``. A short plain-text template that neither
      loops nor calls is measured once joined instead (see _UNCOUNTED_VALUES);
    - every ``~`` goes through ``environment.bounded_join``, every list, tuple or dict written in a template
      through ``environment.built``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The For nodes' iterables by id (Jinja allows no new node types), with their loop body's text length.
        self._loop_iterables: dict[int, int] = {}
        self._count_values = True  # see _UNCOUNTED_VALUES; decided per template

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        values = sum(1 for output in node.find_all(nodes.Output) for child in output.nodes
                     if not isinstance(child, nodes.TemplateData))
        straight = node.find(_NOT_STRAIGHT) is None  # type: ignore[arg-type]
        html = bool(nodes.EvalContext(self.environment, self.name).autoescape)
        self._count_values = values > _UNCOUNTED_VALUES or not straight or html
        super().visit_Template(node, frame)
        self.writeline(f"{_STREAMS} = {node.find(_STREAMING_NODES) is not None!r}")  # type: ignore[arg-type]
        self.writeline(f"{_METERED} = {node.find(_METERED_NODES) is not None!r}")  # type: ignore[arg-type]

    def write_commons(self) -> None:
        super().write_commons()  # the start of root and block functions, which yield their output
        self.writeline("_n = 0")

    def buffer(self, frame: Frame) -> None:
        super().buffer(frame)  # macros, call and filter blocks, {% set %} blocks, recursive loops
        self.writeline(f"{frame.buffer}n = 0")

    def _counter(self, frame: Frame) -> str:
        return "_n" if frame.buffer is None else f"{frame.buffer}n"

    def _output_child_pre(self, node: nodes.Expr, frame: Frame, finalize: Any) -> None:
        super()._output_child_pre(node, frame, finalize)
        if self._count_values:
            n = self._counter(frame)
            self.write(f"(_o if ({n} := {n} + (len(_o) if (_o := ")

    def _output_child_post(self, node: nodes.Expr, frame: Frame, finalize: Any) -> None:
        if self._count_values:
            self.write(f").__class__ is str else environment.measure(_o))) <= {MAX_PART_CHARS} "
                       "else environment.overflow())")
        super()._output_child_post(node, frame, finalize)

    def start_write(self, frame: Frame, node: nodes.Node | None = None) -> None:
        super().start_write(frame, node)  # included templates' chunks, call and filter blocks, recursive loops
        n = self._counter(frame)
        self.write(f"(_o if ({n} := {n} + environment.measure(_o := ")

    def end_write(self, frame: Frame) -> None:
        self.write(f")) <= {MAX_PART_CHARS} else environment.overflow())")
        super().end_write(frame)

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        self._loop_iterables[id(node.iter)] = sum(len(text.data) for text in _own_text(node.body))
        super().visit_For(node, frame)

    def visit(self, node: nodes.Node, *args: Any, **kwargs: Any) -> Any:
        static = self._loop_iterables.get(id(node))
        if static is None:
            return super().visit(node, *args, **kwargs)
        self.write("environment.meter(")
        super().visit(node, *args, **kwargs)
        self.write(f", {static})")
        return None

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile:
            join = "(markup_join if context.eval_ctx.volatile else str_join)"
        elif frame.eval_ctx.autoescape:
            join = "markup_join"
        else:
            join = "str_join"
        self.write(f"environment.bounded_join({join}, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def _literal(self, visit: Callable[[Any, Frame], None], node: Any, frame: Frame) -> None:
        self.write("environment.built(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node: nodes.List, frame: Frame) -> None:
        self._literal(super().visit_List, node, frame)

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:
        self._literal(super().visit_Dict, node, frame)

    def visit_Tuple(self, node: nodes.Tuple, frame: Frame) -> None:
        if node.ctx == "load":
            self._literal(super().visit_Tuple, node, frame)
        else:  # a loop's or a {% set %}'s targets
            super().visit_Tuple(node, frame)


def _own_text(body: list[nodes.Node]) -> Iterator[nodes.TemplateData]:
    """The template text a loop body writes each time round: not that of loops inside it (their own meter counts
    it) nor of macros it defines."""
    for node in body:
        if isinstance(node, nodes.TemplateData):
            yield node
        elif not isinstance(node, nodes.For | nodes.Macro | nodes.CallBlock):
            yield from _own_text(list(node.iter_child_nodes()))


_DICT_ATTRIBUTES = frozenset(dir(dict))


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox, with the bounds of a render and a shortcut for ``member.name`` on plain dicts.

    Immutable: ``append``, ``update``, ``pop`` and the like on lists, dicts and sets are refused, so a template can
    never change what the next message is rendered from (a member's tier and its perks are shared, for one).

    The shortcut: for a plain dict, ``getattr`` fails for every name dict itself lacks, and the sandbox then looks
    the key up: going straight to the key gives the same answers (and the same undefined) without raising and
    catching an AttributeError per lookup. Every other object, and every name a dict does have (its mutating
    methods among them), takes the sandbox's own path.
    """

    code_generator_class = _BoundedCodeGenerator
    # The operators that can build far more than they are given: repeat, power, printf-style widths, and "+" (which
    # doubles a text each time round a loop). Intercepted operators are not folded at compile time either, so
    # `validate`, which compiles every template, never builds a huge constant.
    intercepted_binops = frozenset({"*", "**", "%", "+"})
    concat = staticmethod(_bounded_concat)  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The environment is never async: built-in filters with an async variant (join, map, sum…) get their
        # plain version, without the wrapper that asks on every call which one to run.
        for name in list(self.filters):
            plain = getattr(jfilters, f"sync_do_{name}", None)
            if plain is not None:
                self.filters[name] = plain
        # Every built-in filter's text is measured once made: some make a few times what they are given (escape,
        # urlencode, pprint, upper…), which chained would multiply. Those that could make far more are replaced
        # by filters that refuse before making it (_BOUNDED_FILTERS).
        for name, bare in list(self.filters.items()):
            self.filters[name] = _measured(name, bare)
        self.filters.update(_BOUNDED_FILTERS)
        self.globals["lipsum"] = _lipsum

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict and type(attribute) is str and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except KeyError:
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            _check_repeat(left, right)
        elif operator == "+":
            _check_plus(left, right)
        elif operator == "**":
            _check_power(left, right)
        else:
            _check_printf("'%'", left, right)
        return self.binop_table[operator](left, right)

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        if budget is not None and monotonic() > budget[1]:
            raise _too_slow()
        kind = type(obj)
        if kind is BuiltinMethodType or kind is MethodType:
            check = _METHOD_CHECKS.get(obj.__name__)
            if check is not None:
                args = check(obj.__self__, args, kwargs, obj.__name__)
        elif kind is LoopContext and args:  # a recursive loop's loop(children): its items count too
            args = (_metered(args[0]), *args[1:])
        return super().call(context, obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """As the sandbox's own, with formatters that bound what a field may make."""
        if not isinstance(value, MethodType | BuiltinMethodType) or value.__name__ not in ("format", "format_map"):
            return None
        template = value.__self__
        if not isinstance(template, str):
            return None
        str_type = type(template)
        is_format_map = value.__name__ == "format_map"
        formatter: _BoundedFields
        if isinstance(template, Markup):
            formatter = _BoundedEscapeFields(self, escape=template.escape)
        else:
            formatter = _BoundedFields(self)

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs:
                    raise TypeError("format_map() takes no keyword arguments")
                if len(args) != 1:
                    raise TypeError(f"format_map() takes exactly one argument ({len(args)} given)")
                kwargs, args = args[0], ()
            return str_type(formatter.vformat(template, args, kwargs))

        return update_wrapper(wrapper, value)

    # Called by the code _BoundedCodeGenerator writes.
    meter = staticmethod(_metered)

    @staticmethod
    def bounded_join(join: Callable[[Iterable[Any]], str], items: tuple[Any, ...]) -> str:
        _check_size("'~'", sum(len(item) if type(item) is str else _size(item) for item in items))
        return join(items)

    @staticmethod
    def built(value: Any) -> Any:
        _check_size("a list, tuple or dict", _size(value))
        return value

    @staticmethod
    def measure(value: Any) -> int:
        """The size of a value written out that is not plain text (Markup, a number, a list printed whole)."""
        return _size(value)

    @staticmethod
    def overflow() -> Any:
        raise _oversized()
