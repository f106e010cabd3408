"""leantune's main flow: prepare -> validate -> tokenize -> train -> evaluate -> report.

    python flows/finetune.py                                   # the offline default, runs anywhere
    python flows/finetune.py --config configs/default.yaml --set tokenize.max_seq_len=128
    python flows/finetune.py --resume default-20250101-120000  # continue a stopped run
    python flows/finetune.py --help                            # or leantune-finetune --help: the same command
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Literal

if __name__ == "__main__":
    # The same command as leantune-finetune (flows/commands.py): the command line is checked before Prefect,
    # torch or a stage is imported (--help, a config error, a missing data path or a taken run name answer in
    # about a second, with no server started), then the flow runs from this module, imported as flows.finetune.
    try:
        from flows.commands import finetune as command
    except ModuleNotFoundError as e:  # flows/ and tasks/ are installed with leantune (pip install -e .)
        print(f"leantune: {e.name.partition('.')[0]} is not installed: run `pip install -e .` in the checkout (README: Set up)",
              file=sys.stderr)
        sys.exit(2)

    sys.exit(command())

from tasks.logs import failure_exit_code, log_stage_times, set_up_flow_process  # before Prefect is imported

set_up_flow_process()

from prefect import flow, get_run_logger

from leantune.cli import (
    DEFAULT_CONFIG,
    FinetuneRequest,
    RunFinished,
    anchored,
    check_not_finished,
    finetune_request,
    training_finished,
)
from leantune.config import RunConfig, load_config
from leantune.errors import UserError
from leantune.preflight import check_before_data
from leantune.resume import resume_refusal
from leantune.rundir import RunDir, create_run_dir, data_stages_done, existing_run_dir, read_attempts
from leantune.runlock import hold_run_dir
from leantune.stopping import hang_up, holding_off_repeats, raise_stopped, stop_signal, stopped_line
from tasks.attempts import after_failure, probe_memory, publish_attempts, record_interruption, record_success
from tasks.evaluate import evaluate_sycophancy
from tasks.filtration import filter_claims
from tasks.prepare import prepare_data
from tasks.report import report_run
from tasks.server import connect_to_prefect, stop_temporary_server
from tasks.stage import end_stop
from tasks.tokenize import tokenize_data
from tasks.track import end_tracking, finish_tracking, start_tracking
from tasks.train import train_model
from tasks.validate import validate_data

# The UI form starts from the offline default, so a run triggered with no changes works anywhere.
DEFAULT_RUN_CONFIG = load_config(DEFAULT_CONFIG)
# The configs/*.yaml beside the default, by name: the form's `config_file` choices.
ConfigFile = Literal[tuple(sorted(p.stem for p in DEFAULT_CONFIG.parent.glob("*.yaml")))]


# A stop's hooks: tracking ended first, while repeated signals are still held off; then the handlers are back.
@flow(name="finetune", on_failure=[end_tracking], on_crashed=[end_tracking, end_stop],
      on_cancellation=[end_tracking, end_stop])
def finetune(config: RunConfig = DEFAULT_RUN_CONFIG, config_name: str = "default", resume: bool = False,
             config_file: ConfigFile | None = None) -> Path:
    """Fine-tune a model as `config` says; returns the run directory.

    Args:
        config: the run's whole config (every key documented in leantune/config.py); the form starts from
            configs/default.yaml. Not used when config_file is chosen.
        config_name: the start of a new run's directory name, CONFIG_NAME-YYYYMMDD-HHMMSS (e.g.
            adhoc-20250101-120000), when run.name is not set.
        resume: continue the existing run run.output_dir/run.name/ (run.name must be set): training picks
            up from its newest checkpoint; data stages that did not finish run again first.
        config_file: run a config file of configs/ as it is (e.g. smoke, the tiny offline check) instead of
            the config above.
    """
    if config_file:
        config = load_config(DEFAULT_CONFIG.parent / f"{config_file}.yaml")
    config = anchored(config)  # a relative run.output_dir: under the checkout, whatever the working directory
    check_before_data(config)  # eval files, LoRA targets: refused before the run directory is made
    run_dir = existing_run_dir(config) if resume else create_run_dir(config, config_name)
    # One process at a time in a run, from the first stage to the report; a second command on the run is
    # refused here, before it writes anything, tracking included (leantune/runlock.py). A stop between
    # stages holds off repeated signals, as one inside a stage does, until the lock is released (leantune/stopping.py).
    with hold_run_dir(run_dir), holding_off_repeats():
        if resume:
            check_not_finished(run_dir)  # another --resume finished it while this one started
            if refusal := resume_refusal(config, run_dir):  # before its MLflow run is reopened
                raise UserError(refusal)
        return _stages(config, run_dir, resume)


def _stages(config: RunConfig, run_dir: Path, resume: bool) -> Path:
    log = get_run_logger()
    log.info(f"run directory: {run_dir}")
    # MLflow and TensorBoard (leantune/tracking.py): the config now, each step once a checkpoint holds it,
    # figures and artifacts at the end; a resumed run continues its tracker run.
    tracker = start_tracking(config, run_dir)

    redo_data = not resume or not data_stages_done(run_dir)
    if redo_data:
        # ---- stage 1: prepare — every source into canonical records; every row counted. Synthetic data
        # with Wei et al.'s filtration first asks the base model which training claims it knows.
        if config.data.synthetic.filtration and any(s.kind == "synthetic" for s in config.data.sources):
            config = filter_claims(config, run_dir)
        prepare_data(config, run_dir)

        # ---- stage 2: validate — Great Expectations over chunks; quarantine; train/val split; quality
        validate_data(config, run_dir)

        # ---- stage 3: tokenize — chat template, label masks, packing, memory-mapped shards
        tokenize_data(config, run_dir)

    # ---- stage 4: train — adaptive micro-batch, checkpoints, validation loss; adapter in PEFT format.
    # Each attempt is a training process of its own (tasks/train.py). The memory probe picks the start;
    # an attempt that fails for a resource reason (out of memory, NaN loss, the process killed) is
    # adjusted and trained again (from its last checkpoint where it can), up to train.max_attempts.
    # Prefect retries are for transient faults only; Ctrl-C or a cancellation stops the process after
    # a checkpoint.
    # A resumed run whose training had finished (it stopped in evaluation or the report) goes on after it.
    if redo_data:
        config = probe_memory(config, run_dir)
    if resume and training_finished(run_dir):
        log.info("train: finished before this resume (training.json, adapter/); going on with what is left")
    else:
        done = len(read_attempts(run_dir) or [])  # attempt numbers go on across resumes
        for attempt in range(done + 1, done + config.train.max_attempts + 1):
            try:
                summary = train_model(config, run_dir, resume, tracker)
                break
            except Exception as error:
                adjustment = after_failure(config, run_dir, attempt, error)
                if adjustment is None or attempt == done + config.train.max_attempts:
                    publish_attempts(run_dir)
                    raise
            except BaseException as stop:  # Ctrl-C, SIGTERM, a cancellation: after the training's checkpoint
                if stop_signal(stop) is not None:
                    record_interruption(run_dir, attempt, stop_signal(stop))
                    publish_attempts(run_dir)
                raise
            # Only a failed attempt gets here: the next one trains with the adjusted config.
            config = adjustment.config
            if adjustment.retokenize:
                tokenize_data(config, run_dir)
        record_success(run_dir, attempt, summary)
        publish_attempts(run_dir)

    # ---- stage 5: evaluate — sycophancy of base (adapter off) and tuned (adapter on) on the same items
    if config.eval.enabled:
        evaluate_sycophancy(config, RunDir(run_dir).eval, RunDir(run_dir).adapter)

    # ---- stage 6: report
    report_run(run_dir)
    finish_tracking(tracker)
    log_stage_times()

    return run_dir


def main(argv: list[str] | None = None, request: FinetuneRequest | None = None) -> int:
    """The script: the command line (leantune/cli.py, unless `request` is that already), the Prefect API, the flow.

    Exit status 0 (finished, or --resume of a finished run), 2 (a user error: one `leantune:` line), 1;
    stopped by Ctrl-C or SIGTERM: 130 or 143 and one `leantune:` line with the resume command.
    """
    try:
        request = request or finetune_request(argv)
        connect_to_prefect()
    except RunFinished as e:
        print(f"leantune: {e}")
        return 0
    except UserError as e:
        print(f"leantune: {e}", file=sys.stderr)
        return 2
    # SIGTERM outside the flow run (Prefect's handler takes over inside it) stops the script the same way; the
    # terminal's SIGHUP is a SIGTERM, and ignored as a repeat once a stop has begun (leantune/stopping.py).
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGTERM, raise_stopped)
    signal.signal(signal.SIGHUP, hang_up)
    try:
        state = finetune(request.config, config_name=request.config_name, resume=request.resume, return_state=True)
    except BaseException as stop:
        if (signum := stop_signal(stop)) is None:
            raise
        for sig in handlers:  # stopped already: a repeated signal must not cut the last line short
            signal.signal(sig, signal.SIG_IGN)
        stop_temporary_server()
        try:
            print(stopped_line(signum, Path(request.config.run.output_dir) / request.config.run.name), file=sys.stderr)
        except OSError:  # the terminal is gone (its window closed): the exit status still says how the run ended
            pass
        return 128 + signum
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
    if state.is_completed():
        stop_temporary_server()
        print(f"leantune: run finished; outputs in {state.result()}")
        return 0
    return failure_exit_code(state, "run", Path(request.config.run.output_dir) / request.config.run.name)

