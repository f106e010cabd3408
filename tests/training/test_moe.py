"""Mixture-of-Experts: scratch MoE models, LoRA on fused experts, the router loss and its split invariance,
expert load against an independent count, and what is refused at config time."""

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from run_helpers import adapter, assert_same_weights, new_run
from transformers import AutoModelForCausalLM, AutoTokenizer

from leantune.config import ConfigError, load_config
from leantune.errors import UserError
from leantune.modeling import build_model, scratch_hf_config
from leantune.moe import RouterTap, expert_load_figures, moe_geometry, token_segments
from leantune.shards import TokenShards, collate
from leantune.training.loop import epoch_order, next_global_batch, train

CPU = torch.device("cpu")
FAST = ["train.eval_every=1000", "checkpoint.every_steps=1000"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# The tiny OLMoE of the tests: 4 experts, top-2; LoRA on attention and on every expert.
MOE = ["model.scratch.architecture=olmoe", "model.scratch.num_experts=4", "model.scratch.num_experts_per_tok=2",
       "lora.target_modules=[q_proj,v_proj]", f"lora.target_parameters=[{','.join(EXPERTS)}]", "lora.dropout=0",
       "train.router_aux_loss_coef=0.1"]


def steps_of(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "event" not in m]


@pytest.mark.parametrize("arch", ["mixtral", "olmoe", "qwen2_moe"])
def test_scratch_moe_trains_lora_on_its_fused_experts(arch):
    cfg = load_config(overrides=[f"model.scratch.architecture={arch}", "model.scratch.num_experts=4",
                                 "model.scratch.hidden_size=32", "model.scratch.intermediate_size=16",
                                 f"lora.target_parameters=[{','.join(EXPERTS)}]", "lora.dropout=0",
                                 "lora.target_modules=[q_proj,v_proj]", "lora.r=4"])
    config = scratch_hf_config(cfg, 300)
    assert moe_geometry(config).num_experts == 4 and moe_geometry(config).top_k == 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    from leantune.modeling import _add_lora

    peft_model = _add_lora(cfg, model)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    # One adapter per fused expert tensor and layer: r x experts columns of A, and B.
    expert_a = [n for n in trainable if "experts" in n and "lora_A" in n]
    assert len(expert_a) == 2 * 2
    a = dict(peft_model.named_parameters())[expert_a[0]]
    assert a.shape[0] == 4 * 4  # r x num_experts
    assert not any("mlp.gate." in n for n in trainable)  # routers stay frozen
    out = peft_model(input_ids=torch.randint(0, 300, (2, 12)))
    out.logits.float().pow(2).mean().backward()
    assert all(dict(peft_model.named_parameters())[n].grad is not None for n in trainable)
    from leantune.probe import model_shape

    count = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert count == model_shape(cfg, 300).lora_params(4, ["q_proj", "v_proj"], EXPERTS)


def test_router_loss_of_one_sequence_is_transformers_and_ignores_padding():
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

    cfg = load_config(overrides=MOE + ["model.scratch.hidden_size=32", "model.scratch.intermediate_size=16"])
    config = scratch_hf_config(cfg, 300)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    torch.nn.init.normal_(model.model.layers[0].mlp.gate.weight, std=0.5)  # OLMoE's routers start at zero
    torch.nn.init.normal_(model.model.layers[1].mlp.gate.weight, std=0.5)
    tap = RouterTap(model, moe_geometry(config))
    ids = torch.randint(0, 300, (2, 10))
    per_sequence = []
    for row, n in ((0, 10), (1, 7)):
        tap.start()
        out = model(input_ids=ids[row:row + 1, :n], output_router_logits=True)
        weighted, counts = tap.finish(token_segments([n], n), 1)
        expected = load_balancing_loss_func(out.router_logits, 4, 2)
        # Sum of n_s aux_s over the micro-batch: n times transformers' value for one sequence.
        torch.testing.assert_close(weighted / n, expected)
        assert counts.shape == (2, 4) and counts.sum() == 2 * 2 * n
        per_sequence.append((weighted, counts))
    # The two sequences in one right-padded micro-batch: the pads (3 of row 1) count nowhere.
    tap.start()
    model(input_ids=ids, attention_mask=(torch.arange(10)[None] < torch.tensor([[10], [7]])).long())
    weighted, counts = tap.finish(token_segments([10, 7], 10), 2)
    torch.testing.assert_close(weighted, per_sequence[0][0] + per_sequence[1][0])
    torch.testing.assert_close(counts, per_sequence[0][1] + per_sequence[1][1])


def test_expert_load_figures():
    figures = expert_load_figures(np.array([[2, 2, 2, 2], [8, 0, 0, 0]]))
    assert figures["expert_load"] == [[0.25] * 4, [1.0, 0.0, 0.0, 0.0]]
    assert figures["expert_imbalance"] == [1.0, 4.0] and figures["expert_imbalance_max"] == 4.0


def test_micro_batch_splits_give_the_same_update_with_the_router_loss(tokenized_run, tmp_path):
    weights, lines = {}, {}
    for micro in (1, 2, 8):
        cfg, run_dir = new_run(tokenized_run, tmp_path, *FAST, *MOE, "train.max_steps=3",
                               f"train.micro_batch_size={micro}", name=f"mb{micro}")
        train(cfg, run_dir)
        weights[micro], lines[micro] = adapter(run_dir), steps_of(run_dir)
    assert any("experts" in k for k in weights[1])
    for micro in (2, 8):
        assert_same_weights(weights[micro], weights[1])
        for key in ("loss", "router_aux_loss"):
            np.testing.assert_allclose([m[key] for m in lines[micro]], [m[key] for m in lines[1]], rtol=1e-5)
        assert [m["expert_load"] for m in lines[micro]] == [m["expert_load"] for m in lines[1]]
    # The router loss is in the update: without it the weights differ.
    cfg, run_dir = new_run(tokenized_run, tmp_path, *FAST, *MOE, "train.max_steps=3", "train.router_aux_loss_coef=0",
                           name="no-aux")
    train(cfg, run_dir)
    differ = max(float((adapter(run_dir)[k] - v).abs().max()) for k, v in weights[1].items())
    assert differ > 1e-6
    assert all(m["router_aux_loss"] > 0.9 for m in lines[1])  # top-2 of 4: at least ~1 (k/E x E / k ...)


def test_expert_load_in_metrics_matches_an_independent_count(tokenized_run, tmp_path):
    cfg, run_dir = new_run(tokenized_run, tmp_path, *FAST, *MOE, "train.max_steps=1",
                           "tokenize.packing=false", name="load")
    from leantune.tokenization import tokenize

    tokenize(cfg, run_dir / "data", run_dir / "tokens")  # unpacked: sequences of unequal lengths, padded
    train(cfg, run_dir)
    line = steps_of(run_dir)[0]

    counts = independent_counts(cfg, run_dir)
    assert counts.sum() == 2 * 2 * line["tokens"]
    shares = counts / counts.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(line["expert_load"], shares, atol=1e-6)
    np.testing.assert_allclose(line["expert_imbalance"], shares.max(axis=1) * 4, atol=1e-3)


def test_what_peft_and_transformers_cannot_do_is_refused_at_config_time():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["model.scratch.architecture=mixtral", "model.method=qlora"])
    assert "model.method: qlora cannot quantise the experts" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[f"lora.target_parameters=[{EXPERTS[0]}]", "lora.dropout=0.1"])
    assert "lora.dropout: 0.1 is not supported by PEFT's LoRA on parameters" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["model.scratch.architecture=olmoe", "model.scratch.num_experts_per_tok=5"])
    assert "model.scratch.num_experts_per_tok: 5 is more than model.scratch.num_experts 4" in str(e.value)


