"""The run directory, runs/<name>/: created once per run, holding the resolved config and every output."""

from __future__ import annotations

import json
import time
from pathlib import Path

from leantune.config import RunConfig, dump_config
from leantune.errors import UserError


def default_run_name(config_name: str) -> str:
    return f"{config_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def create_run_dir(cfg: RunConfig, config_name: str = "run") -> Path:
    """Make runs/<name>/ with data/ and tokens/, and write the resolved config to config.yaml.

    An existing, non-empty run directory is refused: outputs of two runs must never mix.
    """
    name = cfg.run.name or default_run_name(config_name)
    run_dir = Path(cfg.run.output_dir) / name
    if problem := run_dir_problem(cfg, name):
        raise UserError(problem)
    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    (run_dir / "tokens").mkdir(exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return run_dir


def run_dir_problem(cfg: RunConfig, name: str | None = None) -> str | None:
    """Why a new run named `name` (default: run.name) cannot start, or None: its directory exists and is not empty."""
    name = name or cfg.run.name
    run_dir = Path(cfg.run.output_dir) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        return (f"run directory {run_dir} already exists and is not empty; continue that run with "
                f"--resume {name}, choose another name with --run-name (or run.name in the config), or "
                f"delete that directory")
    return None


def data_stages_done(run_dir: Path) -> bool:
    """Whether prepare, validate and tokenize all finished in `run_dir`: the token suite, the data stages'
    last step, passed (tokens/validation.json). A resume of a run that stopped before that (a data error,
    a kill) runs the data stages again instead of training on tokens that are missing or partial."""
    path = Path(run_dir) / "tokens" / "validation.json"
    try:
        return json.loads(path.read_text()).get("success") is True
    except (OSError, ValueError, AttributeError):
        return False
