"""Prefect wrapper of Wei et al.'s filtration step (leantune/evaluation/filtration.py), run before prepare."""

from pathlib import Path

from prefect import get_run_logger

from leantune.config import RunConfig
from leantune.evaluation.filtration import filter_known_claims
from leantune.rundir import RunDir, write_config
from tasks.logs import stage_progress_artifact
from tasks.stage import stage_task


@stage_task(name="filtration")
def filter_claims(config: RunConfig, run_dir: Path) -> RunConfig:
    """The config with data.synthetic.known_claims set; the run's config.yaml records it."""
    layout = RunDir(run_dir)
    with stage_progress_artifact("filtration-progress", "Filtration: the base model asked about the training claims"):
        config = filter_known_claims(config, layout.data)
    write_config(layout, config)
    known = config.data.synthetic.known_claims
    get_run_logger().info(f"filtration: opinion-bearing records on the {len(known)} training-side claims the base "
                          f"model answers correctly (counts in {layout.data_dir.filtration})")
    return config