def test_target_parameters_that_match_nothing_are_a_user_error():
    cfg = load_config(overrides=["lora.target_parameters=[mlp.experts.gate_up_proj]", "lora.dropout=0",
                                 "model.scratch.hidden_size=32", "model.scratch.intermediate_size=16"])
    from leantune.modeling import _add_lora

    with pytest.raises(UserError, match="its 3-D expert parameters are none"):
        _add_lora(cfg, AutoModelForCausalLM.from_config(scratch_hf_config(cfg, 300)))


# ------------------------------------------------------------------------------- the estimator

# Published architectures (their config.json values) and parameter counts (total, active): Mixtral-8x7B
# (Mistral AI), OLMoE-1B-7B (Muennighoff et al. 2024), Qwen1.5-MoE-A2.7B (Qwen team).
PUBLISHED = {
    "mixtral-8x7b": (dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                          num_experts_per_tok=2), 46.7e9, 12.9e9),
    "olmoe-1b-7b": (dict(model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024,
                         num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, num_experts=64,
                         num_experts_per_tok=8), 6.9e9, 1.3e9),
    "qwen1.5-moe-a2.7b": (dict(model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                               moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_hidden_layers=24,
                               num_attention_heads=16, num_key_value_heads=16, num_experts=60,
                               num_experts_per_tok=4), 14.3e9, 2.7e9),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_moe_parameter_counts_match_the_published_ones(name):
    from transformers import AutoConfig

    from leantune.probe import ModelShape

    values, total, active = PUBLISHED[name]
    config = AutoConfig.for_model(**values)
    shape = ModelShape.from_hf_config(config)
    # Exactly what transformers builds (on the meta device: no memory), norms and biases aside.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    exact = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    geometry = moe_geometry(config)
    assert shape.total_params == pytest.approx(exact, rel=1e-4)
    assert shape.active_params == pytest.approx(
        exact - experts * (geometry.num_experts - geometry.top_k) / geometry.num_experts, rel=1e-4)
    assert shape.total_params == pytest.approx(total, rel=0.01)
    # Published actives have two significant digits: OLMoE's 1.28 B is "1.3 B" (1.4% off), the others within 1%.
    assert shape.active_params == pytest.approx(active, rel=0.01) or round(shape.active_params / 1e8) == active / 1e8


