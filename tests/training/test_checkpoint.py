"""CheckpointManager: bitwise round trips, retention, corrupt-checkpoint fallback, resume checks, triggers."""

import json
import logging
import os
import random
import shutil
import signal
import threading

import numpy as np
import pytest
import torch

from leantune.config import load_config
from leantune.errors import UserError
from leantune.resume import resume_config_hash, resume_fingerprint
from leantune.training.checkpoint import CheckpointManager, run_fingerprints
from leantune.training.optim import build_optimizer, build_scheduler

FINGERPRINTS = {"config": "c0", "data": "d0", "tokenizer": "t0"}
VOCAB = 50


def make_cfg(*overrides):
    return load_config(overrides=["train.warmup_steps=2", "train.lr=1e-2", *overrides])


def manager(cfg, run_dir, fingerprints=FINGERPRINTS, **kwargs):
    return CheckpointManager(cfg, run_dir, {**fingerprints, "config": resume_config_hash(cfg)}, **kwargs)


def tiny_lora(cfg, adapter_seed):
    """A one-layer Llama with LoRA (dropout on, so training draws random numbers); the base is always seed 0."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))
    torch.manual_seed(adapter_seed)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))
    model.train()
    optimizer = build_optimizer(cfg, model)
    return model, optimizer, build_scheduler(cfg, optimizer, total_steps=10)


class Tied(torch.nn.Module):
    """A full-fine-tune stand-in whose output head shares the embedding's weight."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, width)
        self.mid = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, input_ids, labels):
        logits = self.head(torch.relu(self.mid(self.embed(input_ids))))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def tiny_full(cfg, seed):
    torch.manual_seed(seed)
    model = Tied()
    optimizer = build_optimizer(cfg, model)
    return model, optimizer, build_scheduler(cfg, optimizer, total_steps=10)


def train_step(model, optimizer, scheduler):
    """One optimizer step on random tokens; draws from python, numpy and torch RNGs like a loop would."""
    ids = torch.randint(0, VOCAB, (2, 8))
    scale = 1.0 + random.random() + float(np.random.random())
    out = model(input_ids=ids, labels=ids)
    loss = getattr(out, "loss", out) * scale
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def draws():
    # gauss draws check the cached second normal of python's and numpy's generators too.
    return (random.random(), random.gauss(0, 1), float(np.random.random()), float(np.random.normal()),
            torch.rand(3).tolist())


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def save_steps(mgr, steps, metrics=None):
    cfg = mgr.cfg
    model, opt, sched = tiny_full(cfg, 0)
    metrics = metrics or [None] * len(steps)
    for step, metric in zip(steps, metrics, strict=True):
        mgr.save(step, model, opt, sched, {"step": step}, metric=metric)


def step_dirs(run_dir):
    return sorted(int(p.name.removeprefix("step-")) for p in (run_dir / "checkpoints").glob("step-*"))


# -------------------------------------------------------------------------------- round trips


