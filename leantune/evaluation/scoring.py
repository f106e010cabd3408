"""Log-likelihood scoring of answer options, batched, with the shared prompt computed once per item.

Framing (`eval.framing`): 'chat_template' renders the question as the user turn with the tokenizer's
chat template and its generation prompt, then the item's assistant prefix; 'human_assistant' is
Anthropic's plain-text framing, BOS + "\\n\\nHuman: {question}\\n\\nAssistant:" + " " + prefix (BOS
only when the tokenizer has one; rendered chat templates write their own). 'auto' is the chat
template when the tokenizer has one. Answers follow the prompt text directly: Anthropic's " (A)"
keeps its leading space; in the human_assistant framing an answer that starts with no space (the
synthetic "(A) Agree") gets one, as text after "Assistant:" has.

Tokens: trailing spaces of the prompt move to the front of every answer (a space belongs to the
word after it in BPE vocabularies). An answer's tokens are those of tokenize(prompt + answer) after
the tokens of tokenize(prompt) — the tokens the model would see in the whole text — when the prompt's
tokens are a prefix of the whole; else (a merge across the boundary) the answer is tokenized alone
and the item is counted as `boundary_retokenized`.

Score of an answer = sum over its tokens of log p(token | prompt, earlier answer tokens).

Batching, one forward per batch of items: each row holds one item laid out as
    [left padding][prompt][answer 1 + padding][answer 2 + padding]...
with the answer slots at the same columns in every row. A 4D additive attention mask lets prompt
tokens attend causally within the prompt and each answer's tokens attend to the prompt and causally
within their own answer, never to another answer; position ids restart after the prompt for every
answer (answer k's j-th token has position len(prompt) + j). Each answer therefore gets exactly the
logits it would get in a forward of prompt + answer alone, while the prompt is computed once for all
answers (tests/evaluation/test_eval_scoring.py checks this against unbatched forwards). Because the slots share
columns, logits are computed only at the columns that predict answer tokens (`logits_to_keep`), not
over the whole sequence and vocabulary. Padding queries attend only to themselves, so no row of the
mask is empty. The 4D mask needs the sdpa or eager attention (flash-attention takes no 4D mask;
runner.py loads evaluation models with sdpa).

Shared prefix: the tokens that all prompts of a call begin with (the chat template's opening with
its system prompt, an opening every question shares) are computed once, in one row, and every batch
reads their keys/values from a cache (PrefixCache; a batch whose prompts share more extends it for
itself); rows then hold only what follows, with positions continuing after the prefix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from leantune.errors import UserError
from leantune.evaluation.items import ChoiceItem, ResponseItem

Framing = Literal["chat_template", "human_assistant"]


def resolve_framing(framing: str, tokenizer) -> Framing:
    """eval.framing as used: 'auto' is the chat template when the tokenizer has one."""
    if framing == "auto":
        return "chat_template" if tokenizer.chat_template else "human_assistant"
    if framing == "chat_template" and not tokenizer.chat_template:
        raise UserError("eval.framing: 'chat_template' but the tokenizer has no chat template; use "
                        "eval.framing=human_assistant (or auto)")
    return framing  # type: ignore[return-value]


def render_prompt(tokenizer, framing: Framing, turns: Sequence[tuple[str, str]], assistant_prefix: str) -> str:
    """The text before the assistant's answer: the conversation `turns` ((role, content), ending with
    a user turn) and the start of the assistant's turn."""
    if framing == "chat_template":
        messages = [{"role": role, "content": content} for role, content in turns]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text + assistant_prefix
    names = {"user": "Human", "assistant": "Assistant"}
    text = "".join(f"\n\n{names[role]}: {content}" for role, content in turns) + "\n\nAssistant:"
    return text + (" " + assistant_prefix if assistant_prefix else "")


def bos_ids(tokenizer, framing: Framing) -> list[int]:
    """Ids put before the tokens of a rendered prompt: BOS for the plain-text framing (when the
    tokenizer has one); chat templates write their own special tokens."""
    if framing == "human_assistant" and tokenizer.bos_token_id is not None:
        return [int(tokenizer.bos_token_id)]
    return []


@dataclass(frozen=True)
class EncodedItem:
    prompt_ids: list[int]
    option_ids: list[list[int]]  # option 0 matches the behaviour
    boundary_retokenized: bool = False


