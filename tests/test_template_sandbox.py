"""The template sandbox: a template cannot reach past its own message, and a render is bounded in work, time and
size. What a marketer's mistake (or a pasted exploit) costs is one failed message that names the file and the bound,
never a changed message for someone else, a hung send or a process out of memory."""

from __future__ import annotations

import shutil
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
import pytest
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.exceptions import TemplateRenderError
from engine.rules import sandbox_limits as sandbox_module
from engine.rules.rulebook import load_rulebook
from engine.rules.templates import Templates
from engine.testing import REPO, Harness
from engine.tick.context import ContextBuilder

NOW = datetime(2026, 3, 2, 2, 0, tzinfo=UTC)
#: What a refused step may allocate while it is refused: far below the strings it was asked to build (1 GB and up).
SMALL = 20_000_000


def member(member_id: str, name: str, **extra: Any) -> dict[str, Any]:
    return {"id": member_id, "name": name, "email": f"{member_id}@example.com", "phone": "13800138000",
            "timezone": "Asia/Shanghai", "locale": "zh-CN", "tier": "silver", "email_opt_in": True,
            "sms_opt_in": True, **extra}


class Scratch:
    """A templates folder of one's own: write a template (each under a new name), render it for a context."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.templates = Templates(root, "en")
        self.written = 0

    def write(self, source: str, part: str = "text", name: str | None = None) -> str:
        """Write SOURCE as PART of template NAME (default: a new name); return the name."""
        if name is None:
            self.written += 1
            name = f"t/m{self.written}"
        path = self.root / "en" / f"{name}.{part}.j2"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")
        # Straight into use, as written: these tests are about the sandbox, not about which files the loader lets
        # in (a template naming a variable no message has is kept out by Templates.load).
        self.templates.use({f.relative_to(self.root).as_posix(): f.read_text(encoding="utf-8")
                            for f in self.root.rglob("*.j2")})
        return name

    def render(self, source: str, context: dict[str, Any] | None = None, *, part: str = "text") -> str:
        return self._render(source, context, part)[1]

    def _render(self, source: str, context: dict[str, Any] | None, part: str) -> tuple[str, str]:
        name = self.write(source, part)
        channel = "sms" if part == "text" else "email"
        if channel == "email":
            for other in ("subject", "text"):
                if other != part:
                    self.write("x", other, name)
        rendered = self.templates.render(name, channel, "en", CONTEXT if context is None else context)
        return name, {"text": rendered.text, "subject": rendered.subject, "html": rendered.html}[part] or ""

    def fails(self, source: str, context: dict[str, Any] | None = None, *, part: str = "text") -> str:
        """The message a render of SOURCE fails with (it must fail), checked to name the template file."""
        with pytest.raises(TemplateRenderError) as caught:
            self._render(source, context, part)
        message = str(caught.value)
        assert f"en/t/m{self.written}.{part}.j2" in message
        return message


def peak_of(work: Callable[[], Any]) -> int:
    """The peak of Python's allocations while WORK runs, in bytes."""
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


CONTEXT: dict[str, Any] = {"member": {"name": "Amy", "points": 1200}, "tier": {"name": "Gold", "perks": ["a", "b"]},
                           "unsubscribe_url": "https://crm.example.com/u/1", "numbers": list(range(2000)),
                           "pages": ["x" * 1_000_000] * 100}  # a list of 100 times the same megabyte


@pytest.fixture
def scratch(tmp_path: Path) -> Scratch:
    return Scratch(tmp_path / "templates")


# ---------------------------------------------------------------------- nothing a template does reaches another


