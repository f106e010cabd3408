"""The adaptive micro-batch: the controller's rules, and the loop under injected out-of-memory errors."""

import json

import numpy as np
import pytest
import torch
from run_helpers import adapter, assert_same_weights, new_run

from leantune.errors import UserError
from leantune.failures import OutOfMemory, is_out_of_memory
from leantune.metrics import read_metrics
from leantune.shards import TokenShards
from leantune.testing import loop_hooks
from leantune.training import loop
from leantune.training.adaptive import MicroBatchController
from leantune.training.loop import train

FAST = ["train.eval_every=1000", "checkpoint.every_steps=1000"]


def events(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(e["step"], e["old"], e["new"], e["reason"]) for e in lines if e.get("event") == "micro_batch"]


class Feed:
    """Records what the model is fed: each injector call, and the training sequences of each micro-batch.

    `fire(step, micro_index, micro_batch_size)` says where to inject an out-of-memory error.
    """

    def __init__(self, run_dir, monkeypatch, fire=lambda step, k, mb: False):
        shards = TokenShards(run_dir / "tokens" / "train")
        self.index_of = {shards[i]["input_ids"].tobytes(): i for i in range(len(shards))}
        self.fire = fire
        self.log = []
        real = loop.model_inputs

        def recording(items, *args, **kwargs):
            self.log.append(("batch", [self.index_of.get(it["input_ids"].tobytes()) for it in items]))
            return real(items, *args, **kwargs)

        monkeypatch.setattr(loop, "model_inputs", recording)

    def injector(self, step, k, mb):
        fired = self.fire(step, k, mb)
        self.log.append(("micro", step, k, mb, fired))
        return fired

    def attempts(self, step):
        """The sequences of each attempt of `step` (0: the probe), micro-batch by micro-batch."""
        out, current = [], None
        for entry in self.log:
            if entry[0] == "micro":
                _, s, k, _, fired = entry
                if s == step and k == 0:
                    out.append([])
                current = s if not fired else None
            elif current == step:  # the micro-batch the injector let through
                out[-1].append(entry[1])
                current = None
        return out

    def seen(self, steps):
        """Per step, the sequences of its last (successful) attempt, in the order fed."""
        return {s: [i for micro in self.attempts(s)[-1] for i in micro] for s in steps}


# ----------------------------------------------------------------------------------- the controller


def test_oom_halves_to_divisors_of_the_global_batch_and_fails_clearly_below_one():
    c = MicroBatchController(12, 12)
    sizes = []
    while True:
        try:
            change = c.on_oom(step=5)
        except UserError as e:
            message = str(e)
            break
        sizes.append(change.new)
        assert change.event() == {"event": "micro_batch", "step": 5, "old": change.old, "new": change.new,
                                  "reason": "oom"}
    assert sizes == [6, 3, 1]  # 3 // 2 = 1: the largest divisor of 12 not above half
    assert "at step 5 with a micro-batch of 1" in message
    for setting in ("train.micro_batch_size", "tokenize.max_seq_len", "model.gradient_checkpointing",
                    "model.method"):
        assert setting in message
    with pytest.raises(OutOfMemory, match="start-up probe"):
        MicroBatchController(8, 1).on_oom(step=0, probe=True)


def test_growth_needs_a_sustained_headroom_streak_and_stops_at_the_cap():
    c = MicroBatchController(16, 2, max_micro_batch_size=8, grow_after_steps=3, headroom_fraction=0.3)
    readings = [0.5, 0.5, 0.2, 0.5, None, 0.5, 0.5, 0.5, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]
    changes = [(s, c.after_step(s, r)) for s, r in enumerate(readings, start=1)]
    grown = [(s, ch.old, ch.new, ch.reason) for s, ch in changes if ch is not None]
    # A low reading or no reading breaks the streak; 3 in a row grow; the cap 8 stops it.
    assert grown == [(8, 2, 4, "headroom"), (11, 4, 8, "headroom")]
    assert c.micro_batch_size == 8 and c.accumulation_steps == 2


def test_growth_lands_on_divisors_and_the_cap_is_a_divisor():
    c = MicroBatchController(14, 2, grow_after_steps=1)
    assert c.after_step(1, 0.9).new == 7  # no divisor of 14 in (2, 4]: the next one up
    assert c.after_step(2, 0.9).new == 14
    assert MicroBatchController(12, 2, max_micro_batch_size=10).cap == 6


