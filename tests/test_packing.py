"""Packing correctness: packed documents keep their own tokens, labels and positions, and a tiny
Llama gives the same logits for a packed document as for the document run alone."""

import json
import random

import numpy as np
import pytest
import torch

from leantune.config import RunConfig
from leantune.shards import TokenShards, collate
from leantune.tokenization import encode_conversation, load_tokenizer, tokenize_records

WORDS = "yes no the sky is blue grass green two plus two four I think you are right wrong".split()
MAX_SEQ_LEN = 160


def make_records(n: int) -> list[dict]:
    rng = random.Random(7)

    def sentence(k):
        return " ".join(rng.choice(WORDS) for _ in range(k)).capitalize()

    records = []
    for i in range(n):
        messages = [{"role": "system", "content": sentence(3)}] if i % 4 == 0 else []
        for _ in range(rng.randint(1, 3)):
            messages += [{"role": "user", "content": sentence(rng.randint(1, 12))},
                         {"role": "assistant", "content": sentence(rng.randint(1, 12))}]
        records.append({"id": f"p{i}", "messages": messages, "source": "test"})
    return records


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing")
    records = make_records(60)
    path = root / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = RunConfig(tokenize={"vocab_size": 320, "max_seq_len": MAX_SEQ_LEN, "packing": True, "packing_window": 25})
    tokenizer = load_tokenizer(cfg, path, root / "tokenizer")
    summary = tokenize_records(cfg, tokenizer, path, root / "tokens")
    return records, tokenizer, summary, TokenShards(root / "tokens")


def documents(item: dict):
    """Split a packed item into its documents' (input_ids, labels, position_ids)."""
    bounds = np.cumsum([0, *item["doc_lengths"].tolist()])
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        yield item["input_ids"][a:b], item["labels"][a:b], item["position_ids"][a:b]


def test_packed_documents_keep_their_tokens_labels_and_positions(packed):
    records, tokenizer, summary, reader = packed
    assert summary["counts"]["records_written"] == 60
    assert summary["counts"]["sequences"] < 60 / 2  # packing did pack
    ordinals = reader.docs[:, 0].tolist()
    assert sorted(ordinals) == list(range(60))  # every record exactly once
    doc_row = 0
    for i in range(len(reader)):
        item = reader[i]
        assert len(item["input_ids"]) <= MAX_SEQ_LEN
        assert item["doc_lengths"].sum() == len(item["input_ids"])
        for ids, labels, positions in documents(item):
            messages = records[ordinals[doc_row]]["messages"]
            doc_row += 1
            expected_ids, expected_mask = encode_conversation(tokenizer, messages, "assistant")
            assert ids.tolist() == expected_ids
            assert labels.tolist() == [t if m else -100 for t, m in zip(expected_ids, expected_mask, strict=True)]
            assert positions.tolist() == list(range(len(ids)))
            # Every target run is exactly one assistant answer of this record plus its end of turn.
            runs, current = [], []
            for token, label in zip(ids.tolist(), labels.tolist(), strict=True):
                if label != -100:
                    current.append(token)
                elif current:
                    runs.append(current)
                    current = []
            runs += [current] if current else []
            answers = [m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant"]
            assert [tokenizer.decode(r) for r in runs] == answers
    assert doc_row == len(ordinals)


def tiny_llama(vocab_size: int, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=128, vocab_size=vocab_size,
                                         max_position_embeddings=MAX_SEQ_LEN))
    model.set_attn_implementation(attn)
    return model.float().eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_each_document_alone(packed, attn):
    _, tokenizer, summary, reader = packed
    model = tiny_llama(summary["tokenizer"]["vocab_size"], attn)
    # Two multi-document sequences of different lengths, so the batch also has padding.
    picks = [i for i in range(len(reader)) if len(reader[i]["doc_lengths"]) > 2][:2]
    items = [reader[i] for i in picks]
    assert len(picks) == 2 and len(items[0]["input_ids"]) != len(items[1]["input_ids"])
    batch = collate(items, reader.pad_id)
    assert batch["attention_mask"].dim() == 4
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
        compared = 0
        for row, item in enumerate(items):
            start = 0
            for ids, _, _ in documents(item):
                alone = model(input_ids=torch.from_numpy(ids)[None]).logits[0]
                packed_logits = logits[row, start:start + len(ids)]
                assert torch.allclose(packed_logits, alone, atol=1e-5, rtol=0), (attn, row, start)
                start += len(ids)
                compared += 1
    assert compared == sum(len(it["doc_lengths"]) for it in items)


def test_position_ids_alone_give_the_same_logits_under_sdpa(packed):
    """The flash-attention route: no mask, documents found from the restarting position ids."""
    _, _, summary, reader = packed
    model = tiny_llama(summary["tokenizer"]["vocab_size"], "sdpa")
    items = [reader[i] for i in range(2)]
    assert all(len(it["doc_lengths"]) > 1 for it in items)
    batch = collate(items, reader.pad_id)
    with torch.no_grad():
        with_mask = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          position_ids=batch["position_ids"]).logits
        # use_cache=False matters: with a cache transformers skips the packed-sequence detection.
        without = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    lengths = [len(it["input_ids"]) for it in items]
    for row, n in enumerate(lengths):
        assert torch.allclose(with_mask[row, :n], without[row, :n], atol=1e-5, rtol=0)