MUTATIONS = [
    "tier.perks.append('INJECTED')", "tier.perks.extend(['INJECTED'])", "tier.perks.insert(0, 'INJECTED')",
    "tier.perks.pop()", "tier.perks.remove(tier.perks[0])", "tier.perks.clear()", "tier.perks.sort(reverse=true)",
    "tier.perks.reverse()", "tier.update({'name': 'INJECTED'})", "tier.pop('name')", "tier.clear()",
    "tier.setdefault('perks2', 'INJECTED')", "tier.popitem()", "tier['perks'].append('INJECTED')",
    "(tier.perks|attr('append'))('INJECTED')", "'{0.append}'.format(tier.perks)",
]


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_a_template_cannot_change_what_the_next_member_of_the_tier_sees(tmp_path: Path, mutation: str) -> None:
    """One ContextBuilder (one batch) shares a tier's dict and its perks between members, as the composer does."""
    scratch = Scratch(tmp_path / "templates")
    loyalty = load_rulebook(REPO / "rules", None).loyalty
    contexts = ContextBuilder(loyalty, "en", "Asia/Shanghai", computed=[])
    journey = {"id": "j", "name": "j", "version": 1}
    first = contexts.build(member("m1", "Lin", locale="en"), NOW, journey, None, "https://u/1")
    perks_before = list(first["tier"]["perks"])
    name = scratch.write("{% if member.id == 'm1' %}{{ " + mutation + " }}{% endif %}"
                         "{{ member.name }}: {{ tier.name }}, {{ tier.perks|join(', ') }}")

    with pytest.raises(TemplateRenderError, match="unsafe"):
        scratch.templates.render(name, "sms", "en", first)
    second = contexts.build(member("m2", "Wang", locale="en"), NOW, journey, None, "https://u/2")
    assert second["tier"] is first["tier"]  # the very dict the first template tried to change
    assert scratch.templates.render(name, "sms", "en", second).text == f"Wang: Silver, {', '.join(perks_before)}"
    assert contexts.tier("silver", "en")["perks"] == perks_before


def test_a_welcome_email_that_tries_to_append_a_perk_fails_and_the_next_member_gets_the_real_perks(
        tmp_path: Path, db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """The story end to end: two members sign up and are sent the welcome email in one tick (one batch, one
    ContextBuilder). The zh-CN email tries to add a perk for Lin: her email is not sent and the error names the file
    and the refused call; Wang's goes out with the programme's perks and nothing else."""
    root = tmp_path / "templates"
    shutil.copytree(REPO / "templates", root)
    (root / "zh-CN/welcome/welcome_email.text.j2").write_text(
        "{% if member.name == '林小雨' %}{{ tier.perks.append('免费午餐') }}{% endif %}"
        "{{ member.name }}，您好！您的权益：{{ tier.perks | join('、') }}\n退订邮件：{{ unsubscribe_url }}\n",
        encoding="utf-8")
    home = tmp_path / "home"
    home.mkdir()
    harness = Harness(home, db_url, templates=root)
    try:
        harness.members(member("m1", "林小雨", tier="regular"), member("m2", "王伟", tier="regular"))
        harness.event("m1", "signup", "2026-03-02T10:00:00+08:00")
        harness.event("m2", "signup", "2026-03-02T10:00:00+08:00")
        harness.tick("2026-03-02T10:05:00+08:00")
        harness.tick("2026-03-02T10:35:00+08:00")
        [sent] = harness.sent("email")
        assert sent.member_id == "m2"
        assert "王伟，您好！您的权益：积分累计、生日礼遇\n" in sent.text
        assert "免费午餐" not in sent.text
        assert all(row["status"] != "sent" for row in harness.log(member_id="m1", step="welcome_email"))
        assert any("zh-CN/welcome/welcome_email.text.j2" in r.getMessage() and "'append'" in r.getMessage()
                   and "unsafe" in r.getMessage() for r in caplog.records)
    finally:
        harness.close()


def test_the_dict_shortcut_answers_as_the_immutable_sandbox() -> None:
    """member.name on a plain dict skips the sandbox's AttributeError round trip: same answers, mutators refused."""
    templates = Templates(REPO / "templates", "zh-CN")
    plain = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined)
    values = {"name": "x", "items": "shadowed", "keys": 1, "__class__": "k", "_private": 2, "update": 3}
    for attribute in ("name", "items", "keys", "get", "__class__", "_private", "missing", "update", "copy", "pop",
                      "setdefault", "clear"):
        ours, theirs = templates.env.getattr(values, attribute), plain.getattr(values, attribute)
        assert type(ours) is type(theirs)
        if isinstance(theirs, jinja2.Undefined):
            assert str(ours._undefined_hint) == str(theirs._undefined_hint)
        else:
            assert ours == theirs


