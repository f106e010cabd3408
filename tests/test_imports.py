"""The package's import graph: no import cycle between leantune's modules or between its packages, counting
the imports inside functions, and every module imports on its own in a fresh interpreter (an
order-dependent cycle would fail there)."""

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


def imports_of(module: str, inside_functions: bool = True) -> set[str]:
    """The leantune modules `module` imports: when it is imported, and (inside_functions) when any of its
    functions runs. A cycle through a function-level import is still a tangle: the two modules cannot be
    understood, tested or moved one without the other."""
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
    known = set(module_names())
    tree = ast.parse(path.read_text())
    nodes = _run_time_nodes(tree) if inside_functions else (n for n in tree.body if not isinstance(n, ast.If))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {name for name in found if name in known and name != module}


def _run_time_nodes(node: ast.AST):
    """Every node under `node` except the bodies of `if TYPE_CHECKING:` blocks, which import nothing at run time."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
            continue
        yield child
        yield from _run_time_nodes(child)


def package_of(module: str) -> str:
    """leantune.data.sources -> leantune.data; a top-level module is its own package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and (PACKAGE / parts[1]).is_dir() else module


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def test_no_import_cycle_between_modules_function_level_imports_included():
    cycle = find_cycle({m: imports_of(m) for m in module_names()})
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    for module in module_names():
        graph.setdefault(package_of(module), set()).update(
            package_of(m) for m in imports_of(module) if package_of(m) != package_of(module))
    cycle = find_cycle(graph)
    assert cycle is None, "package import cycle: " + " -> ".join(cycle)


def test_the_graph_sees_imports():
    # The checks above are only as good as the graph: the loop's known imports, a function-level one
    # included, must be in it, and a made-up cycle must be found.
    assert {"leantune.config", "leantune.training.adaptive"} <= imports_of("leantune.training.loop", False)
    assert "leantune.gguf" in imports_of("leantune.evaluation.runner") - imports_of("leantune.evaluation.runner", False)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert package_of("leantune.data.sources") == "leantune.data" and package_of("leantune.config") == "leantune.config"


@pytest.mark.slow
def test_every_module_imports_alone():
    failed = {}
    for module in module_names():
        done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
        if done.returncode:
            failed[module] = done.stderr.strip().splitlines()[-1]
    assert failed == {}


def test_every_package_map_names_each_of_its_modules():
    # The maps in the __init__ docstrings are what a newcomer reads first: a module missing from its map is
    # a module nobody finds. ARCHITECTURE.md names every package.
    architecture = (PACKAGE.parent / "ARCHITECTURE.md").read_text()
    for init in [PACKAGE / "__init__.py", *sorted(PACKAGE.glob("*/__init__.py"))]:
        package = init.parent
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        names = [p.name for p in package.glob("*.py") if p.name != "__init__.py"]
        names += [f"{p.parent.name}/" for p in package.glob("*/__init__.py")]
        missing = [n for n in names if n not in doc]
        assert missing == [], f"{init.relative_to(PACKAGE.parent)} does not name {missing}"
        if package != PACKAGE:
            assert f"`{package.name}/`" in architecture, f"ARCHITECTURE.md does not name {package.name}/"


def test_no_module_of_the_library_imports_torch_when_imported():
    # ARCHITECTURE.md's rule: heavy libraries are imported inside the functions that need them, so the CLI,
    # the resume policy and the flow process answer in a second. One interpreter imports every module.
    modules = module_names()
    code = (f"import importlib, sys\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
            "print(sorted(h for h in ('torch', 'transformers', 'peft', 'bitsandbytes', 'prefect') if h in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
