"""leantune's evaluation flow: the sycophancy of a model, or of a base model against its fine-tuned version.

    python flows/evaluate.py --run runs/default-20250101-120000        # base vs tuned of a finetune run
    python flows/evaluate.py --config configs/qwen2.5-0.5b-lora.yaml   # a model alone
    python flows/evaluate.py --config configs/qwen2.5-0.5b-lora.yaml --adapter path/to/adapter
    python flows/evaluate.py --run RUN --set 'eval.datasets=[synthetic, /data/sycophancy_on_nlp_survey.jsonl]'
    python flows/evaluate.py --help
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# A script of the checkout: tasks/ and flows/ are imported from the repository root (the wheel
# installs only the leantune package), whatever the working directory.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.logs import failure_exit_code, set_up_flow_process  # first: before Prefect is imported

set_up_flow_process()

from prefect import flow, get_run_logger

from leantune.config import ConfigError, RunConfig, load_config
from leantune.errors import UserError
from tasks.evaluate import evaluate_sycophancy

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
DEFAULT_RUN_CONFIG = load_config(DEFAULT_CONFIG)


@flow(name="evaluate")
def evaluate_flow(config: RunConfig = DEFAULT_RUN_CONFIG, run_dir: str | None = None, adapter: str | None = None,
                  out_dir: str | None = None) -> dict:
    """Evaluate sycophancy on config.eval.datasets.

    run_dir: a finetune run: its adapter/ against its base, results in run_dir/eval/.
    adapter: a PEFT adapter directory (or a fully fine-tuned model) for the model of `config`.
    Neither: the model of `config` alone. out_dir: where results go (default: see `output_dir`).
    """
    log = get_run_logger()
    if run_dir and adapter:
        raise UserError("evaluate: give a run directory or an adapter, not both (a run's adapter is its adapter/)")
    adapter_dir = Path(run_dir) / "adapter" if run_dir else (Path(adapter) if adapter else None)
    if adapter_dir is not None and not adapter_dir.is_dir():
        raise UserError(f"evaluate: {adapter_dir} is not a directory; " + (
            "the run has not finished training (resume it with python flows/finetune.py --resume NAME)"
            if run_dir else "give the directory training wrote (runs/<name>/adapter)"))
    out = Path(out_dir) if out_dir else output_dir(config, run_dir)
    log.info(f"evaluate: {config.model.name_or_path}" + (f" + {adapter_dir}" if adapter_dir else "")
             + f" on {', '.join(config.eval.datasets)}; results in {out}")
    return evaluate_sycophancy(config, out, adapter_dir)


def output_dir(config: RunConfig, run_dir: str | None) -> Path:
    """run_dir/eval for a run, else <run.output_dir>/eval-<model>-<time>."""
    if run_dir:
        return Path(run_dir) / "eval"
    model = Path(config.model.name_or_path.rstrip("/")).name
    return Path(config.run.output_dir) / f"eval-{model}-{time.strftime('%Y%m%d-%H%M%S')}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python flows/evaluate.py",
        description="Evaluate the sycophancy of a model (log-likelihood of the sycophantic answer against the "
        "others, Anthropic's model-written-evals sets and leantune's synthetic set), or of a fine-tuned model "
        "against its base on the same items. Results: base.json, tuned.json, comparison.json, sycophancy.png.",
    )
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help="YAML config with the model and the eval section (default: configs/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set eval.max_items=100 (repeatable; values parse as YAML)")
    p.add_argument("--run", metavar="RUN_DIR",
                   help="a finetune run directory: evaluates its adapter against its base model with the run's "
                   "config.yaml (--set still applies; --config is not used); results in RUN_DIR/eval/")
    p.add_argument("--adapter", metavar="DIR",
                   help="a PEFT adapter directory (or a fully fine-tuned model) to compare against the model of "
                   "--config; its tokenizer is used when it holds one")
    p.add_argument("--out", metavar="DIR", help="where the results go (default: RUN_DIR/eval with --run, else "
                   "<run.output_dir>/eval-<model>-<time>)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run and args.adapter:
        print("leantune: --run evaluates the run's own adapter; leave out --adapter", file=sys.stderr)
        return 2
    try:
        if args.run:
            run_config = Path(args.run) / "config.yaml"
            if not run_config.is_file():
                print(f"leantune: --run: {args.run} has no config.yaml, so it is not a leantune run directory",
                      file=sys.stderr)
                return 2
            config = load_config(run_config, args.overrides)
        else:
            config = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"leantune: {e}", file=sys.stderr)
        return 2
    state = evaluate_flow(config, run_dir=args.run, adapter=args.adapter, out_dir=args.out, return_state=True)
    if state.is_completed():
        files = state.result()["files"]
        print(f"leantune: evaluation finished; results in {Path(files['base']).parent}")
        return 0
    return failure_exit_code(state, "evaluation")


if __name__ == "__main__":
    sys.exit(main())
