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

import json
import re
from array import array
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from leantune.data.formats import _SHAREGPT_ROLES, RowError, _check_order, _text, _turns, type_name
from leantune.data.normalize import is_blank, record_id

if TYPE_CHECKING:
    import pandas

    from leantune.config import RunConfig

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


# ------------------------------------------------------------------------------------- features


def pair_features(records: list[dict], seen_ids: set[int]) -> pandas.DataFrame:
    """One row of features per pair record, the frame expectations/pairs.json checks (as
    validation.record_features is for conversations; `seen_ids` is updated the same way)."""
    import pandas as pd

    from leantune.validation import id_features

    rows = []
    for record in records:
        record_id_, source, seen_before = id_features(record, seen_ids)
        parts, malformed = {}, 0
        for name in ("prompt", "chosen", "rejected"):
            value = record.get(name)
            if not isinstance(value, list):
                malformed, value = malformed + 1, []
            messages = []
            for m in value:
                role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
                if not (isinstance(role, str) and isinstance(content, str)):
                    malformed += 1
                messages.append((str(role), content if isinstance(content, str) else ""))
            parts[name] = messages
        prompt_roles = [r for r, _ in parts["prompt"]]
        turns = prompt_roles[1:] if prompt_roles[:1] == ["system"] else prompt_roles
        contents = [c for name in parts for _, c in parts[name]]
        lengths = [len(c) for c in contents]
        rows.append({
            "id": record_id_,
            "source": source,
            "id_seen_before": seen_before,
            "malformed_messages": malformed,
            "n_messages": len(parts["prompt"]) + 1,
            "roles": ",".join(r for name in parts for r, _ in parts[name]) or None,
            "prompt_last_role": prompt_roles[-1] if prompt_roles else None,
            "prompt_roles_alternate": all(r == ("user", "assistant")[i % 2] for i, r in enumerate(turns)),
            "chosen_roles": ",".join(r for r, _ in parts["chosen"]),
            "rejected_roles": ",".join(r for r, _ in parts["rejected"]),
            "chosen_equals_rejected": [c for _, c in parts["chosen"]] == [c for _, c in parts["rejected"]],
            "min_content_chars": min(lengths) if lengths else None,
            "max_content_chars": max(lengths) if lengths else None,
            "blank_turns": sum(1 for c in contents if not c.strip()),
        })
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------- tokenization


def encode_pairs(tokenizer, records: list[dict], special: str = "plain") -> list:
    """Each pair record -> (prompt ids, (chosen ids, chosen mask), (rejected ids, rejected mask)), or the
    EncodeFailure of either conversation. The prompt is the two renderings' common token prefix, up to the
    first target token; the rest of each is its answer (the template's assistant header included, not a target)."""
    from leantune.tokenization import EncodeFailure, encode_batch

    conversations = [r["prompt"] + r[side] for r in records for side in ("chosen", "rejected")]
    encoded = encode_batch(tokenizer, conversations, "last_assistant", special)
    results = []
    for (c_ids, c_mask), (r_ids, r_mask) in zip(encoded[0::2], encoded[1::2], strict=True):
        failure = next((e for e in ((c_ids, c_mask), (r_ids, r_mask)) if isinstance(e, EncodeFailure)), None)
        if failure is not None:
            results.append(failure)
            continue
        limit = min(_first_target(c_mask), _first_target(r_mask), len(c_ids), len(r_ids))
        p = next((k for k in range(limit) if c_ids[k] != r_ids[k]), limit)
        results.append((c_ids[:p], (c_ids[p:], c_mask[p:]), (r_ids[p:], r_mask[p:])))
    return results


def _first_target(mask: list[int]) -> int:
    return next((k for k, m in enumerate(mask) if m), len(mask))


def truncate_pair(prompt: list[int], answers: list[tuple[list[int], list[int]]], max_len: int):
    """Fit prompt + each answer into max_len: cut the prompt's start first (at least one token stays,
    the one the first answer token is predicted from), then each answer's end.
    Returns (prompt, answers, prompt tokens cut, answer tokens cut)."""
    longest = max(len(ids) for ids, _ in answers)
    cut_prompt = min(max(0, len(prompt) + longest - max_len), max(0, len(prompt) - 1))
    prompt = prompt[cut_prompt:]
    room = max_len - len(prompt)
    cut_answers = sum(max(0, len(ids) - room) for ids, _ in answers)
    return prompt, [(ids[:room], mask[:room]) for ids, mask in answers], cut_prompt, cut_answers


