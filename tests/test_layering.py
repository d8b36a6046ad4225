"""Layering of src/lopkit: no import circle, and the core loads neither the seed systems nor heavy libraries."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "lopkit"


def module_name(path: Path) -> str:
    """``src/lopkit/a/b.py`` -> ``lopkit.a.b`` (a package's ``__init__.py`` is the package itself)."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_nodes(body: list[ast.stmt], nested: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements run when a module is imported (``nested=True``: also those inside functions and
    classes, i.e. every import the module can ever run); ``if TYPE_CHECKING:`` blocks are never run."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node):
                found += import_nodes(node.body, nested) + import_nodes(node.orelse, nested)
        elif isinstance(node, ast.Try):
            found += import_nodes(node.body + node.orelse + node.finalbody, nested)
            for handler in node.handlers:
                found += import_nodes(handler.body, nested)
        elif isinstance(node, (ast.With, ast.For, ast.While)):
            found += import_nodes(node.body, nested)
        elif nested and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found += import_nodes(node.body, nested)
    return found


def import_graph(nested: bool = False) -> dict[str, set[str]]:
    """Module -> the lopkit modules it imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in import_nodes(ast.parse(path.read_text(), str(path)).body, nested):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name in files}
                continue
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                if f"{base}.{alias.name}" in files:
                    targets.add(f"{base}.{alias.name}")
                elif base in files:
                    targets.add(base)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or None when the graph is acyclic (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    for root in sorted(graph):
        if root in state:
            continue
        path = [root]
        stack = [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif child not in state:
                state[child] = 1
                path.append(child)
                stack.append(iter(sorted(graph.get(child, ()))))
    return None


def test_find_cycle_reports_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None


def test_import_graph_sees_relative_and_submodule_imports(tmp_path, monkeypatch):
    package = tmp_path / "lopkit"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import leaf\n")
    (package / "sub" / "leaf.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import lopkit.other\n"
        "def f():\n    from ..other import x\n")
    (package / "other.py").write_text("from lopkit.sub import leaf\nx = 1\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    top = import_graph()
    assert top["lopkit.sub"] == {"lopkit.sub.leaf"} and top["lopkit.sub.leaf"] == set()
    assert top["lopkit.other"] == {"lopkit.sub.leaf"}
    assert import_graph(nested=True)["lopkit.sub.leaf"] == {"lopkit.other"}
    assert find_cycle(import_graph(nested=True)) == ["lopkit.other", "lopkit.sub.leaf", "lopkit.other"]


def test_no_import_cycle_at_module_level():
    cycle = find_cycle(import_graph())
    assert cycle is None, "module-level import circle: " + " -> ".join(cycle or [])


def test_no_import_cycle_counting_function_level_imports():
    cycle = find_cycle(import_graph(nested=True))
    assert cycle is None, "import circle through a function-level import: " + " -> ".join(cycle or [])


def _loaded_after(statement: str) -> list[str]:
    code = (f"import json, sys\n{statement}\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {{'ray', 'transformers', "
            f"'lightning', 'pytorch_lightning'}} or m.startswith(('lopkit.moe', 'lopkit.kws')))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("statement", [
    "import lopkit",
    "import lopkit as lk; lk.__all__",
    "import lopkit.benchmarks.toy",
    "from lopkit.benchmarks.base import get_benchmark; get_benchmark('toy'); get_benchmark('bitflip')",
    "import lopkit.runner.cli, lopkit.runner.compare",
    "import lopkit as lk; lk.Monitor; lk.build_methods; lk.get_benchmark('toy'); lk.ResultStore",
    "import lopkit.integrations, lopkit.integrations.probe",
])
def test_core_does_not_load_seed_systems_or_heavy_libraries(statement):
    loaded = _loaded_after(statement)
    assert loaded == [], f"{statement!r} loaded {loaded}"


def test_seed_system_benchmarks_load_by_name_only():
    loaded = _loaded_after("from lopkit.benchmarks.registry import get_benchmark; get_benchmark('kws_train')")
    assert "lopkit.kws.train" in loaded and not any(m.startswith("lopkit.moe") for m in loaded)


def test_benchmark_scripts_do_not_share_a_name_with_a_lopkit_benchmarks_module():
    """``benchmarks/NAME.py`` (timing scripts) never shadows ``lopkit.benchmarks.NAME`` in tracebacks or imports."""
    scripts = {p.stem for p in (SRC.parent / "benchmarks").glob("*.py")}
    modules = {p.stem for p in (PACKAGE / "benchmarks").glob("*.py")}
    assert scripts and modules and scripts & modules == set()
