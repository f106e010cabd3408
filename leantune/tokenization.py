"""Streaming tokenization, the tokenize stage: chat template, label masking, packing, the token shard writer.

Pipeline: canonical records (`data/train.jsonl`, `data/val.jsonl`) stream in chunks through the
tokenizer's chat template; each record becomes `input_ids` plus a `trainable` mask; records are
truncated or dropped at `tokenize.max_seq_len`, optionally packed (best fit) into sequences of
`max_seq_len`, and appended to memory-mappable shards. Memory stays flat: at most one chunk of
records and one packing window are held at a time (shards are written as sequences come; what grows
is the index, 56 bytes a sequence, and 4 bytes a record of lengths).

Label masking works for any chat template. The conversation is rendered in full, and for each
assistant turn k two prefixes are rendered: `messages[:k]` with the generation prompt (where the
assistant's answer starts) and `messages[:k+1]` (where it ends). Both must be string prefixes of
the full rendering; records whose template is not prefix-stable (e.g. templates that rewrite
earlier turns) are counted as `template_unstable` and not written, never given a guessed mask.
The full text is tokenized once and a token is trainable when its characters overlap a
trainable span: for train_on="assistant" each assistant answer and the end-of-turn text the
template adds after it (not the role header); "last_assistant" the last such span; "all" every
token. The first token of a record is never trainable: nothing precedes it to predict it from,
and in a packed sequence it must not be learned as a continuation of the previous document.

The files written, and what packed documents mean to attention, are the token-shard format of
leantune/shards.py, which training reads. No batch, seed or optimizer setting is read here, so the
stage and its stage-cache key depend only on the records (conversations, or pairs under train.objective
dpo/simpo), the tokenizer and the `tokenize` section; the padding that training's micro-batches will
have is `shards.padding_estimate`, computed on the training side from the train settings.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from array import array
from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from leantune.config import RunConfig
from leantune.data.preference import pair_messages
from leantune.data.quality import length_summary
from leantune.errors import DataError, UserError
from leantune.gguf import model_source
from leantune.jsonl import chunks, iter_jsonl
from leantune.progress import progress_bar
from leantune.rundir import SPLIT_INDEX, SPLIT_LENGTHS, DataDir, TokenDir
from leantune.shards import FORMAT_VERSION, REFERENCE_LOGPS

MAX_FAILURE_EXAMPLES = 5
# The scratch tokenizer learns its merges from at most about this much of the training file.
SCRATCH_SAMPLE_BYTES = 8 << 20

SCRATCH_PAD, SCRATCH_BOS, IM_START, IM_END = "<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>"
# ChatML; <|im_end|> is the end-of-turn token and therefore the eos that generation stops at.
CHATML_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TrainOn = Literal["assistant", "last_assistant", "all"]
SpecialText = Literal["plain", "reject"]


# ------------------------------------------------------------------------------------ tokenizer


def tokenizer_source(cfg: RunConfig) -> str:
    """Where the tokenizer comes from: a hub id or local path, or 'scratch' (trained on the data)."""
    if cfg.tokenize.tokenizer:
        return cfg.tokenize.tokenizer
    return cfg.model.name_or_path


def load_tokenizer(cfg: RunConfig, train_path: Path, out_dir: Path):
    """Load (hub id / local path) or train ('scratch') the tokenizer and save it to `out_dir`.

    Later stages and PEFT users load it back with `AutoTokenizer.from_pretrained(out_dir)`;
    the returned tokenizer is that reloaded copy, so every stage sees the same object.
    """
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    source = tokenizer_source(cfg)
    # The directory belongs to this stage; clear it so no file of an earlier tokenizer survives.
    if out_dir.exists():
        shutil.rmtree(out_dir)
    if source == "scratch":
        _train_scratch_tokenizer(cfg, Path(train_path), out_dir)
    else:
        # The model's revision names a commit of the model repo; it only applies to a tokenizer
        # read from that same repo.
        revision = cfg.model.revision if source == cfg.model.name_or_path else None
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                model_source(cfg.model) if source == cfg.model.name_or_path else source, revision=revision,
                trust_remote_code=cfg.model.trust_remote_code,
            )
        except (OSError, ValueError) as e:
            raise UserError(
                f"tokenize.tokenizer / model.name_or_path: cannot load a tokenizer from '{source}' ({e}); "
                "give a hub id that is reachable from here or a local directory with tokenizer files"
            ) from None
        if not tokenizer.chat_template:
            raise UserError(
                f"tokenize.tokenizer: the tokenizer of '{source}' has no chat template, so conversations "
                "cannot be formatted; use a chat/instruct variant (e.g. '...-Instruct'), set "
                "tokenize.tokenizer to one that has a template, or add 'chat_template' to its "
                "tokenizer_config.json"
            )
        if not tokenizer.is_fast:
            raise UserError(
                f"tokenize.tokenizer: the tokenizer of '{source}' is a slow (Python) tokenizer without "
                "character offsets, which label masking needs; use one that ships a tokenizer.json"
            )
        tokenizer.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def _scratch_training_texts(train_path: Path) -> Iterator[str]:
    """Role and content as the template lays them out between its special tokens, in file order (the
    order makes training deterministic). From a file bigger than SCRATCH_SAMPLE_BYTES only every k-th
    record, k = ceil(size / SCRATCH_SAMPLE_BYTES): the BPE trainer holds every distinct word it sees,
    so its memory would grow with the records (ids, numbers, names are new words)."""
    stride = -(-train_path.stat().st_size // SCRATCH_SAMPLE_BYTES)
    for i, record in enumerate(iter_jsonl(train_path)):
        if i % stride:
            continue
        # A preference pair (data/preference.py): its prompt and both answers.
        for message in record["messages"] if "messages" in record else pair_messages(record):
            yield f"{message['role']}\n{message['content']}"


def _train_scratch_tokenizer(cfg: RunConfig, train_path: Path, out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not train_path.is_file():
        raise DataError(f"{train_path}: not found; the scratch tokenizer is trained on it, run the "
                        "validation stage first")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.tokenize.vocab_size,
        special_tokens=[SCRATCH_PAD, SCRATCH_BOS, IM_START, IM_END],
        # All 256 bytes, so any text (any script, emoji) stays encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_scratch_training_texts(train_path), trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=SCRATCH_BOS,
        eos_token=IM_END,
        pad_token=SCRATCH_PAD,
        chat_template=CHATML_TEMPLATE,
    )
    wrapped.save_pretrained(out_dir)


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary, merges, special tokens and chat template."""
    blob = tokenizer.backend_tokenizer.to_str() + "\0" + (tokenizer.chat_template or "")
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def vocab_size(tokenizer) -> int:
    """One past the largest token id (added tokens included), which is what shards must hold."""
    return max(tokenizer.get_vocab().values()) + 1


