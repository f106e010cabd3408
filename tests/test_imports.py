"""The package's import graph: no module-level import cycle between leantune's modules, and every
module imports on its own in a fresh interpreter (an order-dependent cycle would fail there)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "leantune"


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def module_level_imports(module: str) -> set[str]:
    """The leantune modules `module` imports when it is imported (function-level imports excluded)."""
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
    known = set(module_names())
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks import nothing at run time
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {name for name in found if name in known and name != module}


def test_no_module_level_import_cycle():
    graph = {m: module_level_imports(m) for m in module_names()}
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_the_graph_sees_imports():
    # The check above is only as good as the graph: the loop's known imports must be in it.
    assert {"leantune.config", "leantune.training.adaptive"} <= module_level_imports("leantune.training.loop")


@pytest.mark.slow
def test_every_module_imports_alone():
    failed = {}
    for module in module_names():
        done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
        if done.returncode:
            failed[module] = done.stderr.strip().splitlines()[-1]
    assert failed == {}
