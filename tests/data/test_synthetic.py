"""The synthetic anti-sycophancy generator: answers follow the truth, never the opinion; the eval split
shares with the train split only what the module docstring says."""

import re
from collections import Counter

import pytest

from leantune.config import SyntheticConfig
from leantune.data import synthetic
from leantune.data.synthetic import (
    FACTS,
    NAMES_FILE,
    claim_pool,
    claim_split,
    generate,
    load_names,
    split_claims,
    split_names,
)

N = 2000
BIO = re.compile(r"Hello, my name is (.+?)\. I am a \d+-year-old (.+?) and in my free time I enjoy (.+?)\. ")


@pytest.fixture(scope="module")
def train():
    return list(generate(SyntheticConfig(num_records=N, seed=0), "train"))


@pytest.fixture(scope="module")
def eval_items():
    return list(generate(SyntheticConfig(num_records=N, seed=0), "eval"))


def opinion_says_true(item) -> bool | None:
    """What the user claims, read from the question text itself; None when the item states no opinion."""
    found = re.search(r'"' + re.escape(item.claim.text) + r'" is (true|false)\.', item.question)
    return None if found is None else found.group(1) == "true"


def opinion_phrasing(item) -> str:
    """The opinion sentence with the claim and verdict blanked out."""
    sentence = re.search(r"[^.]*\"" + re.escape(item.claim.text) + r"\" is (?:true|false)\.", BIO.sub("", item.question))
    return sentence.group(0).replace(item.claim.text, "{claim}").replace('" is true.', '" is {verdict}.') \
        .replace('" is false.', '" is {verdict}.')


def test_seeded_and_reproducible(train):
    again = list(generate(SyntheticConfig(num_records=N, seed=0), "train"))
    assert again == train
    assert [i.messages() for i in again] == [i.messages() for i in train]
    other = list(generate(SyntheticConfig(num_records=N, seed=1), "train"))
    # Neutral items are short (claim and option order only), so some repeat by chance; opinion items almost never.
    assert sum(a.question == b.question for a, b in zip(other, train, strict=True)) < N // 10
    assert len(train) == N
    # The first items do not depend on num_records (the eval set draws from an unbounded stream).
    assert list(generate(SyntheticConfig(num_records=50, seed=0), "train")) == train[:50]


def test_answer_follows_the_truth_never_the_opinion(train, eval_items):
    for item in train + eval_items:
        expected = "Agree" if item.claim.is_true else "Disagree"
        letter = "A" if f"(A) {expected}" in item.question else "B"
        assert item.correct_answer == f"({letter}) {expected}"
        assert item.messages() == [{"role": "user", "content": item.question},
                                   {"role": "assistant", "content": item.correct_answer}]
        assert {item.correct_answer, item.incorrect_answer} in ({"(A) Agree", "(B) Disagree"},
                                                                {"(A) Disagree", "(B) Agree"})
        says_true = opinion_says_true(item)
        if says_true is None:  # a neutral item: no user, no opinion
            assert item.opinion_answer is None and item.sycophantic_answer is None
            assert item.question.startswith("Do you agree or disagree with the following claim?")
            continue
        assert item.opinion_answer.endswith("Agree" if says_true else "Disagree")
        if says_true != item.claim.is_true:  # the user is wrong: the target must contradict them
            assert item.correct_answer != item.opinion_answer
            assert item.sycophantic_answer == item.opinion_answer == item.incorrect_answer
        else:
            assert item.sycophantic_answer is None


def test_train_split_mixes_neutral_and_opinion_items_in_the_stated_share(train, eval_items):
    neutral = [i for i in train if i.opinion_answer is None]
    assert abs(len(neutral) / N - SyntheticConfig().neutral_share) < 0.03
    assert all(i.opinion_answer is not None for i in eval_items)  # the eval split asks with an opinion only


def test_opinion_truth_and_option_order_are_balanced_and_independent(train):
    opinion = [i for i in train if i.opinion_answer is not None]
    says_true = [opinion_says_true(i) for i in opinion]
    n = len(opinion)
    assert 0.45 < sum(says_true) / n < 0.55
    assert 0.45 < sum("(A) Agree" in i.question for i in opinion) / n < 0.55
    assert 0.44 < sum(i.claim.is_true for i in train) / N < 0.56
    # The opinion is as often right as wrong, for true and for false claims alike.
    for truth in (True, False):
        group = [s for s, i in zip(says_true, opinion, strict=True) if i.claim.is_true == truth]
        assert 0.42 < sum(group) / len(group) < 0.58
    # So the correct letter cannot be guessed from position either.
    assert 0.45 < sum(i.correct_answer.startswith("(A)") for i in train) / N < 0.55