def pad_id(tokenizer) -> int:
    # Padded positions are masked out of attention and loss, so any id works when there is no pad.
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


# ------------------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class EncodeFailure:
    """Why a record could not be encoded: its template raised, or is not prefix-stable."""

    kind: Literal["template_error", "template_unstable", "special_token_text"]
    reason: str


def _render(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool) -> list[str | EncodeFailure]:
    if not conversations:
        return []
    try:
        return tokenizer.apply_chat_template(
            conversations, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception:
        # The template is code from the model's authors and may raise for one record (e.g. a
        # role it does not support); that fails the whole batch, so render one by one to count it.
        rendered: list[str | EncodeFailure] = []
        for conversation in conversations:
            try:
                rendered.append(tokenizer.apply_chat_template(
                    [conversation], tokenize=False, add_generation_prompt=add_generation_prompt)[0])
            except Exception as e:
                rendered.append(EncodeFailure("template_error", f"{type(e).__name__}: {e}"))
        return rendered


def _trainable_turns(messages: list[dict], train_on: TrainOn) -> list[int]:
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    return turns[-1:] if train_on == "last_assistant" else turns


def special_token_texts(tokenizer) -> dict[str, int]:
    """{text: id} of the tokenizer's special tokens: the control tokens a chat template writes
    (<|im_start|>, <|im_end|>, <|endoftext|>...), which text in the data must never turn into."""
    texts = {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for text in tokenizer.all_special_tokens:
        texts.setdefault(text, tokenizer.convert_tokens_to_ids(text))
    return texts


def _special_text_spans(tokenizer, conversations: list[list[dict]], full: list, special: SpecialText,
                        spans: list) -> dict[int, list[tuple[int, int]]]:
    """The character spans, in each rendered conversation, of the contents that hold special-token text.

    With special='reject' such a record's entry in `spans` becomes an EncodeFailure instead. A content
    the template did not copy verbatim is looked for in vain: that record fails too, as the special
    token text could not be kept plain."""
    texts = special_token_texts(tokenizer)
    if not texts:
        return {}
    pattern = re.compile("|".join(map(re.escape, sorted(texts, key=len, reverse=True))))
    found: dict[int, list[tuple[int, int]]] = {}
    for i, messages in enumerate(conversations):
        if isinstance(spans[i], EncodeFailure) or not any(pattern.search(m["content"]) for m in messages):
            continue
        pos, where = 0, []
        for k, m in enumerate(messages):
            hit = match.group() if (match := pattern.search(m["content"])) else None
            at = full[i].find(m["content"], pos) if m["content"] else -1
            if at >= 0:
                pos = at + len(m["content"])
            if hit is None:
                continue
            if special == "reject" or at < 0:
                spans[i] = EncodeFailure("special_token_text", (
                    f"message {k} ({m['role']}) holds the text of the special token {hit!r}, which would become "
                    "that control token (a forged turn boundary)" + (
                        "; set tokenize.special_token_text='plain' to train on it as plain text" if at >= 0 else
                        "; the chat template does not copy the content verbatim, so it cannot be kept plain")))
                break
            where.append((at, pos))
        else:
            if where:
                found[i] = where
    return found


def _as_plain_text(tokenizer, text: str, ids: list[int], offsets: list, protect: list[tuple[int, int]]):
    """`ids`/`offsets` of `text` with each special token inside a `protect` span re-encoded as plain text."""
    special_ids = set(special_token_texts(tokenizer).values())
    out_ids, out_offsets = [], []
    for token, (s, e) in zip(ids, offsets, strict=True):
        if token in special_ids and any(a <= s and e <= b for a, b in protect):
            plain = tokenizer(text[s:e], add_special_tokens=False, split_special_tokens=True,
                              return_offsets_mapping=True, return_attention_mask=False)
            out_ids += plain["input_ids"]
            out_offsets += [(s + ps, s + pe) for ps, pe in plain["offset_mapping"]]
        else:
            out_ids.append(token)
            out_offsets.append((s, e))
    return out_ids, out_offsets


def encode_batch(
    tokenizer, conversations: list[list[dict]], train_on: TrainOn, special: SpecialText = "plain"
) -> list[tuple[list[int], list[int]] | EncodeFailure]:
    """Encode conversations with the chat template: (input_ids, trainable mask) or a failure each.

    Renders are batched per call (prefixes of all records at once) and the texts tokenized in one
    batch, which is what makes this fast; see the module docstring for the masking rule. Text of a
    special token inside a message (e.g. "<|im_end|>") stays plain text (`special`='plain') or fails
    the record as special_token_text ('reject'); only the template's own special tokens are control tokens.
    """
    full = _render(tokenizer, conversations, add_generation_prompt=False)
    spans: list[list[tuple[int, int]] | EncodeFailure] = []
    requests: list[tuple[int, int]] = []  # (record, assistant turn) pairs that need prefix renders
    for i, messages in enumerate(conversations):
        if isinstance(full[i], EncodeFailure):
            spans.append(full[i])
        elif train_on == "all":
            spans.append([(0, len(full[i]))])
        else:
            spans.append([])
            requests += [(i, k) for k in _trainable_turns(messages, train_on)]
    starts = _render(tokenizer, [conversations[i][:k] for i, k in requests], add_generation_prompt=True)
    inner = [(i, k) for i, k in requests if k + 1 < len(conversations[i])]
    inner_rendered = _render(tokenizer, [conversations[i][:k + 1] for i, k in inner], add_generation_prompt=False)
    inner_ends = dict(zip(inner, inner_rendered, strict=True))
    for (i, k), start in zip(requests, starts, strict=True):
        if isinstance(spans[i], EncodeFailure):
            continue
        end = inner_ends.get((i, k), full[i])
        if isinstance(start, EncodeFailure) or isinstance(end, EncodeFailure):
            spans[i] = start if isinstance(start, EncodeFailure) else end
        elif not (full[i].startswith(start) and full[i].startswith(end) and len(start) <= len(end)):
            spans[i] = EncodeFailure(
                "template_unstable",
                f"the chat template renders messages[:{k}] (with generation prompt) or messages[:{k + 1}] "
                "differently from the same turns inside the whole conversation, so the assistant span "
                f"of message {k} cannot be located; use a prefix-stable template or train_on='all'",
            )
        else:
            spans[i].append((len(start), len(end)))

    protect = _special_text_spans(tokenizer, conversations, full, special, spans)
    ok = [i for i, s in enumerate(spans) if not isinstance(s, EncodeFailure)]
    encoded = tokenizer(
        [full[i] for i in ok],
        add_special_tokens=False,  # the template writes the special tokens it wants (as HF does)
        return_offsets_mapping=True,
        return_attention_mask=False,
        return_token_type_ids=False,
    ) if ok else {"input_ids": [], "offset_mapping": []}
    results: list[tuple[list[int], list[int]] | EncodeFailure] = list(spans)
    for i, ids, offsets in zip(ok, encoded["input_ids"], encoded["offset_mapping"], strict=True):
        if i in protect:
            ids, offsets = _as_plain_text(tokenizer, full[i], ids, offsets, protect[i])
        mask = [0] * len(ids)
        # Offsets rise monotonically along the tokens, so a span's tokens are one contiguous run:
        # from the first token ending after the span start to the last one starting before its end.
        token_starts = [s for s, _ in offsets]
        token_ends = [e for _, e in offsets]
        for a, b in spans[i]:
            lo, hi = bisect_right(token_ends, a), bisect_left(token_starts, b)
            mask[lo:hi] = [1] * (hi - lo)
        if mask:
            mask[0] = 0
        results[i] = (list(ids), mask)
    return results


def encode_conversation(tokenizer, messages: list[dict], train_on: TrainOn) -> tuple[list[int], list[int]]:
    """One conversation -> (input_ids, trainable_mask); DataError when its template cannot be used."""
    result = encode_batch(tokenizer, [messages], train_on)[0]
    if isinstance(result, EncodeFailure):
        raise DataError(f"cannot encode conversation ({result.kind}): {result.reason}")
    return result


# -------------------------------------------------------------------------------------- packing


def best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: indices of `lengths` grouped into bins of `capacity`.

    Longest first; each item goes to the open bin it fills most tightly (ties: the older bin),
    else to a new bin. Deterministic; bins in creation order, items in placement order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin number), sorted
    for i in order:
        slot = bisect_left(free, (lengths[i], -1))
        if slot == len(free):
            bins.append([i])
            insort(free, (capacity - lengths[i], len(bins) - 1))
        else:
            room, b = free.pop(slot)
            bins[b].append(i)
            insort(free, (room - lengths[i], b))
    return bins


# --------------------------------------------------------------------------------------- writer


class _ShardWriter:
    """Appends sequences to the current shard's two .npy files as they come, so memory does not grow
    with the shard: each file starts with the header of an empty array, rewritten with the shard's
    length when the shard is closed (the header's size does not depend on the length). A new shard
    starts when the next sequence would take this one past `shard_tokens`."""

    def __init__(self, out_dir: Path, dtype: type, shard_tokens: int):
        self.out_dir = out_dir
        self.shard_tokens = shard_tokens
        self.dtypes = (np.dtype(dtype), np.dtype(np.uint8))  # of the tokens and of the mask
        self.files: list | None = None
        self.fill = 0
        self.shards: list[dict] = []
        self.index = array("q")  # shard, offset, length, first doc row, docs
        self.docs = array("q")  # record ordinal, length

    def add(self, docs: list[tuple[int, list[int], list[int]]]) -> None:
        length = sum(len(ids) for _, ids, _ in docs)
        if self.fill and self.fill + length > self.shard_tokens:
            self._flush()
        if self.files is None:
            self.files = [self._open(kind, dtype) for kind, dtype in zip(("tokens", "mask"), self.dtypes, strict=True)]
        self.index.extend((len(self.shards), self.fill, length, len(self.docs) // 2, len(docs)))
        for ordinal, ids, mask in docs:
            self.files[0].write(np.asarray(ids, dtype=self.dtypes[0]).tobytes())
            self.files[1].write(np.asarray(mask, dtype=self.dtypes[1]).tobytes())
            self.fill += len(ids)
            self.docs.extend((ordinal, len(ids)))

    def _open(self, kind: str, dtype: np.dtype):
        f = open(self.out_dir / f"shard-{len(self.shards):05d}.{kind}.npy", "wb", buffering=1 << 20)
        _npy_header(f, dtype, 0)
        return f

    def _flush(self) -> None:
        for f, dtype in zip(self.files, self.dtypes, strict=True):
            f.seek(0)
            _npy_header(f, dtype, self.fill)
            f.close()
        self.files = None
        stem = f"shard-{len(self.shards):05d}"
        self.shards.append({"tokens": f"{stem}.tokens.npy", "mask": f"{stem}.mask.npy", "num_tokens": self.fill})
        self.fill = 0

    def close(self) -> np.ndarray:
        """Write the last shard and the index; return the index rows."""
        if self.fill:
            self._flush()
        index = np.frombuffer(self.index, dtype=np.int64).reshape(-1, 5)
        np.save(self.out_dir / "index.npy", index)
        np.save(self.out_dir / "docs.npy", np.frombuffer(self.docs, dtype=np.int64).reshape(-1, 2))
        return index


def _npy_header(f, dtype: np.dtype, length: int) -> None:
    """The .npy header (as np.save writes it) of a 1-D array of `length` items of `dtype`: 128 bytes."""
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                             "shape": (length,)})
    if f.tell() != 128:
        raise AssertionError(f"a .npy header of {f.tell()} bytes, not 128: the shard header cannot be rewritten")


def _count_failure(failure: EncodeFailure, ordinal: int, record: dict, counts: dict, examples: dict) -> None:
    """A record the template could not encode: counted by kind, the first few kept as examples."""
    counts[failure.kind] += 1
    if len(examples[failure.kind]) < MAX_FAILURE_EXAMPLES:
        examples[failure.kind].append({"record": ordinal, "id": record.get("id"), "reason": failure.reason})


def tokenize_records(cfg: RunConfig, tokenizer, records_path: Path, out_dir: Path) -> dict:
    """Stream canonical records into token shards in `out_dir`; return the index.json summary.

    Every record read is counted once: written (possibly truncated), dropped_overlong,
    no_trainable (nothing to learn after truncation), template_error, template_unstable or
    special_token_text (tokenize.special_token_text='reject').
    """
    t = cfg.tokenize
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("shard-*.npy"):
        stale.unlink()
    vocab = vocab_size(tokenizer)
    dtype = np.uint16 if vocab < 65536 else np.uint32
    writer = _ShardWriter(out_dir, dtype, t.shard_tokens)
    counts = dict.fromkeys(("records_read", "records_written", "truncated", "dropped_overlong",
                            "no_trainable", "template_error", "template_unstable", "special_token_text"), 0)
    examples: dict[str, list[dict]] = {"template_error": [], "template_unstable": [], "special_token_text": []}
    lengths = array("i")
    total_tokens = trainable_tokens = 0
    window: list[tuple[int, list[int], list[int]]] = []

    def emit_window() -> None:
        for bin_ in best_fit([len(ids) for _, ids, _ in window], t.max_seq_len):
            writer.add([window[i] for i in bin_])
        window.clear()

    bar = progress_bar(f"tokenize {out_dir.name}", "record")
    for chunk in chunks(iter_jsonl(records_path), cfg.data.chunk_size):
        results = encode_batch(tokenizer, [r["messages"] for r in chunk], t.train_on, t.special_token_text)
        for record, result in zip(chunk, results, strict=True):
            ordinal = counts["records_read"]
            counts["records_read"] += 1
            if isinstance(result, EncodeFailure):
                _count_failure(result, ordinal, record, counts, examples)
                continue
            ids, mask = result
            lengths.append(len(ids))
            if len(ids) > t.max_seq_len:
                if t.overlong == "drop":
                    counts["dropped_overlong"] += 1
                    continue
                counts["truncated"] += 1
                ids, mask = ids[:t.max_seq_len], mask[:t.max_seq_len]
            n_trainable = sum(mask)
            if n_trainable == 0:
                counts["no_trainable"] += 1
                continue
            counts["records_written"] += 1
            total_tokens += len(ids)
            trainable_tokens += n_trainable
            if t.packing:
                window.append((ordinal, ids, mask))
                if len(window) == t.packing_window:
                    emit_window()
            else:
                writer.add([(ordinal, ids, mask)])
        bar.update(len(chunk))
    bar.close()
    emit_window()
    index = writer.close()
    np.save(out_dir / SPLIT_LENGTHS, np.frombuffer(lengths, dtype=np.int32))

    seq_lengths = index[:, 2]
    summary = {
        "format_version": FORMAT_VERSION,
        "tokenizer": {"name": tokenizer_source(cfg), "hash": tokenizer_fingerprint(tokenizer),
                      "vocab_size": vocab, "pad_id": pad_id(tokenizer)},
        "config_hash": cfg.section_hash("tokenize"),
        "dtype": np.dtype(dtype).name,
        "max_seq_len": t.max_seq_len,
        "packing": t.packing,
        "train_on": t.train_on,
        "overlong": t.overlong,
        "counts": {**counts, "sequences": len(seq_lengths), "documents": int(index[:, 4].sum()),
                   "shards": len(writer.shards)},
        "tokens": {"total": total_tokens, "trainable": trainable_tokens},
        "shards": writer.shards,
        "failure_examples": examples,
    }
    (out_dir / SPLIT_INDEX).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def tokenize(cfg: RunConfig, data_dir: Path, tokens_dir: Path) -> dict:
    """The tokenization stage: tokenizer into tokens_dir/tokenizer, shards into train/ and val/, the
    percentiles of the training records' token lengths into lengths.json (`TokenDir`).

    Returns {"tokenizer": {...}, "train": summary, "val": summary or None when there is no
    val.jsonl, "lengths": per-record token lengths of the training records (numpy, int32)}.
    """
    data, out = DataDir(data_dir), TokenDir(tokens_dir)
    train_path, val_path = data.train, data.val
    if not train_path.is_file():
        raise DataError(f"{train_path}: not found; run the validation stage, which writes it, first")
    tokenizer = load_tokenizer(cfg, train_path, out.tokenizer)
    # Preference pairs (train.objective dpo or simpo): the prompt once, then both answers (data/preference.py).
    tokenize_records_ = tokenize_pairs if cfg.train.objective != "sft" else tokenize_records
    train = tokenize_records_(cfg, tokenizer, train_path, out.train)
    if train["counts"]["sequences"] == 0:
        c = train["counts"]
        reasons = [e["reason"] for kind in train["failure_examples"].values() for e in kind][:1]
        raise DataError(
            f"tokenize: none of the {c['records_read']} training records could be used "
            f"(dropped_overlong {c['dropped_overlong']}, no_trainable {c['no_trainable']}, "
            f"template_error {c['template_error']}, template_unstable {c['template_unstable']})"
            + (f"; first failure: {reasons[0]}" if reasons else "")
            + "; raise tokenize.max_seq_len, set tokenize.overlong='truncate', or use a tokenizer whose "
            "chat template fits the data"
        )
    val = tokenize_records_(cfg, tokenizer, val_path, out.val) if val_path.is_file() else None
    lengths = np.load(out.record_lengths("train"))
    out.lengths.write_text(json.dumps(length_summary(lengths), indent=2) + "\n")
    return {
        "tokenizer": {"name": tokenizer_source(cfg), "hash": tokenizer_fingerprint(tokenizer),
                      "vocab_size": vocab_size(tokenizer), "dir": str(out.tokenizer)},
        "train": train,
        "val": val,
        "lengths": lengths,
    }


def tokenize_checked(cfg: RunConfig, data_dir: Path, tokens_dir: Path) -> dict:
    """The tokenize stage as a run runs it: `tokenize`, then the token suite (leantune.validation.validate_tokens)
    checks the shards' invariants before any training step reads them; returns what `tokenize` returns."""
    from leantune.validation import validate_tokens

    stats = tokenize(cfg, data_dir, tokens_dir)
    validate_tokens(cfg, tokens_dir)
    return stats


# ------------------------------------------------------------------------------ preference pairs


def encode_pairs(tokenizer, records: list[dict], special: str = "plain") -> list:
    """Each pair record -> (prompt ids, (chosen ids, chosen mask), (rejected ids, rejected mask)), or the
    EncodeFailure of either conversation. The prompt is the two renderings' common token prefix, up to the
    first target token; the rest of each is its answer (the template's assistant header included, not a target)."""
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

    t = cfg.tokenize
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The reference log-probabilities of the pairs of an earlier tokenization go with its shards.
    for stale in [*out_dir.glob("shard-*.npy"), out_dir / REFERENCE_LOGPS]:
        stale.unlink(missing_ok=True)
    vocab = vocab_size(tokenizer)
    dtype = np.uint16 if vocab < 65536 else np.uint32
    writer = _ShardWriter(out_dir, dtype, t.shard_tokens)
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
                _count_failure(result, ordinal, record, counts, examples)
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
        "tokens": {"total": total_tokens, "trainable": trainable_tokens},
        "shards": writer.shards,
        "failure_examples": examples,
    }
    (out_dir / SPLIT_INDEX).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary
