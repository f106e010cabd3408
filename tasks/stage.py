"""The Prefect task options every leantune stage shares, the hook that ends a stop, and the stage cache's hit
as a log line.

A stage's result is files in the run directory, which leantune's own stage cache restores
(leantune/stagecache.py; ARCHITECTURE.md says why not Prefect's): Prefect's result cache would return a
stored value and leave a new run directory empty, and persisting return values would only store them twice.
"""

from collections.abc import Callable
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from leantune.config import RunConfig
from leantune.stagecache import run_cached
from leantune.stopping import holding_off_repeats, release_repeats


def stage_task(**options):
    """`@task(**options)` for a stage. A stop inside it (Ctrl-C, SIGTERM, a cancellation) holds off repeated
    signals before Prefect records the task's crash: a repeat (`timeout`'s second SIGTERM, the terminal's
    hangup) raised in the middle of that recording would leave the task "Running" (leantune/stopping.py)."""
    return lambda fn: task(holding_off_repeats()(fn), cache_policy=NO_CACHE, persist_result=False, **options)


def end_stop(flow, flow_run, state) -> None:
    """Flow state hook (crashed, cancelled: how a stop ends a run), the last of its list: the run is over, so the signal
    handlers a stop held off are put back (`release_repeats`); a flow called from Python leaves them as
    they were."""
    release_repeats()


def cached(config: RunConfig, stage: str, run_dir: Path, compute: Callable[[], dict], same: str) -> dict:
    """`compute` through the stage cache (`run_cached`); a hit says so in one line, naming what was the same."""
    stats, hit = run_cached(config, stage, run_dir, compute)
    if hit:
        get_run_logger().info(f"{stage}: skipped, same {same} as an earlier run; outputs restored from the stage "
                              f"cache (key {hit})")
    return stats
