"""The tiny scratch model of the loss, fused-layer, packed-layout, preference and full fine-tuning tests: its
overrides, the tokenizer that build_model reads, a batch of random documents (packed or not), and a loss's
gradients."""

import numpy as np

from leantune.shards import collate

VOCAB = 300
TINY = ["train.device=cpu", "model.scratch.hidden_size=64", "model.scratch.intermediate_size=128",
        "model.scratch.num_layers=2", "model.scratch.num_heads=4", "model.scratch.num_kv_heads=2",
        f"tokenize.vocab_size={VOCAB}", "tokenize.max_seq_len=64", "lora.dropout=0.0"]


class Tokenizer:  # what build_model reads of a tokenizer
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __len__(self):
        return VOCAB

    def get_vocab(self):
        return {str(i): i for i in range(VOCAB)}


def batch(packed: bool, rows: int = 3, length: int = 40):
    """Rows of random tokens, the first part of every document not a target (a prompt), uneven lengths."""
    rng = np.random.default_rng(1)
    items = []
    for r in range(rows):
        n = length - 7 * r
        ids = rng.integers(3, VOCAB, n)
        docs = np.array([n // 2, n - n // 2]) if packed else np.array([n])
        labels = ids.copy()
        start = 0
        for d in docs:
            labels[start:start + d // 2] = -100  # the "prompt" of each document
            start += d
        items.append({"input_ids": ids, "labels": labels, "doc_lengths": docs,
                      "position_ids": np.concatenate([np.arange(d) for d in docs])})
    inputs = collate(items, 0)
    return inputs, inputs.pop("labels")


def grads_of(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads
