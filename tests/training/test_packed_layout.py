"""Packed micro-batches under each attention (leantune/training/packed.py): the mask bytes each layout
costs, counted from the tensors built, and the same loss and gradients in every layout."""

import numpy as np
import pytest
import torch
from tiny_model import TINY, Tokenizer, grads_of

from leantune.config import load_config
from leantune.modeling import build_model
from leantune.shards import collate
from leantune.training.loss import target_cross_entropy
from leantune.training.packed import model_inputs, packed_layout

MIB = 2**20
CPU = torch.device("cpu")


@pytest.mark.parametrize("attention, docs, kind, mask_mib", [
    ("flash_attention_2", [[5000, 3192]] * 4, "one_row", 0),
    ("sdpa", [[4096, 4096]] * 4, "document_rows", 0),  # equal documents: no padding added
    ("sdpa", [[8000, 192]] * 4, "position_ids", 256),  # 8 rows of 8000 would double the positions
    ("sdpa", [[8192]] * 4, "rows", 0),
    ("eager", [[8000, 192]] * 4, "additive_mask", 512),
])
def test_mask_bytes_of_4_rows_of_8k_tokens(attention, docs, kind, mask_mib):
    layout = packed_layout(attention, docs, mask_element_bytes=2)  # bf16
    assert (layout.kind, layout.mask_bytes / MIB) == (kind, mask_mib)


def test_a_mixture_of_experts_keeps_its_rows():
    assert packed_layout("sdpa", [[4096, 4096]] * 4, 2, split_documents=False).kind == "position_ids"


def items_of(rows: list[list[int]]):
    rng = np.random.default_rng(3)
    items = []
    for docs in rows:
        n = sum(docs)
        ids = rng.integers(3, 300, n)
        labels = ids.copy()
        start = 0
        for d in docs:
            labels[start] = -100  # the first token of a document is never a target
            start += d
        items.append({"input_ids": ids, "labels": labels, "doc_lengths": np.array(docs),
                      "position_ids": np.concatenate([np.arange(d) for d in docs])})
    return items


@pytest.mark.parametrize("attention, rows, kind", [
    ("sdpa", [[12, 12], [12, 12]], "document_rows"),
    ("sdpa", [[30, 2], [20, 12]], "position_ids"),
    ("eager", [[30, 2], [20, 12]], "additive_mask"),
])
def test_the_masks_built_hold_the_counted_bytes(monkeypatch, attention, rows, kind):
    """The mask passed in plus the one transformers builds in the forward pass (spied on)."""
    from transformers.masking_utils import AttentionMaskInterface

    built = []
    real = AttentionMaskInterface._global_mapping[attention]

    def spy(*args, **kwargs):
        mask = real(*args, **kwargs)
        built.append(mask)
        return mask

    monkeypatch.setitem(AttentionMaskInterface._global_mapping, attention, spy)
    model = build_model(load_config(overrides=[*TINY, f"model.attn_implementation={attention}"]), Tokenizer(), CPU)
    inputs, labels = model_inputs(items_of(rows), 0, torch.float32, attention, CPU)
    layout = packed_layout(attention, rows, 4)
    assert layout.kind == kind
    with torch.no_grad():
        target_cross_entropy(model, inputs, labels)
    masks = {id(m): m for m in [inputs.get("attention_mask"), *built] if m is not None}
    assert sum(m.numel() * m.element_size() for m in masks.values()) == layout.mask_bytes
    if kind == "document_rows":
        assert inputs["input_ids"].shape == (4, 12) and "position_ids" not in inputs


@pytest.mark.parametrize("rows", [[[12, 12], [12, 12]], [[30, 2], [20, 12]]], ids=["document_rows", "position_ids"])
def test_every_layout_gives_the_loss_and_gradients_of_the_block_mask(rows):
    model = build_model(load_config(overrides=TINY), Tokenizer(), CPU)
    items = items_of(rows)
    reference = collate(items, 0)
    ref_labels = reference.pop("labels")
    ref_loss, ref = grads_of(model, lambda: target_cross_entropy(model, reference, ref_labels))
    inputs, labels = model_inputs(items, 0, torch.float32, "sdpa", CPU)
    assert "attention_mask" not in inputs
    loss, new = grads_of(model, lambda: target_cross_entropy(model, inputs, labels))
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name, g in ref.items():
        torch.testing.assert_close(new[name], g, rtol=1e-4, atol=1e-5, msg=name)