def encode_items(tokenizer, framing: Framing, items: Sequence[ChoiceItem | ResponseItem]) -> list[EncodedItem]:
    """Token ids of each item's prompt and answers (see the module docstring for the rules)."""
    prompts, answers = [], []
    for item in items:
        prompt = render_prompt(tokenizer, framing, [*item.earlier_turns, ("user", item.question)], item.assistant_prefix)
        options = list(item.options)
        if framing == "human_assistant":
            options = [o if o[:1].isspace() or prompt[-1:].isspace() else " " + o for o in options]
        stripped = prompt.rstrip(" ")
        moved = prompt[len(stripped):]
        prompts.append(stripped)
        answers.append([moved + o for o in options])
    wholes = [p + a for p, opts in zip(prompts, answers, strict=True) for a in opts]
    prompt_ids = _tokenize(tokenizer, prompts)
    whole_ids = iter(_tokenize(tokenizer, wholes))
    encoded = []
    for ids, opts in zip(prompt_ids, answers, strict=True):
        option_ids, retokenized = [], False
        for answer in opts:
            whole = next(whole_ids)
            if whole[:len(ids)] == ids and len(whole) > len(ids):
                option_ids.append(whole[len(ids):])
            else:
                option_ids.append(_tokenize(tokenizer, [answer])[0])
                retokenized = True
        encoded.append(EncodedItem(bos_ids(tokenizer, framing) + ids, option_ids, retokenized))
    return encoded


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    # The rendered text holds every special token it needs (BOS is added separately).
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]


# ---------------------------------------------------------------------------------------- scoring


def score_encoded(model, encoded: Sequence[EncodedItem], batch_size: int, pad_id: int, device,
                  autocast, mask_dtype, label: str = "scoring") -> list[list[float]]:
    """Log-likelihood of every answer of every item, in item order (see the module docstring); a long
    scoring logs its progress under `label` (leantune.progress.StageProgress)."""
    import torch

    from leantune.progress import StageProgress

    # Longest prompts first: batches of similar lengths pad less, and a batch too big for memory
    # fails at the start; equal lengths in token order, so items that share a prefix meet in a batch.
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i].prompt_ids), encoded[i].prompt_ids))
    scores: list[list[float]] = [[] for _ in encoded]
    with torch.inference_mode():
        shared = PrefixCache(model, device, autocast, [e.prompt_ids for e in encoded])
        progress = StageProgress(label, len(encoded))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = [encoded[i] for i in idx]
            prefix = shared.for_batch([e.prompt_ids for e in batch])
            for i, s in zip(idx, _score_batch(model, batch, prefix, pad_id, device, autocast, mask_dtype),
                            strict=True):
                scores[i] = s
            progress.update(len(idx))
    return scores


def common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix all `prompts` share, short of the shortest prompt's last token (the
    last prompt token predicts the answers' first tokens, so every item keeps one of its own)."""
    first = prompts[0]
    n = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        n = next((j for j in range(n) if p[j] != first[j]), n)
    return max(n, 0)


class PrefixCache:
    """The key/value cache of the prefix common to all `prompts` of a call (chat template, system
    prompt, a shared opening), computed once; `for_batch` extends it to a batch's own common prefix."""

    def __init__(self, model, device, autocast, prompts: Sequence[Sequence[int]]):
        self.model, self.device, self.autocast = model, device, autocast
        self.ids: list[int] = []
        self.layers: list[tuple] = []
        n = common_prefix(prompts) if prompts else 0
        if n:
            self.layers, self.ids = self._extend(list(prompts[0][:n])), list(prompts[0][:n])

    def _extend(self, ids: list[int]) -> list[tuple]:
        import torch
        from transformers import DynamicCache

        # A plain DynamicCache keeps every position (no sliding-window layers), as the 4D mask does.
        cache = DynamicCache(ddp_cache_data=self.layers) if self.layers else DynamicCache()
        with self.autocast:
            self.model(input_ids=torch.tensor([ids[len(self.ids):]], device=self.device),
                       position_ids=torch.arange(len(self.ids), len(ids), device=self.device)[None],
                       **{cache_kwarg(): cache}, use_cache=True, logits_to_keep=1)
        return [(layer.keys, layer.values) for layer in cache.layers]

    def for_batch(self, prompts: Sequence[Sequence[int]]) -> tuple[int, list[tuple]]:
        """(prefix length, per-layer (keys, values) of one row) for prompts that all start with the
        shared prefix."""
        n = common_prefix(prompts)
        if n <= len(self.ids):
            return len(self.ids), self.layers
        return n, self._extend(list(prompts[0][:n]))


def cache_kwarg() -> str:
    """The forward argument of a key/value cache: transformers renamed past_key_values to cache
    (the old name warns from 5.24 and goes in 5.40)."""
    import inspect

    from transformers import masking_utils

    return "cache" if "cache" in inspect.signature(masking_utils.create_causal_mask).parameters else "past_key_values"


