"""Prefect wrapper of the training stage: training in its own process, its log and progress in the
flow run, a summary log line and artifact.

The training process (leantune/training/launch.py: `python -m leantune.training.loop`, or torchrun)
reads the config from run_dir/config.yaml, so the task writes the config it is given there first.
While it runs, its output goes to the task's log line by line, and the steps it appends to
metrics.jsonl update two artifacts, each one artifact updated in place (a new version per update would
bury the run's other artifacts under hundreds): a progress bar (key training-progress) and a table of
the latest steps (key training-metrics); on a terminal they also draw a bar (leantune.progress.TrainingBar).
A multi-node run with train.distributed.node_deployment starts a flow run of that deployment per other
machine first (`start_other_nodes`; flows/node.py runs the machine's torchrun agent: `train_node_agent`).
When it fails, the task raises what it stands for
(leantune.failures.attempt_failure): AttemptFailed (oom, nan, killed, error), which the flow's attempt
loop may answer with another attempt, or the UserError it reported, which ends the run.
"""

import json
import time
from pathlib import Path
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactUpdate

from leantune.config import RunConfig
from leantune.cost import run_cost_report
from leantune.errors import UserError
from leantune.failures import EXIT_STOPPED, TORCHRUN_WORKER_EXIT, attempt_failure
from leantune.metrics import StepHistory
from leantune.progress import TrainingBar, training_percent, training_progress_text
from leantune.report import best_val_text, training_summary_markdown
from leantune.resume import resume_refusal
from leantune.rundir import RunDir, write_config
from leantune.runlock import check_run_dir_free
from leantune.tracking import Tracker
from leantune.training.launch import (
    RENDEZVOUS_TIMEOUT,
    progress_markdown,
    rendezvous_timeout_message,
    run_node_agent,
    run_training,
    training_command,
)
from leantune.training.optim import total_steps
from tasks.stage import stage_task

PROGRESS_EVERY_S = 10.0  # the artifacts are updated at most this often (and after the last step)


class _TrainingProgress:
    """One training attempt's progress, from its metrics.jsonl step lines: the training-progress bar and the
    training-metrics table (each one artifact, updated in place), and the bar in the flow's terminal."""

    def __init__(self, total: int):
        self.total = total
        self.history = StepHistory()
        self._published_at: float | None = None
        self._published_step: int | None = None
        self.bar = create_progress_artifact(0.0, key="training-progress", description=f"Training: {total} steps")
        self._table: UUID | None = None  # the training-metrics artifact, created at the first publish
        self.terminal = TrainingBar(total)

    def add(self, lines: list[dict]) -> None:
        self.terminal.update(self.history.add(lines))
        if self._published_at is None or time.monotonic() - self._published_at >= PROGRESS_EVERY_S:
            self.publish()

    def publish(self) -> None:
        steps = self.history.steps
        if not steps or steps[-1]["step"] == self._published_step:
            return
        step = steps[-1]["step"]
        update_progress_artifact(self.bar, training_percent(step, self.total),
                                 description=training_progress_text(steps, self.total))
        table = progress_markdown(steps, self.total)
        if self._table is None:
            self._table = create_markdown_artifact(
                table, key="training-metrics", description="Training: the latest steps (loss, lr, tokens/s, micro-batch)")
        else:
            # In place: a new version per update would bury the run's other artifacts.
            with get_client(sync_client=True) as client:
                client.update_artifact(self._table, ArtifactUpdate(data=table))
        self._published_at, self._published_step = time.monotonic(), step

    def close(self) -> None:
        self.publish()
        self.terminal.close()


