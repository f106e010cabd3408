"""Preference objectives (leantune/training/preference.py): DPO and SimPO losses and every LoRA gradient equal
a plain hand-written reference (separate full forwards, full-vocabulary log_softmax, the reference model
as the adapter turned off); the micro-batch split does not change the update; exact resume."""

from __future__ import annotations

import contextlib
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_model import TINY, VOCAB, Tokenizer

from leantune.config import load_config
from leantune.modeling import build_model
from leantune.shards import TokenShards
from leantune.training.loop import train
from leantune.training.preference import PreferenceObjective, pair_rows, preference_metrics

CPU = torch.device("cpu")
METRICS = ("loss", "pref_accuracy", "reward_margin", "logp_chosen", "logp_rejected", "grad_norm")
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


def hand_loss(model, items, t, reference=None) -> torch.Tensor:
    """The mean pair loss; the DPO reference is `reference` (a frozen model), else `model` with its adapter off."""
    m = len(items)
    logp = hand_logps(model, items)
    n = torch.tensor([int((it["labels"] != -100)[1:p + c].sum()) for it in items for p, c in [it["doc_lengths"][:2]]]
                     + [int((it["labels"] != -100)[p + c:].sum()) for it in items for p, c in [it["doc_lengths"][:2]]],
                     dtype=torch.float32)
    if t.objective == "dpo":
        with torch.no_grad(), (contextlib.nullcontext() if reference else model.disable_adapter()):
            ref = hand_logps(reference or model, items)
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
    ["model.method=qlora"],
], ids=["dpo", "dpo-rpo-lora-on-head", "simpo", "simpo-rpo-lora-on-head", "dpo-qlora"])
def test_loss_and_every_lora_gradient_equal_a_hand_written_reference(overrides):
    cfg, model = lora_model(["train.dpo_beta=0.5", "train.simpo_beta=2.5", "train.simpo_gamma=0.4", *overrides])
    items = pair_items()
    # 5 target rows per chunk: several chunks, the last one short; checkpointed chunks recomputed in backward.
    objective = PreferenceObjective(cfg.train, 0, torch.float32, "sdpa", CPU, chunk_logits=5 * VOCAB)
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
    m = preference_metrics(stats["s"], len(items))
    assert m["logp_chosen"] == pytest.approx(float(logp[:4].mean()), rel=1e-5)
    assert m["logp_rejected"] == pytest.approx(float(logp[4:].mean()), rel=1e-5)
    assert 0 <= m["pref_accuracy"] <= 1 and m["pref_accuracy"] * 4 == round(m["pref_accuracy"] * 4)


def test_full_fine_tuning_dpo_reads_the_reference_stored_before_training(tmp_path):
    """Full fine-tuning: the reference log-probs are the model's before any step, stored beside the shards;
    the loss and every gradient then equal the hand-written DPO with a frozen copy as the reference."""
    from leantune.training.distributed import DistContext

    cfg = load_config(overrides=[*TINY, *PAIRS, "model.method=full", "train.micro_batch_size=3",
                                 "train.global_batch_size=6"])
    model = build_model(cfg, Tokenizer(), CPU)
    frozen = copy.deepcopy(model)
    shards = FakeShards(tmp_path, pair_items(5))
    objective = PreferenceObjective(cfg.train, 0, torch.float32, "sdpa", CPU, stored_reference=True)
    objective.store_reference(model, shards, DistContext(CPU))
    with torch.no_grad():
        np.testing.assert_allclose(np.load(tmp_path / "reference_logps.npy"),
                                   hand_logps(model, shards.items).reshape(2, -1).T.numpy(), rtol=1e-5)
    with torch.no_grad():  # the policy moves away from its reference
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    items = [{**it, "reference_logps": shards.reference[i]} for i, it in enumerate(shards.items)]
    ref_loss, ref = gradients(model, lambda: hand_loss(model, items, cfg.train, reference=frozen))
    loss, new = gradients(model, lambda: objective.loss(model, items, 5)[0])
    assert loss == pytest.approx(ref_loss, rel=1e-6) and abs(ref_loss - np.log(2)) > 1e-3
    for name, g in ref.items():
        torch.testing.assert_close(new[name], g, rtol=1e-5, atol=1e-5, msg=name)


class FakeShards:
    """Pair items as TokenShards serve them, from `directory` (where the reference file goes)."""

    def __init__(self, directory, items):
        self.directory, self.items, self.reference = directory, items, None

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_dpo_reference_is_the_adapter_off_and_zero_margin_at_start():
    """With LoRA B at zero the policy is its reference: every margin is 0 and the loss is log 2."""
    cfg = load_config(overrides=TINY + PAIRS)
    model = build_model(cfg, Tokenizer(), CPU)
    loss, stats = PreferenceObjective(cfg.train, 0, torch.float32, "sdpa", CPU).loss(model, pair_items(), 4)
    assert float(loss.detach()) == pytest.approx(np.log(2), abs=1e-6)
    assert float(stats[2]) == pytest.approx(0, abs=1e-6) and float(stats[1]) == 0  # margin sum, pairs right


# ------------------------------------------------------------------------------------------- formats