def _score_batch(model, batch: list[EncodedItem], prefix: tuple[int, list[tuple]], pad_id: int, device, autocast,
                 mask_dtype) -> list[list[float]]:
    import torch
    from transformers import DynamicCache

    shared, layers = prefix
    rows = len(batch)
    prompt_width = max(len(e.prompt_ids) for e in batch) - shared
    slots = max(len(e.option_ids) for e in batch)
    slot_width = [max((len(e.option_ids[k]) for e in batch if k < len(e.option_ids)), default=0)
                  for k in range(slots)]
    slot_start = [prompt_width + sum(slot_width[:k]) for k in range(slots)]
    width = prompt_width + sum(slot_width)

    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    positions = torch.zeros((rows, width), dtype=torch.long)
    # Region of each column: -1 padding, 0 prompt, k + 1 answer k.
    region = torch.full((rows, width), -1, dtype=torch.long)
    for r, e in enumerate(batch):
        p = len(e.prompt_ids)
        own = p - shared
        input_ids[r, prompt_width - own:prompt_width] = torch.tensor(e.prompt_ids[shared:])
        positions[r, prompt_width - own:prompt_width] = torch.arange(shared, p)
        region[r, prompt_width - own:prompt_width] = 0
        for k, ids in enumerate(e.option_ids):
            s = slot_start[k]
            input_ids[r, s:s + len(ids)] = torch.tensor(ids)
            positions[r, s:s + len(ids)] = torch.arange(p, p + len(ids))
            region[r, s:s + len(ids)] = k + 1

    real = region >= 0
    q_region, k_region = region[:, :, None], region[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal & real[:, :, None] & real[:, None, :] & ((k_region == 0) | (k_region == q_region))
    allowed |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no empty mask row
    # Every column attends to the cached shared prefix.
    allowed = torch.cat([torch.ones((rows, width, shared), dtype=torch.bool), allowed], dim=2)
    mask = torch.zeros((rows, 1, width, shared + width), dtype=mask_dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(mask_dtype).min)
    cache = DynamicCache(ddp_cache_data=[(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1))
                                         for k, v in layers]) if shared else None

    # Columns whose logits predict answer tokens: the last prompt column predicts every answer's
    # first token; an answer's column j - 1 predicts its token j.
    keep = [prompt_width - 1]
    predictor, target_col, target_slot = [], [], []
    for k in range(slots):
        for j in range(slot_width[k]):
            if j == 0:
                predictor.append(0)
            else:
                keep.append(slot_start[k] + j - 1)
                predictor.append(len(keep) - 1)
            target_col.append(slot_start[k] + j)
            target_slot.append(k)

    with autocast:
        logits = model(
            input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
            logits_to_keep=torch.tensor(keep, device=device), **{cache_kwarg(): cache}, use_cache=cache is not None,
        ).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (rows, kept columns, vocab)
    target_col_t = torch.tensor(target_col)
    targets = input_ids[:, target_col_t].to(device)
    token_lp = logprobs[:, torch.tensor(predictor, device=device)].gather(-1, targets[..., None])[..., 0]
    token_lp = token_lp * real[:, target_col_t].to(device)  # padding inside a slot scores nothing
    per_slot = torch.zeros((rows, slots), dtype=torch.float64, device=device)
    per_slot.index_add_(1, torch.tensor(target_slot, device=device), token_lp.double())
    per_slot = per_slot.cpu()
    return [[float(per_slot[r, k]) for k in range(len(e.option_ids))] for r, e in enumerate(batch)]


# -------------------------------------------------------------------------------------- summaries


def nll_outcomes(items: Sequence[ResponseItem], scores: Sequence[Sequence[float]],
                 encoded: Sequence[EncodedItem]) -> list[dict]:
    """Per item of an "nll" set: its response's tokens and negative log-likelihood per token."""
    return [{"id": item.id, "subset": item.subset, "tokens": len(enc.option_ids[0]),
             "nll": -lp[0] / len(enc.option_ids[0]), "boundary_retokenized": enc.boundary_retokenized}
            for item, lp, enc in zip(items, scores, encoded, strict=True)]


def choice_outcomes(items: Sequence[ChoiceItem], scores: Sequence[Sequence[float]],
                    encoded: Sequence[EncodedItem]) -> list[dict]:
    """Per item: the answers' log-likelihoods, whether the matching answer wins, its probability
    among the answers (softmax of the log-likelihoods)."""
    out = []
    for item, lp, enc in zip(items, scores, encoded, strict=True):
        top = max(lp)
        p_matching = math.exp(lp[0] - top) / sum(math.exp(x - top) for x in lp)
        out.append({"id": item.id, "subset": item.subset, "logprobs": [round(x, 6) for x in lp],
                    "sycophantic": lp[0] > max(lp[1:]), "p_matching": p_matching,
                    "boundary_retokenized": enc.boundary_retokenized})
    return out


