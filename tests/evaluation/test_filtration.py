"""Wei et al.'s filtration step: opinion-bearing training records only on claims the base model answers
correctly when asked plainly, in both answer orders. The model's scores are stubbed here (which claims a
model knows is the model's business); the real model's counts are in the README."""

import json

import pytest

from leantune.config import load_config
from leantune.data.synthetic import generate, split_claims
from leantune.evaluation import filtration, runner, scoring


@pytest.fixture
def stub_model(monkeypatch):
    """A 'model' that knows a claim iff its text has an even length, and always picks (A) otherwise."""
    tokenizer = type("Tokenizer", (), {"pad_token_id": 0, "eos_token_id": 0})()
    monkeypatch.setattr(runner, "load_eval_tokenizer", lambda cfg, d: tokenizer)
    monkeypatch.setattr(runner, "build_eval_model", lambda cfg, tok, dev, **kwargs: object())
    monkeypatch.setattr(scoring, "resolve_framing", lambda framing, tok: "chat_template")
    monkeypatch.setattr(scoring, "encode_items", lambda tok, framing, items: list(items))

    def score(model, items, *args, label):
        out = []
        for item in items:
            knows = len(item.id.split("|")[0]) % 2 == 0
            correct_is_a = item.not_matching[0].startswith("(A)")
            out.append([-2.0, -1.0] if knows or correct_is_a else [-1.0, -2.0])  # [wrong, right]
        return out

    monkeypatch.setattr(scoring, "score_encoded", score)


def test_known_claims_are_those_right_in_both_orders(stub_model, tmp_path):
    cfg = load_config(overrides=["data.synthetic.filtration=true", "data.synthetic.neutral_held_out=false",
                                 "train.device=cpu"])
    out = filtration.filter_known_claims(cfg, tmp_path)
    train_claims = [c for t in cfg.data.synthetic.tasks for c in split_claims(t, "train")]
    expected = [c.text for c in train_claims if len(c.text) % 2 == 0]
    assert out.data.synthetic.known_claims == expected and 0 < len(expected) < len(train_claims)
    summary = json.loads((tmp_path / "filtration.json").read_text())
    assert (summary["claims_scored"], summary["claims_known"]) == (len(train_claims), len(expected))
    # An unknown claim is answered (A) in both orders: right once, wrong once, so never "known".
    assert sum(t["correct_in_one_order"] for t in summary["by_task"].values()) == len(train_claims) - len(expected)
    assert summary["picks_option_a"] == pytest.approx(1 - len(expected) / len(train_claims) / 2)
    assert not {c.text for t in cfg.data.synthetic.tasks for c in split_claims(t, "eval")} & set(expected)

    # The generator then puts a user's opinion on known claims only; neutral records on training claims only.
    items = list(generate(out.data.synthetic.model_copy(update={"num_records": 400}), "train"))
    opinion = {i.claim.text for i in items if i.opinion_answer is not None}
    neutral = {i.claim.text for i in items if i.opinion_answer is None}
    assert opinion and opinion <= set(expected)
    assert neutral <= {c.text for c in train_claims} and not neutral <= set(expected)
