"""The command line of every flow, checked before Prefect, torch or a stage is imported.

Each flow's command (flows/commands.py: `leantune-finetune`, `leantune-evaluate`, `leantune-profile`,
`leantune-sweep`, or `python flows/<flow>.py`) parses its arguments here and checks everything that needs no
server: the config, the data paths, that a hub model id exists, the run name (a new run must not exist; a
resumed one must, must not be finished, and must not be in use by another command), a profile's combinations,
a sweep's members and pools. A relative run.output_dir (a sweep's members' too) is made absolute under the
checkout (`anchored`). A
user error is answered in about a second, before any Prefect server starts, and leaves nothing on disk. This
module imports only argparse, yaml and pydantic (leantune.config) and torch-free leantune modules."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from leantune.config import ConfigError, RunConfig, load_config
from leantune.errors import UserError
from leantune.gguf import check_model_file
from leantune.preflight import data_path_problems, hub_model_problem
from leantune.resume import resume_refusal
from leantune.rundir import RunDir, default_run_name, run_dir_problem
from leantune.runlock import check_run_dir_free

if TYPE_CHECKING:
    from leantune.routing import PoolClass
    from leantune.sweep import Member

PACKAGE_PARENT = Path(__file__).resolve().parents[1]


def checkout_file(relative: str, package_root: Path = PACKAGE_PARENT, script: str | None = None,
                  cwd: Path | None = None) -> Path:
    """A file of the checkout (configs/default.yaml, deployments/pools.yaml): beside the leantune package (a
    checkout, an editable install), else in the checkout of the flow script being run (`python flows/finetune.py`
    with leantune installed from a wheel, whose package sits in site-packages, away from configs/), else in the
    working directory. None found: the first place, which the loader's message then names."""
    script = sys.argv[0] if script is None and sys.argv else script
    roots = [package_root, *(Path(script).resolve().parents[1:2] if script else ()), cwd or Path.cwd()]
    found = [root / relative for root in roots if (root / relative).is_file()]
    return (found or [package_root / relative])[0]


def default_config(package_root: Path = PACKAGE_PARENT, script: str | None = None, cwd: Path | None = None) -> Path:
    """configs/default.yaml of the checkout (`checkout_file`)."""
    return checkout_file("configs/default.yaml", package_root, script, cwd)


DEFAULT_CONFIG = default_config()
DEFAULT_POOLS = checkout_file("deployments/pools.yaml")  # the sweep's GPU machine classes
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
        prog="leantune-finetune",
        description="Fine-tune an LLM with leantune (also: python flows/finetune.py). Without arguments it runs "
        "the offline default (configs/default.yaml; no network, no GPU).",
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
        prog="leantune-evaluate",
        description="Evaluate the sycophancy of a model (log-likelihood of the sycophantic answer against the "
        "others, Anthropic's model-written-evals sets and leantune's synthetic set), or of a fine-tuned model "
        "against its base on the same items. Results: base.json, tuned.json, comparison.json, sycophancy.png. "
        "Also: python flows/evaluate.py.",
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


@dataclass
class ProfileRequest:
    """What a checked profile command line asks for: the base config and the lists the profile flow sweeps
    (the flow's parameters of the same names)."""

    config: RunConfig
    config_name: str
    micro_batch_sizes: list[int]
    max_seq_lens: list[int]
    optimizers: list[str]
    precisions: list[str]
    power_limits_w: list[float | None]
    architectures: list[str | None]
    steps: int
    breakdown: bool


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected whole numbers separated by commas, e.g. 1,2,4") from None


def _choice_list(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        wrong = [v for v in values if v not in choices]
        if wrong:
            raise argparse.ArgumentTypeError(f"{', '.join(wrong)}: not one of {', '.join(choices)}")
        return values
    return parse


def _power_list(text: str) -> list[float | None]:
    try:
        return [None if v.strip().lower() in ("none", "null") else float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected watts or 'none' separated by commas, "
                                         "e.g. none,100,115") from None


def profile_parser() -> argparse.ArgumentParser:
    import leantune.profile as pf  # here, as each command imports what it checks: leantune-finetune does not load it

    p = _ArgumentParser(
        prog="leantune-profile",
        description="Profile training: tokens/s, seconds per 10k tokens, peak memory and energy for every "
        "combination of micro-batch, sequence length, optimizer, precision, power limit and scratch architecture, "
        "with the time per step split into attention / experts / router / optimizer. Writes profile.csv "
        "and profile.png in the profile directory, and the table and plot as Prefect artifacts. "
        "Also: python flows/profiling.py.",
    )
    _config_arguments(p, "base YAML config (default: configs/default.yaml, the tiny offline model)", "train.lr=1e-4")
    p.add_argument("--run-name", help="name of the profile directory under run.output_dir")
    p.add_argument("--micro-batch", type=_int_list, default=pf.DEFAULT_MICRO_BATCH_SIZES, metavar="N,N",
                   help="train.micro_batch_size values (default: 1,2,4)")
    p.add_argument("--seq-len", type=_int_list, default=pf.DEFAULT_MAX_SEQ_LENS, metavar="L,L",
                   help="tokenize.max_seq_len values (default: 128,256)")
    p.add_argument("--optimizer", type=_choice_list(pf.Optimizer.__args__), default=pf.DEFAULT_OPTIMIZERS,
                   metavar="NAME,NAME", help=f"train.optimizer values: {', '.join(pf.Optimizer.__args__)} (default: adamw)")
    p.add_argument("--precision", type=_choice_list(pf.Precision.__args__), default=pf.DEFAULT_PRECISIONS,
                   metavar="DTYPE,DTYPE", help=f"model.dtype values: {', '.join(pf.Precision.__args__)} (default: auto)")
    p.add_argument("--power-limit", type=_power_list, default=pf.DEFAULT_POWER_LIMITS_W, metavar="W,W",
                   help="power.limit_watts values, 'none' for no limit (default: none); needs an NVIDIA GPU and root")
    p.add_argument("--architecture", type=_choice_list(pf.Architecture.__args__), default=pf.DEFAULT_ARCHITECTURES,
                   metavar="ARCH,ARCH",
                   help=f"model.scratch.architecture values for the scratch model: "
                   f"{', '.join(pf.Architecture.__args__)} (default: the config's model)")
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                   help="skip the profiled second training of each combination (no attention / experts / router / "
                   "optimizer columns)")
    p.add_argument("--steps", type=int, default=pf.DEFAULT_STEPS,
                   help=f"optimizer steps per combination, the first not measured (default: {pf.DEFAULT_STEPS})")
    return p


