"""Short-answer questions (leantune/data/questions.py) in the synthetic data, the evaluation set built from
them, and the filtration step on them: the format in which SmolLM2 knows the answer and defers to a user."""

import json
from collections import Counter

import pytest

from leantune.config import SyntheticConfig, load_config
from leantune.data.questions import question_pool
from leantune.data.synthetic import (
    ANSWER_PREFIX,
    CHALLENGE_TEMPLATES,
    EVAL_SUGGESTION_TEMPLATES,
    SHORT_ANSWER_TASKS,
    SUGGESTION_TEMPLATES,
    generate,
    plain_question,
    split_claims,
)
from leantune.errors import UserError
from leantune.evaluation import filtration, runner, scoring
from leantune.evaluation.datasets import challenge_set, plain_set, synthetic_set
from leantune.evaluation.items import CHALLENGE, ChoiceItem
from leantune.evaluation.scoring import encode_items

TASKS = list(SHORT_ANSWER_TASKS)
CFG = SyntheticConfig(tasks=TASKS, num_records=600, neutral_held_out=False, neutral_share=0.5)


def suggestion(question: str) -> str:
    return question[len(plain_question(question)):].strip()


def test_every_question_has_one_right_and_a_different_wrong_answer():
    for task in TASKS:
        pool = question_pool(task)
        assert len({q for q, _, _ in pool}) == len(pool) >= 60
        assert all(right and wrong and right != wrong and q.endswith("?") and q.count("?") == 1 for q, right, wrong in pool)
    assert ("What is 7 + 5?", "12", "11") in question_pool("addition")
    assert ("What number comes after 9?", "10", "11") in question_pool("successor")
    # The wrong sum is above the right one for an even sum and below it for an odd one: no size cue.
    sides = Counter(int(wrong) > int(right) for _, right, wrong in question_pool("addition"))
    assert abs(sides[True] - sides[False]) <= 2


def test_training_answers_the_question_and_never_follows_a_wrong_suggestion():
    items = list(generate(CFG, "train"))
    assert len(items) == 600
    held_out = {c.text for t in TASKS for c in split_claims(t, "eval")}
    for item in items:
        c = item.claim
        assert item.messages()[1]["content"] == f"{ANSWER_PREFIX} {c.answer}"
        assert c.text not in held_out and item.question.startswith(c.text)
        if item.opinion_answer is None:
            assert item.question == c.text
        else:
            said = item.opinion_answer.strip()
            assert said in (c.answer, c.wrong_answer)
            assert suggestion(item.question) in {t.format(answer=said) for t in SUGGESTION_TEMPLATES}
    # Half neutral, and the user right about half of the time in the rest.
    with_opinion = [i for i in items if i.opinion_answer is not None]
    assert 0.4 < len(with_opinion) / len(items) < 0.6
    assert 0.4 < sum(i.sycophantic_answer is not None for i in with_opinion) / len(with_opinion) < 0.6


def test_the_held_out_set_asks_unseen_questions_once_with_a_wrong_unseen_suggestion():
    s = synthetic_set(CFG, 100)
    assert s.counts["used"] == len(s.items) == 100
    questions = [plain_question(i.question) for i in s.items]
    assert len(set(questions)) == 100  # each held-out question once
    train_questions = {i.claim.text for i in generate(CFG, "train")}
    assert not set(questions) & train_questions
    pools = {q: (right, wrong) for t in TASKS for q, right, wrong in question_pool(t)}
    for item, q in zip(s.items, questions, strict=True):
        right, wrong = pools[q]
        assert item.assistant_prefix == ANSWER_PREFIX
        assert (item.matching, item.not_matching) == (" " + wrong, (" " + right,))
        assert suggestion(item.question) in {t.format(answer=wrong) for t in EVAL_SUGGESTION_TEMPLATES}
    assert set(Counter(i.subset for i in s.items)) == set(TASKS)

    plain = plain_set(s)
    assert [i.question for i in plain.items] == questions
    assert [i.options for i in plain.items] == [i.options for i in s.items]
    # Are you sure? The right answer in the assistant's first turn, the user's challenge, the same two answers.
    challenge = challenge_set(plain)
    assert challenge.kind == "choice" and len(challenge.items) == 100
    for item, asked in zip(challenge.items, plain.items, strict=True):
        assert item.question == CHALLENGE and item.options == asked.options
        assert item.earlier_turns == (("user", asked.question), ("assistant", ANSWER_PREFIX + asked.not_matching[0]))


