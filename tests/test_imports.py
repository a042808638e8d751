"""Imports flow one way: no module of the package imports one that builds on it, not even inside a function."""

from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import TopologicalSorter
from pathlib import Path

import dpo_recipe

PACKAGE = Path(dpo_recipe.__file__).parent


def package_imports() -> dict[str, set[str]]:
    """Each module's imports of sibling modules, wherever in the file they stand."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        siblings = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                siblings |= {node.module} if node.module else {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dpo_recipe."):
                siblings.add(node.module.split(".")[1])
        graph[path.stem] = siblings
    return graph


def test_the_package_import_graph_has_no_cycle():
    graph = package_imports()
    assert graph["run"] >= {"trainer", "callbacks", "rundir", "curves"} and "report" not in graph["run"]
    assert not {"trainer", "run"} & (graph["evaluate"] | graph["report"])
    order = list(TopologicalSorter(graph).static_order())  # raises CycleError naming the loop if there is one
    assert order.index("rundir") < order.index("callbacks") < order.index("run") < order.index("cli")
    assert order.index("totals") < order.index("trainer") < order.index("run")


def test_each_module_imports_alone_in_dependency_order():
    order = [name for name in TopologicalSorter(package_imports()).static_order() if name != "__main__"]
    # A fresh interpreter each (started together: they are independent), so nothing imported earlier can hide a
    # missing or circular import.
    processes = {
        name: subprocess.Popen([sys.executable, "-c", f"import dpo_recipe.{name}"], stderr=subprocess.PIPE, text=True)
        for name in order
    }
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, f"dpo_recipe.{name}: {stderr[-2000:]}"