def test_oom_after_growth_backs_off_and_waits_longer_before_growing_again():
    c = MicroBatchController(8, 2, grow_after_steps=1)
    assert c.after_step(1, 0.9).new == 4
    change = c.on_oom(step=2)
    assert (change.old, change.new, change.reason) == (4, 2, "oom_after_growth")
    assert c.after_step(2, 0.9) is None  # now 2 steps of headroom are needed
    assert c.after_step(3, 0.9).new == 4
    assert c.on_oom(step=4).reason == "oom_after_growth"
    assert [c.after_step(s, 0.9) for s in (4, 5, 6)] == [None] * 3 and c.after_step(7, 0.9).new == 4
    # An OOM at a size that was not grown to is a plain "oom" and does not change the wait.
    plain = MicroBatchController(8, 4, grow_after_steps=1)
    assert plain.on_oom(step=1).reason == "oom" and plain.grow_after_steps == 1


def test_disabled_controller_never_grows_and_state_round_trips():
    assert MicroBatchController(8, 2, enabled=False, grow_after_steps=1).after_step(1, 0.99) is None
    c = MicroBatchController(16, 4, grow_after_steps=1)
    c.after_step(1, 0.9)
    saved = c.state_dict()
    restored = MicroBatchController(16, 16, grow_after_steps=1)
    restored.load_state_dict(saved)
    assert restored.state_dict() == saved == {"micro_batch_size": 8, "headroom_steps": 0, "grow_after_steps": 1,
                                              "grown": True}
    # A resumed attempt whose config lowers train.micro_batch_size starts from that lower size.
    lowered = MicroBatchController(16, 2)
    lowered.load_state_dict(saved)
    assert lowered.micro_batch_size == 2 and not lowered.grown


def test_out_of_memory_errors_are_recognised():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    try:  # the CPU allocator's real failure: a plain RuntimeError
        torch.empty(1 << 62, dtype=torch.uint8)
    except RuntimeError as e:
        assert is_out_of_memory(e)
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("can't allocate memory"))


# ------------------------------------------------------------------------------------ in the loop


@pytest.mark.slow
def test_oom_mid_step_redoes_the_step_with_the_same_sequences_and_the_same_result(tokenized_run, tmp_path,
                                                                                  monkeypatch):
    steps = range(1, 6)
    cfg, straight = new_run(tokenized_run, tmp_path, *FAST, "train.max_steps=5", name="straight")
    clean = Feed(straight, monkeypatch)
    with loop_hooks(oom=clean.injector):
        train(cfg, straight)

    # Out of memory in the second micro-batch of step 2 (at 4), then in the first of step 4 (at 2).
    cfg, run_dir = new_run(tokenized_run, tmp_path, *FAST, "train.max_steps=5", name="oom")
    fired = set()

    def fire(step, k, mb):
        hit = (step, k) in {(2, 1), (4, 0)} and (step, k) not in fired
        fired.update({(step, k)} if hit else set())
        return hit

    feed = Feed(run_dir, monkeypatch, fire)
    with loop_hooks(oom=feed.injector):
        summary = train(cfg, run_dir)

    assert summary["completed"] and summary["steps"] == 5 and summary["micro_batch_size"] == 1
    assert feed.seen(steps) == clean.seen(steps)
    assert all(len(set(v)) == 8 for v in feed.seen(steps).values())
    # The failed attempt of step 2 had fed its first micro-batch; the redo starts over at micro-batch 0.
    first, redo = feed.attempts(2)
    assert len(first) == 1 and redo[:2] == [first[0][:2], first[0][2:]]
    assert events(run_dir) == [(2, 4, 2, "oom"), (4, 2, 1, "oom")]
    assert [m["micro_batch_size"] for m in read_metrics(run_dir, "step")] == [4, 2, 2, 1, 1]
    assert [m["accumulation_steps"] for m in read_metrics(run_dir, "step")] == [2, 4, 4, 8, 8]
    assert [m["lr"] for m in read_metrics(run_dir, "step")] == [m["lr"] for m in read_metrics(straight, "step")]
    assert_same_weights(adapter(run_dir), adapter(straight))


