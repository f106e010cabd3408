"""leantune's profile flow (the file is not named profile.py: that name is the standard library's
`profile` module, which cProfile and through it transformers import, and a script's folder comes first
on sys.path): training throughput, time per 10k tokens, peak memory and energy per setting.

    python flows/profiling.py                                   # the tiny offline model, 3 x 2 combinations
    python flows/profiling.py --micro-batch 1,2,4 --seq-len 128,256 --precision fp32,bf16 --steps 8
    python flows/profiling.py --config configs/qwen2.5-0.5b-lora.yaml --optimizer adamw,adamw_8bit \\
        --precision bf16 --power-limit none,100,115           # on a GPU
    python flows/profiling.py --config configs/smoke.yaml --architecture olmoe,llama --set lora.target_modules=all-linear \
        --set lora.target_parameters=[mlp.experts.gate_up_proj,mlp.experts.down_proj]
                                                                # a tiny MoE against its dense counterpart
    python flows/profiling.py --help

Each combination trains a few optimizer steps with the real training loop on data prepared once
and tokenized once per sequence length; see leantune/profile.py for what each column means.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# A script of the checkout: tasks/ and flows/ are imported from the repository root (the wheel
# installs only the leantune package), whatever the working directory.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.logs import failure_exit_code, set_up_flow_process  # first: before Prefect is imported

set_up_flow_process()

from prefect import flow, get_run_logger

from leantune.cli import anchored
from leantune.config import ConfigError, ModelConfig, RunConfig, ScratchModelConfig, TrainConfig, load_config
from leantune.errors import UserError
from leantune.profile import combinations, markdown_table, plan, read_csv
from leantune.rundir import create_run_dir
from tasks.prepare import prepare_data
from tasks.profile import profile_combination, publish_profile, tokenize_seq_len
from tasks.server import connect_to_prefect
from tasks.validate import validate_data

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
DEFAULT_RUN_CONFIG = load_config(DEFAULT_CONFIG)
# The sweep's value types are the config's own, so the UI form offers exactly the values a config accepts.
Optimizer = TrainConfig.model_fields["optimizer"].annotation
Precision = ModelConfig.model_fields["dtype"].annotation
Architecture = ScratchModelConfig.model_fields["architecture"].annotation
DEFAULT_MICRO_BATCH_SIZES = [1, 2, 4]
DEFAULT_MAX_SEQ_LENS = [128, 256]
DEFAULT_OPTIMIZERS = ["adamw"]
DEFAULT_PRECISIONS = ["auto"]
DEFAULT_POWER_LIMITS_W = [None]  # no limit
DEFAULT_ARCHITECTURES = [None]  # the base config's model
DEFAULT_STEPS = 5


@flow(name="profile")
def profile(
    config: RunConfig = DEFAULT_RUN_CONFIG,
    micro_batch_sizes: list[int] = DEFAULT_MICRO_BATCH_SIZES,
    max_seq_lens: list[int] = DEFAULT_MAX_SEQ_LENS,
    optimizers: list[Optimizer] = DEFAULT_OPTIMIZERS,
    precisions: list[Precision] = DEFAULT_PRECISIONS,
    power_limits_w: list[float | None] = DEFAULT_POWER_LIMITS_W,
    architectures: list[Architecture | None] = DEFAULT_ARCHITECTURES,
    steps: int = DEFAULT_STEPS,
    breakdown: bool = True,
    config_name: str = "default",
) -> Path:
    """Profile training over every combination of the lists; returns the profile directory.

    Args:
        config: the base run config; each combination changes only the settings swept.
        micro_batch_sizes: train.micro_batch_size values (the global batch is the config's, rounded up
            to a multiple of each).
        max_seq_lens: tokenize.max_seq_len values; the data is tokenized once per value.
        optimizers: train.optimizer values (the 8-bit ones need bitsandbytes).
        precisions: model.dtype values (fp16 needs a GPU; auto is bf16/fp16 on a GPU, fp32 on the CPU).
        power_limits_w: power.limit_watts values in watts; null is no limit. Needs an NVIDIA GPU and root.
        architectures: model.scratch.architecture values for the scratch model (an MoE such as olmoe and its
            dense counterpart llama); null keeps the base config's model.
        steps: optimizer steps per combination; the first is warm-up and not measured.
        breakdown: also train each combination's steps under torch.profiler for the execution-time breakdown
            (attention / experts / router / optimizer / other per step); doubles the sweep's training time.
        config_name: names the profile directory, profile-<config_name>-<time> (unless config.run.name is set).
    """
    log = get_run_logger()
    combos = combinations(micro_batch_sizes, max_seq_lens, optimizers, precisions, power_limits_w, architectures)
    configs = plan(config, combos, steps)  # every combination checked before anything heavy starts
    profile_dir = create_run_dir(config, f"profile-{config_name}")
    log.info(f"profile: {len(combos)} combination(s), {steps} steps each; directory {profile_dir}")

    # ---- data: prepared and validated once (the stage cache applies), tokenized once per sequence length
    prepare_data(config, profile_dir)
    validate_data(config, profile_dir)
    for max_seq_len in dict.fromkeys(c.max_seq_len for c in combos):
        tokenize_seq_len(config, profile_dir, max_seq_len)

    # ---- one short training per combination, one after the other (they would disturb each other's timing)
    rows = [profile_combination(configs[combo], combo, profile_dir, breakdown) for combo in combos]

    # ---- profile.csv, profile.png, the table and plot artifacts
    publish_profile(rows, profile_dir)
    return profile_dir


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python flows/profiling.py",
        description="Profile training: tokens/s, seconds per 10k tokens, peak memory and energy for every "
        "combination of micro-batch, sequence length, optimizer, precision, power limit and scratch architecture, "
        "with the time per step split into attention / experts / router / optimizer. Writes profile.csv "
        "and profile.png in the profile directory, and the table and plot as Prefect artifacts.",
    )
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help="base YAML config (default: configs/default.yaml, the tiny offline model)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key of the base config (repeatable; values parse as YAML)")
    p.add_argument("--run-name", help="name of the profile directory under run.output_dir")
    p.add_argument("--micro-batch", type=_int_list, default=DEFAULT_MICRO_BATCH_SIZES, metavar="N,N",
                   help="train.micro_batch_size values (default: 1,2,4)")
    p.add_argument("--seq-len", type=_int_list, default=DEFAULT_MAX_SEQ_LENS, metavar="L,L",
                   help="tokenize.max_seq_len values (default: 128,256)")
    p.add_argument("--optimizer", type=_choice_list(Optimizer.__args__), default=DEFAULT_OPTIMIZERS,
                   metavar="NAME,NAME",
                   help=f"train.optimizer values: {', '.join(Optimizer.__args__)} (default: adamw)")
    p.add_argument("--precision", type=_choice_list(Precision.__args__), default=DEFAULT_PRECISIONS,
                   metavar="DTYPE,DTYPE",
                   help=f"model.dtype values: {', '.join(Precision.__args__)} (default: auto)")
    p.add_argument("--power-limit", type=_power_list, default=DEFAULT_POWER_LIMITS_W, metavar="W,W",
                   help="power.limit_watts values, 'none' for no limit (default: none); needs an NVIDIA GPU and root")
    p.add_argument("--architecture", type=_choice_list(Architecture.__args__), default=DEFAULT_ARCHITECTURES,
                   metavar="ARCH,ARCH",
                   help=f"model.scratch.architecture values for the scratch model: {', '.join(Architecture.__args__)} "
                   "(default: the config's model)")
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                   help="skip the profiled second training of each combination (no attention / experts / router / "
                   "optimizer columns)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"optimizer steps per combination, the first not measured (default: {DEFAULT_STEPS})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"run.name={args.run_name}"] if args.run_name else [])
    try:
        config = anchored(load_config(args.config, overrides))  # outputs under the checkout
        # The sweep is checked here too, so a bad value costs no server start.
        combos = combinations(args.micro_batch, args.seq_len, args.optimizer, args.precision, args.power_limit,
                              args.architecture)
        plan(config, combos, args.steps)
        connect_to_prefect()  # the temporary server, with a safe start-up wait (tasks/server.py)
    except (ConfigError, UserError) as e:
        print(f"leantune: {e}", file=sys.stderr)
        return 2
    state = profile(config, micro_batch_sizes=args.micro_batch, max_seq_lens=args.seq_len,
                    optimizers=args.optimizer, precisions=args.precision, power_limits_w=args.power_limit,
                    architectures=args.architecture, steps=args.steps, breakdown=args.breakdown, config_name=args.config.stem, return_state=True)
    if state.is_completed():
        profile_dir = state.result()
        print(markdown_table(read_csv(profile_dir / "profile.csv")))
        print(f"leantune: profile finished; {profile_dir / 'profile.csv'} and {profile_dir / 'profile.png'}")
        return 0
    return failure_exit_code(state, "profile")


if __name__ == "__main__":
    sys.exit(main())