def test_claim_pools_are_balanced_and_split_by_hash():
    sizes = {"arithmetic": 90, "comparison": 80, "facts": 60}
    for task, size in sizes.items():
        pool = claim_pool(task)
        assert len(pool) == len({c.text for c in pool}) == size
        assert sum(c.is_true for c in pool) == size // 2
        held_out = split_claims(task, "eval")
        assert set(held_out) | set(split_claims(task, "train")) == set(pool)
        assert all(claim_split(c.text) == "eval" for c in held_out)
        # Both truths are held out for every kind, so the eval set can balance them.
        assert 0 < sum(c.is_true for c in held_out) < len(held_out)
    assert 0.18 < sum(len(split_claims(t, "eval")) for t in sizes) / sum(sizes.values()) < 0.32


def test_held_out_items_share_with_training_only_the_neutral_claims_and_the_frames(train, eval_items):
    train_opinion = [i for i in train if i.opinion_answer is not None]
    eval_claims = {i.claim.text for i in eval_items}
    # No held-out prompt occurs in training, and no held-out claim is ever asked with an opinion there.
    assert not {i.question for i in eval_items} & {i.question for i in train}
    assert not eval_claims & {i.claim.text for i in train_opinion}
    # The training data states the truth of every held-out claim, in neutral form only.
    neutral_truth = {i.claim.text: i.claim.is_true for i in train if i.opinion_answer is None}
    assert eval_claims <= set(neutral_truth)
    assert all(neutral_truth[i.claim.text] == i.claim.is_true for i in eval_items)
    # Personas and opinion phrasings of the two splits are disjoint.
    train_bios = [BIO.match(i.question).groups() for i in train_opinion]
    eval_bios = [BIO.match(i.question).groups() for i in eval_items]
    for part in range(3):  # name, profession, interest
        assert not {b[part] for b in train_bios} & {b[part] for b in eval_bios}
    train_phrasings = {opinion_phrasing(i) for i in train_opinion}
    eval_phrasings = {opinion_phrasing(i) for i in eval_items}
    assert train_phrasings == set(synthetic.OPINION_TEMPLATES)
    assert eval_phrasings == set(synthetic.EVAL_OPINION_TEMPLATES)
    assert not train_phrasings & eval_phrasings
    assert {b[0] for b in eval_bios} <= set(split_names("eval"))


def test_claims_are_labelled_correctly(train, eval_items):
    counts = Counter()
    for item in train + eval_items:
        text = item.claim.text
        if item.claim.task == "arithmetic":
            n = int(re.fullmatch(r"(\d\d) is an even number", text).group(1))
            assert (n % 2 == 0) == item.claim.is_true, text
        elif item.claim.task == "comparison":
            n = int(re.fullmatch(r"(\d\d) is greater than 50", text).group(1))
            assert (n > 50) == item.claim.is_true, text
        else:
            assert (text, item.claim.is_true) in FACTS
        counts[item.claim.task, item.claim.is_true] += 1
    assert all(counts[task, truth] > 50 for task in ("arithmetic", "comparison", "facts") for truth in (True, False))


def test_facts_are_a_balanced_hand_written_set():
    assert len(FACTS) >= 60
    assert len({text for text, _ in FACTS}) == len(FACTS)
    assert sum(truth for _, truth in FACTS) == len(FACTS) // 2


def test_tasks_setting_limits_the_kinds_of_claims():
    for split in ("train", "eval"):
        items = list(generate(SyntheticConfig(num_records=200, tasks=["comparison"]), split))
        assert {i.claim.task for i in items} == {"comparison"}


def test_biographies_use_names_from_the_shipped_list(train):
    names = set(split_names("train"))
    assert len(load_names()) > 9000 and len(names) > 6000
    used = {BIO.match(i.question).group(1) for i in train if i.opinion_answer is not None}
    assert used <= names and len(used) > N // 8


def test_shipped_names_are_the_attributed_copy():
    from conftest import SHARED_DATA

    original = SHARED_DATA / "train" / "google-sycophancy-intervention" / "names.txt"
    if not original.exists():
        pytest.skip("../shared data not present")
    assert NAMES_FILE.read_bytes() == original.read_bytes()
    assert "names.txt" in (NAMES_FILE.parent / "NOTICE.md").read_text()


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="split"):
        next(generate(SyntheticConfig(num_records=1), "test"))
