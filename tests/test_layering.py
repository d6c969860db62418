"""The layers stay apart, read from the source: every import of every module, at its
top or inside a function, goes only where its layer may look.

    core         payq/ (its modules, payq.gate, payq.redis_scripts, payq.dramatiq_redis)
    producers    producers/ (enqueue, the relay, the HTTP intake)     → core
    workers      workers/ (the actor, its middleware, the watchdog)  → core
    devservices  throwaway Redis and PostgreSQL for tests and demos  → core
    provider_sim the provider's stand-in: none of payq
    ops          payq/ops/ (operator tools, the dashboard, drills)    → core, producers,
                                                                       devservices, provider_sim
    payq_cli     the payq command, above everything
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("payq", "producers", "workers", "devservices", "provider_sim", "payq_cli")
MAY_IMPORT = {
    "core": {"core"},
    "producers": {"core", "producers"},
    "workers": {"core", "workers"},
    "devservices": {"core", "devservices"},
    "provider_sim": {"provider_sim"},
    "ops": {"core", "producers", "devservices", "provider_sim", "ops"},
    "payq_cli": set(PACKAGES) - {"payq"} | {"core", "ops"},
}


def layer(module: str) -> str:
    top = module.split(".")[0]
    if top != "payq":
        return top
    return "ops" if module == "payq.ops" or module.startswith("payq.ops.") else "core"


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = modules()


def imported(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """The project's modules ``name`` imports, each with the line that does."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".")[
                    : len(name.split(".")) - node.level + (path.name == "__init__.py")
                ]
                base = ".".join([*package, *([node.module] if node.module else [])])
            # A name from a package is its submodule when there is one, else the package.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            ]
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target, node.lineno


GRAPH = {name: {target for target, _ in imported(name, path)} for name, path in MODULES.items()}


def test_every_module_imports_only_what_its_layer_may() -> None:
    wrong = [
        f"{path.relative_to(ROOT)}:{line} ({layer(name)}) imports {target} ({layer(target)})"
        for name, path in MODULES.items()
        for target, line in imported(name, path)
        if layer(target) not in MAY_IMPORT[layer(name)]
    ]
    assert wrong == []


def test_the_checker_sees_every_layer() -> None:
    # A checker that finds no modules or no imports would pass anything.
    assert {layer(name) for name in MODULES} == set(MAY_IMPORT)
    assert "payq.gate.gate" in GRAPH["payq.gate"] and "payq.settings" in GRAPH["workers.actors"]
    assert layer("payq.ops.dashboard.routes") == "ops" and layer("payq.opsx") == "core"


def test_no_import_cycle_anywhere() -> None:
    """Tarjan's strongly connected components over every import, lazy ones included."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 5000))
    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    assert cycles == []


def test_no_function_in_the_core_is_over_60_lines() -> None:
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
        for name, path in MODULES.items()
        if layer(name) == "core"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and (node.end_lineno or 0) - node.lineno + 1 > 60
    ]
    assert long == []


CHECK = """
import sys, importlib
for name in {modules!r}:
    importlib.import_module(name)
print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r}
                      or m.startswith('payq.ops'))))
"""


@pytest.mark.parametrize(
    ("modules", "forbidden"),
    [
        (["producers", "producers.relay"], ["workers", "payq_cli", "provider_sim"]),
        (["workers.actors", "workers.middleware"], ["producers", "payq_cli", "provider_sim"]),
        (
            [name for name in MODULES if layer(name) == "core"],
            ["workers", "producers", "payq_cli", "provider_sim", "devservices"],
        ),
    ],
    ids=["producers", "workers", "core"],
)
def test_loading_a_layer_loads_nothing_above_it(modules: list[str], forbidden: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHECK.format(modules=modules, forbidden=forbidden)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert result.stdout.strip() == "", f"{modules} loaded {result.stdout.strip()}"
