"""Imports point downward: core -> features -> steering -> server -> benchmarks.

Read from the source (every import, at the top of a module or inside a function), so a lazy
import that runs back up is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[2]
LAYERS = ["core", "features", "steering", "server", "benchmarks"]  # each may import those before it
WORKER_SIDE = {"steering.hook", "steering.worker"}  # what runs in vLLM's worker, not in the API process


def _imports(module: str) -> set[str]:
    """The steerserve modules `module` names in an import statement."""
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = ROOT / module.replace(".", "/") / "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from steering import wire` names the module steering.wire
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] in LAYERS and _exists(name):
                found.add(name)
    return found


def _exists(module: str) -> bool:
    base = ROOT / module.replace(".", "/")
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _modules(package: str) -> list[str]:
    return [".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / package).rglob("*.py")]


def test_imports_point_downward():
    upward = []
    for rank, package in enumerate(LAYERS):
        allowed = set(LAYERS[: rank + 1])
        for module in _modules(package):
            upward += [f"{module} imports {name}" for name in _imports(module) if name.split(".")[0] not in allowed]
    assert not upward, upward


def test_the_api_process_reaches_the_worker_side_only_through_the_wire():
    """Everything the API process loads of ours (the endpoint plugin and the CLI, and all they
    import, transitively) avoids the worker's modules: it shares only steering/wire.py with them."""
    seen, todo = set(), ["server.plugin", "server.cli"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += _imports(module)
    assert not seen & WORKER_SIDE, sorted(seen & WORKER_SIDE)
    assert "steering.wire" in seen
