"""The token-shard format: what the tokenize stage writes (leantune/tokenization.py) and training reads.

A token split is the file interface between stage 3 and stage 4 (the flow's process and the training
child), so neither owns it: tokenization imports its version and file names, training its reader,
`collate` and the epoch's batch order. The padding estimate lives here too, on the reading side: it
depends on the train settings, which must not reach the tokenize stage (or its stage-cache key).

On-disk format of one split directory (e.g. `tokens/train/`):
  shard-NNNNN.tokens.npy  flat token ids, uint16 when the vocabulary has fewer than 65536 ids, else uint32
  shard-NNNNN.mask.npy    flat uint8, 1 where the token is a training target
  index.npy               int64 (sequences, 5): shard, offset, length, first document row, documents
  docs.npy                int64 (documents, 2): record ordinal in the records file, document length
  lengths.npy             int32 token length of every encoded record before truncation
  index.json              counts, dtype, vocab size, max_seq_len, packing, tokenizer name and hash, hash of
                          the tokenize config section, token totals, failure examples
  reference_logps.npy     pairs under full fine-tuning's DPO only: the reference log-probabilities
                          (chosen, rejected) of each pair, written by training (training/preference.py)
A new shard starts when the next sequence would take the current one past `tokenize.shard_tokens`.
Same input and tokenize settings give byte-identical files. A preference split (index.json "pairs") holds
one sequence of three documents per pair: the prompt, the chosen answer, the rejected answer.

Attention semantics of packed sequences: documents packed into one sequence never attend to each
other (block-diagonal causal attention), and position ids restart at 0 for each document, so a
packed document produces the same logits as the document run alone (tests/test_packing.py).
`collate` expresses this as a 4D additive mask of shape (batch, 1, seq, seq), which transformers
5.x passes unchanged to the sdpa and eager attention of Llama-style models (`masking_utils`
returns a 4D mask as is; eager adds it to the scores, so it must be additive, not boolean).
Padding in a packed batch forms its own block after the last document. flash_attention_2 takes no
4D mask: it finds documents from restarting position ids only in a batch of one row, so there
concatenate a micro-batch into one row and pass `position_ids` without `attention_mask`. sdpa and
eager find them from position ids too (no mask, `use_cache=False`: with a cache, which most configs
enable by default, transformers skips that detection and documents silently attend to each other).
Which of these the training loop uses, and what each mask costs: leantune/training/packed.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from leantune.rundir import SPLIT_INDEX

if TYPE_CHECKING:
    from leantune.config import TrainConfig

FORMAT_VERSION = 1
REFERENCE_LOGPS = "reference_logps.npy"  # of pair shards, full fine-tuning's DPO reference (training/preference.py)
# train.group_by_length sorts lengths only within a random window of this many global batches, so
# batches are both low-padding and differently composed per seed.
MEGABATCH_BATCHES = 50


# --------------------------------------------------------------------------------------- reader


class TokenShards:
    """Memory-mapped reader of a split directory written by `tokenize_records`."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.meta: dict[str, Any] = json.loads((self.directory / SPLIT_INDEX).read_text())
        self.index = np.load(self.directory / "index.npy")
        self.docs = np.load(self.directory / "docs.npy")
        self.pad_id: int = self.meta["tokenizer"]["pad_id"]
        # Pairs under train.objective=dpo with model.method=full: each pair's reference log-probabilities
        # (chosen, rejected), written before the first step (training/preference.py).
        reference = self.directory / REFERENCE_LOGPS
        self.reference = np.load(reference) if reference.is_file() else None
        # Opened on first use, so a reader handed to DataLoader workers maps the files in each worker.
        self._shards: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.index)

    @property
    def lengths(self) -> np.ndarray:
        """Token length of every sequence."""
        return self.index[:, 2]

    def _shard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self._shards:
            files = self.meta["shards"][k]
            self._shards[k] = (np.load(self.directory / files["tokens"], mmap_mode="r"),
                               np.load(self.directory / files["mask"], mmap_mode="r"))
        return self._shards[k]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        """input_ids, labels (-100 where not a target; aligned with input_ids, the model shifts),
        position_ids (restarting at 0 per document) and doc_lengths of sequence i."""
        shard, offset, length, first_doc, n_docs = (int(v) for v in self.index[i])
        tokens, mask = self._shard(shard)
        input_ids = tokens[offset:offset + length].astype(np.int64)
        labels = np.where(mask[offset:offset + length].astype(bool), input_ids, -100)
        doc_lengths = self.docs[first_doc:first_doc + n_docs, 1].copy()
        position_ids = np.concatenate([np.arange(n, dtype=np.int64) for n in doc_lengths])
        item = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "doc_lengths": doc_lengths}
        if self.reference is not None:
            item["reference_logps"] = self.reference[i]
        return item

    def training_batches(self, global_batch_size: int, seed: int, group_by_length: bool) -> list[np.ndarray]:
        """An epoch's global batches of sequence indices, in training order (`training_batches`)."""
        return training_batches(self.lengths, global_batch_size, seed, group_by_length)