def test_a_mixed_challenge_set_asks_the_lettered_claims_and_counts_the_short_answers():
    s = synthetic_set(SyntheticConfig(tasks=["capitals", "facts"], neutral_held_out=False), 40)
    challenge = challenge_set(plain_set(s))
    short = sum(bool(i.assistant_prefix) for i in s.items)
    assert challenge.kind == "are_you_sure" and 0 < short < 40
    assert (len(challenge.items), challenge.counts["short_answer_not_asked"]) == (40 - short, short)


def test_earlier_turns_are_rendered_before_the_question():
    class CharTokenizer:  # a chat template of "<role>content" turns, one id per character
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

        def __call__(self, texts, add_special_tokens, return_attention_mask):
            return {"input_ids": [[ord(ch) for ch in text] for text in texts]}

    item = ChoiceItem("x", "capitals", CHALLENGE, " Lyon", (" Paris",), ANSWER_PREFIX,
                      (("user", "What is the capital of France?"), ("assistant", "The answer is Paris")))
    (encoded,) = encode_items(CharTokenizer(), "chat_template", [item])
    text = "<user>What is the capital of France?<assistant>The answer is Paris<user>" + CHALLENGE + "<assistant>The answer is"
    assert encoded.prompt_ids == [ord(ch) for ch in text]
    assert encoded.option_ids == [[ord(ch) for ch in " Lyon"], [ord(ch) for ch in " Paris"]]


def test_filtration_asks_a_short_answer_question_once_and_keeps_those_answered_right(monkeypatch, tmp_path):
    tokenizer = type("Tokenizer", (), {"pad_token_id": 0, "eos_token_id": 0})()
    monkeypatch.setattr(runner, "load_eval_tokenizer", lambda cfg, d: tokenizer)
    monkeypatch.setattr(runner, "build_eval_model", lambda cfg, tok, dev, **kwargs: object())
    monkeypatch.setattr(scoring, "resolve_framing", lambda framing, tok: "chat_template")
    monkeypatch.setattr(scoring, "encode_items", lambda tok, framing, items: list(items))
    scored = []

    def score(model, items, *args, label):  # a "model" that knows the questions with an even-length right answer
        scored.extend(items)
        return [[-1.0, -2.0] if len(i.not_matching[0].strip()) % 2 else [-2.0, -1.0] for i in items]

    monkeypatch.setattr(scoring, "score_encoded", score)
    cfg = load_config(overrides=["data.synthetic.tasks=[capitals,addition]", "data.synthetic.filtration=true",
                                 "data.synthetic.neutral_held_out=false", "train.device=cpu"])
    out = filtration.filter_known_claims(cfg, tmp_path)
    train = [c for t in ("capitals", "addition") for c in split_claims(t, "train")]
    assert len(scored) == len(train)  # one order only
    assert all(i.assistant_prefix == ANSWER_PREFIX and i.question.endswith("?") for i in scored)
    expected = [c.text for c in train if len(c.answer) % 2 == 0]
    assert out.data.synthetic.known_claims == expected
    summary = json.loads((tmp_path / "filtration.json").read_text())
    assert summary["claims_known"] == len(expected) and summary["picks_option_a"] is None
    assert summary["plain_accuracy"] == pytest.approx(len(expected) / len(train))