# ---------------------------------------------------------------------- well-known injection payloads


@pytest.mark.parametrize("payload", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ().__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'] }}",
    "{{ lipsum.__globals__.__builtins__.__import__('os') }}",
    "{{ range.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ self.__init__.__globals__ }}",
    "{{ config }}",
    "{{ config.items() }}",
    "{{ request.application.__globals__ }}",
    "{{ member.__class__.__base__ }}",
    "{{ member|attr('__class__') }}",
    "{{ member|attr('\\x5f\\x5fclass\\x5f\\x5f') }}",
    "{{ '{0.__class__.__mro__}'.format('') }}",
    "{{ dict.mro() }}",
    "{{ ''.encode.__self__ }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
])
def test_injection_payloads_fail_and_leak_nothing(scratch: Scratch, payload: str) -> None:
    message = scratch.fails(payload)
    assert "<class" not in message and "<module" not in message and "<function" not in message
    assert "unsafe" in message or "undefined" in message or "mro" in message


# ---------------------------------------------------------------------- loops and time


def test_nested_loops_fail_at_the_loop_bound(scratch: Scratch) -> None:
    message = scratch.fails("{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}"
                            "{% endfor %}")
    assert "more than 100,000 loop iterations" in message
    assert f"en/t/m{scratch.written}.text.j2:1:" in message
    # Short lists are counted in one go as their loop starts: they count all the same.
    assert "more than 100,000 loop iterations" in scratch.fails(
        "{% for i in range(10000) %}{% for j in [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] %}{% endfor %}{% endfor %}")


def test_loops_count_together_across_the_parts_of_one_message_but_afresh_for_the_next(scratch: Scratch) -> None:
    loop = "{% for i in range(60000) %}{% endfor %}{{ member.name }}"
    name = scratch.write(loop, "subject")
    scratch.write(loop, "text", name)
    with pytest.raises(TemplateRenderError, match="more than 100,000 loop iterations"):
        scratch.templates.render(name, "email", "en", CONTEXT)
    assert scratch.templates.render(name, "sms", "en", CONTEXT).text == "Amy"  # the text part alone: 60,000
    assert scratch.templates.render(name, "sms", "en", CONTEXT).text == "Amy"  # and again, a new message


def test_recursive_loops_count_every_level(scratch: Scratch) -> None:
    message = scratch.fails("{% for x in range(400) recursive %}{% if loop.depth < 4 %}{{ loop(range(400)) }}"
                            "{% endif %}{% endfor %}")
    assert "more than 100,000 loop iterations" in message


