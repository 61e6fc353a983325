"""The package's import structure: no cycle, shared modules never import a method, every module imports on its own."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "ocd_hf"
# The shared substrate: none of these may import anything from ocd_hf.methods (not even for type hints).
SHARED = ("hub", "cards", "results", "weight_datasets", "trainer", "harvest", "data", "finetune", "target", "factorised",
          "modeling_utils", "backbones", "episodes", "sources", "fewshot", "task_heads", "weight_vae")


def module_name(path: Path) -> str:
    parts = ["ocd_hf", *path.relative_to(PACKAGE_DIR).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def imported_modules(name: str, path: Path) -> set[str]:
    """Every ocd_hf module ``name`` imports, at the top, inside functions or under TYPE_CHECKING."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # "from . import x" imports the module x when x is one.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in MODULES and target != name)
    return found


GRAPH = {name: imported_modules(name, path) for name, path in MODULES.items()}


def test_the_import_graph_has_no_cycle():
    # An edge from a module to its parent package is implicit in every import; the package __init__s that
    # re-export their submodules would otherwise count as cycles.
    graph = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in GRAPH.items()}
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)


@pytest.mark.parametrize("shared", SHARED)
def test_shared_modules_import_no_method(shared):
    name = f"ocd_hf.{shared}"
    if name not in MODULES:
        pytest.skip(f"{name} does not exist")
    assert not {t for t in GRAPH[name] if t.startswith("ocd_hf.methods")}, f"{name} imports a method"
    # ... nor indirectly, through another module.
    seen, todo = set(), [name]
    while todo:
        for target in GRAPH[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    assert not {t for t in seen if t.startswith("ocd_hf.methods") or t in ("ocd_hf", "ocd_hf.cli")}, f"{name} reaches a method"


def test_methods_do_not_import_the_public_api_or_the_cli():
    for name, targets in GRAPH.items():
        if name.startswith("ocd_hf.methods"):
            assert not targets & {"ocd_hf", "ocd_hf.cli"}, name


def test_every_module_imports_on_its_own():
    """Import each module first thing, with every ocd_hf module forgotten before (a fresh interpreter for the
    package; torch and transformers stay loaded so that this takes seconds, not minutes)."""
    script = """
import importlib, json, sys, traceback
failures = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "ocd_hf" or m.startswith("ocd_hf.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failures[name] = traceback.format_exc(limit=3)
print(json.dumps(failures))
"""
    completed = subprocess.run(
        [sys.executable, "-c", script, json.dumps(sorted(MODULES))], capture_output=True, text=True, timeout=600, check=True
    )
    assert json.loads(completed.stdout.splitlines()[-1]) == {}


def test_every_package_is_in_the_wheel():
    """pyproject.toml lists the packages explicitly: a new folder missing there would be absent from an installed wheel."""
    import tomllib

    listed = set(tomllib.loads((PACKAGE_DIR.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {module_name(path.parent / "__init__.py") for path in PACKAGE_DIR.rglob("__init__.py")}
    assert on_disk <= listed, f"add {sorted(on_disk - listed)} to [tool.setuptools] packages in pyproject.toml"
