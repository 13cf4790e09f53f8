"""The package's dependencies point one way: shared modules <- calibrate/ and merge/ <- pipeline and CLI.

Read statically from the source (every import statement, including those inside functions), because importing any
submodule runs the package's ``__init__``, which imports everything.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

PACKAGE = "mergekit_fisher_mask"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
SHARED = {"errors", "architectures", "tasks", "settings", "checkpoints", "outputs", "files"}


def module_name(path: Path) -> str:
    parts = (PACKAGE,) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> Dict[str, Set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: Dict[str, Set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {c for c in candidates if c in modules and c != name}
    return graph


def area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def reachable(graph: Dict[str, Set[str]], start: str) -> Set[str]:
    seen, stack = set(), [start]
    while stack:
        for target in graph[stack.pop()]:
            if target not in seen:
                seen.add(target)
                stack.append(target)
    return seen


def test_the_graph_is_read():
    graph = import_graph()
    assert f"{PACKAGE}.calibrate.api" in graph[f"{PACKAGE}.pipeline"]
    assert f"{PACKAGE}.files" in graph[f"{PACKAGE}.merge.kernels"]
    assert f"{PACKAGE}.settings" in graph[f"{PACKAGE}.calibrate.engine"]  # a relative import two levels up


def test_no_import_cycles():
    graph = import_graph()
    cycles: List[str] = []
    state: Dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: List[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [node, target]))
            elif target not in state:
                visit(target, stack + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, cycles


@pytest.mark.parametrize("layer, forbidden", [("merge", "calibrate"), ("calibrate", "merge")])
def test_merging_and_calibration_never_import_each_other(layer, forbidden):
    graph = import_graph()
    for module in (m for m in graph if area(m) == layer):
        bad = sorted(m for m in reachable(graph, module) if area(m) == forbidden)
        assert not bad, f"{module} reaches {bad}"


def test_shared_modules_import_only_shared_modules():
    graph = import_graph()
    for module in (m for m in graph if area(m) in SHARED):
        bad = sorted(m for m in graph[module] if area(m) not in SHARED)
        assert not bad, f"{module} imports {bad}"