def test_lora_round_trip_restores_weights_optimizer_scheduler_and_rng_bitwise(tmp_path):
    cfg = make_cfg()
    model, opt, sched = tiny_lora(cfg, adapter_seed=1)
    for _ in range(3):
        train_step(model, opt, sched)
    # Leave a cached normal in both gauss generators, which a naive state copy would lose.
    random.gauss(0, 1)
    np.random.normal()
    state = {"cursor": [0, 48], "micro_batch_size": 4, "tokens_seen": 123, "loss": 0.1 + 0.2}
    path = manager(cfg, tmp_path).save(3, model, opt, sched, state, metric=2.5, reason="every_steps")

    expected_draws = draws()
    train_step(model, opt, sched)
    expected_weights, expected_lr = trainable(model), sched.get_last_lr()

    assert sorted(p.name for p in path.iterdir()) == [
        "adapter.safetensors", "manifest.json", "optimizer.pt", "rng.pt", "scheduler.pt", "state.json"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert (manifest["step"], manifest["weights"], manifest["reason"], manifest["metric"]) == (3, "adapter",
                                                                                               "every_steps", 2.5)
    assert manifest["files"]["optimizer.pt"]["size"] == (path / "optimizer.pt").stat().st_size

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    model2, opt2, sched2 = tiny_lora(cfg, adapter_seed=2)
    assert not torch.equal(next(iter(trainable(model2).values())), next(iter(expected_weights.values())))
    mgr2 = manager(cfg, tmp_path)
    assert mgr2.latest() == path
    assert mgr2.load(path, model2, opt2, sched2) == state
    assert draws() == expected_draws
    train_step(model2, opt2, sched2)
    assert_bitwise_equal(trainable(model2), expected_weights)
    assert sched2.get_last_lr() == expected_lr
    assert sched2.last_epoch == 4


def test_full_model_round_trip_keeps_tied_weights(tmp_path):
    cfg = make_cfg("model.method=full")
    model, opt, sched = tiny_full(cfg, 0)
    train_step(model, opt, sched)
    path = manager(cfg, tmp_path).save(1, model, opt, sched, {"step": 1})
    train_step(model, opt, sched)
    expected = trainable(model)

    model2, opt2, sched2 = tiny_full(cfg, 5)
    manager(cfg, tmp_path).load(path, model2, opt2, sched2)
    assert model2.head.weight is model2.embed.weight
    train_step(model2, opt2, sched2)
    assert (path / "model.safetensors").is_file()
    assert_bitwise_equal(trainable(model2), expected)


def test_adamw_8bit_quantised_state_round_trips(tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = make_cfg("train.optimizer=adamw_8bit", "model.method=full")
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 128)  # 8192 weights: above the threshold, so its state is 8-bit
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt, total_steps=10)

    def step(m, o, s):
        m(torch.randn(3, 64)).square().mean().backward()
        o.step()
        s.step()
        o.zero_grad()

    step(model, opt, sched)
    assert opt.state[model.weight]["state1"].dtype == torch.uint8
    path = manager(cfg, tmp_path).save(1, model, opt, sched, {"step": 1})
    step(model, opt, sched)
    expected = trainable(model)

    torch.manual_seed(1)
    model2 = torch.nn.Linear(64, 128)
    opt2 = build_optimizer(cfg, model2)
    sched2 = build_scheduler(cfg, opt2, total_steps=10)
    manager(cfg, tmp_path).load(path, model2, opt2, sched2)
    assert torch.equal(opt2.state[model2.weight]["state1"], torch.load(path / "optimizer.pt", weights_only=True)[
        "state"][0]["__bnb_optimizer_quant_state__"]["state1"])
    step(model2, opt2, sched2)
    assert_bitwise_equal(trainable(model2), expected)


@pytest.mark.parametrize("overrides", [
    ["train.full_precision=bf16-kahan"],
    ["train.full_precision=bf16-stochastic", "train.optimizer_in_backward=true", "train.max_grad_norm=null"],
    ["train.full_precision=bf16-stochastic", "train.optimizer=adamw_8bit"],
    ["train.optimizer=paged_adamw_8bit", "train.optimizer_in_backward=true", "train.max_grad_norm=null"],
], ids=["bf16-kahan", "bf16-stochastic-in-backward", "bf16-stochastic-adamw_8bit", "fp32-paged-8bit-in-backward"])
def test_per_weight_optimizers_round_trip_bitwise(tmp_path, overrides):
    """training/paramwise.py: every weight's optimizer state, Kahan compensation and step count is saved and
    restored, so the step after a resume is the uninterrupted run's, bit for bit."""
    pytest.importorskip("bitsandbytes")
    cfg = make_cfg("model.method=full", "model.dtype=bf16", *overrides)
    dtype = torch.float32 if cfg.train.full_precision == "fp32" else torch.bfloat16

    def build(seed):
        torch.manual_seed(seed)
        model = Tied(width=64).to(dtype)  # mid: 4096 weights, so bitsandbytes keeps 8-bit state
        optimizer = build_optimizer(cfg, model)
        return model, optimizer, build_scheduler(cfg, optimizer, total_steps=10)

    model, opt, sched = build(0)
    for _ in range(2):
        train_step(model, opt, sched)
    state = opt.state_dict()
    assert len(state["optimizers"]) == 3  # the tied embedding and head, mid's weight and bias
    if cfg.train.full_precision == "bf16-kahan":
        assert all(c.abs().max() > 0 for c in state["compensation"].values())
    path = manager(cfg, tmp_path).save(2, model, opt, sched, {"step": 2})
    train_step(model, opt, sched)
    expected, expected_state = trainable(model), opt.state_dict()

    model2, opt2, sched2 = build(5)
    manager(cfg, tmp_path).load(path, model2, opt2, sched2)
    train_step(model2, opt2, sched2)
    assert_bitwise_equal(trainable(model2), expected)
    state2 = opt2.state_dict()
    assert state2["steps"] == expected_state["steps"]
    assert_bitwise_equal(state2["compensation"], expected_state["compensation"])
    for saved, restored in zip(expected_state["optimizers"], state2["optimizers"], strict=True):
        assert restored["param_groups"] == saved["param_groups"]
        for key, value in saved["state"][0].items():
            if key == "__bnb_optimizer_quant_state__":
                assert_bitwise_equal(restored["state"][0][key], value)
            else:
                assert torch.equal(torch.as_tensor(restored["state"][0][key]), torch.as_tensor(value)), key
    if cfg.train.optimizer == "adamw":
        assert {v.dtype for s in state2["optimizers"] for v in s["state"][0].values()} == {torch.float32}


