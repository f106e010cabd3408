"""Preference pairs (train.objective dpo or simpo): the canonical pair record, its formats, the features
the pair suite checks, and tokenization with the prompt stored once.

Canonical pair record (records.jsonl, train.jsonl, val.jsonl):
    {"id", "prompt": [messages], "chosen": [one assistant message], "rejected": [one assistant message], "source"}
The prompt is an optional system message, then user and assistant alternating, ending with a user turn.
The id is the sha256 of [prompt, chosen, rejected] (`normalize.record_id`), so a repeated pair (same
prompt, same chosen, same rejected) is a duplicate; the same prompt with another pair is not.

Input formats (detected like the conversation formats, leantune/data/formats.py):
- ``prompt_chosen_rejected`` (TRL's explicit prompt): ``prompt`` a string (one user message) or a list
  of messages; ``chosen`` and ``rejected`` a string (one assistant message) or a list of messages: one
  assistant message, or (UltraFeedback-binarized style) the prompt's messages followed by one.
- ``instruction_chosen_rejected`` (LLaMA-Factory's alpaca-style ranking data): the prompt is ``instruction``
  and ``input`` as in the alpaca format, after an optional ``system``; ``chosen`` and ``rejected`` strings.
- ``sharegpt_chosen_rejected`` (LLaMA-Factory's sharegpt-style ranking data): the prompt is
  ``conversations`` (sharegpt turns ending with the human's), after an optional ``system``; ``chosen`` and
  ``rejected`` one ``{"from": "gpt", "value": ...}`` message each.
- ``chosen_rejected`` (implicit prompt): ``chosen`` and ``rejected`` are whole conversations sharing a
  prompt: Anthropic HH texts ("\\n\\nHuman: ...\\n\\nAssistant: ...") or message lists. All but their last
  message must be equal (the shared prompt); the last message of each is the assistant's answer.
A row that breaks a rule raises `RowError` (codes as formats.py's, plus ``no_shared_prompt``).

Token shards of pairs (tokens/train/, index.json's "pairs": true): one sequence per pair, three
documents: the prompt's tokens, then the chosen answer's, then the rejected answer's. The prompt is
stored once; the training loop rebuilds the two rows prompt+chosen and prompt+rejected
(training/preference.py). Only answer tokens are targets (the chat template's assistant span, as
tokenize.train_on=last_assistant marks it). A row over tokenize.max_seq_len loses the start of its
prompt first (its end, next to the answers, is kept), then the ends of the answers; index.json counts
the pairs truncated and the prompt and answer tokens cut, or drops them with tokenize.overlong=drop.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from leantune.data.formats import _SHAREGPT_ROLES, RowError, _check_order, _text, _turns, type_name
from leantune.data.normalize import is_blank, record_id

if TYPE_CHECKING:

    pass

_ROLES = {r: r for r in ("system", "user", "assistant")}
_HH_TURN = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def to_pair(row, fmt: str) -> dict:
    """One parsed row of a preference format -> {"prompt", "chosen", "rejected"}, normalised and checked."""
    if not isinstance(row, dict):
        raise RowError("not_an_object", f"expected a JSON object, got {type_name(row)}")
    if fmt in ("prompt_chosen_rejected", "instruction_chosen_rejected", "sharegpt_chosen_rejected"):
        prompt = _prompt(row, fmt)
        chosen, rejected = (_answer(row, key, prompt) for key in ("chosen", "rejected"))
    elif fmt == "chosen_rejected":
        chosen, rejected = (_messages(row, key, "assistant") for key in ("chosen", "rejected"))
        if chosen[:-1] != rejected[:-1] or len(chosen) < 2:
            raise RowError("no_shared_prompt", "'chosen' and 'rejected' must be conversations that differ only in "
                                               "their last message (the answers to a shared prompt)")
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    else:
        raise RowError("not_a_pair", f"rows of format '{fmt}' have no chosen/rejected pair, which train.objective "
                                     "dpo and simpo train on; give preference pairs or set train.objective=sft")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        _check_order([m["role"] for m in prompt + answer])
        if len(answer) != 1:
            raise RowError("bad_structure", f"'{name}' must be one assistant message after the prompt, got "
                                            f"{len(answer)} messages")
    for i, m in enumerate(prompt + chosen + rejected):
        if is_blank(m["content"]):
            where = f"prompt message {i}" if i < len(prompt) else ("chosen", "rejected")[i - len(prompt)]
            raise RowError("empty_content", f"{where} ({m['role']}) is empty after normalisation")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _prompt(row: dict, fmt: str) -> list[dict]:
    if fmt == "prompt_chosen_rejected":
        prompt = _messages(row, "prompt", "user")
        if len(prompt) > 1 and prompt[-1]["role"] == "assistant" and is_blank(prompt[-1]["content"]):
            prompt = prompt[:-1]  # an HH prompt text ending in "Assistant:", the answer's header
        return prompt
    if fmt == "instruction_chosen_rejected":
        user = "\n\n".join(part for part in (_text(row, "instruction"), _text(row, "input", required=False)) if part)
        prompt = [{"role": "user", "content": user}]
    else:
        prompt = [{"role": r, "content": c} for r, c in _turns(row, "conversations", "from", "value", _SHAREGPT_ROLES)]
    system = _text(row, "system", required=False)
    return [{"role": "system", "content": system}, *prompt] if system else prompt


def _messages(row: dict, key: str, role_of_text: str) -> list[dict]:
    """row[key] as messages: a message list or one message ({"role", "content"}, or sharegpt's {"from",
    "value"}), or a string (an HH transcript, else one `role_of_text` message)."""
    value = row.get(key)
    if isinstance(value, dict):
        sharegpt = "from" in value
        turns = _turns({key: [value]}, key, *(("from", "value", _SHAREGPT_ROLES) if sharegpt else
                                               ("role", "content", _ROLES)))
        return [{"role": r, "content": c} for r, c in turns]
    if isinstance(value, str):
        parts = _HH_TURN.split(value)
        if len(parts) > 1 and not parts[0].strip():
            turns = [(_HH_ROLES[role], text) for role, text in zip(parts[1::2], parts[2::2], strict=True)]
            return [{"role": r, "content": _text({key: t}, key)} for r, t in turns]
        return [{"role": role_of_text, "content": _text(row, key)}]
    return [{"role": r, "content": c} for r, c in _turns(row, key, "role", "content", _ROLES)]


def _answer(row: dict, key: str, prompt: list[dict]) -> list[dict]:
    answer = _messages(row, key, "assistant")
    # UltraFeedback-binarized repeats the prompt's messages before the answer.
    return answer[len(prompt):] if len(answer) > 1 and answer[:len(prompt)] == prompt else answer


def pair_id(pair: dict) -> str:
    return record_id([pair["prompt"], pair["chosen"], pair["rejected"]])


def pair_messages(record: dict) -> list:
    """The messages of a pair record (prompt, then chosen, then rejected), for texts and excerpts;
    whatever is not a list is left out (validation reads malformed records too)."""
    return [m for key in ("prompt", "chosen", "rejected") if isinstance(record.get(key), list) for m in record[key]]
