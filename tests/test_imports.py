"""No import circles in btfast: the module-level imports between btfast's own modules form a DAG, and every module
imports on its own in a fresh interpreter (an import that works only after another module was loaded fails)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import btfast

ROOT = Path(btfast.__file__).parent
MODULES = sorted(".".join(("btfast", *p.relative_to(ROOT).with_suffix("").parts)) for p in ROOT.rglob("*.py"))
MODULES = [m.removesuffix(".__init__") for m in MODULES]


def _module_level_imports(name: str) -> set[str]:
    """btfast modules `name` imports at module level (imports inside functions and TYPE_CHECKING are lazy)."""
    path = ROOT / Path(*name.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m for m in found if m in MODULES and m != name}


def test_no_import_cycles():
    graph = {m: _module_level_imports(m) for m in MODULES}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(m) :], m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for dep in sorted(graph[m]):
            visit(dep, [*path, m])
        state[m] = 2

    for m in MODULES:
        visit(m, [])
    assert graph["btfast.ops"] <= {"btfast.weights"}, graph["btfast.ops"]  # the op table depends on no layer above
    assert "btfast.model" not in graph["btfast.kernel_race"]  # the race times ops, not the model


ENGINE = ["btfast", "btfast.errors", "btfast.inputs", "btfast.kernel_race", "btfast.kernels", "btfast.model"]
ENGINE += ["btfast.ops", "btfast.optimize", "btfast.runtime", "btfast.spec", "btfast.states", "btfast.weights"]


@pytest.mark.parametrize("name", ENGINE)
def test_each_engine_module_imports_alone(name):
    result = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_optimize_stays_callable_after_its_module_is_imported():
    # Importing the submodule btfast.optimize rebinds the package attribute `optimize` to the module.
    code = (
        "import btfast\n"
        "from btfast.optimize import OptimizedBridgeTower\n"
        "from btfast.testing import build, tiny_config\n"
        "from transformers import BridgeTowerModel\n"
        "fast = btfast.optimize(build(BridgeTowerModel, tiny_config()))\n"
        "assert isinstance(fast, OptimizedBridgeTower), type(fast)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
