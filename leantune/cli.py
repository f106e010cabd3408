"""The finetune command line, checked before Prefect, torch or a stage is imported.

`python flows/finetune.py` parses its arguments here and checks everything that needs no server:
the config, the data paths, the run name (a new run must not exist; a resumed one must, must not be
finished, and must not be in use by another command), and that a hub model id exists. A relative run.output_dir
is made absolute under the checkout (`anchored`). A user error is answered in about a second,
before any Prefect server starts, and leaves nothing on disk. This module imports only argparse, yaml
and pydantic (leantune.config).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from leantune.config import RunConfig, load_config
from leantune.errors import UserError
from leantune.gguf import check_model_file
from leantune.preflight import data_path_problems, hub_model_problem
from leantune.resume import resume_refusal
from leantune.rundir import RunDir, default_run_name, run_dir_problem
from leantune.runlock import check_run_dir_free

PACKAGE_PARENT = Path(__file__).resolve().parents[1]


def default_config(package_root: Path = PACKAGE_PARENT, script: str | None = None, cwd: Path | None = None) -> Path:
    """configs/default.yaml of the checkout: beside the leantune package (a checkout, an editable install),
    else in the checkout of the flow script being run (`python flows/finetune.py` with leantune installed
    from a wheel, whose package sits in site-packages, away from configs/), else in the working directory.
    None found: the first place, which the config loader's message then names."""
    script = sys.argv[0] if script is None and sys.argv else script
    roots = [package_root, *(Path(script).resolve().parents[1:2] if script else ()), cwd or Path.cwd()]
    found = [root / "configs" / "default.yaml" for root in roots if (root / "configs" / "default.yaml").is_file()]
    return (found or [package_root / "configs" / "default.yaml"])[0]


DEFAULT_CONFIG = default_config()
# The checkout whose configs/ the scripts use: a relative run.output_dir is under it (`anchored`).
CHECKOUT = DEFAULT_CONFIG.parents[1]


def anchored(config: RunConfig, root: Path = CHECKOUT) -> RunConfig:
    """`config` with a relative run.output_dir made absolute under `root` (the checkout), so that the runs,
    the MLflow store and the stage cache (all under run.output_dir) are in one place whatever the working
    directory the command or the Prefect worker runs in."""
    output_dir = Path(config.run.output_dir).expanduser()
    config.run.output_dir = str(output_dir if output_dir.is_absolute() else root / output_dir)
    return config


class RunFinished(UserError):
    """--resume of a run that has already finished: nothing to do; the message says what to do instead."""


@dataclass
class FinetuneRequest:
    """What a checked command line asks for: the config (run.name set), its name, and whether it resumes."""

    config: RunConfig
    config_name: str
    resume: bool


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        # An unquoted --set value with spaces splits into several arguments: say so beside argparse's words.
        if "unrecognized arguments" in message:
            message += ("; a --set value with spaces must be quoted as one argument, e.g. "
                        "--set 'data.sources=[{kind: file, path: my.jsonl}]'")
        super().error(message)


def _config_arguments(p: argparse.ArgumentParser, config_help: str, set_example: str) -> None:
    """--config and --set, as every flow script takes them."""
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=config_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override one config key, e.g. --set {set_example} (repeatable; values parse as YAML; "
                   "quote a value with spaces: --set 'data.sources=[{kind: file, path: my.jsonl}]')")


def finetune_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(
        prog="python flows/finetune.py",
        description="Fine-tune an LLM with leantune. Without arguments it runs the offline default "
        "(configs/default.yaml; no network, no GPU).",
    )
    _config_arguments(p, "YAML config (default: configs/default.yaml); every key is documented in leantune/config.py",
                      "train.lr=1e-4")
    p.add_argument("--run-name", help="name of the run directory under run.output_dir (same as --set run.name=...)")
    p.add_argument("--resume", metavar="RUN_NAME",
                   help="continue the run RUN_NAME under run.output_dir from its newest checkpoint, with the "
                   "config.yaml it was started with (--set may change settings that do not alter the updates, "
                   "e.g. train.micro_batch_size, or train.lr, which rescales the schedule; others are refused by name)")
    return p


