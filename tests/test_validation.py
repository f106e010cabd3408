"""Validation stage: the GX records suite quarantines exactly the bad rows, splits the rest, reports.

Each validate_records call builds a GX context; the first one in the process pays the GX import
(seconds), so these tests use few calls, each over a fixture that exercises many checks at once.
"""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from leantune.config import load_config
from leantune.data.split import is_validation
from leantune.errors import DataError
from leantune.jsonl import iter_jsonl
from leantune.shards import TokenShards
from leantune.validation import (
    load_suite,
    run_suite,
    sequence_features,
    suites_dir,
    validate_records,
    validate_tokens,
)


def rec(record_id, *turns, system=None, source="s"):
    """A record whose messages alternate user/assistant over `turns`, after an optional system prompt."""
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
    return {"id": record_id, "messages": messages, "source": source}


def raw(record_id, *role_content, source="s"):
    """A record with the exact (role, content) messages given."""
    return {"id": record_id, "messages": [{"role": r, "content": c} for r, c in role_content], "source": source}


def write_inputs(data_dir, records):
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "records.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    n = len(records)
    counts = {"read": n, "kept": n, "rejected": 0, "duplicates": 0, "not_selected": 0, "reasons": {}}
    (data_dir / "prepare.json").write_text(json.dumps(
        {"sources": {"s": {"format": "alpaca", **counts}}, "totals": counts}))
    return data_dir


def config(*overrides):
    return load_config(overrides=list(overrides))


def good(n, prefix="g"):
    return [rec(f"{prefix}{i}", f"question {i}?", f"answer number {i}.", system="Be brief." if i % 3 == 0 else None)
            for i in range(n)]


def ids(path):
    return [r["id"] for r in iter_jsonl(path)]


def test_passing_records_split_deterministically_by_id(tmp_path):
    records = good(30)
    cfg = config("data.chunk_size=7", "data.val_fraction=0.3", "data.split_seed=5")
    result = validate_records(cfg, write_inputs(tmp_path / "a", records))

    expected_val = [r["id"] for r in records if is_validation(r["id"], 0.3, 5)]
    assert 0 < len(expected_val) < 30
    assert ids(tmp_path / "a" / "val.jsonl") == expected_val
    assert ids(tmp_path / "a" / "train.jsonl") == [r["id"] for r in records if r["id"] not in expected_val]
    assert (result["records"], result["train"], result["val"], result["quarantined"]) == (
        30, 30 - len(expected_val), len(expected_val), 0)
    assert (tmp_path / "a" / "quarantine.jsonl").read_text() == ""
    # Records pass through unchanged.
    first_train = next(iter_jsonl(tmp_path / "a" / "train.jsonl"))
    assert first_train == next(r for r in records if r["id"] == first_train["id"])

    report = json.loads((tmp_path / "a" / "validation.json").read_text())
    assert report == result and report["success"] is True
    assert [e["name"] for e in report["expectations"]] == [e["name"] for e in load_suite(suites_dir(cfg) / "records.json", {
        f"validation.{k}": v for k, v in cfg.validation.model_dump().items()})[1]]
    assert all(e["rows_failed"] == 0 and e["examples"] == [] for e in report["expectations"])
    by_name = {e["name"]: e for e in report["expectations"]}
    assert by_name["id_present"]["rows_evaluated"] == 30
    assert by_name["message_count"]["kwargs"] == {"column": "n_messages", "min_value": 2, "max_value": 64}
    assert report["per_source"] == {"s": {"records": 30, "train": 30 - len(expected_val),
                                          "val": len(expected_val), "quarantined": 0}}
    assert json.loads((tmp_path / "a" / "quality.json").read_text())["split"]["val"] == len(expected_val)

    # Same input, other chunking: the same split, byte for byte.
    validate_records(config("data.chunk_size=30", "data.val_fraction=0.3", "data.split_seed=5"),
                     write_inputs(tmp_path / "b", records))
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


