"""Preference objectives (leantune/training/preference.py): DPO and SimPO losses and every LoRA gradient equal
a plain hand-written reference (separate full forwards, full-vocabulary log_softmax, the reference model
as the adapter turned off); the micro-batch split does not change the update; exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_loss import TINY, VOCAB, Tokenizer

from leantune.config import load_config
from leantune.modeling import build_model
from leantune.training.preference import PreferenceObjective, metrics

CPU = torch.device("cpu")
PAIRS = ["train.objective=dpo", "tokenize.packing=false", "data.sources=[{kind: file, path: pairs.jsonl}]"]


def pair_items(n: int = 4, seed: int = 0) -> list[dict]:
    """n pair sequences (prompt, chosen, rejected) of random tokens and uneven lengths; every answer token
    but the first (the assistant header) is a target."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        p, c, r = (int(x) for x in rng.integers(3, 12, 3))
        ids = rng.integers(3, VOCAB, p + c + r)
        labels = ids.copy()
        labels[:p + 1] = -100
        labels[p + c] = -100
        items.append({"input_ids": ids, "labels": labels, "doc_lengths": np.array([p, c, r]),
                      "position_ids": np.concatenate([np.arange(d) for d in (p, c, r)])})
    return items


def hand_logps(model, items) -> torch.Tensor:
    """[chosen..., rejected...] log-probabilities: each row alone through the full model, full-vocab log_softmax."""
    out = {"chosen": [], "rejected": []}
    for it in items:
        p, c, _ = it["doc_lengths"]
        for side, keep in (("chosen", np.r_[0:p + c]), ("rejected", np.r_[0:p, p + c:len(it["input_ids"])])):
            ids, labels = torch.as_tensor(it["input_ids"][keep]), torch.as_tensor(it["labels"][keep])
            logprobs = model(input_ids=ids[None]).logits[0].float().log_softmax(-1)
            t = torch.nonzero(labels[1:] != -100)[:, 0]
            out[side].append(logprobs[t, ids[t + 1]].sum())
    return torch.stack(out["chosen"] + out["rejected"])


def hand_loss(model, items, t) -> torch.Tensor:
    m = len(items)
    logp = hand_logps(model, items)
    n = torch.tensor([int((it["labels"] != -100)[1:p + c].sum()) for it in items for p, c in [it["doc_lengths"][:2]]]
                     + [int((it["labels"] != -100)[p + c:].sum()) for it in items for p, c in [it["doc_lengths"][:2]]],
                     dtype=torch.float32)
    if t.objective == "dpo":
        with torch.no_grad(), model.disable_adapter():
            ref = hand_logps(model, items)
        losses = -F.logsigmoid(t.dpo_beta * ((logp[:m] - ref[:m]) - (logp[m:] - ref[m:])))
    else:
        losses = -F.logsigmoid(t.simpo_beta * (logp[:m] / n[:m] - logp[m:] / n[m:]) - t.simpo_gamma)
    return (losses + t.rpo_alpha * (-logp[:m] / n[:m])).mean()


def lora_model(overrides):
    cfg = load_config(overrides=TINY + PAIRS + overrides)
    torch.manual_seed(0)
    model = build_model(cfg, Tokenizer(), CPU)
    with torch.no_grad():  # LoRA B (an embedding's A) starts at zero, where the policy is its reference: move it off
        for name, p in model.named_parameters():
            if "lora_" in name and not p.any():
                p.normal_(0, 0.2)
    return cfg, model


def gradients(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("overrides", [
    [],
    ["train.rpo_alpha=0.5", "lora.target_modules=[q_proj,v_proj,down_proj,embed_tokens,lm_head]"],
    ["train.objective=simpo"],
    ["train.objective=simpo", "train.rpo_alpha=0.3", "lora.target_modules=[q_proj,v_proj,embed_tokens,lm_head]"],
], ids=["dpo", "dpo-rpo-lora-on-head", "simpo", "simpo-rpo-lora-on-head"])
def test_loss_and_every_lora_gradient_equal_a_hand_written_reference(overrides):
    cfg, model = lora_model(["train.dpo_beta=0.5", "train.simpo_beta=2.5", "train.simpo_gamma=0.4", *overrides])
    items = pair_items()
    # 5 target rows per chunk: several chunks, the last one short; checkpointed chunks recomputed in backward.
    objective = PreferenceObjective(cfg.train, 0, torch.float32, False, CPU, chunk_logits=5 * VOCAB)
    stats = {}

    def ours():
        loss, stats["s"] = objective.loss(model, items, len(items))
        return loss

    ref_loss, ref = gradients(model, lambda: hand_loss(model, items, cfg.train))
    loss, new = gradients(model, ours)
    assert loss == pytest.approx(ref_loss, rel=1e-6, abs=1e-6)
    assert abs(ref_loss - np.log(2)) > 1e-3  # the pairs are told apart: not the loss at a zero margin
    assert new.keys() == ref.keys() and len(ref) >= 4
    for name, g in ref.items():
        assert float(g.abs().max()) > 0, name
        torch.testing.assert_close(new[name], g, rtol=1e-5, atol=1e-5, msg=name)
    if "lm_head" in str(overrides):
        assert any("lm_head" in n and "lora" in n for n in ref)
    # The stats the step's metrics come from: the loss sum and the policy's log-probabilities.
    with torch.no_grad():
        logp = hand_logps(model, items)
    assert float(stats["s"][0]) / len(items) == pytest.approx(ref_loss, rel=1e-6)
    m = metrics(stats["s"], len(items))
    assert m["logp_chosen"] == pytest.approx(float(logp[:4].mean()), rel=1e-5)
    assert m["logp_rejected"] == pytest.approx(float(logp[4:].mean()), rel=1e-5)
    assert 0 <= m["pref_accuracy"] <= 1 and m["pref_accuracy"] * 4 == round(m["pref_accuracy"] * 4)


def test_dpo_reference_is_the_adapter_off_and_zero_margin_at_start():
    """With LoRA B at zero the policy is its reference: every margin is 0 and the loss is log 2."""
    cfg = load_config(overrides=TINY + PAIRS)
    model = build_model(cfg, Tokenizer(), CPU)
    loss, stats = PreferenceObjective(cfg.train, 0, torch.float32, False, CPU).loss(model, pair_items(), 4)
    assert float(loss.detach()) == pytest.approx(np.log(2), abs=1e-6)
    assert float(stats[2]) == pytest.approx(0, abs=1e-6) and float(stats[1]) == 0  # margin sum, pairs right
