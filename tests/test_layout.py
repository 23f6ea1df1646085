"""The package layout is the architecture: every import of aepo_core points down the layers, and no
two modules import each other (directly or around a circle), lazy imports inside functions included.

    foundation (config, errors, atomic) < core < io < task < pipeline < cli
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "aepo_core"
RANK = {"foundation": 0, "core": 1, "io": 2, "task": 3, "pipeline": 4, "cli": 5}
FOUNDATION = {"config", "errors", "atomic", "__init__"}


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in FOUNDATION:
        return "foundation"
    if parts[1] == "cli":
        return "cli"
    return parts[1]


def _imports(path: Path) -> set[str]:
    """Every aepo_core module `path` imports, at any depth of the file (function bodies included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("aepo_core"):
            for alias in node.names:  # `from aepo_core.core import update` imports a module
                candidate = f"{node.module}.{alias.name}"
                out.add(candidate if _exists(candidate) else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("aepo_core"))
    return out


def _exists(module: str) -> bool:
    base = PACKAGE.parent.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_import_points_down_the_layers():
    wrong = []
    for module, imported in _graph().items():
        for other in imported:
            if RANK[_layer(other)] > RANK[_layer(module)]:
                wrong.append(f"{module} ({_layer(module)}) imports {other} ({_layer(other)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_core_imports_nothing_but_the_foundation_and_itself():
    for module, imported in _graph().items():
        if _layer(module) == "core":
            assert {_layer(o) for o in imported} <= {"foundation", "core"}, module


def test_no_import_circles():
    graph = _graph()
    # a module importing its own package's __init__ (or the reverse) is how packages work, not a circle
    edges = {m: {o for o in imported if o in graph and not m.startswith(o + ".") and not o.startswith(m + ".")}
             for m, imported in graph.items()}
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not circles, "\n".join(circles)


def test_the_layers_are_folders():
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == {
        "core", "io", "task", "pipeline"
    }