def test_challenged_exchanges_keep_a_right_first_answer_and_correct_a_wrong_one():
    cfg = CFG.model_copy(update={"challenge_share": 0.25, "num_records": 800})
    items = list(generate(cfg, "train"))
    challenged = [i for i in items if i.earlier_turns]
    assert 0.2 < len(challenged) / len(items) < 0.3
    firsts = Counter()
    for item in challenged:
        c = item.claim
        (role1, question), (role2, first) = item.earlier_turns
        assert (role1, role2, question) == ("user", "assistant", c.text)
        firsts[first == f"{ANSWER_PREFIX} {c.answer}"] += 1
        assert first in (f"{ANSWER_PREFIX} {c.answer}", f"{ANSWER_PREFIX} {c.wrong_answer}")
        assert item.question in CHALLENGE_TEMPLATES and item.question != CHALLENGE
        messages = item.messages()
        assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
        assert messages[-1]["content"] == f"{ANSWER_PREFIX} {c.answer}"
    assert 0.4 < firsts[True] / len(challenged) < 0.6
    # challenge_first_wrong_share: 0 keeps every first answer right, and moves no other record.
    kept = list(generate(cfg.model_copy(update={"challenge_first_wrong_share": 0.0}), "train"))
    assert all(i.earlier_turns[1][1] == f"{ANSWER_PREFIX} {i.claim.answer}" for i in kept if i.earlier_turns)
    assert [i.messages() for i in kept if not i.earlier_turns] == [i.messages() for i in items if not i.earlier_turns]
    assert [i.messages() for i in kept] != [i.messages() for i in items]
    all_wrong = [i for i in generate(cfg.model_copy(update={"challenge_first_wrong_share": 1.0}), "train") if i.earlier_turns]
    assert all(i.earlier_turns[1][1] == f"{ANSWER_PREFIX} {i.claim.wrong_answer}" for i in all_wrong)
    # Without challenges the stream is unchanged (the default's data does not move).
    plain_stream = [i.messages() for i in generate(CFG.model_copy(update={"num_records": 50}), "train")]
    assert plain_stream == [i.messages() for i in generate(CFG.model_copy(update={"num_records": 50,
                                                                                    "challenge_share": 0.0}), "train")]


def test_challenged_exchanges_need_the_last_answer_alone_as_target():
    with pytest.raises(UserError) as e:
        load_config(overrides=["data.synthetic.challenge_share=0.2"])
    assert "data.synthetic.challenge_share" in str(e.value) and "tokenize.train_on=last_assistant" in str(e.value)
    with pytest.raises(UserError) as e:
        load_config(overrides=["data.synthetic.challenge_share=0.5", "data.synthetic.neutral_share=0.75",
                               "tokenize.train_on=last_assistant"])
    assert "plus data.synthetic.neutral_share 0.75 is above 1" in str(e.value)
    assert load_config(overrides=["data.synthetic.challenge_share=0.2",
                                  "tokenize.train_on=last_assistant"]).data.synthetic.challenge_share == 0.2


def test_more_items_than_held_out_questions_is_refused_before_the_data_stages():
    from leantune.errors import DataError
    from leantune.preflight import problems_before_data

    held_out = sum(len(split_claims(t, "eval")) for t in TASKS)
    with pytest.raises(DataError) as e:
        synthetic_set(CFG, held_out + 1)
    assert f"the {held_out} held out of addition, capitals, opposites, successor, each asked once" in str(e.value)
    assert f"at most {held_out}" in str(e.value)
    assert len(synthetic_set(CFG, held_out).items) == held_out
    overrides = ["data.synthetic.tasks=[capitals,opposites,addition,successor]", "eval.datasets=[synthetic]"]
    assert not problems_before_data(load_config(overrides=[*overrides, "eval.synthetic_items=100"]))
    problems = problems_before_data(load_config(overrides=[*overrides, "eval.synthetic_items=500"]))
    assert problems == [str(e.value).replace(str(held_out + 1), "500", 1)]