# id -> the exact expectations it must fail under BAD_CONFIG (max_turns=4, content 2..50 chars).
BAD = [
    ({"messages": rec("x", "q?", "fine.")["messages"], "source": "s"}, {"id_present"}),
    (rec("g1", "q?", "same id as a record three chunks earlier"), {"id_unique"}),
    (rec("dup", "first?", "kept."), set()),
    (rec("dup", "second?", "quarantined: same id in the same chunk"), {"id_unique"}),
    ({"id": "nosource", "messages": rec("x", "q?", "fine.")["messages"]}, {"source_present"}),
    ({"id": "notalist", "messages": "hello", "source": "s"}, {"messages_well_formed", "message_count"}),
    (rec("toolong", "q1", "a1", "q2", "a2", "q3", "a3"), {"message_count"}),
    (raw("badrole", ("user", "hi?"), ("Assistant", "hello")), {"roles_valid", "ends_with_assistant",
                                                                "roles_alternate"}),
    (raw("startsassist", ("assistant", "hi"), ("user", "q?"), ("assistant", "a.")),
     {"starts_with_system_or_user", "roles_alternate"}),
    (raw("endsuser", ("user", "q?"), ("assistant", "a."), ("user", "and?")), {"ends_with_assistant"}),
    (raw("twousers", ("user", "q?"), ("user", "q2?"), ("assistant", "a.")), {"roles_alternate"}),
    (raw("nouser", ("system", "sys"), ("assistant", "a.")), {"roles_alternate"}),
    (rec("short", "q?", "a"), {"content_not_too_short"}),
    (rec("long", "q?", "x" * 51), {"content_not_too_long"}),
    (rec("blank", "q?", "   "), {"no_blank_turns"}),
    (rec("echo", "What is 2+2?", " What is 2+2?"), {"answer_not_echo"}),
    # A plain-text row's empty prompt is by design; an empty prompt anywhere else is not.
    (raw("plain", ("user", ""), ("assistant", "a plain text body")), set()),
    (raw("emptyq", ("user", ""), ("assistant", "ok."), ("user", "q?"), ("assistant", "a.")),
     {"content_not_too_short", "no_blank_turns"}),
]
BAD_CONFIG = ("data.chunk_size=5", "validation.max_turns=4", "validation.min_content_chars=2",
              "validation.max_content_chars=50", "validation.examples_per_failure=1")


def test_each_expectation_quarantines_exactly_its_bad_rows(tmp_path):
    records = good(20) + [r for r, _ in BAD]
    n_bad = sum(1 for _, failed in BAD if failed)
    # Exactly at the threshold: quarantined rows are reported but the run does not fail.
    cfg = config(*BAD_CONFIG, f"validation.max_reject_fraction={n_bad / len(records)!r}")
    result = validate_records(cfg, write_inputs(tmp_path, records))

    quarantined = list(iter_jsonl(tmp_path / "quarantine.jsonl"))
    expected = [(20 + i, failed) for i, (_, failed) in enumerate(BAD) if failed]
    assert [(q["index"], set(q["failed"])) for q in quarantined] == expected
    assert [q["record"] for q in quarantined] == [records[i] for i, _ in expected]
    # Failed names are listed in suite order.
    order = [e["name"] for e in result["expectations"]]
    assert all(q["failed"] == sorted(q["failed"], key=order.index) for q in quarantined)

    passed = ids(tmp_path / "train.jsonl") + ids(tmp_path / "val.jsonl")
    assert sorted(passed) == sorted([f"g{i}" for i in range(20)] + ["dup", "plain"])
    assert result["records"] == len(records) == result["train"] + result["val"] + result["quarantined"]
    assert result["quarantined"] == n_bad and result["success"] is True

    by_name = {e["name"]: e for e in result["expectations"]}
    failed_counts = {name: sum(name in f for _, f in BAD) for name in by_name}
    assert {n: e["rows_failed"] for n, e in by_name.items()} == failed_counts
    # GX skips nulls: the record without messages has no first/last role to check.
    assert by_name["ends_with_assistant"]["rows_evaluated"] == len(records) - 1
    assert by_name["content_not_too_long"]["kwargs"]["max_value"] == 50
    assert by_name["content_not_too_long"]["examples"] == [
        {"id": "long", "source": "s", "value": 51, "excerpt": "user: q? | assistant: " + "x" * 51}]
    assert len(by_name["roles_alternate"]["examples"]) == 1 and by_name["roles_alternate"]["rows_failed"] == 4
    assert by_name["id_present"]["examples"][0]["id"] is None

    quality = json.loads((tmp_path / "quality.json").read_text())
    assert quality["quarantine_reasons"] == {n: c for n, c in failed_counts.items() if c}
    assert quality["totals"]["quarantined"] == n_bad


