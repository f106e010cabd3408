"""Full fine-tuning that fits (training/paramwise.py): bf16 weights rounded with Kahan summation or
stochastically, the optimizer step in backward, 8-bit AdamW; against the plain fp32 path, and the memory
the estimator gives them (leantune/probe.py) against the bytes of their tensors."""

from __future__ import annotations

import pytest
import torch
from tiny_model import TINY, Tokenizer, batch

from leantune.config import ConfigError, load_config
from leantune.modeling import build_model
from leantune.probe import estimate_for_config, model_shape
from leantune.training.loss import target_cross_entropy
from leantune.training.optim import build_optimizer
from leantune.training.paramwise import stochastic_round

FULL = [*TINY, "model.method=full", "train.lr=1e-3", "train.max_grad_norm=null"]
BF16 = ["model.dtype=bf16"]
IN_BACKWARD = ["train.optimizer_in_backward=true"]


def build(*overrides, weights=None):
    cfg = load_config(overrides=[*FULL, *overrides])
    model = build_model(cfg, Tokenizer(), torch.device("cpu"))
    if weights is not None:
        model.load_state_dict(weights)
    return cfg, model, build_optimizer(cfg, model)


def train(cfg, model, optimizer, steps: int = 3, scheduler=None) -> list[float]:
    """`steps` optimizer steps on the test batch as the loop takes them: forward under autocast in model.dtype,
    backward (which steps the weights with train.optimizer_in_backward), optimizer.step(), the lr schedule's
    step when given, zero_grad."""
    inputs, labels = batch(packed=True)
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.model.dtype == "bf16"):
            loss = target_cross_entropy(model, inputs, labels) / int((labels != -100).sum())
        loss.backward()
        # In backward, every weight stepped and its gradient went; otherwise every one has its gradient.
        assert all((p.grad is None) == cfg.train.optimizer_in_backward for p in model.parameters())
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------ exact options


@pytest.mark.parametrize("overrides", [
    ["train.full_precision=bf16-stochastic", *BF16],
    ["train.full_precision=bf16-kahan", *BF16],
    ["train.full_precision=bf16-stochastic", *BF16, "train.optimizer=adamw_8bit"],
    ["train.full_precision=bf16-kahan", *BF16, "model.gradient_checkpointing=true"],
], ids=["bf16-stochastic", "bf16-kahan", "bf16-stochastic-adamw_8bit", "bf16-kahan-checkpointing"])
def test_the_step_in_backward_equals_the_step_after_it_bitwise(overrides):
    cfg, model, optimizer = build(*overrides)
    start = weights(model)
    losses = train(cfg, model, optimizer)
    cfg_b, model_b, optimizer_b = build(*overrides, *IN_BACKWARD, weights=start)
    assert losses == train(cfg_b, model_b, optimizer_b)
    after, after_b = weights(model), weights(model_b)
    assert all(p.dtype == torch.bfloat16 for p in after.values())
    for name, w in after.items():
        assert not torch.equal(w, start[name]), name  # every weight moved
        assert torch.equal(after_b[name], w), name


def test_a_bf16_weight_stepped_in_chunks_equals_it_stepped_whole(monkeypatch):
    from leantune.training import paramwise

    cfg, model, optimizer = build("train.full_precision=bf16-kahan", *BF16)
    start = weights(model)
    train(cfg, model, optimizer)
    monkeypatch.setattr(paramwise, "STEP_CHUNK", 1000)  # the embedding's 300 x 64 in 20 chunks, the last short
    cfg, chunked, chunked_optimizer = build("train.full_precision=bf16-kahan", *BF16, weights=start)
    assert len(chunked_optimizer.chunks[0]) == 20
    train(cfg, chunked, chunked_optimizer)
    for name, w in weights(model).items():
        assert torch.equal(weights(chunked)[name], w), name


