"""How a micro-batch of packed sequences reaches attention, and what its mask costs.

Documents packed into one sequence must not attend to each other (shards.py). A dense block
mask of a micro-batch of B rows of T tokens holds B x T x T elements: 4 x 8k tokens is 256 MiB as
booleans, 512 MiB as a bf16 additive mask, and with any mask SDPA cannot use its flash kernel.
`packed_layout` picks, per micro-batch, the layout with the least mask that gives the same loss:

  one_row        flash_attention_2: the micro-batch concatenated into one row, no mask; documents are
                 found from the restarting position ids (varlen kernels)
  rows           every row is one document: right padding, no mask (causal SDPA, its flash kernel)
  document_rows  sdpa, not a Mixture-of-Experts: each document becomes a row of its own, right-padded,
                 no mask; chosen when the padding it adds stays within MAX_DOCUMENT_PADDING of the
                 micro-batch's tokens (documents of similar lengths)
  position_ids   sdpa otherwise: no mask is passed; transformers builds a boolean block mask on the
                 device from the restarting position ids (B x T x T bytes; none built on the host or copied)
  additive_mask  eager attention adds the mask to its scores: `collate`'s additive mask in the compute
                 dtype (B x T x T x its bytes)

The first token of every document is never a target (tokenization.py), so the loss is the same in
every layout (tests/training/test_packed_layout.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_DOCUMENT_PADDING = 0.25  # document_rows may compute this share more positions than the packed rows


@dataclass(frozen=True)
class PackedLayout:
    kind: str  # one_row, rows, document_rows, position_ids, additive_mask
    mask_bytes: int  # the attention mask of the micro-batch (0: none)
    positions: int  # token positions computed, padding included


def packed_layout(attention: str, doc_lengths: list[list[int]], mask_element_bytes: int,
                  split_documents: bool = True) -> PackedLayout:
    """The layout of a micro-batch whose rows hold documents of `doc_lengths` (one list per row), for
    attention implementation `attention`; mask_element_bytes: of the compute dtype (eager's mask);
    split_documents: False keeps rows whole (a Mixture-of-Experts counts its router load per row)."""
    rows = len(doc_lengths)
    width = max(sum(docs) for docs in doc_lengths)
    tokens = sum(sum(docs) for docs in doc_lengths)
    if attention == "flash_attention_2":
        return PackedLayout("one_row", 0, tokens)
    if all(len(docs) == 1 for docs in doc_lengths):
        return PackedLayout("rows", 0, rows * width)
    if attention == "eager":
        return PackedLayout("additive_mask", rows * width * width * mask_element_bytes, rows * width)
    documents = [n for docs in doc_lengths for n in docs]
    padded = len(documents) * max(documents)
    if split_documents and padded <= (1 + MAX_DOCUMENT_PADDING) * rows * width:
        return PackedLayout("document_rows", 0, padded)
    return PackedLayout("position_ids", rows * width * width, rows * width)


def document_rows(items: list[dict]) -> list[dict]:
    """Each document of `items` (TokenShards items) as an item of its own."""
    out = []
    for it in items:
        start = 0
        for n in it["doc_lengths"]:
            n = int(n)
            out.append({k: it[k][start:start + n] for k in ("input_ids", "labels", "position_ids")}
                       | {"doc_lengths": [n]})
            start += n
    return out


def model_inputs(items: list[dict], pad_id: int, mask_dtype, attention: str, device,
                 split_documents: bool = True) -> tuple[dict, object]:
    """Model keyword arguments and labels of a micro-batch, on `device`, in the layout `packed_layout`
    picks for `attention` (leantune/training/packed.py says what each costs).

    one_row (flash-attention): the items concatenated into one row with no mask; documents are
    told apart by their restarting position ids. Otherwise `collate`'s padded batch, without its
    mask when every row is one document (rows, document_rows): the pads are on the right, where under
    the causal mask no real token attends to them, so the mask changes nothing the loss reads. Without
    it SDPA runs its causal kernel with no mask, and models with grouped key/value heads do not repeat
    them. position_ids: no mask either; transformers builds its boolean block mask from the positions.
    """
    import torch

    from leantune.shards import collate

    layout = packed_layout(attention, [list(it["doc_lengths"]) for it in items], torch.finfo(mask_dtype).bits // 8,
                           split_documents)
    if layout.kind == "one_row":
        batch = {k: torch.from_numpy(np.concatenate([it[k] for it in items]))[None]
                 for k in ("input_ids", "labels", "position_ids")}
    else:
        if layout.kind == "document_rows":
            items = document_rows(items)
        batch = collate(items, pad_id, dtype=mask_dtype, mask=layout.kind != "position_ids")
        if layout.kind in ("rows", "document_rows"):
            # The default positions 0, 1, ... are the documents' own (pads get the ones after).
            del batch["attention_mask"], batch["position_ids"]
    labels = batch.pop("labels").to(device, non_blocking=True)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}, labels