# ---------------------------------------------------------------------------------- retention


def test_retention_keeps_last_k_and_the_best(tmp_path):
    mgr = manager(make_cfg("checkpoint.keep_last=2"), tmp_path)
    save_steps(mgr, [1, 2, 3, 4, 5], metrics=[3.0, 1.0, 2.0, None, 2.7])
    assert step_dirs(tmp_path) == [2, 4, 5]
    assert mgr.best() == {"checkpoint": "step-2", "step": 2, "metric": 1.0}

    save_steps(mgr, [6], metrics=[0.5])
    assert step_dirs(tmp_path) == [5, 6]
    assert mgr.best()["step"] == 6
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_retention_never_deletes_the_checkpoint_just_written(tmp_path):
    mgr = manager(make_cfg("checkpoint.keep_last=1"), tmp_path)
    save_steps(mgr, [5])
    # A resume that fell back to an older checkpoint writes lower steps than the newest on disk.
    save_steps(mgr, [3])
    assert step_dirs(tmp_path) == [3, 5]
    save_steps(mgr, [4, 5])
    assert step_dirs(tmp_path) == [5]
    assert json.loads((tmp_path / "checkpoints/step-5/state.json").read_text()) == {"step": 5}


# ------------------------------------------------------------------------- corrupt checkpoints


def truncate(path):
    file = path / "adapter.safetensors" if (path / "adapter.safetensors").exists() else path / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def flip_byte(path):
    data = bytearray((path / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "optimizer.pt").write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (truncate, "truncated"),
    (flip_byte, "optimizer.pt does not match its sha256"),
    (lambda p: (p / "rng.pt").unlink(), "rng.pt is missing"),
    (lambda p: (p / "manifest.json").unlink(), "manifest.json is missing"),
    (lambda p: (p / "manifest.json").write_text("{\"format\": "), "manifest.json is unreadable"),
])
def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog, damage, message):
    cfg = make_cfg("checkpoint.keep_last=3")
    save_steps(manager(cfg, tmp_path), [1, 2, 3])
    damage(tmp_path / "checkpoints/step-3")

    mgr = manager(cfg, tmp_path)
    with caplog.at_level(logging.WARNING, logger="leantune.training.checkpoint"):
        assert mgr.latest() == tmp_path / "checkpoints/step-2"
    assert message in caplog.text and "step-3" in caplog.text

    model, opt, sched = tiny_full(cfg, 0)
    with pytest.raises(UserError, match=message):
        mgr.load(tmp_path / "checkpoints/step-3", model, opt, sched)
    assert mgr.load(mgr.latest(), model, opt, sched) == {"step": 2}


