"""The package's dependencies point one way: shared modules <- calibration/ and merge/ <- pipeline and CLI; and only
outputs.py writes to disk.

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
SHARED = {"errors", "paths", "architectures", "tasks", "settings", "checkpoints", "outputs", "files", "_startup"}


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
    assert f"{PACKAGE}.calibration.api" in graph[f"{PACKAGE}.cache"]
    assert f"{PACKAGE}.files" in graph[f"{PACKAGE}.merge.kernels"]
    assert f"{PACKAGE}.settings" in graph[f"{PACKAGE}.calibration.engine"]  # a relative import two levels up


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


@pytest.mark.parametrize("layer, forbidden", [("merge", "calibration"), ("calibration", "merge")])
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


def test_only_the_pipeline_and_the_command_line_use_both_calibration_and_merging():
    graph = import_graph()
    both = sorted(m for m in graph if {"calibration", "merge"} <= {area(t) for t in reachable(graph, m) | {m}})
    assert both == [PACKAGE, f"{PACKAGE}.__main__", f"{PACKAGE}.cli", f"{PACKAGE}.pipeline"], both  # __main__ is the CLI


# Calls that write, rename or delete files. ``replace``/``remove`` only count on os/shutil, since str.replace exists.
_WRITE_METHODS = {"write_text", "write_bytes", "mkdir", "unlink", "rmdir", "touch", "rename", "symlink_to",
                  "savefig", "save_pretrained", "save_file"}
_WRITE_FUNCTIONS = {"os": {"replace", "rename", "remove", "unlink", "makedirs", "mkdir", "rmdir", "symlink"},
                    "shutil": {"rmtree", "copy", "copy2", "copyfile", "copytree", "move"},
                    "tempfile": {"mkdtemp", "mkstemp", "NamedTemporaryFile"}, "torch": {"save"}}


def _writes(path: Path) -> List[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        function = node.func
        if isinstance(function, ast.Name) and function.id in ("save_file", "open"):
            modes = [a.value for a in node.args[1:2] if isinstance(a, ast.Constant)]
            modes += [k.value.value for k in node.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)]
            if function.id == "save_file" or any(set(str(mode)) & set("wax+") for mode in modes):
                found.append(f"{path.name}:{node.lineno} {function.id}")
        elif isinstance(function, ast.Attribute):
            owner = function.value.id if isinstance(function.value, ast.Name) else None
            if function.attr in _WRITE_FUNCTIONS.get(owner, ()) or (
                owner not in _WRITE_FUNCTIONS and function.attr in _WRITE_METHODS
            ):
                found.append(f"{path.name}:{node.lineno} {owner or '...'}.{function.attr}")
    return found


def test_the_write_scan_finds_writes():
    assert any("save_file" in w for w in _writes(ROOT / "outputs.py"))
    assert any("os.replace" in w for w in _writes(ROOT / "outputs.py"))


def test_only_outputs_writes_to_disk():
    """Every write goes through outputs.py, which resolves, checks, stages and reports disk errors; no module can
    write a user path that bypassed those checks."""
    writes = [w for path in sorted(ROOT.rglob("*.py")) if path.name != "outputs.py" for w in _writes(path)]
    assert not writes, writes