def test_too_many_quarantined_fails_with_a_message_naming_the_fix(tmp_path):
    records = good(4) + [raw(f"u{i}", ("user", "q?"), ("assistant", "a."), ("user", "and?")) for i in range(2)] + [
        rec("long", "q?", "x" * 51)]
    with pytest.raises(DataError) as err:
        validate_records(config(*BAD_CONFIG, "validation.max_reject_fraction=0.2"), write_inputs(tmp_path, records))
    message = str(err.value)
    assert "quarantined 3 of 7 records (42.9%)" in message
    assert "validation.max_reject_fraction=0.2" in message
    assert "Top failing expectations (rows failed): ends_with_assistant (2), content_not_too_long (1)." in message
    assert str(tmp_path / "quarantine.jsonl") in message and str(tmp_path / "validation.json") in message
    report = json.loads((tmp_path / "validation.json").read_text())
    assert report["success"] is False and report["quarantined"] == 3
    assert json.loads((tmp_path / "quality.json").read_text())["totals"]["quarantined"] == 3


def test_no_training_records_left_is_a_data_error(tmp_path):
    records = [rec(f"e{i}", "q?", "x" * 51) for i in range(3)]
    with pytest.raises(DataError, match="No training records left after validation: 0 record.* 3 were quarantined"):
        validate_records(config(*BAD_CONFIG, "validation.max_reject_fraction=1"), write_inputs(tmp_path, records))


def test_missing_records_file_names_the_stage_to_run(tmp_path):
    with pytest.raises(DataError, match="records.jsonl not found: run the prepare stage first"):
        validate_records(config(), tmp_path)


def test_run_suite_returns_row_positions_and_resolves_params(tmp_path):
    suite = tmp_path / "tokens.json"
    suite.write_text(json.dumps({"name": "tokens", "expectations": [
        {"type": "expect_column_values_to_be_between", "meta": {"name": "fits"},
         "kwargs": {"column": "n_tokens", "min_value": 1, "max_value": {"$param": "tokenize.max_seq_len"}}},
    ]}))
    # A frame whose index is not 0..n-1: positions, not index labels, come back.
    frame = pd.DataFrame({"n_tokens": [5, 600, 0, 512]}, index=[10, 11, 12, 13])
    [outcome] = run_suite(suite, frame, {"tokenize.max_seq_len": 512})
    assert outcome["name"] == "fits" and outcome["success"] is False
    assert outcome["unexpected_rows"] == [1, 2] and outcome["rows_evaluated"] == 4
    assert outcome["kwargs"]["max_value"] == 512

    with pytest.raises(ValueError, match="fits.max_value needs parameter 'tokenize.max_seq_len'"):
        load_suite(suite, {})

    # GX drops an expectation it cannot build (and only logs it); the runner refuses instead.
    suite.write_text(json.dumps({"name": "typo", "expectations": [
        {"type": "expect_column_values_to_be_betwen", "meta": {"name": "fits"}, "kwargs": {"column": "n_tokens"}},
    ]}))
    with pytest.raises(ValueError, match=r"GX rejected expectation\(s\) \['fits'\]"):
        run_suite(suite, frame, {})


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory):
    from leantune.data.prepare import prepare
    from leantune.tokenization import tokenize

    cfg = config("data.synthetic.num_records=160", "tokenize.vocab_size=300", "tokenize.max_seq_len=200",
                 "data.chunk_size=16")
    run = tmp_path_factory.mktemp("run")
    prepare(cfg, run / "data")
    validate_records(cfg, run / "data")
    tokenize(cfg, run / "data", run / "tokens")
    return cfg, run / "tokens"


