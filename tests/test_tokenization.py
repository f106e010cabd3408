"""Tokenization stage: scratch tokenizer, label masks per template and mode, counts, shards, reader."""

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from leantune.config import RunConfig
from leantune.errors import DataError, UserError
from leantune.shards import (
    TokenShards,
    collate,
    micro_batches,
    padding_estimate,
    padding_fraction,
    training_batches,
)
from leantune.tokenization import (
    CHATML_TEMPLATE,
    best_fit,
    encode_conversation,
    load_tokenizer,
    tokenize,
    tokenize_records,
)

WORDS = ("the sky is blue I think you are wrong two plus two equals four paris capital of france "
         "answer because maybe right sure not").split()

LLAMA3_LIKE_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "Be brief"},
    {"role": "user", "content": "Is the sky blue"},
    {"role": "assistant", "content": "Yes it is"},
    {"role": "user", "content": "Are you sure"},
    {"role": "assistant", "content": "I think so"},
]


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize()


def make_records(n: int, seed: int = 0, max_words: int = 30) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        messages = [{"role": "system", "content": sentence(rng, 4)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": sentence(rng, rng.randint(2, max_words))})
            messages.append({"role": "assistant", "content": sentence(rng, rng.randint(2, max_words))})
        records.append({"id": f"r{i}", "messages": messages, "source": "test"})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def config(**tokenize) -> RunConfig:
    return RunConfig(tokenize={"vocab_size": 300, "max_seq_len": 128, **tokenize})


def runs(tokenizer, ids: list[int], mask: list[int]) -> list[tuple[str, int]]:
    """Maximal runs of equal mask value, decoded: an exact picture of which positions train."""
    out: list[tuple[list[int], int]] = []
    for token, m in zip(ids, mask, strict=True):
        if out and out[-1][1] == m:
            out[-1][0].append(token)
        else:
            out.append(([token], m))
    return [(tokenizer.decode(t), m) for t, m in out]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A scratch tokenizer trained on 200 records, and the training file."""
    root = tmp_path_factory.mktemp("scratch")
    train = write_jsonl(root / "data" / "train.jsonl", make_records(200))
    return load_tokenizer(config(), train, root / "tokenizer"), train


def copy_of(tokenizer):
    """A separate instance, so a test can change its template without touching the shared one."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer.name_or_path)


def save_tokenizer(tmp_path: Path, chat_template: str | None, specials: list[str], bos: str, eos: str) -> Path:
    """A locally saved byte-level BPE tokenizer with the given template (None: no template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([sentence(random.Random(i), 20) for i in range(100)], trainer)
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos,
                            chat_template=chat_template).save_pretrained(tmp_path)
    return tmp_path


# ---------------------------------------------------------------------------------- tokenizer


def test_scratch_tokenizer_is_saved_with_specials_and_chat_template(scratch):
    from transformers import AutoTokenizer

    tokenizer, _ = scratch
    reloaded = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    assert reloaded.chat_template == CHATML_TEMPLATE
    assert len(reloaded) == 300
    assert (reloaded.bos_token, reloaded.eos_token, reloaded.pad_token) == ("<|bos|>", "<|im_end|>", "<|pad|>")
    assert reloaded.convert_tokens_to_ids("<|im_start|>") != reloaded.unk_token_id
    assert reloaded.decode(reloaded.encode("Ünïcode 😀 text", add_special_tokens=False)) == "Ünïcode 😀 text"


def test_scratch_tokenizer_is_deterministic(scratch, tmp_path):
    tokenizer, train = scratch
    load_tokenizer(config(), train, tmp_path / "again")
    first = (Path(tokenizer.name_or_path) / "tokenizer.json").read_bytes()
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == first


def test_tokenizer_without_chat_template_is_a_user_error(tmp_path):
    path = save_tokenizer(tmp_path / "plain", None, ["<s>", "</s>"], "<s>", "</s>")
    with pytest.raises(UserError, match="no chat template"):
        load_tokenizer(config(tokenizer=str(path)), tmp_path / "unused.jsonl", tmp_path / "out")


# ------------------------------------------------------------------------------------ masking


def test_chatml_masks_for_each_train_on_mode(scratch):
    tokenizer, _ = scratch
    header = "<|bos|><|im_start|>system\nBe brief<|im_end|>\n<|im_start|>user\nIs the sky blue<|im_end|>\n"
    ask = "<|im_start|>assistant\n"
    second_user = "<|im_start|>user\nAre you sure<|im_end|>\n"
    first, last = "Yes it is<|im_end|>\n", "I think so<|im_end|>\n"

    ids, mask = encode_conversation(tokenizer, CONVERSATION, "assistant")
    assert runs(tokenizer, ids, mask) == [(header + ask, 0), (first, 1), (second_user + ask, 0), (last, 1)]
    ids, mask = encode_conversation(tokenizer, CONVERSATION, "last_assistant")
    assert runs(tokenizer, ids, mask) == [(header + ask + first + second_user + ask, 0), (last, 1)]
    ids, mask = encode_conversation(tokenizer, CONVERSATION, "all")
    # The first token is never a target (nothing precedes it); everything after it is.
    assert runs(tokenizer, ids, mask) == [("<|bos|>", 0), (header[7:] + ask + first + second_user + ask + last, 1)]
    assert ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)


def test_llama3_like_template_masks_assistant_content_and_eot_only(tmp_path):
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    path = save_tokenizer(tmp_path / "llama", LLAMA3_LIKE_TEMPLATE, specials, "<|begin_of_text|>", "<|eot_id|>")
    tokenizer = load_tokenizer(config(tokenizer=str(path)), tmp_path / "unused.jsonl", tmp_path / "out")

    def head(role):
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    ids, mask = encode_conversation(tokenizer, CONVERSATION, "assistant")
    assert runs(tokenizer, ids, mask) == [
        ("<|begin_of_text|>" + head("system") + "Be brief<|eot_id|>" + head("user") + "Is the sky blue<|eot_id|>"
         + head("assistant"), 0),
        ("Yes it is<|eot_id|>", 1),
        (head("user") + "Are you sure<|eot_id|>" + head("assistant"), 0),
        ("I think so<|eot_id|>", 1),
    ]


def test_prefix_unstable_template_is_counted_not_masked(scratch, tmp_path):
    tokenizer = copy_of(scratch[0])
    # Like templates that strip reasoning from earlier turns: an assistant turn renders differently
    # once a later turn follows it, so its span in the full text is not where the prefix puts it.
    tokenizer.chat_template = CHATML_TEMPLATE.replace(
        "{{ message['content'] }}",
        "{% if message['role'] == 'assistant' and not loop.last %}[earlier]{% else %}{{ message['content'] }}{% endif %}",
    )
    with pytest.raises(DataError, match="template_unstable"):
        encode_conversation(tokenizer, CONVERSATION, "assistant")
    assert encode_conversation(tokenizer, CONVERSATION[:3], "assistant")  # one turn: stable

    records = make_records(40)
    multi_turn = sum(1 for r in records if sum(m["role"] == "assistant" for m in r["messages"]) > 1)
    summary = tokenize_records(config(), tokenizer, write_jsonl(tmp_path / "r.jsonl", records), tmp_path / "out")
    c = summary["counts"]
    assert 0 < multi_turn < 40
    assert c["template_unstable"] == multi_turn
    assert c["records_written"] == 40 - multi_turn - c["no_trainable"]
    assert summary["failure_examples"]["template_unstable"][0]["reason"].startswith("the chat template renders")
    # With train_on='last_assistant' only the last turn's prefixes matter, and those are stable.
    summary = tokenize_records(config(train_on="last_assistant"), tokenizer, tmp_path / "r.jsonl", tmp_path / "out2")
    assert summary["counts"]["template_unstable"] == 0


def test_template_that_raises_is_counted_per_record(scratch, tmp_path):
    tokenizer = copy_of(scratch[0])
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + CHATML_TEMPLATE)
    records = make_records(30)
    with_system = sum(1 for r in records if r["messages"][0]["role"] == "system")
    summary = tokenize_records(config(), tokenizer, write_jsonl(tmp_path / "r.jsonl", records), tmp_path / "out")
    assert 0 < with_system < 30
    assert summary["counts"]["template_error"] == with_system
    assert "System role not supported" in summary["failure_examples"]["template_error"][0]["reason"]
    assert summary["counts"]["records_written"] == 30 - with_system


# ------------------------------------------------------------------------------ counts, limits


def test_truncate_and_drop_are_counted(scratch, tmp_path):
    tokenizer, _ = scratch
    records = make_records(60, seed=3)
    path = write_jsonl(tmp_path / "r.jsonl", records)
    full = [len(encode_conversation(tokenizer, r["messages"], "assistant")[0]) for r in records]
    overlong = sum(n > 96 for n in full)
    assert 0 < overlong < 60

    truncated = tokenize_records(config(max_seq_len=96, packing=False), tokenizer, path, tmp_path / "t")
    assert truncated["counts"]["truncated"] == overlong
    assert truncated["counts"]["records_written"] == 60 - truncated["counts"]["no_trainable"]
    assert max(TokenShards(tmp_path / "t").lengths) == 96
    assert np.load(tmp_path / "t" / "lengths.npy").tolist() == full

    dropped = tokenize_records(config(max_seq_len=96, overlong="drop", packing=False), tokenizer, path, tmp_path / "d")
    assert dropped["counts"]["dropped_overlong"] == overlong
    assert dropped["counts"]["truncated"] == 0
    assert dropped["counts"]["records_written"] == 60 - overlong
    assert dropped["tokens"]["total"] == sum(n for n in full if n <= 96)


def test_record_truncated_before_the_assistant_has_no_trainable_token(scratch, tmp_path):
    tokenizer, _ = scratch
    long_question = {"id": "long", "source": "test", "messages": [
        {"role": "user", "content": "two plus " * 40}, {"role": "assistant", "content": "Four"}]}
    short = {"id": "short", "source": "test", "messages": CONVERSATION[1:3]}
    records = [short, long_question, short]
    summary = tokenize_records(config(max_seq_len=32), tokenizer, write_jsonl(tmp_path / "r.jsonl", records),
                               tmp_path / "out")
    c = summary["counts"]
    assert (c["records_read"], c["no_trainable"], c["records_written"]) == (3, 1, 2)
    assert 1 not in np.load(tmp_path / "out" / "docs.npy")[:, 0].tolist()  # record ordinal 1 was not written


def test_nothing_usable_is_a_data_error(tmp_path):
    write_jsonl(tmp_path / "data" / "train.jsonl", make_records(20, max_words=60))
    with pytest.raises(DataError, match="dropped_overlong 20"):
        tokenize(config(max_seq_len=16, overlong="drop"), tmp_path / "data", tmp_path / "tokens")


# ------------------------------------------------------------------------- shards and reader


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_output_is_byte_identical_across_runs_and_processes(tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", make_records(120))
    write_jsonl(data / "val.jsonl", make_records(15, seed=9))
    cfg = config(shard_tokens=2048, packing_window=40)
    tokenize(cfg, data, tmp_path / "a")
    tokenize(cfg, data, tmp_path / "b")
    # A fresh process with another hash seed: nothing may depend on set/dict order or memory.
    script = ("import sys; from pathlib import Path; from leantune.config import RunConfig; "
              "from leantune.tokenization import tokenize; "
              "cfg = RunConfig.model_validate_json(sys.argv[1]); tokenize(cfg, Path(sys.argv[2]), Path(sys.argv[3]))")
    subprocess.run([sys.executable, "-c", script, cfg.model_dump_json(), str(data), str(tmp_path / "c")],
                   check=True, env={**os.environ, "PYTHONHASHSEED": "123"})
    a = file_hashes(tmp_path / "a")
    assert "train/shard-00001.tokens.npy" in a and "tokenizer/tokenizer.json" in a and "val/index.json" in a
    assert file_hashes(tmp_path / "b") == a
    assert file_hashes(tmp_path / "c") == a


def test_shards_roll_over_at_shard_tokens(scratch, tmp_path):
    tokenizer, _ = scratch
    path = write_jsonl(tmp_path / "r.jsonl", make_records(100))
    summary = tokenize_records(config(shard_tokens=1024, packing=False), tokenizer, path, tmp_path / "out")
    reader = TokenShards(tmp_path / "out")
    # Expected layout: sequences fill a shard until the next one would pass 1024 tokens.
    expected, fill = [], 0
    for n in reader.lengths.tolist():
        if fill and fill + n > 1024:
            expected.append(fill)
            fill = 0
        fill += n
    expected.append(fill)
    assert [s["num_tokens"] for s in summary["shards"]] == expected
    assert len(expected) == summary["counts"]["shards"] > 3
    for k, shard in enumerate(summary["shards"]):
        tokens = np.load(tmp_path / "out" / shard["tokens"], mmap_mode="r")
        assert tokens.dtype == np.uint16 and len(tokens) == expected[k]
    assert reader.index[:, 0].tolist() == sorted(reader.index[:, 0].tolist())
    assert summary["tokens"]["total"] == sum(expected)


def test_shards_are_written_as_sequences_come_not_buffered(scratch, tmp_path):
    import tracemalloc

    tokenizer, _ = scratch
    path = write_jsonl(tmp_path / "r.jsonl", make_records(60))
    small = tokenize_records(config(shard_tokens=1024, packing=False), tokenizer, path, tmp_path / "small")
    # A shard of 2**26 tokens held in memory would be 192 MiB (uint16 tokens + uint8 mask); numpy
    # reports its buffers to tracemalloc.
    tracemalloc.start()
    big = tokenize_records(config(shard_tokens=1 << 26, packing=False), tokenizer, path, tmp_path / "big")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20, peak
    assert big["counts"]["shards"] == 1 and small["counts"]["shards"] > 1
    # The one shard holds the same tokens as the small shards, in a file np.load reads.
    tokens = np.load(tmp_path / "big" / "shard-00000.tokens.npy")
    assert tokens.tolist() == [t for s in small["shards"] for t in np.load(tmp_path / "small" / s["tokens"]).tolist()]


def test_scratch_tokenizer_trains_on_a_bounded_sample(tmp_path, monkeypatch):
    import leantune.tokenization as tokenization

    records = make_records(90)
    path = write_jsonl(tmp_path / "train.jsonl", records)

    def texts(rows):
        return [f"{m['role']}\n{m['content']}" for r in rows for m in r["messages"]]

    assert list(tokenization._scratch_training_texts(path)) == texts(records)
    monkeypatch.setattr(tokenization, "SCRATCH_SAMPLE_BYTES", path.stat().st_size // 3 + 1)
    assert list(tokenization._scratch_training_texts(path)) == texts(records[::3])


def test_reader_round_trip(scratch, tmp_path):
    tokenizer, _ = scratch
    records = make_records(50)
    path = write_jsonl(tmp_path / "r.jsonl", records)
    summary = tokenize_records(config(packing=False, max_seq_len=100, shard_tokens=1024), tokenizer, path,
                               tmp_path / "out")
    reader = TokenShards(tmp_path / "out")
    assert len(reader) == summary["counts"]["sequences"] == summary["counts"]["records_written"]
    ordinals = reader.docs[:, 0].tolist()
    assert ordinals == sorted(ordinals)  # unpacked sequences keep file order
    trainable = 0
    for i, ordinal in enumerate(ordinals):
        ids, mask = encode_conversation(tokenizer, records[ordinal]["messages"], "assistant")
        ids, mask = ids[:100], mask[:100]
        item = reader[i]
        assert item["input_ids"].tolist() == ids
        assert item["labels"].tolist() == [t if m else -100 for t, m in zip(ids, mask, strict=True)]
        assert item["position_ids"].tolist() == list(range(len(ids)))
        assert item["doc_lengths"].tolist() == [len(ids)]
        trainable += sum(mask)
    assert summary["tokens"]["trainable"] == trainable
    meta = json.loads((tmp_path / "out" / "index.json").read_text())
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["vocab_size"] == 300 and meta["tokenizer"]["pad_id"] == 0
    assert meta["config_hash"] == config(packing=False, max_seq_len=100, shard_tokens=1024).section_hash("tokenize")


def test_tokenize_writes_splits_and_returns_lengths(tmp_path):
    data = tmp_path / "data"
    train = make_records(40)
    write_jsonl(data / "train.jsonl", train)
    write_jsonl(data / "val.jsonl", make_records(6, seed=5))
    stats = tokenize(config(), data, tmp_path / "tokens")
    assert stats["train"]["counts"]["records_read"] == 40 and stats["val"]["counts"]["records_read"] == 6
    assert len(TokenShards(tmp_path / "tokens" / "val")) == stats["val"]["counts"]["sequences"]
    tokenizer = load_tokenizer(config(), data / "train.jsonl", tmp_path / "tok")
    assert stats["lengths"].tolist() == [len(encode_conversation(tokenizer, r["messages"], "assistant")[0])
                                         for r in train]
    assert stats["tokenizer"]["hash"] == stats["train"]["tokenizer"]["hash"]


# --------------------------------------------------------------------- batching and padding


def test_best_fit_decreasing_on_a_hand_example():
    # 5 opens bin 0 (room 3); 4 opens bin 1 (room 4); 3 fits bin 0 tightest; 3 -> bin 1 (room 1);
    # 2 fits nowhere -> bin 2; 1 -> bin 1, the tightest fit.
    assert best_fit([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]


def test_padding_fraction_on_a_hand_example():
    lengths = np.array([3, 5, 2, 8])
    # Batches padded to 8 and to 3: 22 positions for 18 tokens.
    assert padding_fraction(lengths, [[3, 1], [0, 2]]) == pytest.approx(4 / 22)
    assert padding_fraction(lengths, [[0, 1, 2, 3]]) == pytest.approx(1 - 18 / 32)


@pytest.mark.parametrize("group_by_length", [False, True])
def test_training_batches_cover_every_index_once(group_by_length):
    lengths = np.random.default_rng(0).integers(5, 500, size=403)
    batches = training_batches(lengths, 8, 1, group_by_length)
    assert sorted(i for b in batches for i in b) == list(range(403))
    assert [len(b) for b in batches] == [8] * 50 + [3]
    assert all((np.diff(lengths[b]) <= 0).all() for b in batches)
    assert all(np.array_equal(a, b) for a, b in zip(training_batches(lengths, 8, 1, group_by_length), batches,
                                                    strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(training_batches(lengths, 8, 2, group_by_length), batches,
                                                        strict=True))
    in_order = [list(range(i, min(i + 8, 403))) for i in range(0, 403, 8)]
    if group_by_length:
        assert padding_fraction(lengths, batches) < padding_fraction(lengths, in_order) / 3
    else:
        # The batches' members are a plain shuffle's with the same seed: sorting moves none across.
        perm = np.random.default_rng(1).permutation(403)
        assert [sorted(b.tolist()) for b in batches] == [sorted(perm[i:i + 8].tolist()) for i in range(0, 403, 8)]
    assert [m.tolist() for m in micro_batches([np.array([5, 4, 3, 2, 1])], 2)] == [[5, 4], [3, 2], [1]]


def test_the_shards_hold_no_training_setting_and_the_padding_estimate_follows_them(scratch, tmp_path):
    # Training settings stay out of the tokenize stage (and so out of its cache key): the same records give
    # byte-identical shards whatever the batch sizes and seed; training estimates its padding from them.
    tokenizer, _ = scratch
    path = write_jsonl(tmp_path / "r.jsonl", make_records(80))

    def settings(micro: int, global_: int, seed: int, **tokenize) -> RunConfig:
        return RunConfig(tokenize={"vocab_size": 300, "max_seq_len": 128, **tokenize},
                         train={"micro_batch_size": micro, "global_batch_size": global_, "seed": seed})

    tokenize_records(settings(1, 8, 0, packing=False), tokenizer, path, tmp_path / "a")
    tokenize_records(settings(4, 16, 7, packing=False), tokenizer, path, tmp_path / "b")
    assert file_hashes(tmp_path / "a") == file_hashes(tmp_path / "b")
    assert "padding_fraction" not in json.loads((tmp_path / "a" / "index.json").read_text())["tokens"]

    unpacked = TokenShards(tmp_path / "a")
    assert padding_estimate(unpacked, settings(1, 8, 0).train) == 0.0  # one sequence a micro-batch: no padding
    train = settings(4, 8, 3).train
    batches = micro_batches(unpacked.training_batches(8, 3, False), 4)
    assert [len(b) for b in batches[:2]] == [4, 4]
    widths = sum(int(unpacked.lengths[b].max()) * len(b) for b in batches)
    assert padding_estimate(unpacked, train) == pytest.approx(1 - unpacked.lengths.sum() / widths)
    assert padding_estimate(unpacked, train) > 0
    tokenize_records(settings(1, 8, 0, packing_window=30), tokenizer, path, tmp_path / "p")
    packed = TokenShards(tmp_path / "p")
    # A packed sequence is padded to max_seq_len, whatever the micro-batch.
    expected = 1 - packed.lengths.sum() / (len(packed) * 128)
    assert padding_estimate(packed, settings(1, 8, 0).train) == padding_estimate(packed, train) == pytest.approx(expected)


def test_collate_pads_and_builds_block_diagonal_mask():
    packed = {"input_ids": np.array([5, 6, 7, 8, 9]), "labels": np.array([-100, 6, -100, -100, 9]),
              "position_ids": np.array([0, 1, 0, 1, 2]), "doc_lengths": np.array([2, 3])}
    single = {"input_ids": np.array([1, 2, 3]), "labels": np.array([-100, 2, 3]),
              "position_ids": np.array([0, 1, 2]), "doc_lengths": np.array([3])}
    batch = collate([packed, single], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, -100, -100, 9], [-100, 2, 3, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 0, 1]]
    allowed = (batch["attention_mask"] == 0).squeeze(1).int().tolist()
    assert batch["attention_mask"].shape == (2, 1, 5, 5) and batch["attention_mask"].dtype == torch.float32
    assert allowed[0] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    # The pads of row 1 form their own block, so no row is fully masked.
    assert allowed[1] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert batch["attention_mask"].min() == torch.finfo(torch.float32).min

    unpacked = collate([single, {**single, "input_ids": np.array([4]), "labels": np.array([-100]),
                                 "position_ids": np.array([0]), "doc_lengths": np.array([1])}], pad_id=7)
    assert unpacked["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert unpacked["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert collate([packed], pad_id=0, dtype=torch.bfloat16)["attention_mask"].dtype == torch.bfloat16
