"""The documents a newcomer reads stay true to the tree: the README is a user's guide of under 500 lines, and
every repository path that the README, ARCHITECTURE.md, bench/README.md, docs/ or a comment or docstring of the
code names exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A repository path as the documents write it: leantune/training/loop.py, tests/training/test_loss.py, bench/x.py,
# configs/smoke.yaml, expectations/records.json.
PATH = re.compile(r"(?<![\w/.])((?:leantune|tests|bench|configs|expectations|flows|tasks|deployments)/[\w/.-]*\w\.(?:py|yaml|json|md))(?!\w)")


def test_the_readme_is_a_guide_of_under_500_lines():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 500
    for heading in ("## Set up", "## The finetune flow", "## What a run writes", "## Configs", "## Tests",
                    "## Troubleshooting"):
        assert heading in readme


def test_every_path_the_documents_and_the_code_name_exists():
    sources = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md")),
               *sorted((ROOT / "leantune").rglob("*.py")), *sorted((ROOT / "tasks").glob("*.py")),
               *sorted((ROOT / "flows").glob("*.py"))]
    missing = sorted({(src.relative_to(ROOT).as_posix(), path) for src in sources
                      for path in PATH.findall(src.read_text()) if not (ROOT / path).exists()})
    assert missing == []


def test_the_path_pattern_finds_paths():
    text = "see leantune/training/loop.py, `tests/training/test_loss.py` and (configs/smoke.yaml); not x/leantune/a.py"
    assert PATH.findall(text) == ["leantune/training/loop.py", "tests/training/test_loss.py", "configs/smoke.yaml"]


def test_the_readmes_test_commands_follow_from_its_first_command():
    """The README's first command installs no test extra: its Tests section installs it before any pytest."""
    import tomllib

    readme = (ROOT / "README.md").read_text()
    setup = readme[readme.index("## Set up"):]
    first = setup[setup.index("```bash\n") + 8:].splitlines()[0]
    assert "-e ." in first and "pytest" not in first  # the first command: the main flow, no test extra
    tests = readme[readme.index("## Tests"):]
    block = tests[tests.index("```bash\n") + 8:tests.index("```", tests.index("```bash\n") + 8)].splitlines()
    assert block[0] == ".venv/bin/pip install -e '.[test]'" and all("pytest" in line for line in block[1:])
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    assert any(req.startswith("pytest") for req in extra)
