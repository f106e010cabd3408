"""leantune's main flow: prepare -> validate -> tokenize -> train -> evaluate -> report.

    python flows/finetune.py                                   # the offline default, runs anywhere
    python flows/finetune.py --config configs/default.yaml --set tokenize.max_seq_len=128
    python flows/finetune.py --resume default-20250101-120000  # continue a stopped run
    python flows/finetune.py --help
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tasks.logs import failure_exit_code, set_up_flow_process  # first: before Prefect is imported

set_up_flow_process()

from prefect import flow, get_run_logger

from leantune.config import ConfigError, RunConfig, load_config
from leantune.errors import UserError
from leantune.rundir import create_run_dir
from tasks.attempts import after_failure, probe_memory, publish_attempts, record_success
from tasks.evaluate import evaluate_sycophancy
from tasks.prepare import prepare_data
from tasks.report import report_run
from tasks.tokenize import tokenize_data
from tasks.train import train_model
from tasks.validate import validate_data

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
# The UI form starts from the offline default, so a run triggered with no changes works anywhere.
DEFAULT_RUN_CONFIG = load_config(DEFAULT_CONFIG)


@flow(name="finetune")
def finetune(config: RunConfig = DEFAULT_RUN_CONFIG, config_name: str = "default", resume: bool = False) -> Path:
    """Fine-tune a model as `config` says; returns the run directory.

    resume: continue the existing run runs/<run.name>/: its data stages are done, so training
    picks up from its newest checkpoint.
    """
    log = get_run_logger()
    run_dir = existing_run_dir(config) if resume else create_run_dir(config, config_name)
    log.info(f"run directory: {run_dir}")

    if not resume:
        # ---- stage 1: prepare — every source into canonical records; every row counted
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
    if not resume:
        config = probe_memory(config, run_dir)
    for attempt in range(1, config.train.max_attempts + 1):
        try:
            summary = train_model(config, run_dir, resume)
            break
        except Exception as error:
            adjustment = after_failure(config, run_dir, attempt, error)
            if adjustment is None or attempt == config.train.max_attempts:
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
        evaluate_sycophancy(config, run_dir / "eval", run_dir / "adapter")

    # ---- stage 6: report
    report_run(run_dir)

    return run_dir


def existing_run_dir(config: RunConfig) -> Path:
    """The directory of the run to resume; it must hold the config.yaml its first attempt wrote."""
    if config.run.name is None:
        raise UserError("resume: run.name is not set; name the run to continue (--resume RUN_NAME)")
    run_dir = Path(config.run.output_dir) / config.run.name
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"resume: {run_dir} is not a leantune run directory (no config.yaml); check the run "
                        "name and run.output_dir, or start a new run without --resume")
    return run_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python flows/finetune.py",
        description="Fine-tune an LLM with leantune. Without arguments it runs the offline default "
        "(a tiny model built from config on synthetic anti-sycophancy data; no network, no GPU).",
    )
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help="YAML config (default: configs/default.yaml); every key is documented in leantune/config.py")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set train.lr=1e-4 (repeatable; values parse as YAML)")
    p.add_argument("--run-name", help="name of the run directory under run.output_dir (same as --set run.name=...)")
    p.add_argument("--resume", metavar="RUN_NAME",
                   help="continue the run RUN_NAME under run.output_dir from its newest checkpoint, with the "
                   "config.yaml it was started with (--set may change settings that do not alter the updates, "
                   "e.g. train.micro_batch_size, or train.lr, which rescales the schedule; others are refused by name)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.run_name:
        overrides.append(f"run.name={args.run_name}")
    if args.resume and args.run_name:
        print("leantune: --resume names the run to continue; leave out --run-name", file=sys.stderr)
        return 2
    try:
        # Validate everything before any heavy step: a config error costs nothing.
        config = load_config(args.config, overrides)
        if args.resume:
            # The run continues with its own resolved config; --config only says where runs are.
            run_dir = Path(config.run.output_dir) / args.resume
            if not (run_dir / "config.yaml").is_file():
                print(f"leantune: --resume: {run_dir} has no config.yaml, so it is not a leantune run; check "
                      "the name (and run.output_dir)", file=sys.stderr)
                return 2
            config = load_config(run_dir / "config.yaml",
                                 [*overrides, f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}"])
    except ConfigError as e:
        print(f"leantune: {e}", file=sys.stderr)
        return 2
    state = finetune(config, config_name=args.config.stem, resume=bool(args.resume), return_state=True)
    if state.is_completed():
        print(f"leantune: run finished; outputs in {state.result()}")
        return 0
    return failure_exit_code(state, "run")


if __name__ == "__main__":
    sys.exit(main())
