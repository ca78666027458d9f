"""The bounded Jinja2 sandbox message templates render in.

Jinja's immutable sandbox: a template cannot reach Python's internals, nor change the lists and dicts it is
given (a tier's perks are shared by every message of a batch). A render is bounded: loop iterations and
wall-clock time per message, characters per part, and what any one step (``*``, ``%``, a format width,
``replace``…) may build. Past a bound, the render raises RenderBoundError (a TemplateRuntimeError), which
engine.rules.templates turns into the TemplateRenderError of that one message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from functools import update_wrapper
from time import monotonic
from types import BuiltinMethodType, MethodType
from typing import Any

from jinja2 import filters as jfilters
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import Markup

from engine.rules.sandbox_filters import (
    BOUNDED_FILTERS,
    bounded_concat,
    bounded_lipsum,
    bounded_measured,
)

# ----------------------------------------------------------------- bounds of one render
# Templates are written by marketers, not attackers, but a slip (a loop inside a loop, a width typed as a huge
# number) must fail that one message quickly, never stall or exhaust the process that sends a million others.
#: Characters one part of a message (subject, text or html) may render, and the most any single step of a template
#: (``*``, ``%``, a format width, ``replace``, ``join``…) may build. A rich newsletter is a few hundred KB of HTML:
#: 1 MiB leaves it room three times over, and is already ten times what Gmail shows before clipping a message.
from engine.rules.sandbox_limits import (
    BUDGET,
    MAX_PART_CHARS,
    METHOD_CHECKS,
    BoundedEscapeFields,
    BoundedFields,
    check_plus,
    check_power,
    check_printf,
    check_repeat,
    check_size,
    metered,
    oversized,
    printed_size,
    too_slow,
)

#: Set in the module of every compiled template: whether its output also comes from other templates or blocks
#: (``extends``, ``block``, ``include``), streams not counted where they are written, so the part is counted chunk
#: by chunk as it is joined (see _BoundedCodeGenerator); and whether it loops, calls anything (macros included) or
#: brings in another template, the only ways a render can run long, which need the budget of the render.
STREAMS = "engine_streams_other_templates"


METERED = "engine_loops_or_calls"
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
        self.writeline(f"{STREAMS} = {node.find(_STREAMING_NODES) is not None!r}")  # type: ignore[arg-type]
        self.writeline(f"{METERED} = {node.find(_METERED_NODES) is not None!r}")  # type: ignore[arg-type]

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


class BoundedSandbox(ImmutableSandboxedEnvironment):
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
    concat = staticmethod(bounded_concat)  # type: ignore[assignment]

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
        # by filters that refuse before making it (BOUNDED_FILTERS).
        for name, bare in list(self.filters.items()):
            self.filters[name] = bounded_measured(name, bare)
        self.filters.update(BOUNDED_FILTERS)
        self.globals["lipsum"] = bounded_lipsum

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict and type(attribute) is str and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except KeyError:
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            check_repeat(left, right)
        elif operator == "+":
            check_plus(left, right)
        elif operator == "**":
            check_power(left, right)
        else:
            check_printf("'%'", left, right)
        return self.binop_table[operator](left, right)

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        budget = BUDGET.get()
        if budget is not None and monotonic() > budget[1]:
            raise too_slow()
        kind = type(obj)
        if kind is BuiltinMethodType or kind is MethodType:
            check = METHOD_CHECKS.get(obj.__name__)
            if check is not None:
                args = check(obj.__self__, args, kwargs, obj.__name__)
        elif kind is LoopContext and args:  # a recursive loop's loop(children): its items count too
            args = (metered(args[0]), *args[1:])
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
        formatter: BoundedFields
        if isinstance(template, Markup):
            formatter = BoundedEscapeFields(self, escape=template.escape)
        else:
            formatter = BoundedFields(self)

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
    meter = staticmethod(metered)

    @staticmethod
    def bounded_join(join: Callable[[Iterable[Any]], str], items: tuple[Any, ...]) -> str:
        check_size("'~'", sum(len(item) if type(item) is str else printed_size(item) for item in items))
        return join(items)

    @staticmethod
    def built(value: Any) -> Any:
        check_size("a list, tuple or dict", printed_size(value))
        return value

    @staticmethod
    def measure(value: Any) -> int:
        """The size of a value written out that is not plain text (Markup, a number, a list printed whole)."""
        return printed_size(value)

    @staticmethod
    def overflow() -> Any:
        raise oversized()
