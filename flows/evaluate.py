"""leantune's evaluation flow: the sycophancy of a model, or of a base model against its fine-tuned version.

    python flows/evaluate.py --run runs/default-20250101-120000        # base vs tuned of a finetune run
    python flows/evaluate.py --config configs/qwen2.5-0.5b-lora.yaml   # a model alone
    python flows/evaluate.py --config configs/qwen2.5-0.5b-lora.yaml --adapter path/to/adapter
    python flows/evaluate.py --run RUN --set 'eval.datasets=[synthetic, /data/sycophancy_on_nlp_survey.jsonl]'
    python flows/evaluate.py --help                                  # or leantune-evaluate --help
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    # The same command as leantune-evaluate (flows/commands.py): checked before Prefect or torch is imported.
    try:
        from flows.commands import evaluate as command
    except ModuleNotFoundError as e:  # flows/ and tasks/ are installed with leantune (pip install -e .)
        print(f"leantune: {e.name.partition('.')[0]} is not installed: run `pip install -e .` in the checkout (README: Set up)",
              file=sys.stderr)
        sys.exit(2)

    sys.exit(command())

from tasks.logs import failure_exit_code, set_up_flow_process  # first: before Prefect is imported

set_up_flow_process()

from prefect import flow, get_run_logger

from leantune.cli import DEFAULT_CONFIG, EvaluateRequest, anchored, evaluate_request
from leantune.config import RunConfig, load_config
from leantune.errors import UserError
from leantune.rundir import RunDir
from leantune.runlock import hold_run_dir
from tasks.evaluate import evaluate_sycophancy
from tasks.server import connect_to_prefect
from tasks.stage import end_stop

DEFAULT_RUN_CONFIG = load_config(DEFAULT_CONFIG)


@flow(name="evaluate", on_crashed=[end_stop], on_cancellation=[end_stop])  # end_stop: tasks/stage.py
def evaluate_flow(config: RunConfig = DEFAULT_RUN_CONFIG, run_dir: str | None = None, adapter: str | None = None,
                  out_dir: str | None = None) -> dict:
    """Evaluate sycophancy on config.eval.datasets.

    Args:
        config: the model and the eval section (datasets, items); with run_dir, the model is the run's own.
        run_dir: a finetune run directory (runs/NAME): its adapter/ against its base (the model of the
            run's own config.yaml); results in run_dir/eval/.
        adapter: a PEFT adapter directory (or a fully fine-tuned model) for the model of config. Leave
            both empty to evaluate the model of config alone.
        out_dir: where the results go (default: run_dir/eval, else run.output_dir/eval-MODEL-TIME).
    """
    log = get_run_logger()
    if run_dir and adapter:
        raise UserError("evaluate: give a run directory or an adapter, not both (a run's adapter is its adapter/)")
    config = anchored(run_config(config, run_dir) if run_dir else config)  # outputs under the checkout
    adapter_dir = RunDir(run_dir).adapter if run_dir else (Path(adapter) if adapter else None)
    if adapter_dir is not None and not adapter_dir.is_dir():
        raise UserError(f"evaluate: {adapter_dir} is not a directory; " + (
            f"the run has not finished training (resume it with python flows/finetune.py --resume {Path(run_dir).name})"
            if run_dir else "give the directory training wrote (runs/<name>/adapter)"))
    out = Path(out_dir) if out_dir else output_dir(config, run_dir)
    log.info(f"evaluate: {config.model.name_or_path}" + (f" + {adapter_dir}" if adapter_dir else "")
             + f" on {', '.join(config.eval.datasets)}; results in {out}")
    if notice := overwrite_notice(out):
        log.warning(notice)
    # A finetune run is evaluated under its lock: never while another command works in it (leantune/runlock.py).
    with hold_run_dir(run_dir) if run_dir else contextlib.nullcontext():
        return evaluate_sycophancy(config, out, adapter_dir)


def run_config(config: RunConfig, run_dir: str) -> RunConfig:
    """The config a run's adapter is evaluated with: `config` (the command line's, which is the run's own
    config.yaml with --set), or, when its model or LoRA shape is another (the UI form's default), the run's
    config.yaml with the eval section of `config`: the adapter only fits the model it was trained on."""
    path = RunDir(run_dir).config
    if not path.is_file():
        raise UserError(f"evaluate: {run_dir} has no config.yaml, so it is not a leantune run directory")
    own = load_config(path)

    def shape(c: RunConfig):
        return c.model.name_or_path, c.model.scratch, c.model.method, c.lora

    if shape(own) == shape(config):
        return config
    logging.getLogger("leantune.evaluate").info(f"evaluate: the run trained {own.model.name_or_path}, not {config.model.name_or_path}; "
                          f"evaluating with the run's own config ({path}) and the given eval settings")
    return own.model_copy(update={"eval": config.eval})


def overwrite_notice(out: Path) -> str | None:
    """One line when `out` (a run's eval/, --out) already holds results that this evaluation replaces."""
    files = sorted(p.name for p in out.iterdir() if p.is_file()) if out.is_dir() else []
    if not files:
        return None
    return (f"evaluate: {out} holds an earlier evaluation ({', '.join(files)}); it is replaced (copy it first to "
            "keep it, or give --out / out_dir)")


def output_dir(config: RunConfig, run_dir: str | None) -> Path:
    """run_dir/eval for a run, else <run.output_dir>/eval-<model>-<time>."""
    if run_dir:
        return RunDir(run_dir).eval
    model = Path(config.model.name_or_path.rstrip("/")).name
    return Path(config.run.output_dir) / f"eval-{model}-{time.strftime('%Y%m%d-%H%M%S')}"


def main(argv: list[str] | None = None, request: EvaluateRequest | None = None) -> int:
    try:
        request = request or evaluate_request(argv)
        connect_to_prefect()
    except UserError as e:
        print(f"leantune: {e}", file=sys.stderr)
        return 2
    state = evaluate_flow(request.config, run_dir=request.run, adapter=request.adapter, out_dir=request.out,
                          return_state=True)
    if state.is_completed():
        files = state.result()["files"]
        print(f"leantune: evaluation finished; results in {Path(files['base']).parent.resolve()}")
        return 0
    return failure_exit_code(state, "evaluation")

