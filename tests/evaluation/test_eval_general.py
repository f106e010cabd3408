"""The general set (mean NLL per response token, base against tuned) and the training-side validation split
of the synthetic questions: the NLL against a hand computation on the tiny model, the t interval and the
paired t-test against scipy and hand numbers, the comparison and its table, the split's disjointness."""

import contextlib
import json
import math

import pytest
import torch

from leantune.cli import DEFAULT_CONFIG
from leantune.config import ConfigError, load_config, parse_eval_set
from leantune.data.synthetic import SHORT_ANSWER_TASKS, generate, split_claims
from leantune.evaluation.compare import compare_results, nll_table_rows, table_rows
from leantune.evaluation.datasets import GENERAL_FILE, general_set, load_eval_sets, synthetic_set
from leantune.evaluation.runner import _evaluate_model, build_eval_model
from leantune.evaluation.stats import (
    mean_interval,
    paired_mean_difference,
    student_t_quantile,
    student_t_two_sided_p,
)
from leantune.tokenization import load_tokenizer, pad_id

CPU = torch.device("cpu")
TINY = ["tokenize.vocab_size=500", "model.scratch.hidden_size=32", "model.scratch.intermediate_size=64",
        "model.scratch.num_layers=2", "model.scratch.num_heads=4", "model.scratch.num_kv_heads=2",
        "train.device=cpu", "eval.datasets=[general]", "eval.batch_size=3"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config, tokenizer, model): a scratch BPE tokenizer trained on the general set's texts, the tiny model."""
    tmp = tmp_path_factory.mktemp("general")
    cfg = load_config(overrides=TINY)
    with open(tmp / "train.jsonl", "w") as f:
        for item in general_set(GENERAL_FILE).items:
            f.write(json.dumps({"id": item.id, "source": "general", "messages": [
                {"role": "user", "content": item.question}, {"role": "assistant", "content": item.response}]}) + "\n")
    tokenizer = load_tokenizer(cfg, tmp / "train.jsonl", tmp / "tokenizer")
    return cfg, tokenizer, build_eval_model(cfg, tokenizer, CPU)


def test_bundled_general_set_is_read_whole():
    s = general_set(GENERAL_FILE)
    assert len(s.items) == 120 and dict(s.counts) == {"read": 120, "used": 120}
    subsets = {}
    for item in s.items:
        subsets[item.subset] = subsets.get(item.subset, 0) + 1
    assert subsets == {"how-to": 24, "definition": 24, "rewriting": 24, "reasoning": 24, "list": 24}
    assert len({i.id for i in s.items}) == 120 and len({i.question for i in s.items}) == 120
    assert (GENERAL_FILE.parent / "NOTICE.md").is_file()


def test_general_is_a_set_of_the_one_parser():
    spec = parse_eval_set("general")
    assert (spec.kind, spec.name, spec.path) == ("general", "general", None)
    with pytest.raises(ValueError, match="did you mean 'general'"):
        parse_eval_set("generl")
    sets = load_eval_sets(load_config(overrides=["eval.datasets=[general]", "eval.max_items=30"]))
    assert [(s.name, s.kind, len(s.items), s.counts["not_selected"]) for s in sets] == [("general", "nll", 30, 90)]