def test_pair_formats_convert_to_the_canonical_record():
    from leantune.data.formats import RowError, detect_format
    from leantune.data.preference import to_pair

    u, a = ({"role": "user", "content": "Is 7 prime?"}, {"role": "assistant", "content": "Yes."})
    yes, no = [{"role": "assistant", "content": "Yes."}], [{"role": "assistant", "content": "No."}]
    expected = {"prompt": [u], "chosen": yes, "rejected": no}
    trl = {"prompt": " Is 7 prime?", "chosen": "Yes.", "rejected": "No.\r\n"}
    assert detect_format([trl]) == "prompt_chosen_rejected" and to_pair(trl, "prompt_chosen_rejected") == expected
    conversational = {"prompt": [u], "chosen": yes, "rejected": no}
    assert to_pair(conversational, "prompt_chosen_rejected") == expected
    # UltraFeedback-binarized: the prompt's messages repeated before each answer.
    ultra = {"prompt": "Is 7 prime?", "chosen": [u, *yes], "rejected": [u, *no], "score_chosen": 9}
    assert to_pair(ultra, "prompt_chosen_rejected") == expected
    # Older HH-derived sets: the prompt is a transcript ending with the answer's "Assistant:" header.
    hh_prompt = {"prompt": "\n\nHuman: Is 7 prime?\n\nAssistant:", "chosen": " Yes.", "rejected": " No."}
    assert to_pair(hh_prompt, "prompt_chosen_rejected") == expected
    # Anthropic HH: two whole conversations sharing all but their last turn.
    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Is 7 prime?\n\nAssistant: Yes.",
          "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Is 7 prime?\n\nAssistant: No."}
    assert detect_format([hh]) == "chosen_rejected"
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, u]
    assert to_pair(hh, "chosen_rejected") == {"prompt": history, "chosen": yes, "rejected": no}
    assert to_pair({"chosen": [u, *yes], "rejected": [u, *no]}, "chosen_rejected") == expected
    # LLaMA-Factory's ranking data, alpaca and sharegpt style.
    system = {"role": "system", "content": "Be brief."}
    factory = {"instruction": "Is 7", "input": "prime?", "chosen": "Yes.", "rejected": "No.", "system": "Be brief."}
    assert detect_format([factory]) == "instruction_chosen_rejected"
    assert to_pair(factory, "instruction_chosen_rejected") == {
        **expected, "prompt": [system, {"role": "user", "content": "Is 7\n\nprime?"}]}
    factory = {"conversations": [{"from": "human", "value": "Is 7 prime?"}], "chosen": {"from": "gpt", "value": "Yes."},
               "rejected": {"from": "gpt", "value": "No."}}
    assert detect_format([factory]) == "sharegpt_chosen_rejected"
    assert to_pair(factory, "sharegpt_chosen_rejected") == expected

    def code(row, fmt="prompt_chosen_rejected"):
        with pytest.raises(RowError) as e:
            to_pair(row, fmt)
        return e.value.code

    assert code({"chosen": hh["chosen"], "rejected": "\n\nHuman: Other\n\nAssistant: No."}, "chosen_rejected") == \
        "no_shared_prompt"
    assert code({"prompt": "Is 7 prime?", "chosen": "Yes.", "rejected": " \u200b "}) == "empty_content"
    assert code({"prompt": "Is 7 prime?", "chosen": [*yes, u, *yes], "rejected": "No."}) == "bad_structure"
    assert code({"prompt": [a], "chosen": "Yes.", "rejected": "No."}) == "wrong_role_order"
    assert code({"prompt": "Is 7 prime?", "chosen": 3, "rejected": "No."}) == "bad_structure"
    assert code({"instruction": "x", "output": "y"}, "alpaca") == "not_a_pair"


def test_truncation_keeps_the_prompts_end_then_cuts_the_answers_ends():
    from leantune.tokenization import truncate_pair

    prompt, answers = list(range(10)), [([20, 21, 22], [0, 1, 1]), ([30, 31, 32, 33, 34], [0, 1, 1, 1, 1])]
    assert truncate_pair(prompt, answers, 15) == (prompt, answers, 0, 0)
    assert truncate_pair(prompt, answers, 12) == ([3, 4, 5, 6, 7, 8, 9], answers, 3, 0)
    # The prompt keeps one token; then each answer loses its end.
    assert truncate_pair(prompt, answers, 4) == ([9], [([20, 21, 22], [0, 1, 1]), ([30, 31, 32], [0, 1, 1])], 9, 2)


# ----------------------------------------------------------------------------------- the data stages

# 48 arithmetic pairs in TRL's format (four long prompts among them, truncated at max_seq_len 64), 24 in
# Anthropic HH's, plus faults: a blank answer (rejected), a repeated pair (duplicate), equal answers
# (quarantined by the pair suite).
PAIR_RUN = [*PAIRS, "data.val_fraction=0.1", "data.chunk_size=20", "tokenize.vocab_size=400",
            "tokenize.max_seq_len=64", "model.scratch.hidden_size=32", "model.scratch.intermediate_size=64",
            "model.scratch.num_layers=2", "model.scratch.num_heads=4", "model.scratch.num_kv_heads=2", "lora.r=4",
            "lora.alpha=8", "lora.dropout=0.0", "train.device=cpu", "train.global_batch_size=8",
            "train.micro_batch_size=4", "train.warmup_steps=2", "train.lr=1e-2", "train.dpo_beta=0.5",
            "train.eval_every=1000", "checkpoint.every_steps=1000", "eval.enabled=false"]