def test_stale_tmp_dir_is_ignored_and_removed(tmp_path):
    cfg = make_cfg("checkpoint.keep_last=3")
    save_steps(manager(cfg, tmp_path), [1, 2])
    # A save killed before its rename: everything but the manifest, under the temporary name.
    stale = tmp_path / "checkpoints/.tmp-step-3"
    shutil.copytree(tmp_path / "checkpoints/step-2", stale)
    (stale / "manifest.json").unlink()

    assert manager(cfg, tmp_path).latest() == tmp_path / "checkpoints/step-2"
    assert not stale.exists()


def test_no_intact_checkpoint_gives_none(tmp_path):
    cfg = make_cfg()
    mgr = manager(cfg, tmp_path)
    assert mgr.latest() is None
    save_steps(mgr, [1])
    truncate(tmp_path / "checkpoints/step-1")
    assert manager(cfg, tmp_path).latest() is None


def test_newer_format_version_is_refused(tmp_path):
    cfg = make_cfg()
    save_steps(manager(cfg, tmp_path), [1])
    manifest_path = tmp_path / "checkpoints/step-1/manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(UserError, match="format version 99.*upgrade leantune"):
        manager(cfg, tmp_path).load(tmp_path / "checkpoints/step-1", *tiny_full(cfg, 0))


# ---------------------------------------------------------------------------- resume checks


def test_config_change_that_breaks_resume_names_the_fields(tmp_path):
    save_steps(manager(make_cfg(), tmp_path), [1])
    changed = make_cfg("train.global_batch_size=8", "lora.r=8", "train.schedule=linear")
    with pytest.raises(UserError) as err:
        manager(changed, tmp_path).load(tmp_path / "checkpoints/step-1", *tiny_full(changed, 0))
    text = str(err.value)
    assert "train.global_batch_size changed from 16 to 8: resume needs the same value; restore it or start a new run" \
        in text
    assert "lora.r changed from 16 to 8" in text
    assert 'train.schedule changed from "cosine" to "linear"' in text
    assert "micro_batch_size" not in text


def test_changes_that_keep_resume_exact_are_accepted(tmp_path):
    save_steps(manager(make_cfg(), tmp_path), [1])
    changed = make_cfg("train.micro_batch_size=2", "checkpoint.every_steps=7", "eval.enabled=false",
                       "run.name=elsewhere", "monitor.enabled=false", "train.log_every=5",
                       "model.gradient_checkpointing=true")
    assert manager(changed, tmp_path).load(tmp_path / "checkpoints/step-1", *tiny_full(changed, 0)) == {"step": 1}


def test_resume_fingerprint_covers_the_update_defining_fields():
    fp = resume_fingerprint(make_cfg())
    assert fp["train.global_batch_size"] == 16 and fp["train.seed"] == 0 and fp["lora.r"] == 16
    assert fp["data.sources.0.kind"] == "synthetic" and fp["tokenize.max_seq_len"] == 512
    assert fp["train.optimizer"] == "adamw" and fp["train.max_steps"] is None and fp["model.method"] == "lora"
    for may_change in ("train.micro_batch_size", "train.eval_every", "checkpoint.every_steps", "run.name",
                       "eval.enabled", "monitor.enabled", "power.limit_watts", "adaptive.enabled"):
        assert may_change not in fp
    assert resume_config_hash(make_cfg("train.micro_batch_size=2")) == resume_config_hash(make_cfg())
    assert resume_config_hash(make_cfg("train.seed=1")) != resume_config_hash(make_cfg())


def test_different_data_or_tokenizer_is_refused(tmp_path):
    cfg = make_cfg()
    save_steps(manager(cfg, tmp_path), [1])
    other = manager(cfg, tmp_path, {"data": "d1", "tokenizer": "t1"})
    with pytest.raises(UserError) as err:
        other.load(tmp_path / "checkpoints/step-1", *tiny_full(cfg, 0))
    assert "training tokens (tokens/train) differ" in str(err.value)
    assert "tokenizer differs" in str(err.value)


