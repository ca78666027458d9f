"""The layout's promises (docs/architecture.md): imports flow one way and no module imports itself round a cycle."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent


def test_the_import_contracts_in_pyproject_are_kept() -> None:
    # The layers (commands > wiring > phases > rules and storage > domain; channels below all of it) and the
    # adapters' independence, as `lint-imports` checks them in .ci/run.
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The import cycles among GRAPH's modules (Tarjan's strongly connected components of more than one)."""
    edges = {module: graph.find_modules_directly_imported_by(module) for module in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in edges[module]:
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                popped = stack.pop()
                component.append(popped)
                if popped == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return found


def test_no_module_imports_itself_through_others() -> None:
    graph = grimp.build_graph("engine", "channels", cache_dir=None)
    assert cycles(graph) == []
    assert len(graph.modules) > 50  # the graph is the real one, not an empty package


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for module in ("a", "a.x", "a.y", "a.z"):
        graph.add_module(module)
    graph.add_import(importer="a.x", imported="a.y")
    graph.add_import(importer="a.y", imported="a.x")
    graph.add_import(importer="a.z", imported="a.x")
    assert cycles(graph) == [["a.x", "a.y"]]


def test_the_provider_clients_are_loaded_only_when_a_channel_needs_them() -> None:
    # twilio and sendgrid (with requests, urllib3…) cost each engine process about 15 MB and start-up time; the
    # daemon and its compose worker import the engine (the HTTP service needs their signature checks only), and
    # most installations send through the outbox.
    probe = ("import sys, engine.app, engine.cli.main, engine.tick.pipeline; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'twilio', 'sendgrid', 'requests'}))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