def write_pair_sources(root):
    trl = [{"prompt": f"What is {i} plus {i % 7}?", "chosen": f"It is {i + i % 7}.", "rejected": f"It is {i + 9}."}
           for i in range(48)]
    for k in (5, 6, 7, 8):
        trl[k]["prompt"] = "Think about this carefully. " * 12 + trl[k]["prompt"]
    trl += [{"prompt": "What is 1 plus 1?", "chosen": "2.", "rejected": "  "}, trl[3],
            {"prompt": "What is 2 plus 2?", "chosen": "4.", "rejected": "4."}]
    hh = [{"chosen": f"\n\nHuman: Is {i} even?\n\nAssistant: {'Yes' if i % 2 == 0 else 'No'}.",
           "rejected": f"\n\nHuman: Is {i} even?\n\nAssistant: {'No' if i % 2 == 0 else 'Yes'}."} for i in range(24)]
    for name, rows in (("trl.jsonl", trl), ("hh.jsonl", hh)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [f"data.sources=[{{kind: file, path: {root / 'trl.jsonl'}, name: trl}}, "
            f"{{kind: file, path: {root / 'hh.jsonl'}, name: hh}}]"]


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory):
    """A run directory of pairs after prepare, validate and tokenize (and the token suite); copy before use."""
    from leantune.config import dump_config
    from leantune.data.prepare import prepare
    from leantune.tokenization import tokenize
    from leantune.validation import validate_records, validate_tokens

    root = tmp_path_factory.mktemp("pairs")
    run_dir = root / "run"
    run_dir.mkdir()
    cfg = load_config(overrides=PAIR_RUN + write_pair_sources(root) + [f"run.output_dir={root}", "run.name=run"])
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    stats = {"prepare": prepare(cfg, run_dir / "data"), "validate": validate_records(cfg, run_dir / "data"),
             "tokenize": tokenize(cfg, run_dir / "data", run_dir / "tokens")}
    validate_tokens(cfg, run_dir / "tokens")
    return run_dir, stats


