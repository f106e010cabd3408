"""The profile flow: one CSV row per combination, numbers that agree with the training metrics, skips with reasons."""

import base64
import csv
import json
import re

import pytest
from PIL import Image
from run_helpers import latest_artifact

from flows.profiling import main, profile
from leantune.config import load_config
from leantune.errors import UserError
from leantune.jsonl import iter_jsonl
from leantune.profile import (
    BREAKDOWN_COLUMNS,
    COLUMNS,
    NO_ENERGY_NOTE,
    Combination,
    combinations,
    plan,
    read_csv,
    run_combination,
)

SMALL = [
    "data.synthetic.num_records=120", "data.val_fraction=0.1", "data.chunk_size=64",
    "model.scratch.hidden_size=32", "model.scratch.intermediate_size=64", "lora.r=4", "lora.alpha=8",
    "train.device=cpu", "train.global_batch_size=4",
]


@pytest.mark.slow
@pytest.mark.flow
def test_a_2x2_sweep_writes_consistent_rows_and_reports_what_cannot_run(prefect_server, tmp_path):
    cfg = load_config(overrides=[*SMALL, f"run.output_dir={tmp_path}", "run.name=p"])

    # 2 micro-batches x 2 lengths run; fp16 and a power limit cannot run on the CPU and must be rows too.
    profile_dir = profile(cfg, micro_batch_sizes=[1, 2], max_seq_lens=[128, 256], precisions=["fp32", "fp16"],
                          power_limits_w=[None, 90], steps=3, breakdown=False)

    with open(profile_dir / "profile.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    assert len(rows) == 16
    ran = [r for r in rows if r["status"] == "ok"]
    assert [(r["max_seq_len"], r["micro_batch_size"]) for r in ran] == [("128", "1"), ("128", "2"), ("256", "1"),
                                                                         ("256", "2")]
    assert all(r["precision"] == "fp32" and r["power_limit_w"] == "" for r in ran)
    for r in ran:
        tokens_per_s, seconds = float(r["tokens_per_s"]), float(r["seconds_per_10k_tokens"])
        assert tokens_per_s > 0 and float(r["peak_memory_mb"]) > 0
        assert seconds == pytest.approx(10_000 / tokens_per_s, rel=1e-4, abs=5e-5)  # written to 4 decimals
        assert r["energy_j_per_10k_tokens"] == "" and NO_ENERGY_NOTE in r["note"]  # no NVML on this machine
        # The numbers are the combination's own training metrics, warm-up step left out.
        run_dir = profile_dir / "sweep" / r["combination"]
        steps = [m for m in iter_jsonl(run_dir / "metrics.jsonl") if "event" not in m]
        assert [m["step"] for m in steps] == [1, 2, 3] and int(r["steps_measured"]) == 2
        assert int(r["tokens_measured"]) == sum(m["tokens"] for m in steps[1:])
        # Each optimizer step is the global batch of 4 sequences of at most max_seq_len tokens.
        assert all(0 < m["tokens"] <= 4 * int(r["max_seq_len"]) for m in steps)
        assert all(m["micro_batch_size"] == int(r["micro_batch_size"]) for m in steps)
        seconds_measured = sum(m["tokens"] / m["tokens_per_s"] for m in steps[1:])
        assert tokens_per_s == pytest.approx(int(r["tokens_measured"]) / seconds_measured, rel=1e-4)
        assert float(r["peak_memory_mb"]) == max(m["peak_memory_mb"] for m in steps)
        assert not (run_dir / "checkpoints").exists()

    skipped = [r for r in rows if r["status"] != "ok"]
    assert len(skipped) == 12 and {r["status"] for r in skipped} == {"skipped"}
    for r in skipped:
        assert r["tokens_per_s"] == r["peak_memory_mb"] == ""
        if r["power_limit_w"]:
            assert r["note"].startswith("power.limit_watts=90: training runs on the CPU")
        else:
            assert r["precision"] == "fp16" and r["note"].startswith("model.dtype: fp16 is not supported on the CPU")

    with Image.open(profile_dir / "profile.png") as image:
        assert image.format == "PNG" and image.width >= 800 and image.height >= 400
    table = latest_artifact("profile-table")
    assert table.type == "table"
    plot = latest_artifact("profile-plot")
    [b64] = re.findall(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", plot.data)
    assert base64.b64decode(b64) == (profile_dir / "profile.png").read_bytes()


@pytest.mark.slow
@pytest.mark.flow
def test_the_flow_profiles_an_moe_against_its_dense_counterpart_with_a_time_breakdown(prefect_server, tmp_path):
    cfg = load_config(overrides=[*SMALL, f"run.output_dir={tmp_path}", "run.name=moe", "lora.dropout=0",
                                 "lora.target_modules=[q_proj,v_proj]",
                                 "lora.target_parameters=[mlp.experts.gate_up_proj,mlp.experts.down_proj]"])

    profile_dir = profile(cfg, micro_batch_sizes=[2], max_seq_lens=[128], architectures=["olmoe", "llama"], steps=2)

    rows = read_csv(profile_dir / "profile.csv")
    assert [(r["architecture"], r["status"]) for r in rows] == [("olmoe", "ok"), ("llama", "ok")]
    for r in rows:
        assert sum(r[c] for c in BREAKDOWN_COLUMNS[1:]) == pytest.approx(r["step_ms"], abs=0.01)
    assert rows[0]["router_ms"] > 0 and rows[1]["router_ms"] == 0
    [moe, dense] = json.loads(latest_artifact("profile-table").data)
    assert (moe["architecture"], dense["architecture"]) == ("olmoe", "llama")
    assert float(moe["router %"]) > 0 and dense["router %"] == "0.0"
    assert float(dense["experts %"]) > 0 and moe["profiled step (ms)"] == f"{rows[0]['step_ms']:,.1f}"


def test_combinations_keep_the_given_order_and_drop_repeats():
    combos = combinations([4, 1, 4], [256, 128], ["adamw"], ["fp32"], [None])
    assert [(c.max_seq_len, c.micro_batch_size) for c in combos] == [(256, 4), (256, 1), (128, 4), (128, 1)]
    assert combos[0].name == "mb4-seq256-adamw-fp32-nolimit"
    with pytest.raises(UserError, match="max_seq_lens is empty"):
        combinations([1], [], ["adamw"], ["fp32"], [None])


def test_plan_checks_every_combination_before_anything_runs():
    base = load_config(overrides=SMALL)
    configs = plan(base, combinations([1, 3], [128], ["adamw"], ["fp32"], [None]), steps=4)
    # The global batch (4) is kept where the micro-batch divides it and rounded up where it does not.
    assert [(c.train.micro_batch_size, c.train.global_batch_size, c.train.max_steps, c.adaptive.enabled)
            for c in configs.values()] == [(1, 4, 4, False), (3, 6, 4, False)]
    with pytest.raises(UserError, match="use at least 2"):
        plan(base, combinations([1], [128], ["adamw"], ["fp32"], [None]), steps=1)
    with pytest.raises(UserError, match="tokenize.max_seq_len"):
        plan(base, combinations([1], [8], ["adamw"], ["fp32"], [None]), steps=3)


def test_an_8bit_optimizer_without_bitsandbytes_is_a_skipped_row(tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    combo = Combination(2, 128, "adamw_8bit", "fp32", None)
    cfg = plan(load_config(overrides=SMALL), [combo], steps=3)[combo]

    row = run_combination(cfg, combo, tmp_path)

    assert row["status"] == "skipped" and "bitsandbytes is not installed" in row["note"]
    assert not (tmp_path / "sweep").exists()  # nothing was started


def test_cli_rejects_a_bad_sweep_before_starting_anything(capsys):
    assert main(["--micro-batch", "0"]) == 2
    assert "train.micro_batch_size" in capsys.readouterr().err
    assert main(["--steps", "1"]) == 2
    assert "use at least 2" in capsys.readouterr().err
    assert main(["--architecture", "olmoe", "--set", "model.name_or_path=some/model"]) == 2
    assert "architectures sweeps model.scratch.architecture" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--optimizer", "sgd"])
    assert exit_info.value.code == 2
    assert "sgd: not one of adamw, adamw_8bit, paged_adamw_8bit" in capsys.readouterr().err


def _fail_or_fake_training(monkeypatch, outcome):
    """Replace the training loop: raise `outcome` or return it as the summary, writing no metrics."""
    import leantune.training.loop

    def train(cfg, run_dir, **kwargs):
        (run_dir / "checkpoints" / "step-1").mkdir(parents=True)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(leantune.training.loop, "train", train)


def test_an_out_of_memory_is_a_row_not_a_failed_sweep(tmp_path, monkeypatch):
    import torch

    _fail_or_fake_training(monkeypatch, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    combo = Combination(8, 256, "adamw", "fp32", None)
    cfg = plan(load_config(overrides=SMALL), [combo], steps=3)[combo]

    row = run_combination(cfg, combo, tmp_path)

    assert row["status"] == "out_of_memory"
    assert row["note"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert not (tmp_path / "sweep" / combo.name / "checkpoints").exists()


def test_a_power_limit_the_gpu_refused_is_a_skipped_row_not_a_mislabelled_one(tmp_path, monkeypatch):
    import torch

    import leantune.modeling

    monkeypatch.setattr(leantune.modeling, "resolve_device", lambda cfg: torch.device("cuda"))
    message = "power.limit_watts=90: setting a GPU power limit needs root; training goes on at the current limit"
    _fail_or_fake_training(monkeypatch, {"device": "cuda", "gpu_name": "fake", "power_limit": {
        "status": "no_permission", "message": message}})
    combo = Combination(2, 128, "adamw", "fp32", 90.0)
    cfg = plan(load_config(overrides=SMALL), [combo], steps=3)[combo]

    row = run_combination(cfg, combo, tmp_path)

    assert (row["status"], row["note"], row.get("tokens_per_s")) == ("skipped", message, None)


def test_the_ui_form_offers_the_configs_own_values_with_descriptions():
    from prefect.utilities.callables import parameter_schema

    properties = parameter_schema(profile.fn).model_dump()["properties"]

    assert properties["optimizers"]["items"]["enum"] == ["adamw", "adamw_8bit", "paged_adamw_8bit"]
    assert properties["precisions"]["items"]["enum"] == ["auto", "bf16", "fp16", "fp32"]
    assert properties["micro_batch_sizes"]["default"] == [1, 2, 4]
    assert properties["micro_batch_sizes"]["items"] == {"type": "integer"}
    assert properties["power_limits_w"]["default"] == [None]
    assert properties["architectures"]["items"]["anyOf"][0]["enum"] == ["llama", "mixtral", "olmoe", "qwen2_moe"]
    assert all(properties[name]["description"] for name in ("max_seq_lens", "power_limits_w", "steps"))


def test_the_breakdown_attributes_forward_ranges_backward_nodes_and_the_optimizer():
    from leantune.breakdown import BACKWARD_PREFIX, Event, breakdown

    def ev(name, start, end, seq=-1, backward=False):  # times in ms; the profiler's are microseconds
        return Event(name, start * 1000, end * 1000, seq, thread=1, fwd_thread=1 if backward else 0)

    events = [
        ev("leantune::attention", -30, -20), ev("aten::mm", -28, -22, seq=1),  # before the window: warm-up step
        ev("Optimizer.step#AdamW.step", 0, 10),  # the window starts at the end of the first optimizer step
        ev("leantune::attention", 20, 50), ev("aten::linear", 22, 40, seq=5),
        ev("leantune::experts", 50, 90), ev("leantune::router", 55, 60), ev("aten::linear", 56, 59, seq=6),
        ev("aten::mm", 62, 80, seq=7), ev("aten::linear", 90, 95, seq=8),  # the LM head: in no part
        ev(BACKWARD_PREFIX + "MmBackward0", 100, 104, seq=8, backward=True),
        ev(BACKWARD_PREFIX + "MmBackward0", 104, 114, seq=7, backward=True),
        ev("aten::mm", 105, 110),  # inside a backward node: not counted again
        ev(BACKWARD_PREFIX + "AddmmBackward0", 114, 117, seq=6, backward=True),
        ev(BACKWARD_PREFIX + "AddmmBackward0", 117, 127, seq=5, backward=True),
        ev(BACKWARD_PREFIX + "torch::autograd::AccumulateGrad", 127, 130, backward=True),
        ev("Optimizer.zero_grad#AdamW.zero_grad", 130, 132),
        ev("Optimizer.step#AdamW.step", 140, 160),
    ]

    parts = breakdown(events)

    # The window is 10..160 ms, one optimizer step. attention: 30 forward + 10 backward; experts: 40 - 5
    # (router) + 10; router: 5 + 3; optimizer: 2 + 20; other: 150 - 115 (LM head, its backward, AccumulateGrad).
    assert parts == {"steps": 1, "step_ms": 150.0, "attention_ms": 40.0, "experts_ms": 45.0, "router_ms": 8.0,
                     "optimizer_ms": 22.0, "other_ms": 35.0}
    with pytest.raises(ValueError, match="2 or more"):
        breakdown(events[:3])


@pytest.mark.slow  # four short trainings (timed and profiled, MoE and dense): 20-45 s on this 2-core CPU
def test_an_moe_and_its_dense_counterpart_get_a_breakdown_that_adds_up(tokenized_run, tmp_path):
    from leantune.config import load_config as load
    from leantune.profile import table_rows

    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens" / "seq-256").symlink_to(tokenized_run / "tokens", target_is_directory=True)
    base = load(tokenized_run / "config.yaml", overrides=[
        "model.scratch.num_experts=4", "model.scratch.num_experts_per_tok=2", "lora.target_modules=[q_proj,v_proj]",
        "lora.target_parameters=[mlp.experts.gate_up_proj,mlp.experts.down_proj]", "train.router_aux_loss_coef=0.1"])
    combos = combinations([8], [256], ["adamw"], ["fp32"], [None], ["olmoe", "llama"])

    rows = [run_combination(cfg, combo, tmp_path, breakdown=True) for combo, cfg in plan(base, combos, 3).items()]

    moe, dense = rows
    assert (moe["architecture"], dense["architecture"]) == ("olmoe", "llama")
    assert moe["status"] == dense["status"] == "ok"
    for r in rows:
        parts = [r[c] for c in BREAKDOWN_COLUMNS[1:]]
        assert r["step_ms"] > 0 and all(p >= 0 for p in parts[:-1])
        assert sum(parts) == pytest.approx(r["step_ms"], abs=0.01)
        assert r["attention_ms"] > 0 and r["experts_ms"] > 0 and r["optimizer_ms"] > 0
        # Other is what is left after the parts: never negative beyond rounding.
        assert r["other_ms"] >= -0.01
        shares = table_rows([r])[0]
        assert sum(float(shares[f"{p} %"]) for p in ("attention", "experts", "router", "optimizer", "other")) \
            == pytest.approx(100, abs=0.3)
    assert moe["router_ms"] > 0 and dense["router_ms"] == 0
    # The dense counterpart has no experts for lora.target_parameters: it was cleared, not an error.
    assert (tmp_path / "sweep" / dense["combination"] / "breakdown" / "metrics.jsonl").is_file()
    with pytest.raises(UserError, match="model.name_or_path"):
        plan(load(overrides=["model.name_or_path=some/model"]), combos, 3)


@pytest.mark.parametrize("arch", ["olmoe", "llama"])
def test_the_profiled_parts_of_a_real_model_add_up_and_only_an_moe_has_a_router(arch):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, OlmoeConfig, OlmoeForCausalLM

    from leantune.breakdown import breakdown, profiled_parts

    shape = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2)
    torch.manual_seed(0)
    model = (OlmoeForCausalLM(OlmoeConfig(**shape, num_experts=4, num_experts_per_tok=2)) if arch == "olmoe"
             else LlamaForCausalLM(LlamaConfig(**shape)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 64, (2, 16))

    with profiled_parts() as events:
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    parts = breakdown(events)

    assert parts["steps"] == 2
    assert sum(parts[f"{p}_ms"] for p in ("attention", "experts", "router", "optimizer", "other")) \
        == pytest.approx(parts["step_ms"], abs=0.01)
    assert min(parts["attention_ms"], parts["experts_ms"], parts["optimizer_ms"], parts["other_ms"] + 0.01) > 0
    assert (parts["router_ms"] > 0) == (arch == "olmoe")