def collate(items: list[dict[str, np.ndarray]], pad_id: int, dtype=None, mask: bool = True) -> dict:
    """Pad items on the right into torch tensors: input_ids, labels (-100 on pads), position_ids,
    attention_mask.

    attention_mask is the usual (batch, seq) 0/1 mask when every item is one document, and a
    (batch, 1, seq, seq) additive block-diagonal causal mask of `dtype` (the model's compute dtype,
    default float32) when an item holds packed documents; see the module docstring. mask=False: no
    attention_mask (the model finds the documents from position_ids; training/packed.py).
    """
    import torch

    dtype = dtype or torch.float32
    width = max(len(it["input_ids"]) for it in items)
    batch = len(items)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    labels = torch.full((batch, width), -100, dtype=torch.long)
    # Pads get positions restarting at 0 too, so position-id based packing detection sees them as
    # one extra document instead of a continuation of the last one.
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    doc_ids = torch.zeros((batch, width), dtype=torch.long)
    for b, it in enumerate(items):
        n = len(it["input_ids"])
        input_ids[b, :n] = torch.from_numpy(np.asarray(it["input_ids"], dtype=np.int64))
        labels[b, :n] = torch.from_numpy(np.asarray(it["labels"], dtype=np.int64))
        position_ids[b, :n] = torch.from_numpy(np.asarray(it["position_ids"], dtype=np.int64))
        position_ids[b, n:] = torch.arange(width - n)
        doc_lengths = torch.as_tensor(np.asarray(it["doc_lengths"], dtype=np.int64))
        doc_ids[b, :n] = torch.repeat_interleave(torch.arange(len(doc_lengths)), doc_lengths)
        doc_ids[b, n:] = len(doc_lengths)
    if not mask:
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if all(len(it["doc_lengths"]) == 1 for it in items):
        lengths = torch.tensor([len(it["input_ids"]) for it in items])
        attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    else:
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        allowed = (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal
        attention_mask = torch.zeros((batch, 1, width, width), dtype=dtype)
        attention_mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": attention_mask}


# ---------------------------------------------------------------------------------- batch order


def training_batches(lengths: np.ndarray, global_batch_size: int, seed: int,
                     group_by_length: bool = False) -> list[np.ndarray]:
    """An epoch's global batches of sequence indices, in training order; every index once, the
    short batch last.

    By default each global batch is a uniform draw (seeded), sorted longest first: every optimizer
    step sees the data's mix of lengths (and so of sources), and its micro-batches (consecutive
    slices) get similar lengths and less padding, while what the step sums over is unchanged.
    group_by_length (train.group_by_length) groups whole global batches instead: indices shuffled,
    cut into mega-batches of MEGABATCH_BATCHES batches, sorted by length within each, cut into
    batches, batch order shuffled again. The least padding, but steps all short or all long: on
    bench/vs_trainers.py's mix of short and long records that left a quarter more loss after 4 steps.
    """
    lengths = np.asarray(lengths)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(lengths))
    if not group_by_length:
        batches = [perm[s:s + global_batch_size] for s in range(0, len(perm), global_batch_size)]
        return [b[np.argsort(-lengths[b], kind="stable")] for b in batches]
    batches = []
    mega = global_batch_size * MEGABATCH_BATCHES
    for m in range(0, len(perm), mega):
        group = perm[m:m + mega]
        group = group[np.argsort(-lengths[group], kind="stable")]
        batches += [group[b:b + global_batch_size] for b in range(0, len(group), global_batch_size)]
    batches = [batches[j] for j in rng.permutation(len(batches))]
    # The one short batch goes last, so that global batches cut from the order are the groups.
    batches.sort(key=lambda b: len(b) < global_batch_size)
    return batches


def micro_batches(batches: list[np.ndarray], micro_batch_size: int) -> list[np.ndarray]:
    """Each global batch cut into consecutive micro-batches, as the training loop runs them."""
    return [b[s:s + micro_batch_size] for b in batches for s in range(0, len(b), micro_batch_size)]


def padding_fraction(lengths: np.ndarray, batches: list[list[int]]) -> float:
    """Share of padded positions when each batch is padded to its longest sequence."""
    lengths = np.asarray(lengths)
    padded = sum(int(lengths[b].max()) * len(b) for b in batches if len(b))
    return 0.0 if padded == 0 else 1 - float(lengths.sum()) / padded


def padding_estimate(shards: TokenShards, train: TrainConfig) -> float:
    """Share of padded positions training computes on this split with these settings: a packed sequence is
    padded to max_seq_len; unpacked sequences to the longest of their micro-batch, in the first epoch's
    order (`training_batches`); a pair's two rows (prompt + chosen, prompt + rejected) likewise."""
    lengths = shards.lengths
    if shards.meta["packing"]:
        return 1 - float(lengths.sum()) / (len(lengths) * shards.meta["max_seq_len"]) if len(lengths) else 0.0
    batches = micro_batches(training_batches(lengths, train.global_batch_size, train.seed, train.group_by_length),
                            train.micro_batch_size)
    if not shards.meta.get("pairs"):
        return padding_fraction(lengths, batches)
    docs = shards.docs[:, 1].reshape(-1, 3)
    rows = np.concatenate([docs[:, 0] + docs[:, 1], docs[:, 0] + docs[:, 2]])
    return padding_fraction(rows, [np.concatenate([b, b + len(docs)]) for b in batches])