def test_pairs_go_through_prepare_validate_and_tokenize_with_exact_accounting(pair_run, tmp_path):
    from transformers import AutoTokenizer

    from leantune.data.preference import pair_id
    from leantune.jsonl import iter_jsonl
    from leantune.shards import TokenShards

    run_dir, stats = pair_run
    t = stats["prepare"]["totals"]
    assert (t["read"], t["kept"], t["rejected"], t["duplicates"]) == (75, 73, 1, 1)
    assert t["reasons"] == {"empty_content": 1}
    assert stats["prepare"]["sources"]["hh"]["format"] == "chosen_rejected"
    assert stats["prepare"]["sources"]["trl"]["format"] == "prompt_chosen_rejected"
    records = list(iter_jsonl(run_dir / "data" / "records.jsonl"))
    assert all(list(r) == ["id", "prompt", "chosen", "rejected", "source", "file", "line"] and r["id"] == pair_id(r)
               for r in records)
    assert [(r["file"].rsplit("/", 1)[-1], r["line"]) for r in records[:2]] == [("trl.jsonl", 1), ("trl.jsonl", 2)]
    v = stats["validate"]
    assert v["quarantined"] == 1 and v["train"] + v["val"] == 72 and v["val"] > 0
    assert {e["name"]: e["rows_failed"] for e in v["expectations"]}["chosen_differs_from_rejected"] == 1

    # Tokens: one sequence of three documents per pair; the two rows rebuilt from it are the chat template's
    # renderings of prompt + chosen and prompt + rejected; targets only in the answers.
    c = stats["tokenize"]["train"]["counts"]
    assert c["records_read"] == v["train"] == c["records_written"] + c["dropped_overlong"] + c["no_trainable"]
    shards = TokenShards(run_dir / "tokens" / "train")
    assert len(shards) == c["records_written"] and (shards.index[:, 4] == 3).all()
    tok = AutoTokenizer.from_pretrained(run_dir / "tokens" / "tokenizer")
    train = list(iter_jsonl(run_dir / "data" / "train.jsonl"))
    long_prompts = [k for k, r in enumerate(train) if r["prompt"][0]["content"].startswith("Think")]
    for k in range(len(shards)):
        item, record = shards[k], train[k]
        p, ch, rj = item["doc_lengths"]
        assert (item["labels"][:p] == -100).all() and (item["labels"][p:p + ch] != -100).any()
        for side, row in (("chosen", np.r_[0:p + ch]), ("rejected", np.r_[0:p, p + ch:p + ch + rj])):
            text = tok.apply_chat_template(record["prompt"] + record[side], tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if k in long_prompts:  # truncated: the prompt's start is cut, its end and the answers kept
                assert len(row) == 64 and list(item["input_ids"][row]) == ids[-64:]
            else:
                assert list(item["input_ids"][row]) == ids
            answer = tok.decode(item["input_ids"][row][item["labels"][row] != -100])
            assert answer.startswith(record[side][0]["content"])
    assert c["truncated"] == len(long_prompts) > 0 and c["prompt_tokens_cut"] > 0 and c["answer_tokens_cut"] == 0
    # tokenize.overlong=drop drops those pairs instead, and counts them.
    from leantune.tokenization import tokenize_pairs

    drop = load_config(run_dir / "config.yaml", overrides=["tokenize.overlong=drop"])
    d = tokenize_pairs(drop, tok, run_dir / "data" / "train.jsonl", tmp_path / "dropped")["counts"]
    assert (d["dropped_overlong"], d["truncated"], d["records_written"]) == (len(long_prompts), 0, len(train) - len(
        long_prompts))


# ------------------------------------------------------------------------------------------ training


def new_pair_run(pair_run, tmp_path, *overrides, name="run"):
    from run_helpers import new_run

    return new_run(pair_run[0], tmp_path, *overrides, name=name)


def test_dpo_trains_and_logs_the_preference_metrics(pair_run, tmp_path):
    from transformers import AutoTokenizer

    from leantune.modeling import build_base_model
    from leantune.shards import TokenShards
    from leantune.training.loop import epoch_order, next_global_batch

    cfg, run_dir = new_pair_run(pair_run, tmp_path, "train.max_steps=3", "train.eval_every=3")
    summary = train(cfg, run_dir)
    lines = [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "event" not in m]
    assert [m["step"] for m in lines] == [1, 2, 3] and summary["completed"]
    for m in lines:
        assert {"pref_accuracy", "reward_margin", "logp_chosen", "logp_rejected"} <= m.keys()
    # Step 1 runs at LoRA B = 0, where the policy is its reference: every margin 0, the loss log 2; its
    # log-probabilities are the hand-written ones of the global batch's pairs.
    assert lines[0]["loss"] == pytest.approx(np.log(2), abs=1e-6) and lines[0]["reward_margin"] == 0
    shards = TokenShards(run_dir / "tokens" / "train")
    batch, *_ = next_global_batch(lambda e: epoch_order(shards, e, 8, cfg.train.seed), 0, 0, 8)
    # The tokens the model ran: both rows of each pair, the prompt in each.
    assert lines[0]["tokens"] == sum(len(r["input_ids"]) for r in pair_rows([shards[i] for i in batch]))
    tok = AutoTokenizer.from_pretrained(run_dir / "tokens" / "tokenizer")
    model = build_model(cfg, tok, CPU)
    with torch.no_grad():
        logp = hand_logps(model, [shards[i] for i in batch])
    assert lines[0]["logp_chosen"] == pytest.approx(float(logp[:8].mean()), rel=1e-5)
    assert lines[0]["logp_rejected"] == pytest.approx(float(logp[8:].mean()), rel=1e-5)
    # Training moved the chosen answers up against the rejected ones on the pairs it saw.
    from peft import PeftModel

    tuned = PeftModel.from_pretrained(build_base_model(cfg, tok, CPU), run_dir / "adapter")
    with torch.no_grad():
        _, stats = PreferenceObjective(cfg.train, shards.pad_id, torch.float32, "sdpa", CPU).loss(
            tuned, [shards[i] for i in batch], 8)
    assert preference_metrics(stats, 8)["reward_margin"] > 0.01 and float(stats[0]) / 8 < np.log(2)
    assert "val_loss" in lines[-1] and summary["final_val_loss"] == lines[-1]["val_loss"]
    from leantune.report import write_report

    assert "![Preference](preference.png)" in write_report(run_dir).read_text()
    assert (run_dir / "preference.png").stat().st_size > 10_000


def test_the_update_does_not_depend_on_the_micro_batch_split(pair_run, tmp_path, objective="dpo"):
    """(SimPO's loss is normalised by the same code: per pair, over the pairs of the global batch.)"""
    from run_helpers import adapter, assert_same_weights

    from leantune.testing import loop_hooks

    weights, losses = {}, {}
    for micro in (1, 2, 8):  # 8x1, 4x2 and 1x8 pairs
        cfg, run_dir = new_pair_run(pair_run, tmp_path, "train.max_steps=2", f"train.micro_batch_size={micro}",
                                    f"train.objective={objective}", "train.rpo_alpha=0.2", name=f"mb{micro}")
        train(cfg, run_dir)
        lines = [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "event" not in m]
        assert {m["accumulation_steps"] for m in lines} == {8 // micro}
        weights[micro], losses[micro] = adapter(run_dir), [[m[k] for k in METRICS] for m in lines]
    # Out of memory in step 1 at 8 and at 4 pairs: the micro-batch halves in pairs, 8 -> 4 -> 2, and the
    # step is redone whole.
    cfg, run_dir = new_pair_run(pair_run, tmp_path, "train.max_steps=2", "train.micro_batch_size=8",
                                f"train.objective={objective}", "train.rpo_alpha=0.2", name="oom")
    with loop_hooks(oom=lambda step, k, mb: step == 1 and mb > 2):
        train(cfg, run_dir)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(m["old"], m["new"]) for m in lines if m.get("event") == "micro_batch"] == [(8, 4), (4, 2)]
    weights["oom"], losses["oom"] = adapter(run_dir), [[m[k] for k in METRICS] for m in lines if "event" not in m]
    assert max(float(v.abs().max()) for k, v in weights[8].items() if "lora_B" in k) > 1e-3
    for micro in (2, 8, "oom"):
        assert_same_weights(weights[micro], weights[1])
        np.testing.assert_allclose(losses[micro], losses[1], rtol=1e-5, atol=1e-6)


def test_signal_stops_cleanly_and_resume_continues_bitwise(pair_run, tmp_path):
    import os
    import signal

    from run_helpers import adapter

    from leantune.testing import loop_hooks

    cfg, straight = new_pair_run(pair_run, tmp_path, "train.max_steps=4", name="straight")
    train(cfg, straight)
    cfg, run_dir = new_pair_run(pair_run, tmp_path, "train.max_steps=4", name="stopped")

    def sigterm_after_step_2(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with loop_hooks(headroom=sigterm_after_step_2):
        assert train(cfg, run_dir)["steps"] == 2
    resumed = train(cfg, run_dir)
    assert resumed["completed"] and resumed["resumed_from_step"] == 2
    a, b = adapter(run_dir), adapter(straight)
    assert all(torch.equal(a[k], b[k]) for k in b)
    lines = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (run_dir, straight)]
    assert [[m[k] for k in METRICS] for m in lines[0]] == [[m[k] for k in METRICS] for m in lines[1]]
    assert [m["step"] for m in lines[0]] == [1, 2, 3, 4]


def test_config_refuses_what_a_preference_objective_cannot_train_on(tmp_path):
    from leantune.config import ConfigError
    from leantune.data.prepare import prepare
    from leantune.errors import DataError

    def problems(*overrides):
        with pytest.raises(ConfigError) as e:
            load_config(overrides=list(overrides))
        return [p.split(":")[0] for p in e.value.problems]

    assert problems("train.objective=dpo") == ["tokenize.packing"]
    assert problems(*PAIRS, "data.sources.0.format=alpaca") == ["data.sources.0.format"]
    assert problems("train.rpo_alpha=0.5") == ["train.rpo_alpha"]
    assert problems("data.sources=[{kind: file, path: x, format: chosen_rejected}]") == ["data.sources.0.format"]
    assert load_config(overrides=[*PAIRS, "model.method=full", "train.objective=simpo"]).train.objective == "simpo"
    # Pairs in an sft run: every row rejected, saying what to set.
    sources = write_pair_sources(tmp_path)
    with pytest.raises(DataError, match="preference_pair x75 .*set train.objective=dpo or simpo"):
        prepare(load_config(overrides=sources), tmp_path / "data")


def test_full_fine_tuning_dpo_run_starts_at_its_reference_and_resumes(pair_run, tmp_path):
    import os
    import signal

    from leantune.testing import loop_hooks

    cfg, run_dir = new_pair_run(pair_run, tmp_path, "model.method=full",
                                "train.max_steps=3", "train.lr=1e-3")

    def sigterm_after_step_2(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with loop_hooks(headroom=sigterm_after_step_2):
        assert train(cfg, run_dir)["steps"] == 2
    reference = {s: np.load(run_dir / "tokens" / s / "reference_logps.npy") for s in ("train", "val")}
    assert reference["train"].shape == (len(TokenShards(run_dir / "tokens" / "train")), 2)
    resumed = train(cfg, run_dir)  # the same data fingerprint: the stored reference is read back, not recomputed
    assert resumed["completed"] and resumed["resumed_from_step"] == 2
    assert all(np.array_equal(np.load(run_dir / "tokens" / s / "reference_logps.npy"), reference[s]) for s in reference)
    lines = [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "event" not in m]
    # Step 1: the policy is the model the reference was computed from.
    assert lines[0]["loss"] == pytest.approx(np.log(2), abs=1e-6) and abs(lines[0]["reward_margin"]) < 1e-5
    assert [m["step"] for m in lines] == [1, 2, 3] and lines[2]["reward_margin"] != 0


def test_synthetic_source_writes_pairs_of_the_right_answer_over_the_other(tmp_path):
    from leantune.data.prepare import prepare
    from leantune.data.synthetic import ANSWER_PREFIX, CHALLENGE_TEMPLATES, SUGGESTION_TEMPLATES
    from leantune.jsonl import iter_jsonl
    from leantune.validation import validate_records

    cfg = load_config(overrides=["train.objective=dpo", "tokenize.packing=false", "data.synthetic.num_records=120",
                                 "data.synthetic.tasks=[capitals,addition]", "data.synthetic.neutral_share=0.3",
                                 "data.synthetic.challenge_share=0.3"])
    stats = prepare(cfg, tmp_path)
    assert stats["totals"]["kept"] + stats["totals"]["duplicates"] == 120 and stats["totals"]["rejected"] == 0
    assert validate_records(cfg, tmp_path)["quarantined"] == 0
    kinds = {"plain": 0, "suggestion": 0, "challenged": 0}
    for r in iter_jsonl(tmp_path / "records.jsonl"):
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        assert chosen.startswith(ANSWER_PREFIX + " ") and rejected.startswith(ANSWER_PREFIX + " ") and chosen != rejected
        question = r["prompt"][-1]["content"]
        if len(r["prompt"]) == 3:  # question, a first answer, the user's doubt
            kinds["challenged"] += 1
            assert question in CHALLENGE_TEMPLATES and r["prompt"][1]["content"] in (chosen, rejected)
        elif any(t.split("{answer}")[0] in question for t in SUGGESTION_TEMPLATES):
            kinds["suggestion"] += 1
            suggested = question.split("?", 1)[1]
            assert chosen.removeprefix(ANSWER_PREFIX + " ") in suggested or \
                rejected.removeprefix(ANSWER_PREFIX + " ") in suggested
        else:
            kinds["plain"] += 1
            assert question.endswith("?")
    assert min(kinds.values()) >= 10, kinds


def test_the_memory_estimate_counts_a_pair_as_two_rows():
    from leantune.probe import estimate_for_config, model_shape

    dpo = load_config(overrides=[*PAIRS, "train.micro_batch_size=2"])
    sft = load_config(overrides=["tokenize.packing=false", "train.micro_batch_size=4"])
    shape = model_shape(sft, 2048)
    assert estimate_for_config(dpo, shape, "cuda") == estimate_for_config(sft, shape, "cuda")
    assert estimate_for_config(dpo, shape, "cuda").activations > estimate_for_config(
        load_config(overrides=["tokenize.packing=false", "train.micro_batch_size=2"]), shape, "cuda").activations


def test_fuzzed_pair_files_are_accounted_for_row_by_row(tmp_path):
    """Pair rows in every form (TRL strings and message lists, UltraFeedback, HH texts and lists) over .jsonl,
    .json and .csv, with every fault kind mixed in: each good pair kept as its canonical record, each bad row
    rejected with its file, line and reason, each repeated pair (in any form) listed as a duplicate."""
    import csv
    import random

    from leantune.data.normalize import normalize_text
    from leantune.data.preference import pair_id
    from leantune.data.prepare import prepare
    from leantune.jsonl import iter_jsonl

    rng = random.Random(25)
    words = ["sky", "blue", "naïve", "café", "日本語", "e\u0301", "  padded  ", "\u00a0nbsp", "a,b", 'say "hi"']
    counter = iter(range(10**6))

    def text():
        return f"t{next(counter)} " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 5)))

    def good(form, texts=None):
        p, c, r = texts or (text(), text(), text())
        pair = {"prompt": [{"role": "user", "content": normalize_text(p)}],
                "chosen": [{"role": "assistant", "content": normalize_text(c)}],
                "rejected": [{"role": "assistant", "content": normalize_text(r)}]}
        u, a_c, a_r = {"role": "user", "content": p}, {"role": "assistant", "content": c}, {"role": "assistant",
                                                                                              "content": r}
        return {"strings": {"prompt": p, "chosen": c, "rejected": r},
                "lists": {"prompt": [u], "chosen": [a_c], "rejected": [a_r]},
                "ultra": {"prompt": p, "chosen": [u, a_c], "rejected": [u, a_r]},
                "hh": {"chosen": f"\n\nHuman: {p}\n\nAssistant: {c}", "rejected": f"\n\nHuman: {p}\n\nAssistant: {r}"},
                "hh_lists": {"chosen": [u, a_c], "rejected": [u, a_r]}}[form], pair

    def bad(form, kind):
        row, _ = good(form)
        if kind == "missing_field":
            row.pop("rejected")
        elif kind == "empty_content":
            row["rejected"] = {"hh": "\n\nHuman: x\n\nAssistant: \u200b", "lists": [
                {"role": "assistant", "content": " \u2060 "}], "hh_lists": [
                row["chosen"][0], {"role": "assistant", "content": "\u200b"}]}.get(form, "\u200b")
            if form == "hh":
                row["chosen"] = "\n\nHuman: x\n\nAssistant: yes"
        elif kind == "invalid_unicode":
            row["chosen"] = "lone \ud800" if isinstance(row["chosen"], str) else [
                {"role": "assistant", "content": "lone \udfff"}]
        elif kind == "no_shared_prompt":
            row["rejected"] = good(form)[0]["rejected"]
        else:  # wrong_role_order
            row["prompt"] = [{"role": "assistant", "content": text()}]
        return row

    kept, seen = {}, []

    def entries(forms, kinds, n):
        """[(row, None) for a good or repeated row | (row, reason)], and the positions of the repeats."""
        out, repeats = [], []
        for i in range(n):
            roll = rng.random()
            if roll < 0.15:
                form = rng.choice(forms)
                kind = rng.choice(kinds[form])
                out.append((bad(form, kind), kind))
            elif roll < 0.25 and seen:  # a pair seen before (in this file or another), in any form of this file
                out.append((good(rng.choice(forms), rng.choice(seen))[0], None))
                repeats.append(i)
            else:
                texts = (text(), text(), text())
                row, pair = good(rng.choice(forms), texts)
                kept[pair_id(pair)] = pair
                seen.append(texts)
                out.append((row, None))
        return out, repeats

    src = tmp_path / "pairs"
    src.mkdir()
    rejects, duplicates = set(), set()
    common = ["missing_field", "empty_content", "invalid_unicode"]
    a, a_repeats = entries(["strings", "lists", "ultra"], {"strings": common, "lists": [*common, "wrong_role_order"],
                                                           "ultra": common}, 150)
    lines = [json.dumps(row) for row, _ in a]
    lines.insert(40, '{"prompt": "broken')  # physical line 41: not JSON
    number = [i + 1 + (i >= 40) for i in range(len(a))]
    (src / "a.jsonl").write_text("\n".join(lines) + "\n")
    rejects |= {(str(src / "a.jsonl"), number[i], reason) for i, (_, reason) in enumerate(a) if reason}
    rejects.add((str(src / "a.jsonl"), 41, "bad_json"))
    duplicates |= {(str(src / "a.jsonl"), number[i]) for i in a_repeats}
    b, b_repeats = entries(["hh", "hh_lists"], {f: [*common, "no_shared_prompt"] for f in ("hh", "hh_lists")}, 120)
    (src / "b.json").write_text(json.dumps([row for row, _ in b]))
    rejects |= {(str(src / "b.json"), i + 1, reason) for i, (_, reason) in enumerate(b) if reason}
    duplicates |= {(str(src / "b.json"), i + 1) for i in b_repeats}
    c, c_repeats = entries(["strings"], {"strings": ["empty_content"]}, 80)
    with open(src / "c.csv", "w", newline="") as f:
        csv.writer(f).writerows([["prompt", "chosen", "rejected"]] + [[row[k] for k in ("prompt", "chosen", "rejected")]
                                                                         for row, _ in c])
    rejects |= {(str(src / "c.csv"), i + 2, reason) for i, (_, reason) in enumerate(c) if reason}
    duplicates |= {(str(src / "c.csv"), i + 2) for i in c_repeats}

    cfg = load_config(overrides=[*PAIRS[:2], f"data.sources=[{{kind: file, path: {src}}}]",
                                 "validation.max_reject_fraction=0.5"])
    totals = prepare(cfg, tmp_path / "data")["totals"]
    assert totals["read"] == 351 == totals["kept"] + totals["rejected"] + totals["duplicates"]
    records = {r["id"]: {k: r[k] for k in ("prompt", "chosen", "rejected")} for r in iter_jsonl(
        tmp_path / "data" / "records.jsonl")}
    assert records == kept and len(kept) > 200
    assert {(r["file"], r["line"], r["reason"]) for r in iter_jsonl(tmp_path / "data" / "rejects.jsonl")} == rejects
    assert {(d["file"], d["line"]) for d in iter_jsonl(tmp_path / "data" / "duplicates.jsonl")} == duplicates
    assert {r for *_, r in rejects} == {"missing_field", "empty_content", "invalid_unicode", "no_shared_prompt",
                                        "wrong_role_order", "bad_json"}