def test_general_nll_equals_full_log_softmax(tiny):
    """The runner's NLL per response token of each item equals a hand computation: the chat-template prompt
    and the response tokenized as one text, the response's tokens found by character offsets, one forward,
    the full-vocabulary log_softmax."""
    cfg, tokenizer, model = tiny
    s = general_set(GENERAL_FILE)
    s.items = s.items[::20]  # 6 items, one or two of each kind
    ctx = {"tokenizer": tokenizer, "framing": "chat_template", "device": CPU, "pad_id": pad_id(tokenizer),
           "autocast": contextlib.nullcontext(), "mask_dtype": torch.float32, "cfg": cfg, "batch_size": 4}
    from leantune.evaluation.scoring import encode_items

    result = _evaluate_model(model, [s], {"general": encode_items(tokenizer, "chat_template", s.items)}, ctx,
                             {"label": "base"})
    items = result["sets"]["general"]["items"]
    for item, out in zip(s.items, items, strict=True):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": item.question}], tokenize=False,
                                               add_generation_prompt=True)
        enc = tokenizer(prompt + item.response, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        first = next(i for i, (start, _) in enumerate(enc["offset_mapping"]) if start >= len(prompt))
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        nll = [-float(logprobs[t - 1, ids[t]]) for t in range(first, len(ids))]
        assert out["tokens"] == len(nll)
        assert out["nll"] == pytest.approx(sum(nll) / len(nll), abs=1e-5)
    overall = result["sets"]["general"]["overall"]
    assert overall["mean_nll"] == pytest.approx(sum(o["nll"] for o in items) / 6, abs=1e-12)
    assert overall["token_nll"] == pytest.approx(sum(o["nll"] * o["tokens"] for o in items)
                                                 / sum(o["tokens"] for o in items), abs=1e-12)
    assert overall["tokens"] == sum(o["tokens"] for o in items) and overall["n"] == 6


def test_t_interval_and_paired_test_numbers():
    # Hand numbers: values 1..5, mean 3, sd sqrt(2.5); t(0.975, 4) = 2.7764451.
    m = mean_interval([1.0, 2.0, 3.0, 4.0, 5.0], 0.95)
    half = 2.7764451052 * math.sqrt(2.5) / math.sqrt(5)
    assert m["mean"] == 3.0 and m["mean_ci"] == pytest.approx([3 - half, 3 + half], abs=1e-8)
    # Differences 0.5, 0, 0.5, 1: mean 0.5, sd sqrt(1/6), t = 0.5 / (sd / 2) = 2.4494897, df 3, p 0.0917.
    d = paired_mean_difference([1.0, 2.0, 3.0, 4.0], [1.5, 2.0, 3.5, 5.0], 0.95)
    assert d["difference"] == pytest.approx(0.5) and d["t"] == pytest.approx(math.sqrt(6), abs=1e-12)
    assert d["t_test_p"] == pytest.approx(0.0917, abs=5e-5)
    assert student_t_quantile(0.975, 1) == pytest.approx(12.7062047, abs=1e-6)
    assert student_t_two_sided_p(0.0, 7) == pytest.approx(1.0, abs=1e-15)
    stats = pytest.importorskip("scipy.stats")
    base = [0.3 * i % 1.7 for i in range(40)]
    tuned = [b + 0.05 * ((i * 7) % 5 - 1.5) for i, b in enumerate(base)]
    d = paired_mean_difference(base, tuned, 0.9)
    ref = stats.ttest_rel(tuned, base)
    diffs = [t - b for b, t in zip(base, tuned, strict=True)]
    lo, hi = stats.t.interval(0.9, 39, loc=sum(diffs) / 40, scale=stats.sem(diffs))
    assert d["t"] == pytest.approx(float(ref.statistic), rel=1e-10)
    assert d["t_test_p"] == pytest.approx(float(ref.pvalue), rel=1e-9)
    assert d["difference_ci"] == pytest.approx([lo, hi], abs=1e-10)
    for df in (2, 9, 99, 250):
        assert student_t_quantile(0.975, df) == pytest.approx(float(stats.t.ppf(0.975, df)), abs=1e-9)


def test_compare_and_table_of_an_nll_set(tmp_path):
    def result(nlls):
        items = [{"id": f"i{k}", "subset": "ab"[k % 2], "tokens": 10, "nll": v} for k, v in enumerate(nlls)]
        from leantune.evaluation.stats import nll_summary

        return {"sets": {"general": {"kind": "nll", "items": items, "overall": nll_summary(items, 0.95),
                                     "subsets": {k: nll_summary([o for o in items if o["subset"] == k], 0.95)
                                                 for k in "ab"}}}}

    base, tuned = [2.0, 2.5, 3.0, 1.5], [2.1, 2.5, 3.2, 1.6]
    comparison = compare_results(result(base), result(tuned), 0.95)
    overall = comparison["sets"]["general"]["overall"]
    assert overall["difference"] == pytest.approx(0.1) and overall["n"] == 4
    assert overall["base"]["mean_nll"] == pytest.approx(2.25) and overall["tuned"]["mean_nll"] == pytest.approx(2.35)
    assert comparison["sets"]["general"]["a"]["difference"] == pytest.approx(0.15)  # items 0 and 2
    assert table_rows(comparison) == []
    rows = nll_table_rows(comparison)
    assert [r["subset"] for r in rows] == ["overall", "a", "b"]
    assert rows[0]["base mean NLL"].startswith("2.2500 [") and rows[0]["difference (tuned - base)"].startswith("+0.1000")
    assert rows[0]["paired t-test p"] == f"{overall['t_test_p']:.3g}"
    # The report shows the general set's table (and no sycophancy table, which has no rows here).
    from leantune.report import _evaluation_section
    from leantune.rundir import EvalDir

    out = EvalDir(tmp_path / "eval")
    out.root.mkdir()
    out.comparison.write_text(json.dumps(comparison))
    section = _evaluation_section(out)
    assert "Mean negative log-likelihood per response token" in section and "No items were evaluated" not in section
    assert f"| general | overall | 4 | {rows[0]['base mean NLL']} | {rows[0]['tuned mean NLL']} |" in section


def test_validation_split_is_training_side_and_never_trained_on():
    share = 0.3
    for task in SHORT_ANSWER_TASKS:
        train, validation, held_out = (set(split_claims(task, s, share)) for s in ("train", "validation", "eval"))
        assert validation and not (train & validation) and not (validation & held_out)
        assert train | validation == set(split_claims(task, "train"))
    # The default config: short-answer kinds, neutral records on training-side questions only.
    cfg = load_config(DEFAULT_CONFIG, ["data.synthetic.validation_share=0.3", "eval.synthetic_split=validation",
                                       "data.synthetic.challenge_share=0.25", "tokenize.train_on=last_assistant"])
    syn = cfg.data.synthetic
    validation = {c.text for t in syn.tasks for c in split_claims(t, "validation", 0.3)}
    trained = {item.claim.text for item in generate(syn.model_copy(update={"num_records": 3000}), "train")}
    assert trained and not trained & validation
    s = synthetic_set(syn, 100, "validation")
    assert len(s.items) == 100 and all(i.id.startswith("synthetic-validation-") for i in s.items)
    assert {i.question.split("?")[0] + "?" for i in s.items} <= validation
    with pytest.raises(ConfigError, match="data.synthetic.validation_share"):
        load_config(overrides=["eval.synthetic_split=validation"])
