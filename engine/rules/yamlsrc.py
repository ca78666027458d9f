"""Strict YAML loading that remembers where every value came from.

Marketers edit YAML by hand, so the loader is explicit about types (YAML 1.2
core schema: only ``true``/``false`` are booleans, ``08:00`` and dates stay
strings, ``0800`` is not a number) and rejects duplicate keys. Mappings and
sequences come back as ``YMap``/``YSeq``, which carry the line and column of
each key and value so that every problem can be reported as FILE:LINE:COL.

Values are built straight from the parser's events, one at a time and without recursion (PyYAML's own
composer recurses once per level of nesting), so that no file can make the loader run away. Each limit is a
YamlSyntaxError where it is crossed, naming the fix:

- ``MAX_DEPTH`` levels of lists and mappings inside each other, aliases expanded: the code that reads the
  values afterwards (conditions, snapshots, JSON) walks them recursively.
- ``MAX_VALUES`` values per file, an alias counting as every value it repeats: a "billion laughs" file
  (aliases of aliases of anchors, ten deep) is refused in milliseconds at the alias that crosses the limit.
  An alias used inside the list or mapping it names would repeat forever and is refused too.
- whole numbers must fit in 64 bits (no column holds more, and ``int()`` refuses more than 4,300 digits) and
  decimals must be finite (``1.0e999`` is infinity, which neither the database nor JSON holds).

``MAX_BYTES`` is the size limit of a rules file; the rulebook checks it before reading the file.

The events come from libyaml when PyYAML has it (the same grammar and positions, about ten times faster than
the pure Python parser); when libyaml finds a syntax error the file is parsed again by the pure Python parser,
whose messages ``_explain`` rewords for marketers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.events import (
    AliasEvent,
    Event,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)
from yaml.nodes import ScalarNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import BaseResolver
from yaml.scanner import Scanner

try:
    from yaml._yaml import CParser

    _HAS_LIBYAML = True
except ImportError:  # PyYAML built without libyaml: the pure Python parser does all the work
    _HAS_LIBYAML = False

# A condition at its own limit (32 levels of all:/any:, two YAML levels each) still fits, so it gets the
# condition's message rather than this one.
MAX_DEPTH = 100
# A 10,000-step journey holds about 50,000 values; a file of more is written by a program, not a marketer.
MAX_VALUES = 100_000
MAX_BYTES = 1024 * 1024
_INT64 = (-(2**63), 2**63 - 1)


@dataclass(frozen=True)
class Mark:
    """A 1-based position in a source file."""

    line: int
    col: int


UNKNOWN = Mark(1, 1)


class YMap(dict[str, Any]):
    """A mapping that knows where it, its keys and its values are."""

    def __init__(self, mark: Mark = UNKNOWN) -> None:
        super().__init__()
        self.mark = mark
        self.key_marks: dict[str, Mark] = {}
        self.value_marks: dict[str, Mark] = {}

    def key_mark(self, key: str) -> Mark:
        return self.key_marks.get(key, self.mark)

    def value_mark(self, key: str) -> Mark:
        return self.value_marks.get(key, self.key_mark(key))


class YSeq(list[Any]):
    """A sequence that knows where it and its items are."""

    def __init__(self, mark: Mark = UNKNOWN) -> None:
        super().__init__()
        self.mark = mark
        self.item_marks: list[Mark] = []

    def item_mark(self, index: int) -> Mark:
        return self.item_marks[index] if 0 <= index < len(self.item_marks) else self.mark


class YamlSyntaxError(Exception):
    def __init__(self, message: str, mark: Mark) -> None:
        super().__init__(message)
        self.message = message
        self.mark = mark


class _CoreResolver(BaseResolver):
    pass


_CoreResolver.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_CoreResolver.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?(?:0|[1-9][0-9]*))$"), list("-+0123456789")
)
_CoreResolver.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:0|[1-9][0-9]*)\.[0-9]+(?:[eE][-+]?[0-9]+)?)$"),
    list("-+0123456789"),
)
_CoreResolver.add_implicit_resolver(
    "tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]
)


class _Events(Reader, Scanner, Parser, _CoreResolver):
    """Pure Python throughout: its error messages are the ones ``_explain`` rewords for marketers."""

    def __init__(self, stream: str) -> None:
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)
        _CoreResolver.__init__(self)


if _HAS_LIBYAML:

    class _FastEvents(CParser, _CoreResolver):  # type: ignore[misc]
        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            _CoreResolver.__init__(self)


_MAP = "tag:yaml.org,2002:map"
_NULL = "tag:yaml.org,2002:null"
_MERGE = "tag:yaml.org,2002:merge"
_NO_KEY = object()


@dataclass
class _Open:
    """A list or mapping being built."""

    value: YMap | YSeq
    depth: int  # lists and mappings open around it, itself included
    anchor: str | None
    values_before: int  # the file's value count before it (its own size is the difference at the end)
    deepest: int  # the deepest level within it so far, aliases expanded
    key: Any = _NO_KEY  # a mapping's key waiting for its value
    key_mark: Mark = UNKNOWN


@dataclass(frozen=True)
class _Anchor:
    value: Any
    mark: Mark
    yaml_mark: Any  # PyYAML's own, for its "duplicate anchor" message
    size: int = 0  # values, aliases expanded
    height: int = 0  # levels of lists and mappings, aliases expanded
    scalar: tuple[str, str] | None = None  # (tag, text) of an anchored scalar: it can also be used as a key
    done: bool = True


class _Builder:
    """Values from parser events: one loop and a stack of the lists and mappings open, never recursion."""

    def __init__(self, events: Any) -> None:
        self.events = events
        self.stack: list[_Open] = []
        self.anchors: dict[str, _Anchor] = {}
        self.values = 0
        self.result: Any = _NO_KEY

    def document(self) -> Any:
        """The single document of the stream (None if there is none), as Composer.get_single_node reads it."""
        events = self.events
        events.get_event()  # stream start
        if events.check_event(StreamEndEvent):
            return None
        events.get_event()  # document start
        first: Any = events.peek_event()
        value = self.node()
        events.get_event()  # document end
        if not events.check_event(StreamEndEvent):
            event = events.get_event()
            raise ComposerError("expected a single document in the stream", first.start_mark,
                                "but found another document", event.start_mark)
        events.get_event()
        return value

    def node(self) -> Any:
        """One whole value: the events up to where it ends."""
        get = self.events.get_event
        while self.result is _NO_KEY:
            event = get()
            kind = type(event)
            if kind is ScalarEvent:
                self.scalar(event)
            elif kind is MappingStartEvent or kind is SequenceStartEvent:
                self.open(event)
            elif kind is MappingEndEvent or kind is SequenceEndEvent:
                self.close()
            elif kind is AliasEvent:
                self.alias(event)
            else:  # the parser only gives nodes here; kept so that nothing else can loop forever
                raise YamlSyntaxError(f"unexpected {kind.__name__} in the YAML", _mark(event))
        return self.result

    def _in_key(self) -> bool:
        return bool(self.stack) and isinstance(self.stack[-1].value, YMap) and self.stack[-1].key is _NO_KEY

    def _new_anchor(self, event: Any) -> None:
        anchor = event.anchor
        if anchor is not None and anchor in self.anchors:
            raise ComposerError(f"found duplicate anchor {anchor!r}; first occurrence",
                                self.anchors[anchor].yaml_mark, "second occurrence", event.start_mark)

    def scalar(self, event: Any) -> None:
        self._new_anchor(event)
        tag = event.tag
        if tag is None or tag == "!":
            tag = self.events.resolve(ScalarNode, event.value, event.implicit)
        mark = _mark(event)
        value = _scalar(tag, event.value, mark)
        if self._in_key():
            self.key(tag, event.value, mark)
        else:
            self.count(1, event, alias=False)
            self.attach(value, mark)
        if event.anchor is not None:
            self.anchors[event.anchor] = _Anchor(value, mark, event.start_mark, 1, 0, (tag, event.value))

    def key(self, tag: str, text: str, mark: Mark) -> None:
        frame = self.stack[-1]
        mapping = frame.value
        assert isinstance(mapping, YMap)
        if tag == _MERGE or text == "<<":
            raise YamlSyntaxError("merge keys (<<) are not supported; write the keys out", mark)
        key = str(_scalar(tag, text, mark)) if tag != _NULL else ""
        if key in mapping.key_marks:
            first = mapping.key_marks[key]
            raise YamlSyntaxError(f"duplicate key {key!r} (first given on line {first.line}); keep only one", mark)
        frame.key, frame.key_mark = key, mark
        mapping.key_marks[key] = mark

    def open(self, event: Any) -> None:
        mark = _mark(event)
        if self._in_key():
            raise YamlSyntaxError("a key must be a plain word, not a list or mapping", mark)
        self._new_anchor(event)
        depth = len(self.stack) + 1
        self.deeper(depth, event, "")
        self.count(1, event, alias=False)
        container: YMap | YSeq = YMap(mark) if type(event) is MappingStartEvent else YSeq(mark)
        self.stack.append(_Open(container, depth, event.anchor, self.values - 1, depth))
        if event.anchor is not None:
            self.anchors[event.anchor] = _Anchor(container, mark, event.start_mark, done=False)

    def close(self) -> None:
        frame = self.stack.pop()
        if frame.anchor is not None:
            self.anchors[frame.anchor] = _Anchor(frame.value, frame.value.mark, self.anchors[frame.anchor].yaml_mark,
                                                 self.values - frame.values_before, frame.deepest - frame.depth + 1)
        if self.stack:
            self.stack[-1].deepest = max(self.stack[-1].deepest, frame.deepest)
        self.attach(frame.value, frame.value.mark)

    def alias(self, event: Any) -> None:
        anchor = self.anchors.get(event.anchor)
        if anchor is None:
            raise ComposerError(None, None, f"found undefined alias {event.anchor!r}", event.start_mark)
        if not anchor.done:
            raise YamlSyntaxError(f"the alias *{event.anchor} is used inside the list or mapping that "
                                  f"&{event.anchor} names, so it would repeat forever; write the values out",
                                  _mark(event))
        if self._in_key():
            if anchor.scalar is None:
                raise YamlSyntaxError("a key must be a plain word, not a list or mapping", anchor.mark)
            self.key(anchor.scalar[0], anchor.scalar[1], anchor.mark)
            return
        self.deeper(len(self.stack) + anchor.height, event, f" once the alias *{event.anchor} is expanded")
        self.count(anchor.size, event, alias=True)
        self.attach(anchor.value, anchor.mark)

    def attach(self, value: Any, mark: Mark) -> None:
        if not self.stack:
            self.result = value
            return
        frame = self.stack[-1]
        container = frame.value
        if isinstance(container, YMap):
            container[frame.key] = value
            container.value_marks[frame.key] = mark
            frame.key = _NO_KEY
        else:
            container.append(value)
            container.item_marks.append(mark)

    def deeper(self, depth: int, event: Event, how: str) -> None:
        if self.stack:
            self.stack[-1].deepest = max(self.stack[-1].deepest, depth)
        if depth > MAX_DEPTH:
            raise YamlSyntaxError(f"lists and mappings must be nested at most {MAX_DEPTH} levels deep, got: "
                                  f"{depth} levels here{how}; flatten the structure", _mark(event))

    def count(self, size: int, event: Event, *, alias: bool) -> None:
        self.values += size
        if self.values <= MAX_VALUES:
            return
        if alias:
            raise YamlSyntaxError(f"a file may hold at most {MAX_VALUES:,} values, counting an alias (*name) as "
                                  "every value it repeats, and this alias takes it past that; write the values out "
                                  "or split the file", _mark(event))
        raise YamlSyntaxError(f"a file may hold at most {MAX_VALUES:,} values, and this one has more; split the file",
                              _mark(event))


def _mark(event: Event) -> Mark:
    start = event.start_mark
    return UNKNOWN if start is None else Mark(start.line + 1, start.column + 1)


def _scalar(tag: str, value: str, mark: Mark) -> Any:
    if tag == "tag:yaml.org,2002:bool":
        return value.lower() == "true"
    if tag == "tag:yaml.org,2002:int":
        return _integer(value, mark)
    if tag == "tag:yaml.org,2002:float":
        number = float(value)
        if number in (float("inf"), float("-inf")):
            raise YamlSyntaxError(f"number {_cut(value)} is too large to store (it is infinite as a decimal); "
                                  "write a smaller number", mark)
        return number
    if tag == _NULL:
        return None
    if tag == "tag:yaml.org,2002:str":
        return value
    raise YamlSyntaxError(f"unsupported YAML tag {tag}; write plain values", mark)


def _integer(text: str, mark: Mark) -> int:
    # Digits are counted before int() is called: past 4,300 digits int() raises, and past 19 no column holds it.
    digits = text.lstrip("+-")
    number = int(text) if len(digits) <= 19 else None
    if number is None or not _INT64[0] <= number <= _INT64[1]:
        raise YamlSyntaxError(f"whole numbers must be between {_INT64[0]:,} and {_INT64[1]:,} (64 bits), got: "
                              f"{_cut(text)}; write a smaller number", mark)
    return number


def _cut(text: str) -> str:
    return text if len(text) <= 30 else f"{text[:20]}… ({len(text):,} characters)"


def load_yaml(text: str) -> Any:
    """Parse one YAML document; raise YamlSyntaxError with the position of the first problem."""
    if _HAS_LIBYAML:
        try:
            return _load(_FastEvents(text))
        except yaml.YAMLError:
            pass  # said again below by the pure parser, in the words _explain knows (libyaml's differ)
    try:
        return _load(_Events(text))
    except yaml.MarkedYAMLError as exc:
        message, where = _explain(exc, text)
        raise YamlSyntaxError(f"YAML syntax error: {message}", where) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(f"YAML syntax error: {exc}", UNKNOWN) from None


def _load(events: Any) -> Any:
    try:
        return _Builder(events).document()
    finally:
        events.dispose()


def _explain(exc: yaml.MarkedYAMLError, text: str) -> tuple[str, Mark]:
    """A marketer-readable message, positioned where the mistake is rather than where PyYAML noticed it."""
    mark = exc.problem_mark or exc.context_mark
    where = Mark(mark.line + 1, mark.column + 1) if mark else UNKNOWN
    start = exc.context_mark
    started = Mark(start.line + 1, start.column + 1) if start else where
    problem = exc.problem or "invalid YAML"
    if "'\\t'" in problem:
        return "YAML does not allow tab characters here; indent with spaces instead of tabs", where
    if "could not find expected ':'" in problem and exc.context == "while scanning a simple key":
        # PyYAML notices on the next line; the mistake is on the line where the key started.
        lines = text.splitlines()
        line = lines[started.line - 1] if started.line <= len(lines) else ""
        if "：" in line:
            hint = "use an English colon ':' followed by a space, not the full-width Chinese colon '：'"
        elif re.search(r"[^\s:]:[^\s:/]", line):
            hint = "put a space after ':' (write `send: email`, not `send:email`)"
        else:
            hint = "each line must be `key: value`; check indentation and quoting"
        return f"this line is not a `key: value` pair; {hint}", started
    if exc.context == "while scanning a quoted scalar":
        return "a quote opened here is never closed; add the closing quote", started
    if exc.context and start is not None and started.line != where.line:
        problem = f"{problem} ({exc.context} that started on line {started.line})"
    elif exc.context:
        problem = f"{problem} ({exc.context})"
    return f"{problem}; check indentation and quoting", where


def snippet(text: str, line: int, radius: int = 2, col: int | None = None) -> str:
    """The lines around LINE, numbered, with a marker on LINE (as dbt shows syntax errors).

    A long line is cut to a window (around COL on LINE): a 200,000-character line is not printed back in full.
    """
    lines = text.splitlines()
    out = []
    for number in range(max(1, line - radius), min(len(lines), line + radius) + 1):
        marker = ">" if number == line else " "
        out.append(f"  {marker} {number:4d} | {_window(lines[number - 1], col if number == line else None)}")
    return "\n".join(out)


def _window(line: str, col: int | None, width: int = 120) -> str:
    if len(line) <= width:
        return line
    start = max(0, min((col or 1) - 1 - width // 2, len(line) - width))
    return ("…" if start > 0 else "") + line[start:start + width] + ("…" if start + width < len(line) else "")