@pytest.mark.slow
def test_two_processes_give_the_single_process_dpo_update(pair_run, tmp_path):
    """Data parallel (torchrun, gloo): each rank runs half of every global batch of pairs, the reference pass
    included; the summed STATS and gradients give the single-process weights, metrics and validation loss."""
    from run_helpers import adapter, assert_same_weights
    from test_distributed import run_two

    from leantune.metrics import read_metrics

    overrides = ["train.max_steps=3", "train.eval_every=3", "monitor.enabled=false"]
    cfg, one = new_pair_run(pair_run, tmp_path, *overrides, name="one")
    train(cfg, one)
    _, two = new_pair_run(pair_run, tmp_path, *overrides, name="two")
    run_two(two)
    assert_same_weights(adapter(two), adapter(one), rel=1e-5)
    lines = {d: read_metrics(d, "step") for d in (one, two)}
    assert {m["world_size"] for m in lines[two]} == {2}
    for key in (*METRICS[:-1], "val_loss"):
        np.testing.assert_allclose([m[key] for m in lines[two] if key in m], [m[key] for m in lines[one] if key in m],
                                   rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_fsdp_on_two_processes_gives_the_single_process_dpo_update(pair_run, tmp_path):
    """FSDP2 (torchrun, gloo, one launch): DPO with LoRA and QLoRA (the reference the adapter turned off, run
    through FSDP's root, which gathers the shards) and with full fine-tuning (the reference log-probs stored before
    the first step, every rank running every forward), and SimPO; each gives the single-process weights, metrics
    and validation loss."""
    from run_helpers import adapter, assert_same_weights
    from safetensors.torch import load_file
    from test_fsdp import torchrun

    from leantune.metrics import read_metrics

    overrides = ["train.max_steps=3", "train.eval_every=3", "monitor.enabled=false"]
    variants = {"lora": [], "full": ["model.method=full", "train.lr=1e-3"], "simpo": ["train.objective=simpo"],
                # bitsandbytes' CPU 4-bit kernels need rows of at least one quantisation block (64).
                "qlora": ["model.method=qlora", "model.scratch.hidden_size=64", "model.scratch.intermediate_size=128"]}
    fsdp = ["train.distributed.strategy=fsdp"]
    runs = {}
    for name, extra in variants.items():
        cfg, runs[name, 1] = new_pair_run(pair_run, tmp_path, *overrides, *extra, name=f"{name}-one")
        train(cfg, runs[name, 1])
        runs[name, 2] = new_pair_run(pair_run, tmp_path, *overrides, *extra, *fsdp, name=f"{name}-two")[1]
    rc, out, _ = torchrun([{"run_dir": str(runs[name, 2])} for name in variants], tmp_path / "plan.json")
    assert rc == 0, out[-4000:]
    for name in variants:
        one, two = runs[name, 1], runs[name, 2]
        if name == "full":
            assert_same_weights(load_file(two / "adapter" / "model.safetensors"),
                                load_file(one / "adapter" / "model.safetensors"), rel=1e-5)
            assert np.array_equal(np.load(two / "tokens" / "train" / "reference_logps.npy"),
                                  np.load(one / "tokens" / "train" / "reference_logps.npy"))
        else:
            assert_same_weights(adapter(two), adapter(one), rel=1e-5)
        lines = {d: read_metrics(d, "step") for d in (one, two)}
        assert {m["world_size"] for m in lines[two]} == {2}
        for key in (*METRICS[:-1], "val_loss"):
            # One process validates QLoRA through bitsandbytes' AVX512-BF16 CPU kernel where the CPU has it (it
            # repacks the weights at the first eval-mode forward), FSDP through the generic one (fsdp.py keeps the
            # repacking off): 4.3e-5 apart here; 2.5e-2 with the repacking left on under FSDP.
            rtol = 1e-4 if (name, key) == ("qlora", "val_loss") else 1e-5
            np.testing.assert_allclose([m[key] for m in lines[two] if key in m],
                                       [m[key] for m in lines[one] if key in m], rtol=rtol, atol=1e-6,
                                       err_msg=f"{name} {key}")


def test_a_preference_objective_refuses_conversation_shards_and_mixture_of_experts(tmp_path):
    from leantune.errors import UserError

    cfg = load_config(overrides=PAIRS)
    shards = FakeShards(tmp_path, [])
    shards.meta, shards.pad_id = {"pairs": False}, 0
    with pytest.raises(UserError, match="holds conversations; run the data stages again"):
        PreferenceObjective.for_run(cfg, shards, None, torch.float32, "sdpa", CPU)
    shards.meta["pairs"] = True
    with pytest.raises(UserError, match="not supported for Mixture-of-Experts"):
        PreferenceObjective.for_run(cfg, shards, object(), torch.float32, "sdpa", CPU)
    assert PreferenceObjective.for_run(cfg, shards, None, torch.float32, "sdpa", CPU).t.objective == "dpo"


def test_dpo_loss_and_gradients_equal_trls_dpo_trainer(tmp_path):
    """The same pairs, model, adapter and beta through TRL's DPOTrainer (its own tokenization, its reference
    the adapter off): the same loss and LoRA gradients. TRL is the bench extra: skipped where it is not installed."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from leantune.modeling import build_base_model
    from leantune.tokenization import load_tokenizer, tokenize_pairs

    pairs = [{"id": str(i), "prompt": [{"role": "user", "content": f"What is {i} plus {i % 5}?"}],
              "chosen": [{"role": "assistant", "content": f"It is {i + i % 5}."}],
              "rejected": [{"role": "assistant", "content": f"Maybe {i + 7}, I think."}], "source": "s"} for i in range(6)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cfg = load_config(overrides=[*PAIR_RUN, "train.global_batch_size=6", "train.micro_batch_size=6"])
    tok = load_tokenizer(cfg, tmp_path / "train.jsonl", tmp_path / "tokenizer")
    tokenize_pairs(cfg, tok, tmp_path / "train.jsonl", tmp_path / "train")
    shards = TokenShards(tmp_path / "train")
    torch.manual_seed(0)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=6, beta=cfg.train.dpo_beta,
                     loss_type="sigmoid", report_to=[], use_cpu=True, bf16=False, max_length=None)
    trainer = DPOTrainer(model=build_base_model(cfg, tok, CPU), args=args, processing_class=tok,
                         train_dataset=Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")}
                                                          for p in pairs]),
                         peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    model = trainer.model
    with torch.no_grad():  # off the zero-initialised B, where the policy is its reference
        for name, p in model.named_parameters():
            if "lora_" in name and not p.any():
                p.normal_(0, 0.3)
    objective = PreferenceObjective(cfg.train, shards.pad_id, torch.float32, "sdpa", CPU)
    loss, ours = gradients(model, lambda: objective.loss(model, [shards[i] for i in range(6)], 6)[0])
    batch = next(iter(trainer.get_train_dataloader()))
    trl_loss, theirs = gradients(model, lambda: trainer.compute_loss(model, batch))
    assert loss == pytest.approx(trl_loss, rel=1e-5) and abs(loss - np.log(2)) > 1e-3
    assert ours.keys() == theirs.keys() and len(ours) == 28
    for name, g in theirs.items():
        torch.testing.assert_close(ours[name], g, rtol=1e-5, atol=1e-5, msg=name)