def test_the_step_in_backward_in_fp32_equals_the_plain_adamw_within_rounding():
    from leantune.training.optim import build_scheduler

    cfg, model, optimizer = build("train.weight_decay=0.1")
    assert isinstance(optimizer, torch.optim.AdamW)  # the plain path: one AdamW over every weight
    start = weights(model)
    # The warm-up changes the lr at every step: the schedule must reach every weight's own optimizer.
    losses = train(cfg, model, optimizer, scheduler=build_scheduler(cfg, optimizer, 10))
    cfg_b, model_b, optimizer_b = build("train.weight_decay=0.1", *IN_BACKWARD, weights=start)
    scheduler_b = build_scheduler(cfg_b, optimizer_b, 10)
    assert train(cfg_b, model_b, optimizer_b, scheduler=scheduler_b) == pytest.approx(losses, rel=1e-6)
    inner = {g["lr"] for opt in optimizer_b._optimizers() for g in opt.param_groups}
    assert inner == {scheduler_b.get_last_lr()[0]} and inner.pop() == pytest.approx(4 / 11 * 1e-3)  # warm-up step 4
    for name, w in weights(model).items():
        # torch's multi-tensor AdamW against its one-tensor one: the same sums, rounded in another order.
        torch.testing.assert_close(weights(model_b)[name], w, rtol=1e-6, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------------ bf16 against fp32


def test_bf16_weights_follow_the_fp32_run_where_rounding_to_nearest_stalls():
    """Five steps at lr 1e-5 (a full fine-tune's), from the same weights: the fp32 reference keeps fp32 master
    weights (bf16 autocast computes); the bf16 runs store bf16 weights and gradients."""
    steps, lr = 5, "train.lr=1e-5"
    cfg, kahan, kahan_opt = build("train.full_precision=bf16-kahan", *BF16, lr)
    start = weights(kahan)
    cfg_ref, ref, ref_opt = build(*BF16, lr, weights={k: v.float() for k, v in start.items()})
    cfg_sr, sr, sr_opt = build("train.full_precision=bf16-stochastic", *BF16, lr, weights=start)
    _, nearest, _ = build("train.full_precision=bf16-kahan", *BF16, lr, weights=start)
    # Pure bf16 (LLaMA-Factory's pure_bf16): torch's AdamW on the bf16 weights, rounding each step to nearest.
    nearest_opt = torch.optim.AdamW(nearest.parameters(), lr=1e-5, weight_decay=0.0)

    def drop(losses):
        return losses[0] - losses[-1]

    ref_drop = drop(train(cfg_ref, ref, ref_opt, steps))
    kahan_drop = drop(train(cfg, kahan, kahan_opt, steps))
    sr_drop = drop(train(cfg_sr, sr, sr_opt, steps))
    nearest_drop = drop(train(cfg, nearest, nearest_opt, steps))
    names = [n for n, _ in kahan.named_parameters()]
    # The weight Kahan summation represents, bf16 w plus the compensation, against the fp32 one.
    represented = {n: w.float() + kahan_opt.compensation[i].float() for i, (n, w) in enumerate(weights(kahan).items())}
    assert list(represented) == names

    def distance(a, b):
        return sum(float((a[n].float() - b[n].float()).norm()) ** 2 for n in names) ** 0.5

    ref_weights = weights(ref)
    update = distance(ref_weights, start)
    # Measured 0.049: the rest is the gradients' bf16 rounding (the reference's are fp32).
    assert distance(represented, ref_weights) < 0.1 * update
    assert distance(weights(nearest), ref_weights) > 0.5 * update  # measured 0.93: most updates lost
    assert kahan_drop == pytest.approx(ref_drop, rel=0.15)  # measured 0.91x
    assert nearest_drop < 0.5 * ref_drop  # measured 0.24x: training stalls
    assert sr_drop > 0.5 * ref_drop  # measured 1.35x: unbiased, noisy


def test_stochastic_rounding_keeps_the_expected_value():
    gap = 2**-7  # between bf16 neighbours in [1, 2)
    for value in (1 + gap / 4, -(1 + 3 * gap / 4), 1.5 + gap / 16):
        exact = torch.full((100_000,), value)
        rounded = stochastic_round(exact.clone(), seed=3)
        neighbours = sorted({float(v) for v in rounded.unique()})
        assert len(neighbours) == 2 and neighbours[1] - neighbours[0] == pytest.approx(gap)
        # 1e5 draws: the mean within 5 standard deviations (gap / 2 / sqrt(1e5) each) of the exact value.
        assert float(rounded.float().mean()) == pytest.approx(value, abs=5 * gap / 2 / 100_000**0.5)
        assert abs(float(exact[0].to(torch.bfloat16)) - value) > gap / 20  # rounding to nearest is off by more
    assert torch.equal(stochastic_round(exact.clone(), seed=3), stochastic_round(exact.clone(), seed=3))
    assert not torch.equal(stochastic_round(exact.clone(), seed=3), stochastic_round(exact.clone(), seed=4))


# ------------------------------------------------------------------------------------------- the config


@pytest.mark.parametrize(("overrides", "problems"), [
    (["train.optimizer_in_backward=true", "train.max_grad_norm=1.0"],
     ["train.max_grad_norm: 1.0 clips with the norm of every gradient, but train.optimizer_in_backward steps each "
      "weight before the others' gradients exist; set train.max_grad_norm=null or train.optimizer_in_backward=false"]),
    (["model.method=lora", "lora.target_modules=all-linear", "train.optimizer_in_backward=true",
      "train.full_precision=bf16-kahan", "model.dtype=bf16"],
     ["train.full_precision: bf16-kahan is for model.method=full (model.method lora stores its frozen weights in "
      "model.dtype already); remove it or use model.method=full",
      "train.optimizer_in_backward: only for model.method=full (model.method lora trains few weights, whose "
      "gradients cost little); set it to false or use model.method=full"]),
    (["train.full_precision=bf16-stochastic", "model.dtype=fp32"],
     ["train.full_precision: bf16-stochastic stores bf16 weights, which need bf16 compute, not model.dtype fp32; "
      "set model.dtype=bf16 (or auto on a bf16 GPU) or train.full_precision=fp32"]),
    (["train.optimizer_in_backward=true", "train.distributed.nproc_per_node=2", "model.dtype=fp16"],
     ["train.optimizer_in_backward: data parallel sums the gradients after backward, when they are stepped and "
      "gone; set train.distributed.nproc_per_node=1 and nnodes=1, or train.optimizer_in_backward=false",
      "train.optimizer_in_backward: fp16 loss scaling must check every gradient for overflow before any step; use "
      "model.dtype=bf16 or train.optimizer_in_backward=false"]),
], ids=["clipping", "lora", "fp32-compute", "data-parallel-and-fp16"])
def test_incompatible_settings_are_refused_naming_the_key_and_the_fix(overrides, problems):
    with pytest.raises(ConfigError) as refused:
        load_config(overrides=[*FULL, *overrides])
    assert refused.value.problems == problems


def test_bf16_weights_where_auto_resolves_to_fp32_are_refused_at_build():
    from leantune.errors import UserError

    cfg = load_config(overrides=[*FULL, "train.full_precision=bf16-kahan"])  # model.dtype auto: fp32 on the CPU
    with pytest.raises(UserError, match="train.full_precision: bf16-kahan weights need bf16 compute"):
        build_model(cfg, Tokenizer(), torch.device("cpu"))


# ------------------------------------------------------------------------------------------- the memory


def tensor_bytes(value) -> int:
    """Bytes of every tensor in a nested state (dicts, lists, tuples)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(tensor_bytes(v) for v in value)
    return 0


@pytest.mark.parametrize("overrides", [
    [],
    ["train.full_precision=bf16-kahan", *BF16],
    ["train.full_precision=bf16-stochastic", *BF16, *IN_BACKWARD],
    ["train.full_precision=bf16-stochastic", *BF16, "train.optimizer=adamw_8bit"],
    ["train.full_precision=bf16-stochastic", *BF16, *IN_BACKWARD, "train.optimizer=paged_adamw_8bit"],
], ids=["fp32-adamw", "bf16-kahan-adamw", "bf16-stochastic-in-backward", "bf16-stochastic-adamw_8bit",
        "bf16-stochastic-in-backward-paged_8bit"])
def test_weights_gradients_and_optimizer_state_are_the_estimate_within_15_percent(overrides):
    # A larger tiny model, so that bitsandbytes' per-tensor constants are no sizeable share.
    wider = ["model.scratch.hidden_size=128", "model.scratch.intermediate_size=344", "tokenize.vocab_size=2000"]
    cfg = load_config(overrides=[*FULL, *wider, "train.global_batch_size=3", "train.micro_batch_size=3", *overrides])

    class Vocab(Tokenizer):
        def __len__(self):
            return 2000

        def get_vocab(self):
            return {str(i): i for i in range(2000)}

    model = build_model(cfg, Vocab(), torch.device("cpu"))
    live = {"grads": 0}

    def count_gradients(_):  # runs before the optimizer's hook (registered first): every gradient alive now
        live["grads"] = max(live["grads"], sum(tensor_bytes(p.grad) for p in model.parameters() if p.grad is not None))

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(count_gradients)
    optimizer = build_optimizer(cfg, model)
    train(cfg, model, optimizer, steps=1)  # the optimizer's state exists from the first step
    weights_bytes = sum(tensor_bytes(p) for p in model.parameters())
    measured = weights_bytes + live["grads"] + tensor_bytes(optimizer.state_dict())
    estimate = estimate_for_config(cfg, model_shape(cfg), "cpu")
    assert measured == pytest.approx(estimate.weights + estimate.gradients + estimate.optimizer, rel=0.15)
    assert weights_bytes == estimate.weights  # the shape's parameter count, in the stored dtype


# --------------------------------------------------------------------------------------- the training loop


def test_the_loop_steps_in_the_last_micro_batch_backward_as_the_plain_step_does(tokenized_run, tmp_path):
    """Two micro-batches a step: the first accumulates, the second's backward steps every weight; the start-up
    probe (the longest sequences) drops its gradients and steps nothing. Weights and losses equal the loop with
    the step after backward, bit for bit."""
    import json

    from run_helpers import new_run
    from safetensors.torch import load_file

    from leantune.training.loop import train as train_loop

    runs = {}
    for name, extra in (("plain", []), ("in-backward", IN_BACKWARD)):
        cfg, run_dir = new_run(tokenized_run, tmp_path, "model.method=full", "lora.target_modules=all-linear",
                               "model.dtype=bf16", "train.full_precision=bf16-stochastic", "train.max_grad_norm=null",
                               "train.max_steps=2", "train.eval_every=1000", "checkpoint.every_steps=1000", *extra,
                               name=name)
        train_loop(cfg, run_dir)
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (load_file(run_dir / "adapter" / "model.safetensors"), [m for m in lines if "event" not in m])
    (plain, plain_lines), (fused, fused_lines) = runs["plain"], runs["in-backward"]
    assert [m["accumulation_steps"] for m in fused_lines] == [2, 2]
    assert [m["loss"] for m in fused_lines] == [m["loss"] for m in plain_lines]
    # The norm summed weight by weight in fp32 against clip_grad_norm_'s of the bf16 gradients.
    assert [m["grad_norm"] for m in fused_lines] == pytest.approx([m["grad_norm"] for m in plain_lines], rel=1e-2)
    assert plain.keys() == fused.keys()
    for name, w in plain.items():
        assert w.dtype == torch.bfloat16 and torch.equal(fused[name], w), name


def test_out_of_memory_after_weights_stepped_in_backward_fails_the_attempt(tokenized_run, tmp_path, monkeypatch):
    """Before any weight stepped the step is redone smaller in the process, as always; after, redoing it would
    step those weights twice, so the error ends the attempt (the flow's next one resumes from a checkpoint)."""
    import json

    from run_helpers import new_run

    from leantune.training import loop

    real = loop._forward_backward

    def out_of_memory_at(step_k):
        def forward_backward(run, share, k, targets, tokens):
            if (run.state.step + 1, k) == step_k and run.controller.micro_batch_size == 4:
                # Out of memory at the end of the micro-batch: its backward ran (k 1: and stepped every weight).
                real(run, share, k, targets, tokens)
                assert run.optimizer.stepped == (len(run.trainable) if k == 1 else 0)
                raise torch.OutOfMemoryError(f"injected at step {step_k[0]}, micro-batch {k}")
            return real(run, share, k, targets, tokens)
        return forward_backward

    common = ["model.method=full", "lora.target_modules=all-linear", "model.dtype=bf16",
              "train.full_precision=bf16-stochastic", "train.max_grad_norm=null", "train.optimizer_in_backward=true",
              "train.max_steps=2", "train.eval_every=1000", "checkpoint.every_steps=1000"]
    cfg, run_dir = new_run(tokenized_run, tmp_path, *common, name="before")
    monkeypatch.setattr(loop, "_forward_backward", out_of_memory_at((2, 0)))
    assert loop.train(cfg, run_dir)["completed"]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(e["step"], e["old"], e["new"]) for e in events if e.get("event") == "micro_batch"] == [(2, 4, 2)]

    cfg, run_dir = new_run(tokenized_run, tmp_path, *common, name="after")
    monkeypatch.setattr(loop, "_forward_backward", out_of_memory_at((2, 1)))
    with pytest.raises(torch.OutOfMemoryError, match="injected at step 2, micro-batch 1"):
        loop.train(cfg, run_dir)


def test_the_loop_stopped_and_resumed_ends_bitwise_as_an_uninterrupted_run(tokenized_run, tmp_path):
    """Kahan compensation, 8-bit state and the step in backward through the loop's own checkpoint and resume."""
    import json
    import os
    import signal

    from run_helpers import new_run
    from safetensors.torch import load_file

    from leantune.testing import loop_hooks
    from leantune.training.loop import train as train_loop

    settings = ["model.method=full", "lora.target_modules=all-linear", "model.dtype=bf16",
                "train.full_precision=bf16-kahan", "train.optimizer=adamw_8bit", "train.max_grad_norm=null",
                "train.optimizer_in_backward=true", "train.max_steps=3", "train.eval_every=1000",
                "checkpoint.every_steps=1000"]
    cfg, straight = new_run(tokenized_run, tmp_path, *settings, name="straight")
    train_loop(cfg, straight)
    cfg, run_dir = new_run(tokenized_run, tmp_path, *settings, name="stopped")

    def sigterm_after_step_2(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with loop_hooks(headroom=sigterm_after_step_2):
        assert train_loop(cfg, run_dir)["steps"] == 2
    resumed = train_loop(cfg, run_dir)
    assert resumed["completed"] and resumed["resumed_from_step"] == 2
    a, b = load_file(run_dir / "adapter" / "model.safetensors"), load_file(straight / "adapter" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)

    def losses(path):
        return [m["loss"] for m in map(json.loads, (path / "metrics.jsonl").read_text().splitlines()) if "loss" in m]

    assert losses(run_dir) == losses(straight)


# ------------------------------------------------------------------------ lighter methods leave the options


def test_moving_a_bf16_full_fine_tune_to_lora_resets_what_only_full_takes():
    """The start plan and the attempts' ladder move full -> lora; LoRA refuses train.full_precision and
    train.optimizer_in_backward, so the move resets them (and says so) instead of failing validation."""
    from leantune.attempts import AttemptReport, adjust
    from leantune.probe import GIB, plan_start

    cfg = load_config(overrides=[*FULL, *BF16, "train.full_precision=bf16-kahan", *IN_BACKWARD,
                                 "model.gradient_checkpointing=true", "train.global_batch_size=2",
                                 "train.micro_batch_size=1"])
    only_full = ["train.full_precision: bf16-kahan -> fp32", "train.optimizer_in_backward: True -> False"]
    lora = estimate_for_config(load_config(overrides=[*FULL, *BF16, "model.method=lora", "train.global_batch_size=2",
                                                       "train.micro_batch_size=1", "model.gradient_checkpointing=true"]),
                               model_shape(cfg), "cpu")
    plan = plan_start(cfg, model_shape(cfg), int(lora.total / cfg.monitor.memory_high_fraction) + 1, "cpu")
    assert (plan.method, plan.fits) == ("lora", True)
    assert plan.changes == ["model.method: full -> lora", *only_full]
    applied = plan.apply(cfg)
    assert (applied.model.method, applied.train.full_precision, applied.train.optimizer_in_backward) == (
        "lora", "fp32", False)
    assert plan_start(cfg, model_shape(cfg), 64 * GIB, "cpu").changes == []

    moved = adjust(cfg, AttemptReport(attempt=1, outcome="oom", micro_batch_size=1, device_type="cuda"))
    assert moved.changes == ["model.method: full -> lora", *only_full] and not moved.resume