def finish_progress(flow_run_id, description: str) -> None:
    """Give the flow run's training-progress bar its last word (a stopped run's bar would read as running)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        for artifact in client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["training-progress"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))):
            client.update_artifact(artifact.id, ArtifactUpdate(description=description))


def training_steps(config: RunConfig, run_dir: Path) -> int:
    index = json.loads(RunDir(run_dir).train_index.read_text())
    return total_steps(config, index["counts"]["sequences"])


def start_other_nodes(deployment: str, run_dir: Path, nnodes: int, run=None) -> list:
    """A flow run of `deployment` per other machine of a multi-node run (node_rank 1 to nnodes-1, the run
    directory by its absolute path), started without waiting for them: each starts its machine's torchrun
    agent, which joins this attempt's rendezvous (config.yaml's rdzv_endpoint and rdzv_id). `run`: Prefect's
    run_deployment (tests pass a stand-in)."""
    if run is None:
        from prefect.deployments import run_deployment as run
    return [run(deployment, parameters={"run_dir": str(Path(run_dir).resolve()), "node_rank": rank}, timeout=0,
                flow_run_name=f"{Path(run_dir).name}-node{rank}") for rank in range(1, nnodes)]


@stage_task(name="train-node")
def train_node_agent(run_dir: Path, node_rank: int) -> None:
    """This machine's torchrun agent of a multi-node run (node `node_rank`), to its end; its output in the log."""
    log = get_run_logger()
    returncode = run_node_agent(run_dir, node_rank, on_log=log.log)
    if returncode != 0:
        raise RuntimeError(f"node {node_rank}'s torchrun agent for {run_dir} exited with status {returncode}; the "
                           "train stage of the run's flow says why the attempt ended")


@stage_task(name="train")
def train_model(config: RunConfig, run_dir: Path, resume: bool = False, tracker: Tracker | None = None) -> dict:
    log = get_run_logger()
    # The training process reads its config here: the probe's, an adjusted attempt's or --resume --set's.
    # Refused before anything is written: another process training in this run, or a resume whose
    # settings would alter the updates (config.yaml must keep the run's own config then).
    check_run_dir_free(run_dir)
    if resume and (refusal := resume_refusal(config, run_dir)):
        raise UserError(refusal)
    write_config(run_dir, config)
    progress = _TrainingProgress(training_steps(config, run_dir))
    worker_exitcodes = []
    rendezvous_timed_out = []  # multi-node: torchrun's error when a node never joined

    def on_log(level: int, text: str) -> None:
        # torchrun's own summary of a failed worker: how a killed rank (which writes nothing) is told apart.
        if match := TORCHRUN_WORKER_EXIT.match(text):
            worker_exitcodes.append(int(match.group(1)))
        if RENDEZVOUS_TIMEOUT in text:
            rendezvous_timed_out.append(text)
        log.log(level, text)

    def on_metrics(lines: list[dict]) -> None:
        progress.add(lines)
        if tracker is not None:
            tracker.log_steps()  # MLflow and TensorBoard get the steps a checkpoint holds (leantune/tracking.py)

    d = config.train.distributed
    if d.nnodes > 1 and d.node_deployment:
        runs = start_other_nodes(d.node_deployment, run_dir, d.nnodes)
        log.info(f"started {d.node_deployment} for nodes 1-{d.nnodes - 1}: flow runs {', '.join(str(r.id) for r in runs)}")
    try:
        returncode = run_training(training_command(config, run_dir, resume), run_dir, on_log=on_log,
                                  on_metrics=on_metrics)
    finally:
        progress.close()
    if returncode not in (0, EXIT_STOPPED) and rendezvous_timed_out:
        raise UserError(rendezvous_timeout_message(config))
    if returncode not in (0, EXIT_STOPPED):
        raise attempt_failure(run_dir, returncode, worker_exitcodes)
    s = json.loads(RunDir(run_dir).training.read_text())
    if not s["completed"]:
        raise UserError(f"training stopped after step {s['steps']} of {s['total_steps']} (checkpoint saved); "
                        f"continue it with: python flows/finetune.py --resume {run_dir.name}")
    create_markdown_artifact(training_summary_markdown(s, run_cost_report(config, run_dir, s)),
                             key="training-summary", description="Training: steps, losses, micro-batch, throughput, memory")
    tokens_per_s = s["tokens"] / s["train_seconds"] if s["train_seconds"] else 0.0
    log.info(f"train: {s['steps']} steps, {s['tokens']:,} tokens at {tokens_per_s:,.0f} tokens/s; loss "
             f"{s['final_loss']:.4f}, best validation loss {best_val_text(s)}; micro-batch "
             f"{s['micro_batch_size']}; adapter in {s['adapter']}")
    return s
