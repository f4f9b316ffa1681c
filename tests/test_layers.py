"""The layers of `sweeps/` (README "Architecture"): import-linter's contracts in pyproject.toml
hold, no module imports another in a cycle, only the CLI imports project modules inside
functions, the bottom layer plans every preset without loading Ray, MLflow or torch, and `import
sweeps` (the Python API) loads none of them either."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import grimp
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parent.parent


def test_import_linter_contracts_hold(monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # it reads pyproject.toml from the working directory
    assert lint_imports(no_cache=True, no_logo=True) == 0


def strongly_connected(graph: grimp.ImportGraph) -> list[set[str]]:
    """Tarjan's components of more than one module: the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[set[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(component)

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return cycles


def test_no_module_of_sweeps_imports_another_in_a_cycle() -> None:
    graph = grimp.build_graph("sweeps")  # every import statement, those inside functions too
    assert len(graph.modules) > 30
    assert strongly_connected(graph) == []


def test_a_cycle_is_found_when_there_is_one(tmp_path: Path, monkeypatch) -> None:
    package = tmp_path / "looped"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from looped import b\n")
    (package / "b.py").write_text("def late():\n    from looped import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert strongly_connected(grimp.build_graph("looped")) == [{"looped.a", "looped.b"}]


def function_local_project_imports(package: Path) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        for function in ast.walk(ast.parse(path.read_text())):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(function):
                    names = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                             [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
                    found += [f"{path.relative_to(ROOT)}:{node.lineno} {name}" for name in names
                              if name.split(".")[0] == "sweeps"]
    return found


def test_only_the_command_line_imports_project_modules_inside_functions() -> None:
    local = function_local_project_imports(ROOT / "sweeps")
    assert [line for line in local if not line.startswith("sweeps/cli/")] == []
    assert local  # the CLI does, to start fast: the check sees them


PROBE = """
import json, sys
from sweeps.core.plan import build_plan
from sweeps.core.search import planned_counts
from sweeps.core.spec import load_spec, preset_names
import bnew_core.config
sizes = {name: planned_counts(build_plan(load_spec(name), name)).trials for name in preset_names()}
print(json.dumps({"sizes": sizes, "heavy": sorted({m.split('.')[0] for m in sys.modules} & {"ray", "mlflow", "torch"})}))
"""


def test_the_core_plans_every_preset_without_ray_mlflow_or_torch() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, check=True)
    probe = json.loads(result.stdout)
    assert probe["heavy"] == []
    assert probe["sizes"]["demo"] == 8 and probe["sizes"]["paper-table2"] == 115


def test_import_sweeps_loads_no_torch_ray_or_mlflow() -> None:
    probe = ("import sys, sweeps; sweeps.load('demo'); "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow', 'torch'}))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    assert loaded.stdout.strip() == "[]"
