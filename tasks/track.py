"""Prefect wrapper of experiment tracking (leantune/tracking.py): the flow run's id and name as tags,
the MLflow run in an artifact, and the run ended as FAILED or KILLED when the flow run fails, crashes
or is cancelled.

`start_tracking` returns the run's `Tracker`; the train task logs steps through it as checkpoints hold
them, `finish_tracking` logs the rest and ends the MLflow run. `end_tracking` is a flow state hook
(on_failure, on_crashed, on_cancellation) that finds the tracker its flow run started.
"""

import inspect
from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from leantune.config import RunConfig
from leantune.rundir import checkpointed_step
from leantune.tracking import Tracker, end_runs_tagged, tracking_lines
from tasks.stage import stage_task
from tasks.train import finish_progress

_STARTED: dict[str, Tracker] = {}  # flow run id -> the tracker it started, for end_tracking


@stage_task(name="track")
def start_tracking(config: RunConfig, run_dir: Path) -> Tracker:
    """Start (or, for a resumed run, continue) the run's MLflow run and TensorBoard writer."""
    tracker = Tracker(config, run_dir)
    tracker.start({"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name)})
    _STARTED[str(flow_run.id)] = tracker
    lines = tracking_lines(run_dir) + [f"{backend} is left out: {problem}"
                                       for backend, problem in tracker.problems.items()]
    if lines:
        create_markdown_artifact("## Tracking\n\n" + "\n".join(f"- {line}" for line in lines) + "\n",
                                 key="tracking", description=f"Where run {Path(run_dir).name} is tracked")
        get_run_logger().info("tracking: " + "; ".join(lines))
    return tracker


@stage_task(name="track-finish")
def finish_tracking(tracker: Tracker) -> None:
    """Log the figures and artifacts and end the MLflow run as finished."""
    _STARTED.pop(str(flow_run.id), None)
    tracker.finish("FINISHED")


def end_tracking(flow, flow_run, state) -> None:
    """Flow state hook (Prefect calls it with these keywords): end the failed (FAILED), crashed or
    cancelled (KILLED) run's MLflow run, never left RUNNING, and say in its training-progress artifact
    where it stopped.

    In the flow's process the tracker it started logs what the run directory has first. A cancelled
    deployment run's hooks run in Prefect's runner after it stopped the flow's process: there the MLflow
    runs the flow run tagged (prefect.flow_run_id) are found in the store of the run's config.
    """
    status = "FAILED" if state.is_failed() else "KILLED"
    tracker = _STARTED.pop(str(flow_run.id), None)
    if tracker is not None:
        tracker.finish(status)
        run_dirs = [tracker.run_dir]
    else:
        config = flow_run.parameters.get("config") or inspect.signature(flow.fn).parameters["config"].default
        config = config if isinstance(config, RunConfig) else RunConfig.model_validate(config)
        run_dirs = end_runs_tagged(config, "prefect.flow_run_id", str(flow_run.id), status)
    ended = "cancelled" if state.is_cancelling() or state.is_cancelled() else state.name.lower()
    for run_dir in run_dirs:
        finish_progress(flow_run.id, f"Training stopped at step {checkpointed_step(run_dir)} (the last checkpoint): "
                        f"the flow run ended {ended}; continue it with --resume {run_dir.name}")