@pytest.mark.parametrize("overrides", [
    [],
    ["lora.target_parameters=[]"],
    ["model.gradient_checkpointing=true"],
    ["model.scratch.architecture=qwen2_moe"],
    ["model.scratch.architecture=mixtral", "model.method=full", "lora.target_parameters=[]",
     "lora.target_modules=all-linear", "train.micro_batch_size=2"],
], ids=["lora-experts", "lora-attention-only", "lora-experts-checkpointing", "qwen2-moe-shared-expert", "full"])
def test_moe_estimate_is_within_15_percent_of_the_measured_peak(overrides):
    from test_probe import TINY, peak_of_training_steps

    from leantune.probe import estimate_for_config, model_shape

    cfg = load_config(overrides=TINY + ["model.scratch.architecture=olmoe", "model.scratch.num_experts=8",
                                        "lora.dropout=0", "lora.target_modules=[q_proj,v_proj]",
                                        f"lora.target_parameters=[{','.join(EXPERTS)}]", *overrides])
    measured = peak_of_training_steps(cfg)
    estimated = estimate_for_config(cfg, model_shape(cfg), "cpu").total
    assert estimated == pytest.approx(measured, rel=0.15)


def test_all_linear_on_an_moe_means_its_linear_layers_only():
    # peft 0.21 alone would turn 'all-linear' on OLMoE/Mixtral into LoRA on the experts and the router weight.
    cfg = load_config(overrides=["model.scratch.architecture=olmoe", "model.scratch.hidden_size=32",
                                 "model.scratch.intermediate_size=16", "lora.r=4"])
    from leantune.modeling import _add_lora
    from leantune.probe import model_shape

    model = _add_lora(cfg, AutoModelForCausalLM.from_config(scratch_hf_config(cfg, 300)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert not any("experts" in n or "gate" in n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == model_shape(cfg, 300).lora_params(4, "all-linear")


def test_a_local_moe_model_is_checked_before_the_data_stages(tmp_path):
    from transformers import MixtralConfig

    from leantune.preflight import problems_before_data

    MixtralConfig(vocab_size=300, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4).save_pretrained(tmp_path)
    base = [f"model.name_or_path={tmp_path}", "eval.enabled=false", "lora.dropout=0"]
    problems = problems_before_data(load_config(overrides=base + ["model.method=qlora"]))
    assert problems == [f"model.method: qlora cannot quantise the experts of '{tmp_path}': transformers 5.x stores "
                        "them as fused 3-D parameters, which bitsandbytes leaves unquantised and peft's k-bit "
                        "preparation upcasts to fp32, so QLoRA would hold nearly every weight in 32-bit; use "
                        "model.method=lora (experts frozen in bf16, adapters via lora.target_parameters)"]
    problems = problems_before_data(load_config(overrides=base + ["lora.target_parameters=[experts.w1]"]))
    assert len(problems) == 1 and "lora.target_parameters: 'experts.w1' match no parameter" in problems[0]
    assert "'mlp.experts.down_proj', 'mlp.experts.gate_up_proj'" in problems[0]
    assert problems_before_data(load_config(overrides=base + [f"lora.target_parameters=[{EXPERTS[0]}]"])) == []


@pytest.mark.parametrize("name, published, gib", [
    ("mixtral-8x7b-lora", "mixtral-8x7b", 88.4), ("olmoe-1b-7b-lora", "olmoe-1b-7b", 18.7),
    ("qwen1.5-moe-a2.7b-lora", "qwen1.5-moe-a2.7b", 34.7),
])
def test_moe_configs_validate_and_their_memory_is_the_one_they_state(name, published, gib):

    from transformers import AutoConfig

    from leantune.probe import GIB, ModelShape, estimate_for_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml")
    shape = ModelShape.from_hf_config(AutoConfig.for_model(**PUBLISHED[published][0]))
    assert shape.is_moe and cfg.model.method == "lora"
    assert estimate_for_config(cfg, shape, "cuda").total / GIB == pytest.approx(gib, abs=0.05)


# ------------------------------------------------------------------------------- the cost model


def test_cost_model_counts_flops_from_active_parameters_and_memory_from_all(tmp_path, capsys):
    from transformers import AutoConfig

    from leantune.cost import main, workload_from_config
    from leantune.probe import ModelShape

    values, _, _ = PUBLISHED["mixtral-8x7b"]
    config = AutoConfig.for_model(**values)
    shape = ModelShape.from_hf_config(config)
    cfg = load_config(overrides=["tokenize.max_seq_len=2048"])
    work = workload_from_config(cfg, 10**7, shape)
    assert work.forward_flops_per_token == 2 * shape.active_params + 2 * 32 * 4096 * 2048

    def rows(*argv):
        assert main([*argv, "--tokens", "10M", "--json"]) == 0
        return {r["gpu"]: r for r in json.loads(capsys.readouterr().out)}

    sparse, dense = rows("--model", "46.7B", "--active", "12.9B", "--gpu", "H100"), rows("--model", "46.7B",
                                                                                        "--gpu", "H100")
    assert sparse["H100"]["seconds"] / dense["H100"]["seconds"] == pytest.approx(12.9 / 46.7)
    # A model directory: its config gives the active count (time) and every expert (memory).
    config.save_pretrained(tmp_path)
    mixtral = Path(__file__).resolve().parents[2] / "configs" / "mixtral-8x7b-lora.yaml"
    by_gpu = rows("--model", str(tmp_path), "--config", str(mixtral), "--gpu", "H100",
                  "--gpu", "H200")
    assert by_gpu["H100"]["fits"] == "no (88.4 GiB)" and by_gpu["H200"]["fits"] == "yes (88.4 GiB)"
    assert main(["--model", "46.7B", "--active", "50B", "--tokens", "1M"]) == 2
    assert "--active: '50B' is not a count up to --model's 46.7B" in capsys.readouterr().err


# ------------------------------------------------------------------------ flow, report, resume


def independent_counts(cfg, run_dir):
    """Top-k choices of the initial model (LoRA B is zero: the base's routing) over the global batch of step 1,
    counted from the router logits transformers returns, real tokens only."""
    shards = TokenShards(run_dir / "tokens" / "train")
    gbs = cfg.train.global_batch_size
    batch, *_ = next_global_batch(lambda e: epoch_order(shards, e, gbs, cfg.train.seed), 0, 0, gbs)
    tok = AutoTokenizer.from_pretrained(run_dir / "tokens" / "tokenizer")
    model = build_model(cfg, tok, CPU).eval()
    s = cfg.model.scratch
    counts = np.zeros((s.num_layers, s.num_experts), np.int64)
    with torch.no_grad():
        for i in batch:
            inputs = {k: v for k, v in collate([shards[int(i)]], shards.pad_id).items() if k != "labels"}
            # The decoder itself: the causal-LM head would also compute transformers' own router loss, which
            # fails on the 4-D mask of packed sequences.
            decoder = model.get_base_model().model
            for layer, logits in enumerate(decoder(**inputs, output_router_logits=True).router_logits):
                counts[layer] += np.bincount(logits.topk(s.num_experts_per_tok, dim=-1).indices.flatten().numpy(),
                                             minlength=s.num_experts)
    return counts


@pytest.mark.slow
@pytest.mark.flow
def test_a_tiny_moe_fine_tunes_through_the_flow_with_expert_load_in_the_report(prefect_server, tmp_path):
    from flows.finetune import finetune

    cfg = load_config(overrides=[
        "data.synthetic.num_records=300", "data.val_fraction=0.1", "tokenize.vocab_size=400",
        "tokenize.max_seq_len=128", "data.chunk_size=64", f"run.output_dir={tmp_path}", "run.name=moe",
        "model.scratch.hidden_size=32", "model.scratch.intermediate_size=32", "lora.r=4", "lora.alpha=8",
        "train.global_batch_size=8", "train.micro_batch_size=4", "train.max_steps=1", "eval.max_items=16",
        "eval.datasets=[synthetic]", *MOE])
    run_dir = finetune(cfg)
    line = steps_of(run_dir)[0]
    assert line["router_aux_loss"] > 0 and len(line["expert_load"]) == 2

    counts = independent_counts(cfg, run_dir)
    shares = counts / counts.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(line["expert_load"], shares, atol=1e-6)
    report = (run_dir / "report.md").read_text()
    assert "![Expert load](expert-load.png)" in report and (run_dir / "expert-load.png").is_file()
    for layer, row in enumerate(shares):
        assert f"| {layer} | {row.max() * 4:.2f} | {row.min() * 4:.2f} | {int(row.argmax())} |" in report
    # The adapter holds the expert LoRA tensors and PEFT loads it back onto the base (the evaluation did).
    assert any("experts" in k for k in adapter(run_dir))
    assert (run_dir / "eval" / "comparison.json").is_file()


@pytest.mark.slow
def test_moe_sigkill_then_resume_is_bitwise_equal(tokenized_run, tmp_path):
    from test_resume import make_run, metric_lines, resume_and_check, run_to_end, start, wait_for_step

    from leantune.training.checkpoint import CheckpointManager, run_fingerprints

    # Expert load is logged every 4 steps and checkpoints are taken every 3: a resume starts inside a logging
    # interval, so the counts of its first steps must come back from the checkpoint.
    moe = [*MOE, "train.log_every=4", "checkpoint.every_steps=3"]
    reference = make_run(tokenized_run, tmp_path / "reference", *moe)
    run_to_end(reference)
    assert [m["step"] for m in metric_lines(reference)] == [4, 8, 12]
    run_dir = make_run(tokenized_run, tmp_path / "killed", *moe)
    proc = start(run_dir)
    wait_for_step(proc, run_dir, 4)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=240)
    cfg = load_config(run_dir / "config.yaml")
    latest = CheckpointManager(cfg, run_dir, run_fingerprints(cfg, run_dir)).latest()
    step = int(latest.name.removeprefix("step-"))
    assert step % 4  # inside an interval
    resume_and_check(run_dir, reference, step)


def test_the_training_metrics_artifact_shows_the_router_loss_and_expert_imbalance():
    from leantune.training.launch import progress_markdown

    line = {"step": 1, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 100.0, "micro_batch_size": 4,
            "router_aux_loss": 2.01, **expert_load_figures(np.array([[3, 1], [2, 2]]))}
    markdown = progress_markdown([line], 10)
    assert "router loss | expert imbalance (max/mean) |" in markdown and "| 2.0100 | 1.50 |" in markdown


def test_run_expert_load_adds_up_the_intervals():
    from leantune.moe import run_expert_load

    lines = [{"step": 1}, expert_load_figures(np.array([[3, 1], [2, 2]])), expert_load_figures(np.array([[0, 4], [0, 4]]))]
    np.testing.assert_allclose(run_expert_load(lines), [[3 / 8, 5 / 8], [2 / 8, 6 / 8]])
    assert run_expert_load([{"step": 1}]) is None


def test_the_start_plan_of_an_moe_never_falls_back_to_qlora():
    from leantune.probe import estimate_for_config, model_shape, plan_start

    cfg = load_config(overrides=[*MOE, "train.global_batch_size=8", "train.micro_batch_size=4"])
    shape = model_shape(cfg)
    assert shape.is_moe
    # Too little memory for anything: the lightest plan is LoRA with micro-batch 1 and checkpointing, not QLoRA.
    plan = plan_start(cfg, shape, free_bytes=1, device_type="cuda")
    assert (plan.fits, plan.method, plan.micro_batch_size, plan.gradient_checkpointing) == (False, "lora", 1, True)
    # Enough for micro-batch 2 without checkpointing: the plan halves the micro-batch first.
    from leantune.config import with_values

    need = estimate_for_config(with_values(cfg, {"train.micro_batch_size": 2}), shape, "cuda").total
    plan = plan_start(cfg, shape, free_bytes=int(need / cfg.monitor.memory_high_fraction) + 1, device_type="cuda")
    assert (plan.fits, plan.method, plan.micro_batch_size, plan.gradient_checkpointing) == (True, "lora", 2, False)


def test_qlora_of_a_local_moe_is_refused_before_its_weights_load(tmp_path):
    from transformers import MixtralConfig

    # config.json only: loading weights would fail with another message; the refusal comes first.
    MixtralConfig(vocab_size=300, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4).save_pretrained(tmp_path)
    cfg = load_config(overrides=[f"model.name_or_path={tmp_path}", "model.method=qlora", "train.device=cpu"])

    class Tokenizer:
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    with pytest.raises(UserError, match="model.method: qlora cannot quantise the experts of"):
        build_model(cfg, Tokenizer(), CPU)
