"""The Prefect task options every leantune stage shares, and the stage cache's hit as a log line.

A stage's result is files in the run directory, which leantune's own stage cache restores
(leantune/stagecache.py; ARCHITECTURE.md says why not Prefect's): Prefect's result cache would return a
stored value and leave a new run directory empty, and persisting return values would only store them twice.
"""

from collections.abc import Callable
from functools import partial
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from leantune.config import RunConfig
from leantune.stagecache import run_cached

stage_task = partial(task, cache_policy=NO_CACHE, persist_result=False)


def cached(config: RunConfig, stage: str, run_dir: Path, compute: Callable[[], dict], same: str) -> dict:
    """`compute` through the stage cache (`run_cached`); a hit says so in one line, naming what was the same."""
    stats, hit = run_cached(config, stage, run_dir, compute)
    if hit:
        get_run_logger().info(f"{stage}: skipped, same {same} as an earlier run; outputs restored from the stage "
                              f"cache (key {hit})")
    return stats