def test_a_slow_loop_fails_at_the_deadline(scratch: Scratch, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each iteration is cheap to write and slow to run; the clock stops the loop, not the iteration count."""
    monkeypatch.setattr(sandbox_module, "RENDER_SECONDS", 0.05)
    message = scratch.fails("{% for i in range(90000) %}{{ ('x' * 200000)|replace('x', 'yy')|length }}"
                            "{% endfor %}")
    assert "took longer than 0.05 s" in message


def test_a_macro_calling_itself_twice_fails_at_the_deadline(scratch: Scratch, monkeypatch: pytest.MonkeyPatch) -> None:
    """2**40 calls and no loop at all: every call looks at the clock."""
    monkeypatch.setattr(sandbox_module, "RENDER_SECONDS", 0.05)
    message = scratch.fails("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
                            "{{ f(40) }}")
    assert "took longer than 0.05 s" in message


def test_a_macro_calling_itself_forever_fails_cleanly(scratch: Scratch) -> None:
    message = scratch.fails("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}")
    assert "RecursionError" in message and "call themselves" in message


# ---------------------------------------------------------------------- size


@pytest.mark.parametrize("source", [
    "{{ 'x' * 3000000000 }}",
    "{{ 3000000000 * 'x' }}",
    "{{ ['x'] * 3000000000 }}",
    "{{ '{:>1000000000}'.format('x') }}",
    "{{ '{:>{w}}'.format('x', w=1000000000) }}",
    "{{ '{:.1000000000f}'.format(1.5) }}",
    "{{ '{0:>1000000}'.format('x') ~ ('{0:>900000}' * 2).format('x') }}",
    "{{ '%1000000000s' % 'x' }}",
    "{{ '%*s' % (1000000000, 'x') }}",
    "{{ '%(a)1000000000s' % {'a': 'x'} }}",
    "{{ '%.1000000000f' % 1.5 }}",
    "{{ 'x'|center(1000000000) }}",
    "{{ 'x'|indent(1000000000, true) }}",
    "{{ 'x'|format() ~ '%1000000000s'|format('x') }}",
    "{{ 'x'|replace('', 'xxxxxxxxxx')|replace('', 'xxxxxxxxxx')|replace('', 'xxxxxxxxxx')|replace('', 'xxxxxxxxxx')"
    "|replace('', 'xxxxxxxxxx')|replace('', 'xxxxxxxxxx')|replace('', 'xxxxxxxxxx')|replace('', 'xxxxxxxxxx') }}",
    "{{ 'xx'.replace('x', 'xxxxxxxxxxxxxxxxxxxx').replace('x', 'xxxxxxxxxxxxxxxxxxxx').replace('x', "
    "'xxxxxxxxxxxxxxxxxxxx').replace('x', 'xxxxxxxxxxxxxxxxxxxx').replace('x', 'xxxxxxxxxxxxxxxxxxxx')"
    ".replace('x', 'xxxxxxxxxxxxxxxxxxxx').replace('x', 'xxxxxxxxxxxxxxxxxxxx') }}",
    "{{ 'x'.ljust(1000000000) }}",
    "{{ 'x'.rjust(1000000000) }}",
    "{{ 'x'.center(1000000000) }}",
    "{{ 'x'.zfill(1000000000) }}",
    "{{ '\\t'.expandtabs(1000000000) }}",
    "{{ ('x' * 1000000).join(['a', 'b', 'c']) }}",
    "{{ ('x' * 500000)|wordwrap(1, wrapstring='y' * 100) }}",
    "{{ ('x' * 1000)|join('y' * 1000000) }}",
    "{{ pages|join(', ') }}",
    "{{ (1).to_bytes(1000000000, 'big') }}",
    "{{ {}.fromkeys(range(100000), 'x' * 1000000) }}",
    "{{ [1]|batch(1000000000, 'x')|list }}",
    "{{ lipsum(100000, max=100000) }}",
    "{{ ('x' * 600000) ~ ('y' * 600000) }}",
    "{{ ('x' * 600000) + ('y' * 600000) }}",
    "{{ ('&' * 300000)|forceescape|forceescape|forceescape|forceescape|forceescape|forceescape }}",
    "{{ ('\\\\' * 300000)|pprint|pprint|pprint|pprint|pprint|pprint|pprint|pprint }}",
    "{% set s = 'x' * 1000000 %}{{ range(2000)|map(attribute='nothing', default=s)|join }}",  # 2,000 times s
    "{% set s = 'x' * 1000000 %}{{ range(2000)|map(attribute='nothing', default=s)|list }}",
    "{% set s = 'x' * 1000000 %}{{ range(2000)|map(attribute='nothing', default=s)|list|join }}",
    "{% set s = 'x' * 1000000 %}{{ range(2000)|map(attribute='nothing', default=s)|list|string }}",
    "{% set s = 'x' * 1000000 %}{{ numbers|map(attribute='nothing', default=s)|list }}",  # no loop, no call
])
def test_a_step_that_would_build_a_huge_text_fails_without_building_it(scratch: Scratch, source: str) -> None:
    messages: list[str] = []
    assert peak_of(lambda: messages.append(scratch.fails(source))) < SMALL
    assert "1 MiB" in messages[0]


@pytest.mark.parametrize("source", [
    "{{ 9 ** 9999999 }}",
    "{{ 5|round(-1000000000) }}",
    "{% set ns = namespace(n=10 ** 4000) %}{% for i in range(3) %}{% set ns.n = ns.n * ns.n %}{% endfor %}ok",
])
def test_a_number_too_long_to_print_fails_before_it_is_computed(scratch: Scratch, source: str) -> None:
    assert "4,300" in scratch.fails(source)


@pytest.mark.parametrize("source", [
    "{% for i in range(50000) %}{{ 'x' * 1000 }}{% endfor %}",  # 50,000 new values of 1,000 characters
    "{% for i in range(50000) %}" + "static text " * 50 + "{% endfor %}",  # the loop's own text
    "{% macro m() %}{% for i in range(50000) %}{{ 'x' * 1000 }}{% endfor %}{% endmacro %}{{ m()|length }}",
    "{% for i in range(50000) %}{% set b %}{{ 'x' * 1000 }}{% endset %}{{ b }}{% endfor %}",
    "{% for i in range(50000) %}{% filter upper %}{{ 'x' * 1000 }}{% endfilter %}{% endfor %}",
    "{% macro c() %}{{ caller() }}{% endmacro %}{% for i in range(50000) %}{% call c() %}{{ 'x' * 1000 }}"
    "{% endcall %}{% endfor %}",
    "{% for i in range(50000) %}{% block b scoped %}{{ 'x' * 1000 }}{% endblock %}{% endfor %}",
    "{% for x in range(50000) recursive %}{{ 'x' * 1000 }}{% endfor %}",
    "{% set s = 'x' * 600000 %}{{ s }}{{ s }}",
    # No loop, but 30 values of a megabyte each: counted one by one, not once all are made.
    "{% set s = 'x' * 1000000 %}" + "".join(f"{{{{ s ~ {i} }}}}" for i in range(30)),
    "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
])
def test_a_part_stops_at_1_mib_however_it_grows(scratch: Scratch, source: str) -> None:
    """The part is counted as it is made, so a template writing 50 MB is stopped after about 1 MiB of it."""
    messages: list[str] = []
    assert peak_of(lambda: messages.append(scratch.fails(source))) < SMALL
    assert "1 MiB" in messages[0]


def test_a_structure_that_doubles_is_stopped_while_it_grows(scratch: Scratch) -> None:
    """A tuple holding the last one twice, 25 times over: tiny in memory, but printing, hashing or comparing it
    walks 2**25 leaves (and 40 times over, for ever)."""
    message = scratch.fails("{% set ns = namespace(t=('x',)) %}{% for i in range(25) %}{% set ns.t = (ns.t, ns.t) %}"
                            "{% endfor %}{{ {ns.t: 1}|length }}")
    assert "a list, tuple or dict would make" in message and "1 MiB" in message


def test_a_filter_that_loops_by_its_argument_is_bounded(scratch: Scratch) -> None:
    assert "more than 100,000 slices" in scratch.fails("{{ range(10)|slice(1000000000)|list }}")
    assert "1 MiB" in scratch.fails("{{ lipsum(1000000000) }}")


def test_an_html_part_is_bounded_too(scratch: Scratch) -> None:
    assert "1 MiB" in scratch.fails("{% for i in range(20) %}{{ '<b>' * 20000 }}{% endfor %}", part="html")
    assert "1 MiB" in scratch.fails("{% for i in range(20) %}{{ ('<b>' * 20000)|safe }}{% endfor %}", part="html")


def test_included_templates_count_towards_the_part(scratch: Scratch) -> None:
    scratch.write("{{ 'x' * 1000 }}", "text", "shared/block")
    assert "1 MiB" in scratch.fails("{% for i in range(2000) %}{% include 'en/shared/block.text.j2' %}"
                                    "{% endfor %}")
    scratch.write("A{% block b %}{% endblock %}Z", "text", "shared/layout")
    assert "1 MiB" in scratch.fails("{% extends 'en/shared/layout.text.j2' %}{% block b %}"
                                    "{% for i in range(2000) %}{{ 'x' * 1000 }}{% endfor %}{% endblock %}")


def test_memory_recursion_and_overflow_errors_fail_the_message(scratch: Scratch) -> None:
    def out_of_memory(value: Any) -> str:
        raise MemoryError

    scratch.templates.env.filters["boom"] = out_of_memory
    assert "MemoryError" in scratch.fails("{{ member.name|boom }}")
    assert "OverflowError" in scratch.fails("{{ 10.0 ** 400 }}")
    assert "OverflowError" in scratch.fails("{% for i in range(10000000) %}{% endfor %}")  # Jinja's own range cap
    assert "AssertionError" in scratch.fails("{{ 'x'|truncate(1) }}")  # any exception fails only this message


# ---------------------------------------------------------------------- what marketers write still works


def test_a_newsletter_with_a_product_loop_and_a_300_kb_body_renders(scratch: Scratch) -> None:
    products = [{"name": f"Product {i}", "price": 99 + i, "url": f"https://shop.example.com/p/{i}",
                 "sizes": ["S", "M", "L", "XL"]} for i in range(50)]
    body = "<p>" + "Spring is here. " * 18_750 + "</p>"  # 300,007 characters
    source = ("<html><body><h1>Hello {{ member.name }}</h1>{{ event.body|safe }}<table>"
              "{% for p in event.products %}<tr class=\"{{ loop.cycle('odd', 'even') }}\"><td>{{ loop.index }}</td>"
              "<td><a href=\"{{ p.url }}\">{{ p.name|upper }}</a></td><td>{{ '%.2f'|format(p.price) }}</td>"
              "<td>{% for s in p.sizes %}{{ s }}{% if not loop.last %}/{% endif %}{% endfor %}</td></tr>"
              "{% endfor %}</table>{{ tier.perks|join(', ') }}<a href=\"{{ unsubscribe_url }}\">unsubscribe</a>"
              "</body></html>")
    html = scratch.render(source, {**CONTEXT, "event": {"body": body, "products": products}}, part="html")
    assert len(html) > 300_000
    assert html.count("<tr class=") == 50
    assert '<td>50</td><td><a href="https://shop.example.com/p/49">PRODUCT 49</a></td><td>148.00</td>' in html
    assert "<td>S/M/L/XL</td>" in html and html.endswith("unsubscribe</a></body></html>")


def test_loops_and_operators_behave_as_in_jinja(scratch: Scratch) -> None:
    source = ("{% for i in items %}{{ loop.index }}/{{ loop.length }}{{ loop.cycle('a', 'b') }}"
              "{% if loop.last %}!{% endif %}{% else %}none{% endfor %}|{% for i in [] %}x{% else %}empty{% endfor %}"
              "|{% for k, v in pairs|dictsort %}{{ k }}={{ v }};{% endfor %}"
              "|{% for x in tree recursive %}{% if x is iterable %}({{ loop(x) }}){% else %}{{ x }}{% endif %}"
              "{% endfor %}|{% set ns = namespace(t=0) %}{% for i in range(30) if i is even %}"
              "{% set ns.t = ns.t + i %}{% endfor %}{{ ns.t }}|{{ [1, 2] + [3] }} {{ 'ab' * 2 }} {{ 2 ** 10 }} "
              "{{ '%05.1f|%-4s|%(x)s' % {'x': 1} if false else '%05.1f|%-4s|' % (3.14159, 'a') }}"
              "{{ '{:>6}|{:,}'.format('r', 1234567) }}|{{ 'x'|center(5) }}|{{ 'a b c d'|wordwrap(3) }}"
              "|{{ {'k': [1, (2, 3)]} }}|{{ 'a' ~ 1 ~ none }}|{{ ['a', 'b']|join('-') }}{{ [1, 2]|join }}")
    context = {"items": list(range(20)), "pairs": {"b": 2, "a": 1}, "tree": [1, [2, [3]], 4]}
    ours = scratch.render(source, context)
    jinja = Scratch(scratch.root)
    jinja.written = 100
    jinja.templates.env.code_generator_class = CodeGenerator  # Jinja's own code, without the bounds
    assert ours == jinja.render(source, context)
    assert ours.startswith("1/20a2/20b3/20a")
    assert ours.endswith("20/20b!|empty|a=1;b=2;|1(2(3))4|210|[1, 2, 3] abab 1024 003.1|a   |     r|1,234,567|"
                         "  x  |a b\nc d|{'k': [1, (2, 3)]}|a1None|a-b12")


@pytest.fixture(scope="module")
def shipped() -> tuple[Templates, Templates, ContextBuilder]:
    """The shipped templates twice, ours and Jinja's own code generator, and the contexts templates see."""
    ours, plain = Templates(REPO / "templates", "zh-CN"), Templates(REPO / "templates", "zh-CN")
    plain.env.code_generator_class = CodeGenerator
    loyalty = load_rulebook(REPO / "rules", None).loyalty
    return ours, plain, ContextBuilder(loyalty, "zh-CN", "Asia/Shanghai")


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO / "templates").as_posix()
                                        for p in (REPO / "templates").rglob("*.j2")))