def test_growth_on_scripted_headroom_and_back_off_after_a_failed_growth(tokenized_run, tmp_path, monkeypatch):
    cfg, straight = new_run(tokenized_run, tmp_path, *FAST, "train.max_steps=6", name="straight")
    train(cfg, straight)

    # Plenty of headroom every step, but 8 sequences never fit.
    cfg, run_dir = new_run(tokenized_run, tmp_path, *FAST, "train.max_steps=6", "train.micro_batch_size=2",
                           "adaptive.grow_after_steps=1", name="grow")
    feed = Feed(run_dir, monkeypatch, fire=lambda step, k, mb: mb >= 8)
    with loop_hooks(oom=feed.injector, headroom=lambda step: 0.9):
        train(cfg, run_dir)

    assert events(run_dir) == [
        (1, 2, 4, "headroom"),
        (2, 4, 8, "headroom"),
        (3, 8, 4, "oom_after_growth"),  # now 2 steps of headroom are needed
        (4, 4, 8, "headroom"),
        (5, 8, 4, "oom_after_growth"),  # now 4
    ]
    assert [m["micro_batch_size"] for m in read_metrics(run_dir, "step")] == [2, 4, 4, 4, 4, 4]
    assert_same_weights(adapter(run_dir), adapter(straight))


def test_no_headroom_means_no_growth(tokenized_run, tmp_path):
    cfg, run_dir = new_run(tokenized_run, tmp_path, *FAST, "train.max_steps=3", "train.micro_batch_size=2",
                           "adaptive.grow_after_steps=1")
    with loop_hooks(headroom=lambda step: 0.1):
        train(cfg, run_dir)
    assert events(run_dir) == []


def test_out_of_memory_at_micro_batch_one_is_a_user_error(tokenized_run, tmp_path):
    cfg, run_dir = new_run(tokenized_run, tmp_path, *FAST, "train.max_steps=3", "adaptive.probe_longest_first=false")
    with pytest.raises(OutOfMemory, match=r"out of memory at step 1 with a micro-batch of 1 .*train\.micro_batch_size"):
        with loop_hooks(oom=lambda step, k, mb: True):
            train(cfg, run_dir)
    assert events(run_dir) == [(1, 4, 2, "oom"), (1, 2, 1, "oom")]


def test_with_adaptive_disabled_out_of_memory_propagates(tokenized_run, tmp_path):
    cfg, run_dir = new_run(tokenized_run, tmp_path, *FAST, "train.max_steps=3", "adaptive.enabled=false")
    with pytest.raises(torch.OutOfMemoryError, match="step 2"), loop_hooks(oom=lambda step, k, mb: step == 2):
        train(cfg, run_dir)


def test_probe_runs_the_longest_sequences_first_and_changes_nothing(tokenized_run, tmp_path, monkeypatch):
    # Dropout draws random numbers in the probe's forward: only a restored RNG keeps results the same.
    common = [*FAST, "train.max_steps=3", "lora.dropout=0.1"]
    cfg, probed = new_run(tokenized_run, tmp_path, *common, name="probed")
    # Out of memory in the probe at 4: the micro-batch halves before the first step.
    feed = Feed(probed, monkeypatch, fire=lambda step, k, mb: step == 0 and mb >= 4)
    with loop_hooks(oom=feed.injector):
        train(cfg, probed)

    lengths = TokenShards(probed / "tokens" / "train").lengths
    failed, [probe_batch] = feed.attempts(0)
    assert failed == []  # the attempt at 4 failed before feeding anything
    assert sorted(lengths[probe_batch].tolist()) == sorted(lengths.tolist())[-2:]
    assert events(probed) == [(0, 4, 2, "probe_oom")]
    assert {m["micro_batch_size"] for m in read_metrics(probed, "step")} == {2}

    cfg, unprobed = new_run(tokenized_run, tmp_path, *common, "train.micro_batch_size=2",
                            "adaptive.probe_longest_first=false", name="unprobed")
    train(cfg, unprobed)
    a, b = adapter(probed), adapter(unprobed)
    assert all(torch.equal(a[k], b[k]) for k in b)
    np.testing.assert_equal([m["loss"] for m in read_metrics(probed, "step")], [m["loss"] for m in read_metrics(unprobed, "step")])
