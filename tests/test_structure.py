"""The package's shape: no import cycle between onnxq modules, no onnxq import hidden inside a function, no module
over 500 lines, and the solvers and stats import neither ONNX nor ONNX Runtime (numpy math only)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "onnxq"
MAX_LINES = 500
NUMPY_ONLY = ("onnxq.solvers", "onnxq.stats")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, top_level_only: bool) -> set[str]:
    """onnxq modules imported by the file (``from onnxq.x import y`` counts ``onnxq.x.y`` when that is a module)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in MODULES}


def test_no_import_cycle() -> None:
    graph = {name: imported_modules(path, top_level_only=False) - {name} for name, path in MODULES.items()}
    state: dict[str, str] = {}

    def visit(name: str, stack: list[str]) -> None:
        state[name] = "open"
        for child in sorted(graph[name]):
            if child.startswith(name + "."):  # a package importing its own submodule is not a cycle
                continue
            if state.get(child) == "open":
                cycle = stack[stack.index(child):] + [child] if child in stack else [name, child]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if child not in state:
                visit(child, [*stack, child])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_no_onnxq_import_inside_a_function() -> None:
    hidden = {name: sorted(imported_modules(path, False) - imported_modules(path, True))
              for name, path in MODULES.items()}
    assert {name: found for name, found in hidden.items() if found} == {}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_at_most_500_lines(name: str) -> None:
    assert len(MODULES[name].read_text().splitlines()) <= MAX_LINES


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith(NUMPY_ONLY)))
def test_math_modules_import_no_onnx(name: str) -> None:
    tree = ast.parse(MODULES[name].read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 and node.module}
    assert not imported & {"onnx", "onnxruntime"}
    assert not {m for m in imported_modules(MODULES[name], False)} - {m for m in MODULES if m.startswith(
        (*NUMPY_ONLY, "onnxq.errors", "onnxq.quantized_weight"))}