def test_every_shipped_template_renders_as_jinja_renders_it(path: str, shipped: tuple[Templates, Templates,
                                                                                     ContextBuilder]) -> None:
    """The bounds change no output: each shipped template gives what Jinja's own code gives, for members of every
    tier, in both languages."""
    ours, plain, contexts = shipped
    locale, name_part = path.split("/", 1)
    name, part = name_part[: -len(".j2")].rsplit(".", 1)
    for tier in ("regular", "silver", "gold", "diamond"):
        row = {**member("m1", "林<小雨>", locale=locale, tier=tier), "points": 12_345, "total_spend": 8_000.5,
               "last_order_at": NOW, "points_expiring_30_days": 300, "points_expiring_10_days": 100,
               "points_next_expiry": 50, "points_next_expiry_at": NOW, "attributes": {}}
        context = contexts.build(row, NOW, {"id": "j", "name": "j", "version": 1},
                                 {"order_id": "A-1", "from": "regular", "to": tier}, "https://u/1")
        channel = "email" if (REPO / "templates" / locale / f"{name}.subject.j2").exists() else "sms"
        assert vars(ours.render(name, channel, locale, context)) == vars(plain.render(name, channel, locale, context))
    assert part in ("subject", "text", "html")


def test_validate_does_not_build_a_huge_constant(tmp_path: Path) -> None:
    """Jinja folds constant expressions while compiling; `validate` compiles every template, so a huge constant
    product used to be built (and MemoryError raised) by validate itself."""
    scratch = Scratch(tmp_path / "templates")
    scratch.write("{{ 'x' * 300000000 }}{{ 'x'|center(300000000) }}{{ 9 ** 9999999 }}")
    problems: list[Any] = []
    scratch.templates.refresh()  # read and checked from the files, as validate does
    assert peak_of(lambda: problems.extend(scratch.templates.syntax_problems())) < SMALL
    assert problems == []  # it is a render-time failure, reported per message
