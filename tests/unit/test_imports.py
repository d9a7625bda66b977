"""The package's rooms stand on floors: an import goes down a floor or stays in its room,
and no chain of imports comes back to where it started.

Every import counts: at module level, inside a function, under `TYPE_CHECKING`, and
`importlib.import_module("pyproxy....")` with a literal name. A room is a subpackage
(`pyproxy.dataplane`) or a top-level module (`pyproxy.sync`); the package's own
`__init__` (its version) is the ground floor.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pyproxy

PACKAGE = Path(pyproxy.__file__).resolve().parent

FLOORS: dict[str, int] = {
    "pyproxy": 0, "model": 0, "heap": 0,  # pure: the model, and the version; the collector's policy
    "config": 1, "sync": 1, "supervisor": 1,  # leaf helpers: config schema, sync runner, task supervisor
    "dataplane": 2, "sources": 2,  # the edges: kernel and sockets; API server and manifest files
    "proxier": 3, "inspect": 3,  # the sync's executor; read-only views of the proxy
    "observe": 4,  # the HTTP servers: health, metrics, the debug API
    "lifecycle": 5,  # the process's life: start, hand over, retire, drain
    "app": 6,  # assembles one process
    "demo": 7,  # the walkthrough (runs pyproxy as processes)
    "cli": 8, "__main__": 9,  # the entry points
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> Iterator[str]:
    """The pyproxy modules `path` imports (a `from X import Y` whose Y is a module counts as X.Y)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("pyproxy"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pyproxy"):
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and str(node.args[0].value).startswith("pyproxy")):
            yield str(node.args[0].value)


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: {d for d in imports_of(path, known) if d != name} for name, path in found.items()}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "pyproxy"


def test_every_room_has_a_floor() -> None:
    assert {room(m) for m in modules()} <= set(FLOORS), set(map(room, modules())) - set(FLOORS)


def test_no_import_goes_up_or_across_a_floor() -> None:
    wrong = sorted(f"{m} -> {d}" for m, deps in graph().items() for d in deps
                   if room(m) != room(d) and FLOORS[room(d)] >= FLOORS[room(m)])
    assert wrong == []


def test_no_module_imports_itself_back_through_others() -> None:
    edges = graph()
    seen: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for dep in sorted(edges.get(node, ())):
            if dep not in edges:
                continue  # a name that is not a module of ours (a symbol imported from a package)
            if seen.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in seen:
                visit(dep, path + [dep])
        seen[node] = 2

    for start in sorted(edges):
        if start not in seen:
            visit(start, [start])
    assert cycles == []


def test_the_check_sees_a_circle_and_an_upward_arrow(tmp_path: Path) -> None:
    """The walker above finds what it is for: a module imported back under TYPE_CHECKING."""
    source = tmp_path / "mod.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pyproxy.app import ProxyApp\n"
                      "def f():\n    import importlib\n    return importlib.import_module('pyproxy.lifecycle.state')\n")
    assert set(imports_of(source, set(modules()))) == {"pyproxy.app", "pyproxy.lifecycle.state"}
