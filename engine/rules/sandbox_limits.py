"""The bounds of one render in the template sandbox (engine.rules.sandbox): characters per part and per step,
loop iterations and wall-clock time per message, and the checks on what one operator or method call may build."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from time import monotonic
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEscapeFormatter, SandboxedFormatter

# ----------------------------------------------------------------- bounds of one render
# Templates are written by marketers, not attackers, but a slip (a loop inside a loop, a width typed as a huge
# number) must fail that one message quickly, never stall or exhaust the process that sends a million others.

#: Characters one part of a message (subject, text or html) may render, and the most any single step of a template
#: (``*``, ``%``, a format width, ``replace``, ``join``…) may build. A rich newsletter is a few hundred KB of HTML:
#: 1 MiB leaves it room three times over, and is already ten times what Gmail shows before clipping a message.


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


CONTAINERS = (list, tuple, dict, set, frozenset)
_TEXT = (str, bytes)
_SEQUENCES = (str, bytes, list, tuple)


class RenderBoundError(jinja2.TemplateRuntimeError):
    """A template went past one of the bounds of a render (size, loop iterations, time)."""


def too_big(what: str, size: int | float) -> RenderBoundError:
    return RenderBoundError(f"{what} would make {size:,.0f} characters, more than the 1 MiB "
                            f"({MAX_PART_CHARS:,} characters) a message part may hold")


def printed_size(value: Any, limit: int = MAX_PART_CHARS) -> int:
    """About how many characters ``str(VALUE)`` takes: the length of text; for lists, tuples, dicts and sets the sum
    over their items (an item listed twice counts twice, as it prints twice); one for anything else. Counting stops
    a little past LIMIT."""
    if type(value) is str:
        return len(value)
    return _weigh(value, {}, limit)


def _weigh(value: Any, seen: dict[int, int], limit: int) -> int:
    if isinstance(value, _TEXT):
        return len(value)
    if not isinstance(value, CONTAINERS):
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


def check_size(what: str, size: int | float) -> None:
    if size > MAX_PART_CHARS:
        raise too_big(what, size)


def check_digits(what: str, digits: float) -> None:
    if digits > MAX_NUMBER_DIGITS:
        raise RenderBoundError(f"{what} would make a number of {digits:,.0f} digits; a template's numbers may have "
                               f"at most {MAX_NUMBER_DIGITS:,}")


#: The budget of the message being rendered, set by Templates.render: [loop iterations left and the deadline on
#: the monotonic clock, both for the whole message; characters the current part's loops wrote as their own text].
#: A list: the cheapest thing to make once per message.
BUDGET: ContextVar[list[float] | None] = ContextVar("engine_template_budget", default=None)


def new_budget() -> list[float]:
    return [MAX_LOOP_ITERATIONS, monotonic() + RENDER_SECONDS, 0]


def too_slow() -> RenderBoundError:
    return RenderBoundError(f"took longer than {RENDER_SECONDS:g} s to render; look for loops nested in loops or a "
                            "macro that calls itself")


#: A list or tuple this short is charged in one go as its loop starts, without a generator between the loop and
#: each item (the perks of a tier, say): between two looks at the clock its iterations can do little, as every
#: loop and call inside them looks again.
_CHARGED_AT_ONCE = 16


def metered(iterable: Iterable[Any], static: int = 0) -> Iterable[Any]:
    """What every ``{% for %}`` loops over: the items of ITERABLE, each charged to the message's budget, with STATIC
    characters of the loop body's own text."""
    budget = BUDGET.get() or new_budget()  # rendered outside Templates.render: this loop alone is bounded
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
        raise too_slow()
    if static:
        budget[2] += static * iterations
        if budget[2] > MAX_PART_CHARS:
            raise oversized()


def check_repeat(left: Any, right: Any) -> None:
    """``*``: text or a list repeated, or a product of whole numbers."""
    if isinstance(left, int) and isinstance(right, int):
        check_digits("'*'", (left.bit_length() + right.bit_length()) * math.log10(2))
        return
    sequence, count = (right, left) if isinstance(left, int) else (left, right)
    if isinstance(count, int) and isinstance(sequence, _SEQUENCES):
        check_size("'*'", printed_size(sequence) * max(count, 0))