def test_token_suite_passes_on_real_shards(tokens_dir):
    cfg, tokens = tokens_dir
    report = validate_tokens(cfg, tokens)
    index = json.loads((tokens / "train" / "index.json").read_text())
    assert report["success"] is True
    assert report["splits"]["train"] == {"sequences": index["counts"]["sequences"], "failed": {}}
    assert json.loads((tokens / "validation.json").read_text()) == report


def test_token_suite_features_match_the_reader(tokens_dir):
    cfg, tokens = tokens_dir
    shards = TokenShards(tokens / "train")
    meta = json.loads((tokens / "train" / "index.json").read_text())
    frame = sequence_features(tokens / "train", shards.index[3:40], shards.docs, meta)
    for row, i in zip(frame.itertuples(), range(3, 40), strict=True):
        item = shards[i]
        assert row.length == len(item["input_ids"])
        assert row.max_token_id == item["input_ids"].max()
        assert row.trainable_tokens == (item["labels"] != -100).sum()
        assert row.document_tokens == sum(item["doc_lengths"])


def test_token_suite_features_read_only_the_rows_sequences(tmp_path):
    import tracemalloc

    # One 4M-token shard, of which the rows asked for are the last two sequences.
    n = 1 << 22
    np.save(tmp_path / "t.npy", np.arange(n, dtype=np.uint32) % 1000)
    np.save(tmp_path / "m.npy", np.ones(n, dtype=np.uint8))
    index = np.array([[0, n - 30, 10, 0, 1], [0, n - 20, 20, 1, 1]], dtype=np.int64)
    docs = np.array([[0, 10], [1, 20]], dtype=np.int64)
    tracemalloc.start()
    frame = sequence_features(tmp_path, index, docs, {"shards": [{"tokens": "t.npy", "mask": "m.npy"}]})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert frame["trainable_tokens"].tolist() == [10, 20]
    assert frame["max_token_id"].tolist() == [(n - 21) % 1000, (n - 1) % 1000]
    assert peak < 4 << 20, peak  # the whole mask as int64 would be 32 MiB


def test_token_suite_catches_corrupt_shards(tokens_dir, tmp_path):
    cfg, tokens = tokens_dir
    broken = tmp_path / "tokens"
    shutil.copytree(tokens, broken)
    meta = json.loads((broken / "train" / "index.json").read_text())
    # An id past the vocabulary in sequence 2, and a document length that no longer adds up in sequence 5.
    shard = np.load(broken / "train" / meta["shards"][0]["tokens"])
    index = np.load(broken / "train" / "index.npy")
    shard[index[2, 1] + 1] = meta["tokenizer"]["vocab_size"]
    np.save(broken / "train" / meta["shards"][0]["tokens"], shard)
    docs = np.load(broken / "train" / "docs.npy")
    docs[index[5, 3], 1] += 1
    np.save(broken / "train" / "docs.npy", docs)
    with pytest.raises(DataError) as info:
        validate_tokens(cfg, broken)
    message = str(info.value)
    assert "train: token_ids_in_vocabulary failed for 1 sequence(s), e.g. #[2]" in message
    assert "train: documents_cover_sequence failed for 1 sequence(s), e.g. #[5]" in message
    assert json.loads((broken / "validation.json").read_text())["success"] is False


def test_quarantine_names_each_row_by_its_source_file_and_line_as_rejects_do(tmp_path):
    from leantune.data.prepare import prepare

    rows = [{"instruction": f"question {i}?", "output": f"answer number {i}."} for i in range(6)]
    rows[3]["output"] = "x" * 80  # line 4: read fine, too long for validation.max_content_chars
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config(f"data.sources=[{{kind: file, path: {path}, name: mine}}]", "validation.max_content_chars=50",
                 "validation.max_reject_fraction=0.5", "data.val_fraction=0")
    prepare(cfg, tmp_path / "data")
    validate_records(cfg, tmp_path / "data")
    [q] = list(iter_jsonl(tmp_path / "data" / "quarantine.jsonl"))
    assert (q["source"], q["file"], q["line"], q["index"], q["failed"]) == (
        "mine", str(path), 4, 3, ["content_not_too_long"])
    assert q["record"]["messages"][1]["content"] == "x" * 80