def test_run_fingerprints_follow_the_token_files(tmp_path):
    cfg = make_cfg()
    train = tmp_path / "tokens/train"
    train.mkdir(parents=True)
    (train / "index.json").write_text(json.dumps({"config_hash": "abc", "tokenizer": {"hash": "tok1"}}))
    (train / "shard-00000.tokens.npy").write_bytes(b"\x01\x02\x03")
    first = run_fingerprints(cfg, tmp_path)
    assert first["config"] == resume_config_hash(cfg) and first["tokenizer"] == "tok1"
    assert first["data"].startswith("abc-")
    (train / "shard-00000.tokens.npy").write_bytes(b"\x01\x02\x04")
    assert run_fingerprints(cfg, tmp_path)["data"] != first["data"]


# ----------------------------------------------------------------------------------- triggers


def test_every_steps_trigger_and_no_second_save_of_a_step(tmp_path):
    mgr = manager(make_cfg("checkpoint.every_steps=2"), tmp_path)
    assert [mgr.due(s) for s in range(5)] == [None, None, "every_steps", None, "every_steps"]
    save_steps(mgr, [4])
    assert mgr.due(4) is None


def test_every_minutes_uses_the_monotonic_clock(tmp_path):
    now = [1000.0]
    mgr = manager(make_cfg("checkpoint.every_minutes=30", "checkpoint.every_steps=1000"), tmp_path,
                  clock=lambda: now[0])
    now[0] += 29 * 60
    assert mgr.due(1) is None
    now[0] += 60
    assert mgr.due(1) == "every_minutes"
    save_steps(mgr, [1])
    assert mgr.due(2) is None
    now[0] += 30 * 60
    assert mgr.due(2) == "every_minutes"


def test_request_from_another_thread(tmp_path):
    mgr = manager(make_cfg(), tmp_path)
    assert mgr.due(1) is None
    thread = threading.Thread(target=mgr.request, args=("gpu temperature 90C",))
    thread.start()
    thread.join()
    assert mgr.due(1) == "requested:gpu temperature 90C"
    assert not mgr.stop_requested
    save_steps(mgr, [1])
    assert mgr.due(2) is None


def test_sigterm_sets_stop_requested_and_handlers_are_restored(tmp_path):
    mgr = manager(make_cfg(), tmp_path)
    before = signal.getsignal(signal.SIGTERM)
    mgr.install_signal_handlers()
    try:
        assert not mgr.stop_requested and mgr.due(3) is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert mgr.stop_requested
        assert mgr.due(3) == "signal"
    finally:
        mgr.restore_signal_handlers()
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_signal_never_costs_the_checkpoint(tmp_path):
    """A second SIGTERM (a service manager signalling every process, the flow dying after Prefect's grace
    period during a long step) is not a person's: SIGTERM's default action would kill the process with no
    checkpoint. A second Ctrl-C stops at once, but not while the checkpoint is written."""
    mgr = manager(make_cfg(), tmp_path)
    model, opt, sched = tiny_full(mgr.cfg, 0)
    state_dict = opt.state_dict

    def interrupted_state_dict():
        os.kill(os.getpid(), signal.SIGINT)
        return state_dict()

    opt.state_dict = interrupted_state_dict
    previous = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler))}
    try:
        mgr.install_signal_handlers()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            mgr.save(1, model, opt, sched, {"step": 1})
        finally:
            mgr.restore_signal_handlers()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert mgr.stop_requested
    assert step_dirs(tmp_path) == [1] and (tmp_path / "checkpoints" / "step-1" / "optimizer.pt").is_file()


def test_second_sigint_interrupts_at_once(tmp_path):
    mgr = manager(make_cfg(), tmp_path)
    # Python's own handler, whatever an earlier test in this process (a flow, Prefect) left installed.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        mgr.install_signal_handlers()
        try:
            os.kill(os.getpid(), signal.SIGINT)
            assert mgr.stop_requested
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        finally:
            mgr.restore_signal_handlers()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_on_signal_false_leaves_handlers_alone(tmp_path):
    mgr = manager(make_cfg("checkpoint.on_signal=false"), tmp_path)
    before = signal.getsignal(signal.SIGTERM)
    mgr.install_signal_handlers()
    assert signal.getsignal(signal.SIGTERM) is before