def profile_request(argv: list[str] | None = None) -> ProfileRequest:
    """Parse and check a profile command line: the config and every combination's config (`profile.plan`), so a
    bad value costs no server start; raise UserError (ConfigError) for what is wrong."""
    from leantune.profile import combinations, plan

    args = profile_parser().parse_args(argv)
    run_name = [f"run.name={args.run_name}"] if args.run_name else []
    config = anchored(load_config(args.config, [*args.overrides, *run_name]))
    request = ProfileRequest(config, args.config.stem, args.micro_batch, args.seq_len, args.optimizer, args.precision,
                             args.power_limit, args.architecture, args.steps, args.breakdown)
    plan(config, combinations(args.micro_batch, args.seq_len, args.optimizer, args.precision, args.power_limit,
                              args.architecture), args.steps)
    return request


@dataclass
class SweepRequest:
    """What a checked sweep command line asks for (the sweep flow's parameters of the same names), and where
    its comparison table will be (absolute)."""

    configs: list[str]
    grid: dict[str, list]
    overrides: list[str]
    name: str
    pools: list[PoolClass]
    timeout_seconds: float | None
    table: Path


def sweep_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(
        prog="leantune-sweep",
        description="Many fine-tunes across a pool of GPU machines, one comparison table: every member (config "
        "file x grid combination) is routed to the smallest GPU class whose memory holds its estimate and run as a "
        "deployment run. Needs a Prefect server, python deployments/pools.py and workers. Also: python flows/sweep.py.",
    )
    p.add_argument("--config", dest="configs", action="append", type=Path, metavar="YAML",
                   help="a member config (repeatable; default: configs/default.yaml)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a dotted config key and the values to sweep, e.g. --grid lora.r=8,16 (repeatable; values "
                   "parse as --set values do; every combination of every --grid is a member)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key for every member, e.g. --set train.max_steps=200")
    p.add_argument("--name", help="sweep name; members are runs NAME-00, NAME-01, ... (default: sweep-<time>)")
    p.add_argument("--pools", type=Path, default=DEFAULT_POOLS, help="pool catalogue (default: deployments/pools.yaml)")
    p.add_argument("--timeout", type=float, help="stop waiting after this many seconds")
    return p


def parse_grid(items: list[str]) -> dict[str, list]:
    """--grid KEY=V1,V2 strings as {key: [value texts]}; each text is parsed as --set parses a value."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ConfigError([f"--grid {item}: expected KEY=V1,V2,... such as lora.r=8,16"], "command line")
        grid[key.strip()] = [v.strip() for v in values.split(",")]
    return grid


def anchored_members(members: list[Member]) -> list[Member]:
    """Copies of the sweep's members (`expand_members`) as the sweep sees them, a relative run.output_dir
    `anchored` under the checkout: where it reads the members' runs and writes its table and MLflow run,
    whatever the working directory. The members themselves are left as given: each is submitted so, and its
    worker anchors it under the worker's own checkout."""
    from dataclasses import replace

    return [replace(m, config=anchored(m.config.model_copy(deep=True))) for m in members]


def sweep_request(argv: list[str] | None = None) -> SweepRequest:
    """Parse and check a sweep command line: the grid, the pool catalogue and every member's config, before
    anything is submitted; raise UserError (ConfigError) for what is wrong."""
    from leantune.routing import load_pool_classes
    from leantune.sweep import expand_members, table_path

    args = sweep_parser().parse_args(argv)
    grid = parse_grid(args.grid)
    pools = load_pool_classes(args.pools)
    configs = [str(c) for c in (args.configs or [DEFAULT_CONFIG])]
    name = args.name or time.strftime("sweep-%Y%m%d-%H%M%S")  # fixed now: the table's path is known before it runs
    members = anchored_members(expand_members(configs, grid, args.overrides, name))
    return SweepRequest(configs, grid, args.overrides, name, pools, args.timeout, table_path(members, name))


def request_or_exit(check=finetune_request, argv: list[str] | None = None):
    """`check(argv)` (finetune_request, evaluate_request, profile_request, sweep_request) for a command: a user error is one line on stderr
    and exit 2; a finished run exit 0."""
    try:
        return check(argv)
    except RunFinished as e:
        print(f"leantune: {e}")
        sys.exit(0)
    except UserError as e:
        print(f"leantune: {e}", file=sys.stderr)
        sys.exit(2)