def check_plus(left: Any, right: Any) -> None:
    """``+``: text or lists joined (a loop that doubles a text each time would otherwise outgrow memory)."""
    if isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
        check_size("'+'", printed_size(left) + printed_size(right))


def check_power(base: Any, exponent: Any) -> None:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        check_digits("'**'", exponent * math.log10(abs(base)))


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
            total += max(numbers) + printed_size(value)
        start = text.find("%", at + 1)
    return total


def check_printf(what: str, fmt: Any, values: Any) -> None:
    if isinstance(fmt, _TEXT) and ("%" in fmt if isinstance(fmt, str) else b"%" in fmt):
        check_size(what, _printf_size(fmt, values))


_SPEC_NUMBER = re.compile(r"\d+")


class BoundedFields(SandboxedFormatter):
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
                raise too_big(f"format {{:{format_spec[:40]}}}", int(number) if len(number) <= 30 else math.inf)
        if isinstance(value, CONTAINERS):
            check_size("format", self.made + printed_size(value))
        text = super().format_field(value, format_spec)
        self.made += len(text)
        check_size("format", self.made)
        return text


class BoundedEscapeFields(BoundedFields, SandboxedEscapeFormatter):
    """The same for ``Markup.format`` (html templates), which escapes each field."""


# Methods reachable from templates that can make far more than they are given, by name; each check gets the object
# the method belongs to and the call's arguments, and returns the arguments to call with (``join`` reads its
# argument once, so it is materialised for counting).
_Args = tuple[Any, ...]


def _padded(owner: Any, args: _Args, kwargs: dict[str, Any], name: str) -> _Args:
    width = args[0] if args else 0
    if isinstance(owner, _TEXT) and isinstance(width, int):
        check_size(f"{name}()", max(width, len(owner)))
    return args


def _expandtabs(owner: Any, args: _Args, kwargs: dict[str, Any], name: str) -> _Args:
    size = args[0] if args else kwargs.get("tabsize", 8)
    if isinstance(owner, _TEXT) and isinstance(size, int):
        tabs = owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")
        check_size("expandtabs()", len(owner) + tabs * max(size, 0))
    return args


def replace_size(text: Any, old: Any, new: Any, count: Any) -> int:
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
        check_size("replace()", replace_size(owner, args[0], args[1], count))
    return args


def _join_method(owner: Any, args: _Args, kwargs: dict[str, Any], name: str) -> _Args:
    if not isinstance(owner, _TEXT) or len(args) != 1:
        return args
    items = list(args[0])
    check_size("join()", len(owner) * max(len(items) - 1, 0) + sum(len(i) for i in items if isinstance(i, _TEXT)))
    return (items,)


def _translate(owner: Any, args: _Args, kwargs: dict[str, Any], name: str) -> _Args:
    table = args[0] if args else None
    if isinstance(owner, str) and isinstance(table, Mapping | list | tuple):
        values = table.values() if isinstance(table, Mapping) else table
        longest = max((len(v) for v in values if isinstance(v, str)), default=1)
        check_size("translate()", len(owner) * max(longest, 1))
    return args


def _to_bytes(owner: Any, args: _Args, kwargs: dict[str, Any], name: str) -> _Args:
    length = args[0] if args else kwargs.get("length", 1)
    if isinstance(owner, int) and isinstance(length, int):
        check_size("to_bytes()", length)
    return args


def _fromkeys(owner: Any, args: _Args, kwargs: dict[str, Any], name: str) -> _Args:
    if not (isinstance(owner, type) and issubclass(owner, dict) and args):
        return args
    keys = list(args[0])
    value = args[1] if len(args) > 1 else None
    check_size("fromkeys()", len(keys) * (4 + printed_size(value)) + printed_size(keys))
    return (keys, *args[1:])


METHOD_CHECKS: dict[str, Callable[[Any, _Args, dict[str, Any], str], _Args]] = {
    "ljust": _padded, "rjust": _padded, "center": _padded, "zfill": _padded, "expandtabs": _expandtabs,
    "replace": _replace, "join": _join_method, "translate": _translate, "to_bytes": _to_bytes,
    "fromkeys": _fromkeys,
}


def oversized() -> RenderBoundError:
    return RenderBoundError(f"rendered more than 1 MiB ({MAX_PART_CHARS:,} characters); a message part must be "
                            "smaller")