def tokenize_pairs(cfg: RunConfig, tokenizer, records_path: Path, out_dir: Path) -> dict:
    """Stream pair records into token shards in `out_dir` (one sequence of three documents per pair);
    return the index.json summary, with tokenize_records' keys plus "pairs": true and the tokens cut.

    Every record read is counted once: written (possibly truncated), dropped_overlong, no_trainable (an
    answer with no target token left), template_error, template_unstable or special_token_text.
    """
    from leantune.jsonl import chunks, iter_jsonl
    from leantune.progress import progress_bar
    from leantune.rundir import SPLIT_INDEX, SPLIT_LENGTHS
    from leantune.tokenization import (
        FORMAT_VERSION,
        MAX_FAILURE_EXAMPLES,
        REFERENCE_LOGPS,
        EncodeFailure,
        _ShardWriter,
        micro_batches,
        pad_id,
        padding_fraction,
        tokenizer_fingerprint,
        tokenizer_source,
        training_batches,
        vocab_size,
    )

    t = cfg.tokenize
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The reference log-probabilities of the pairs of an earlier tokenization go with its shards.
    for stale in [*out_dir.glob("shard-*.npy"), out_dir / REFERENCE_LOGPS]:
        stale.unlink(missing_ok=True)
    vocab = vocab_size(tokenizer)
    dtype = np.uint16 if vocab < 65536 else np.uint32
    # A pair's sequence holds the prompt once and both answers: at most twice max_seq_len tokens.
    writer = _ShardWriter(out_dir, dtype, t.shard_tokens, 2 * t.max_seq_len)
    counts = dict.fromkeys(("records_read", "records_written", "truncated", "dropped_overlong", "no_trainable",
                            "template_error", "template_unstable", "special_token_text", "prompt_tokens_cut",
                            "answer_tokens_cut"), 0)
    examples: dict[str, list[dict]] = {"template_error": [], "template_unstable": [], "special_token_text": []}
    lengths = array("i")  # per pair: its longer row, prompt + answer, before truncation
    total_tokens = trainable_tokens = 0
    bar = progress_bar(f"tokenize {out_dir.name}", "pair")
    for chunk in chunks(iter_jsonl(records_path), cfg.data.chunk_size):
        for record, result in zip(chunk, encode_pairs(tokenizer, chunk, t.special_token_text), strict=True):
            ordinal = counts["records_read"]
            counts["records_read"] += 1
            if isinstance(result, EncodeFailure):
                counts[result.kind] += 1
                if len(examples[result.kind]) < MAX_FAILURE_EXAMPLES:
                    examples[result.kind].append({"record": ordinal, "id": record.get("id"), "reason": result.reason})
                continue
            prompt, *answers = result
            longest = len(prompt) + max(len(ids) for ids, _ in answers)
            lengths.append(longest)
            if longest > t.max_seq_len:
                if t.overlong == "drop":
                    counts["dropped_overlong"] += 1
                    continue
                prompt, answers, cut_prompt, cut_answers = truncate_pair(prompt, answers, t.max_seq_len)
                counts["truncated"] += 1
                counts["prompt_tokens_cut"] += cut_prompt
                counts["answer_tokens_cut"] += cut_answers
            if not all(sum(mask) for _, mask in answers):
                counts["no_trainable"] += 1
                continue
            counts["records_written"] += 1
            docs = [(ordinal, prompt, [0] * len(prompt)), *((ordinal, ids, mask) for ids, mask in answers)]
            total_tokens += sum(len(ids) for _, ids, _ in docs)
            trainable_tokens += sum(sum(mask) for _, mask in answers)
            writer.add(docs)
        bar.update(len(chunk))
    bar.close()
    index = writer.close()
    np.save(out_dir / SPLIT_LENGTHS, np.frombuffer(lengths, dtype=np.int32))
    seq_lengths = index[:, 2]
    batches = training_batches(seq_lengths, cfg.train.global_batch_size, cfg.train.seed, cfg.train.group_by_length)
    # The rows training runs: prompt + chosen and prompt + rejected of each pair of a micro-batch.
    docs = np.load(out_dir / "docs.npy")[:, 1].reshape(-1, 3)
    rows = np.concatenate([docs[:, 0] + docs[:, 1], docs[:, 0] + docs[:, 2]])
    row_batches = [np.concatenate([b, b + len(docs)]) for b in micro_batches(batches, cfg.train.micro_batch_size)]
    summary = {
        "format_version": FORMAT_VERSION,
        "pairs": True,
        "tokenizer": {"name": tokenizer_source(cfg), "hash": tokenizer_fingerprint(tokenizer),
                      "vocab_size": vocab, "pad_id": pad_id(tokenizer)},
        "config_hash": cfg.section_hash("tokenize"),
        "dtype": np.dtype(dtype).name,
        "max_seq_len": t.max_seq_len,
        "packing": False,
        "train_on": "last_assistant",
        "overlong": t.overlong,
        "counts": {**counts, "sequences": len(seq_lengths), "documents": int(index[:, 4].sum()),
                   "shards": len(writer.shards)},
        "tokens": {"total": total_tokens, "trainable": trainable_tokens,
                   "padding_fraction": padding_fraction(rows, row_batches)},
        "shards": writer.shards,
        "failure_examples": examples,
    }
    (out_dir / SPLIT_INDEX).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary

