"""Strict YAML loading that remembers where every value came from.

Marketers edit YAML by hand, so the loader is explicit about types (YAML 1.2
core schema: only ``true``/``false`` are booleans, ``08:00`` and dates stay
strings, ``0800`` is not a number) and rejects duplicate keys. Mappings and
sequences come back as ``YMap``/``YSeq``, which carry the line and column of
each key and value so that every problem can be reported as FILE:LINE:COL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import BaseResolver
from yaml.scanner import Scanner


@dataclass(frozen=True)
class Mark:
    """A 1-based position in a source file."""

    line: int
    col: int

    @classmethod
    def of(cls, node: Node) -> Mark:
        return cls(node.start_mark.line + 1, node.start_mark.column + 1)


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


class _Loader(Reader, Scanner, Parser, Composer, _CoreResolver):
    def __init__(self, stream: str) -> None:
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)
        Composer.__init__(self)
        _CoreResolver.__init__(self)


def _scalar(node: ScalarNode) -> Any:
    tag, value = node.tag, node.value
    if tag == "tag:yaml.org,2002:bool":
        return value.lower() == "true"
    if tag == "tag:yaml.org,2002:int":
        return int(value)
    if tag == "tag:yaml.org,2002:float":
        return float(value)
    if tag == "tag:yaml.org,2002:null":
        return None
    if tag == "tag:yaml.org,2002:str":
        return value
    raise YamlSyntaxError(f"unsupported YAML tag {tag}; write plain values", Mark.of(node))


def _build(node: Node) -> Any:
    if isinstance(node, ScalarNode):
        return _scalar(node)
    if isinstance(node, SequenceNode):
        seq = YSeq(Mark.of(node))
        for item in node.value:
            seq.append(_build(item))
            seq.item_marks.append(Mark.of(item))
        return seq
    if isinstance(node, MappingNode):
        mapping = YMap(Mark.of(node))
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                raise YamlSyntaxError("a key must be a plain word, not a list or mapping", Mark.of(key_node))
            if key_node.tag == "tag:yaml.org,2002:merge" or key_node.value == "<<":
                raise YamlSyntaxError("merge keys (<<) are not supported; write the keys out", Mark.of(key_node))
            key = str(_scalar(key_node)) if key_node.tag != "tag:yaml.org,2002:null" else ""
            if key in mapping:
                first = mapping.key_marks[key]
                raise YamlSyntaxError(
                    f"duplicate key {key!r} (first given on line {first.line}); keep only one", Mark.of(key_node)
                )
            mapping[key] = _build(value_node)
            mapping.key_marks[key] = Mark.of(key_node)
            mapping.value_marks[key] = Mark.of(value_node)
        return mapping
    raise YamlSyntaxError("unsupported YAML node", Mark.of(node))


def load_yaml(text: str) -> Any:
    """Parse one YAML document; raise YamlSyntaxError with the position of the first problem."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        message, where = _explain(exc, text)
        raise YamlSyntaxError(f"YAML syntax error: {message}", where) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(f"YAML syntax error: {exc}", UNKNOWN) from None
    finally:
        loader.dispose()
    return None if node is None else _build(node)


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


def snippet(text: str, line: int, radius: int = 2) -> str:
    """The lines around LINE, numbered, with a marker on LINE (as dbt shows syntax errors)."""
    lines = text.splitlines()
    out = []
    for number in range(max(1, line - radius), min(len(lines), line + radius) + 1):
        marker = ">" if number == line else " "
        out.append(f"  {marker} {number:4d} | {lines[number - 1]}")
    return "\n".join(out)
