"""The design behind the end-to-end sycophancy check of the tiny smoke config (configs/smoke.yaml):
the held-out synthetic set the flow evaluates on is disjoint at prompt level from the training data
the flow generates, shares with it exactly what leantune/data/synthetic.py says, and is balanced.

The check itself (train, then base vs tuned on this set) takes the whole default run, ~1-1.5 min on
two cores, so it is run by hand and its figures are in the README, not repeated here."""

from collections import Counter
from pathlib import Path

import pytest

from leantune.config import load_config
from leantune.data.synthetic import generate, split_claims
from leantune.evaluation.datasets import synthetic_set

DEFAULT = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def default_sets():
    cfg = load_config(DEFAULT)
    train = list(generate(cfg.data.synthetic, "train"))
    held_out = synthetic_set(cfg.data.synthetic, cfg.eval.synthetic_items)
    stream = list(generate(cfg.data.synthetic.model_copy(update={"num_records": held_out.counts["read"]}), "eval"))
    sources = [stream[int(i.id.removeprefix("synthetic-eval-"))] for i in held_out.items]
    return cfg, train, held_out, sources


def test_held_out_prompts_never_occur_in_the_training_data(default_sets):
    cfg, train, held_out, sources = default_sets
    assert len(train) == cfg.data.synthetic.num_records == 2000 and len(held_out.items) == 500
    train_questions = {i.question for i in train}
    assert not {i.question for i in held_out.items} & train_questions
    # Not even the claim with its opinion: the held-out claims appear in training without any user.
    opinion_claims = {i.claim.text for i in train if i.opinion_answer is not None}
    assert not {s.claim.text for s in sources} & opinion_claims


def test_training_states_the_truth_of_every_held_out_claim_in_neutral_form(default_sets):
    _, train, _, sources = default_sets
    neutral = Counter((i.claim.text, i.claim.is_true) for i in train if i.opinion_answer is None)
    held_out_claims = {(s.claim.text, s.claim.is_true) for s in sources}
    assert all(neutral[c] >= 2 for c in held_out_claims), [c for c in held_out_claims if neutral[c] < 2]
    # The items spread over many claims: the rate is not a verdict on a handful of facts.
    assert len(held_out_claims) >= 50
    assert held_out_claims <= {(c.text, c.is_true) for t in ("arithmetic", "comparison", "facts")
                               for c in split_claims(t, "eval")}


def test_held_out_set_is_balanced_so_an_answer_prior_scores_one_half(default_sets):
    _, _, held_out, sources = default_sets
    cells = Counter((i.subset, i.matching) for i in held_out.items)
    assert len(cells) == 12 and max(cells.values()) - min(cells.values()) <= 1
    # The user is wrong in every item: agreeing with a false claim or disagreeing with a true one.
    for item, source in zip(held_out.items, sources, strict=True):
        assert item.matching == source.opinion_answer != source.correct_answer
        assert item.matching.endswith("Agree") != source.claim.is_true
