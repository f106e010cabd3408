"""No function in leantune/ is 120 lines or longer (measured with ast, decorators and docstring included):
a function that long no longer reads top to bottom; split it into named steps."""

import ast
from pathlib import Path

LIMIT = 120
PACKAGE = Path(__file__).resolve().parents[1] / "leantune"


def function_lengths(root: Path) -> dict[str, int]:
    """'path:qualified.name' -> lines from its first decorator to its last line, for every function under root."""
    lengths = {}

    def visit(node, where: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = f"{prefix}{child.name}" if hasattr(child, "name") else prefix
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                lengths[f"{where}:{name}"] = child.end_lineno - first + 1
            visit(child, where, f"{name}." if hasattr(child, "name") else prefix)

    for path in sorted(root.rglob("*.py")):
        visit(ast.parse(path.read_text(), str(path)), str(path.relative_to(root.parent)), "")
    return lengths


def test_every_function_in_leantune_is_under_120_lines():
    lengths = function_lengths(PACKAGE)
    assert len(lengths) > 300  # the walk found the package's functions, nested ones included
    too_long = {name: n for name, n in lengths.items() if n >= LIMIT}
    assert too_long == {}, f"functions of {LIMIT} lines or more: {too_long}"


def test_the_measure_counts_decorators_docstrings_and_nested_functions(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "m.py").write_text('@staticmethod\ndef f():\n    """doc"""\n\n    def g():\n        return 1\n'
                                  '    return g\n\n\nclass C:\n    def h(self):\n        pass\n')
    assert function_lengths(package) == {"pkg/m.py:f": 7, "pkg/m.py:f.g": 2, "pkg/m.py:C.h": 2}
