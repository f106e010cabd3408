"""Packaging: the wheel holds the leantune package, its run-time data and the flows' layer (tasks/, flows/) with
one command per flow, and nothing else; the Great Expectations suites are found in the checkout or where the
config says, else a clear error."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from leantune.config import load_config
from leantune.errors import UserError
from leantune.validation import suites_dir

REPO = Path(__file__).resolve().parents[1]


def test_suites_found_in_the_checkout_by_default():
    assert suites_dir(load_config()) == REPO / "expectations"


def test_suites_dir_from_the_config(tmp_path):
    shutil.copytree(REPO / "expectations", tmp_path / "suites")
    cfg = load_config(overrides=[f"validation.expectations_dir={tmp_path / 'suites'}"])
    assert suites_dir(cfg) == tmp_path / "suites"


def test_missing_suites_name_the_key_and_the_fix(tmp_path):
    (tmp_path / "records.json").write_text("{}")  # tokens.json missing
    cfg = load_config(overrides=[f"validation.expectations_dir={tmp_path}"])
    with pytest.raises(UserError, match=r"validation.expectations_dir: no Great Expectations suites .*tokens.json"):
        suites_dir(cfg)


@pytest.mark.slow
def test_wheel_holds_the_library_and_its_data_only(tmp_path):
    # Built from a copy of what the wheel is made of, so that setuptools' build/ stays out of the checkout.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info",
                                                               "__pycache__", ".pytest_cache", ".ruff_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("leantune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"leantune", "tasks", "flows"}  # the library and its Prefect layer, for the commands
    sources = {p.relative_to(REPO).as_posix() for package in top_level for p in (REPO / package).rglob("*.py")}
    assert sources <= names
    [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    for flow in ("finetune", "evaluate", "profile", "sweep"):
        assert f"leantune-{flow} = flows.commands:{flow}" in scripts
    for data in ("leantune/gpus.yaml", "leantune/resources/names.txt", "leantune/resources/NOTICE.md",
                 "leantune/resources/sycophancy/political_typology_quiz_sample.jsonl",
                 "leantune/resources/sycophancy/NOTICE.md"):
        assert data in names


def test_default_config_is_found_from_a_wheel_install(tmp_path):
    from leantune.cli import default_config

    checkout, site = tmp_path / "checkout", tmp_path / "venv" / "site-packages"
    (checkout / "configs").mkdir(parents=True)
    (checkout / "flows").mkdir()
    (checkout / "configs" / "default.yaml").write_text("{}\n")
    site.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    wanted = checkout / "configs" / "default.yaml"
    # The package in site-packages, the flow script in the checkout, run from anywhere.
    assert default_config(site, str(checkout / "flows" / "finetune.py"), elsewhere) == wanted
    # The package in the checkout (a clone, an editable install) wins.
    assert default_config(checkout, str(elsewhere / "x.py"), elsewhere) == wanted
    # A script outside any checkout, run from the checkout.
    assert default_config(site, str(elsewhere / "x.py"), checkout) == wanted
    # Nowhere: the place beside the package, which the config loader's error names.
    assert default_config(site, str(elsewhere / "x.py"), elsewhere) == site / "configs" / "default.yaml"


def test_the_readmes_mlflow_ui_is_the_version_of_the_pinned_client():
    """The README's UI command installs `mlflow` at the version pyproject pins `mlflow-skinny` to (and the one
    installed): an older UI refuses a newer client's store ("out-of-date database schema")."""
    import re
    from importlib.metadata import version

    [pin] = re.findall(r'"mlflow-skinny==([\d.]+)"', (REPO / "pyproject.toml").read_text())
    [ui] = re.findall(r'pip install "mlflow==([\d.]+)"', (REPO / "README.md").read_text())
    assert ui == pin == version("mlflow-skinny")