def finetune_request(argv: list[str] | None = None) -> FinetuneRequest:
    """Parse and check a finetune command line; raise UserError (RunFinished, ConfigError) for what is wrong.

    `--help` and argparse's own errors exit here (status 0 and 2), as argparse does.
    """
    args = finetune_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.resume and args.run_name:
        raise UserError("--resume names the run to continue; leave out --run-name")
    if args.run_name:
        overrides.append(f"run.name={args.run_name}")
    config = anchored(load_config(args.config, overrides))
    if args.resume:
        # The run continues with its own resolved config; --config only says where runs are.
        run_dir = Path(config.run.output_dir) / args.resume
        layout = RunDir(run_dir)
        if not layout.config.is_file():
            raise UserError(f"--resume: {run_dir} has no config.yaml, so it is not a leantune run; check the name "
                            "(and run.output_dir)")
        check_run_dir_free(run_dir)  # another command works in it: refused now (the flow checks again, holding it)
        check_not_finished(run_dir)
        config = load_config(layout.config,
                             [*overrides, f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}"])
        if refusal := resume_refusal(config, run_dir):  # refused before the flow writes anything
            raise UserError(refusal)
        return FinetuneRequest(config, args.config.stem, resume=True)
    if problems := data_path_problems(config):
        raise UserError("\n".join(problems) if len(problems) > 1 else problems[0])
    check_model_file(config.model.name_or_path)
    if problem := hub_model_problem(config.model.name_or_path, config.model.revision):  # a typo: now, not at tokenize
        raise UserError(problem)
    # The name is fixed now, so that the run directory checked here is the one the flow creates.
    config.run.name = config.run.name or default_run_name(args.config.stem)
    if problem := run_dir_problem(config):
        raise UserError(problem)
    return FinetuneRequest(config, args.config.stem, resume=False)


def check_not_finished(run_dir: Path) -> None:
    """RunFinished when the run has written its report: there is nothing to resume."""
    layout = RunDir(run_dir)
    if layout.report.is_file():
        raise RunFinished(
            f"run {run_dir.name} has already finished (report: {layout.report}); there is nothing to "
            f"resume. Evaluate it again with: python flows/evaluate.py --run {run_dir}; or train again as a "
            "new run with --run-name NEW_NAME")


def training_finished(run_dir: Path) -> bool:
    """Whether the run's training completed (training.json says so and the adapter is there)."""
    path = RunDir(run_dir).training
    return path.is_file() and json.loads(path.read_text()).get("completed", False) and RunDir(run_dir).adapter.is_dir()


@dataclass
class EvaluateRequest:
    """What a checked evaluate command line asks for (see `evaluate_parser`)."""

    config: RunConfig
    run: str | None
    adapter: str | None
    out: str | None


def evaluate_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(
        prog="python flows/evaluate.py",
        description="Evaluate the sycophancy of a model (log-likelihood of the sycophantic answer against the "
        "others, Anthropic's model-written-evals sets and leantune's synthetic set), or of a fine-tuned model "
        "against its base on the same items. Results: base.json, tuned.json, comparison.json, sycophancy.png.",
    )
    _config_arguments(p, "YAML config with the model and the eval section (default: configs/default.yaml)",
                      "eval.max_items=100")
    p.add_argument("--run", metavar="RUN_DIR",
                   help="a finetune run directory: evaluates its adapter against its base model with the run's "
                   "config.yaml (--set still applies; --config is not used); results in RUN_DIR/eval/")
    p.add_argument("--adapter", metavar="DIR",
                   help="a PEFT adapter directory (or a fully fine-tuned model) to compare against the model of "
                   "--config; its tokenizer is used when it holds one")
    p.add_argument("--out", metavar="DIR", help="where the results go (default: RUN_DIR/eval with --run, else "
                   "OUTPUT_DIR/eval-MODEL-TIME)")
    return p


def evaluate_request(argv: list[str] | None = None) -> EvaluateRequest:
    """Parse and check an evaluate command line; raise UserError (ConfigError) for what is wrong."""
    args = evaluate_parser().parse_args(argv)
    if args.run and args.adapter:
        raise UserError("--run evaluates the run's own adapter; leave out --adapter")
    if args.run and not RunDir(args.run).config.is_file():
        raise UserError(f"--run: {args.run} has no config.yaml, so it is not a leantune run directory")
    config = anchored(load_config(RunDir(args.run).config if args.run else args.config, args.overrides))
    return EvaluateRequest(config, args.run, args.adapter, args.out)


def request_or_exit(check=finetune_request, argv: list[str] | None = None):
    """`check(argv)` (finetune_request, evaluate_request) for a script: a user error is one line on stderr
    and exit 2; a finished run exit 0."""
    try:
        return check(argv)
    except RunFinished as e:
        print(f"leantune: {e}")
        sys.exit(0)
    except UserError as e:
        print(f"leantune: {e}", file=sys.stderr)
        sys.exit(2)

