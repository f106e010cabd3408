"""Prefect side of the feedback across attempts: the memory probe task, and what happens between attempts.

`probe_memory` (a task) picks the starting method, micro-batch and gradient checkpointing
(leantune/probe.py) and publishes the estimate. `after_failure` turns a failed training attempt
(the AttemptFailed or UserError tasks/train.py raised for the training process) into the next config
(leantune/attempts.py) and prepares the run directory for it; `record_success` closes the history
(`record_interruption` when a signal stopped it);
`publish_attempts` is the history's artifact.

On disk: runs/<name>/attempts.jsonl, one line per attempt (attempts.history_entry); config.yaml
holds the config the last attempt that ran trained with (the train task writes it), so `--resume`
continues with it. A checkpoint the next attempt cannot resume from (other method or data) is moved
to attempts/attempt-N/checkpoints/ with that attempt's metrics.jsonl, never deleted
(leantune.rundir.set_aside_attempt).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact

from leantune.attempts import (
    Adjustment,
    AttemptReport,
    adjust,
    history_entry,
    history_markdown,
    report_from_run,
)
from leantune.config import RunConfig
from leantune.probe import probe
from leantune.rundir import RunDir, append_attempt, read_attempts, set_aside_attempt, write_config
from leantune.runlock import RunDirBusy
from tasks.stage import stage_task


@stage_task(name="probe-memory")
def probe_memory(config: RunConfig, run_dir: Path) -> RunConfig:
    """The config training starts with: `config` with the probe's choices (and config.yaml updated)."""
    log = get_run_logger()
    index = json.loads(RunDir(run_dir).train_index.read_text())
    plan = probe(config, vocab_size=index["tokenizer"]["vocab_size"])
    if plan is None:
        log.info(f"probe: the shape of {config.model.name_or_path} is unknown here; starting as configured")
        return config
    create_markdown_artifact(plan.markdown(), key="memory-probe",
                             description="Estimated training memory against the device's free memory")
    if not plan.changes:
        return config
    log.info(f"probe: starting with {', '.join(plan.changes)} (estimate {plan.estimate.describe()})")
    started = plan.apply(config)
    write_config(run_dir, started)
    return started


def after_failure(config: RunConfig, run_dir: Path, attempt: int, error: BaseException) -> Adjustment | None:
    """Record the failed attempt and return the next one's adjustment (None: do not try again).

    For an adjustment that cannot resume, the attempt's checkpoints move to attempts/attempt-N/.
    """
    if isinstance(error, RunDirBusy):  # the run belongs to another live process: nothing of it is touched
        return None
    log = get_run_logger()
    # The device facts adjust needs (the type, bf16) come with the error: the training process wrote them.
    report = report_from_run(attempt, run_dir, error=error)
    adjustment = adjust(config, report)
    append_attempt(run_dir, history_entry(report, adjustment))
    if adjustment is None:
        log.error(f"attempt {attempt} failed ({report.outcome}: {report.message}); no adjustment helps")
        return None
    log.warning(f"attempt {attempt}: {adjustment.reason}; next attempt with "
                f"{', '.join(adjustment.changes) or 'the same config'}"
                f"{'' if adjustment.resume else ' from the start (the checkpoints cannot be resumed)'}")
    if not adjustment.resume:
        set_aside_attempt(run_dir, attempt)  # the next attempt starts from step 0 and would overwrite them
    # config.yaml is not written here: the train task writes the config each attempt trains with, so
    # an adjustment no attempt follows (the last attempt failed) never reaches the run's config.
    return adjustment


def record_interruption(run_dir: Path, attempt: int, signum: int) -> None:
    """Record an attempt stopped by Ctrl-C, SIGTERM or a cancellation (after its checkpoint) as interrupted."""
    report = report_from_run(attempt, run_dir)
    report.outcome, report.message = "interrupted", f"stopped by {signal.Signals(signum).name}"
    append_attempt(run_dir, history_entry(report, None))


def record_success(run_dir: Path, attempt: int, summary: dict) -> None:
    append_attempt(run_dir, history_entry(AttemptReport(attempt=attempt, outcome="completed",
                                                        step=summary["steps"]), None))


def publish_attempts(run_dir: Path) -> None:
    """The attempt history (attempts.jsonl) as a markdown artifact, when there was more than one attempt
    or a failure."""
    entries = read_attempts(run_dir) or []
    if len(entries) > 1 or any(e["outcome"] != "completed" for e in entries):
        create_markdown_artifact(f"## Training attempts\n\n{history_markdown(entries)}", key="training-attempts",
                                 description="Why each attempt ended and what the next one changed")
