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
    python flows/profiling.py --help                            # or leantune-profile --help: the same command

Each combination trains a few optimizer steps with the real training loop on data prepared once
and tokenized once per sequence length; see leantune/profile.py for what each column means.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # The same command as leantune-profile (flows/commands.py): checked before Prefect or torch is imported.
    try:
        from flows.commands import profile as command
    except ModuleNotFoundError as e:  # flows/ and tasks/ are installed with leantune (pip install -e .)
        print(f"leantune: {e.name.partition('.')[0]} is not installed: run `pip install -e .` in the checkout (README: Set up)",
              file=sys.stderr)
        sys.exit(2)

    sys.exit(command())

from tasks.logs import failure_exit_code, set_up_flow_process  # first: before Prefect is imported

set_up_flow_process()

from prefect import flow, get_run_logger

from leantune.cli import DEFAULT_CONFIG, ProfileRequest, profile_request
from leantune.config import RunConfig, load_config
from leantune.errors import UserError
from leantune.profile import (
    DEFAULT_ARCHITECTURES,
    DEFAULT_MAX_SEQ_LENS,
    DEFAULT_MICRO_BATCH_SIZES,
    DEFAULT_OPTIMIZERS,
    DEFAULT_POWER_LIMITS_W,
    DEFAULT_PRECISIONS,
    DEFAULT_STEPS,
    Architecture,
    Optimizer,
    Precision,
    combinations,
    markdown_table,
    plan,
    read_csv,
)
from leantune.rundir import create_run_dir
from tasks.prepare import prepare_data
from tasks.profile import profile_combination, publish_profile, tokenize_seq_len
from tasks.server import connect_to_prefect
from tasks.stage import end_stop
from tasks.validate import validate_data

DEFAULT_RUN_CONFIG = load_config(DEFAULT_CONFIG)


@flow(name="profile", on_crashed=[end_stop], on_cancellation=[end_stop])  # end_stop: tasks/stage.py
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
        config_name: names the profile directory, profile-CONFIG_NAME-TIME (unless config.run.name is set).
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


def main(argv: list[str] | None = None, request: ProfileRequest | None = None) -> int:
    """The command: its command line (leantune/cli.py, unless `request` is that already), the Prefect API, the flow."""
    try:
        request = request or profile_request(argv)
        connect_to_prefect()  # the temporary server, with a safe start-up wait (tasks/server.py)
    except UserError as e:
        print(f"leantune: {e}", file=sys.stderr)
        return 2
    r = request
    state = profile(r.config, micro_batch_sizes=r.micro_batch_sizes, max_seq_lens=r.max_seq_lens,
                    optimizers=r.optimizers, precisions=r.precisions, power_limits_w=r.power_limits_w,
                    architectures=r.architectures, steps=r.steps, breakdown=r.breakdown, config_name=r.config_name,
                    return_state=True)
    if state.is_completed():
        profile_dir = state.result()
        print(markdown_table(read_csv(profile_dir / "profile.csv")))
        print(f"leantune: profile finished; {profile_dir / 'profile.csv'} and {profile_dir / 'profile.png'}")
        return 0
    return failure_exit_code(state, "profile")
