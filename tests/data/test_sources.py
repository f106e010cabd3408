"""Readers: each file kind, line/row numbers and raw text, directories, hub and synthetic sources."""

import json
import sys
import types
from pathlib import Path

import pytest

from leantune.config import DataConfig, SourceConfig, SyntheticConfig
from leantune.data.sources import iter_source
from leantune.errors import DataError

DATA = Path(__file__).parents[1] / "fixtures"


def read(path, chunk_size=1000, **src_kwargs):
    src = SourceConfig(path=str(path), name="t", **src_kwargs)
    return list(iter_source(src, DataConfig(sources=[src], chunk_size=chunk_size), 0))


def summary(rows):
    return [(Path(r.file).name, r.line, r.error.code if r.error else None) for r in rows]


def test_jsonl_lines_skip_blank_lines_and_keep_raw_text():
    rows = read(DATA / "alpaca.jsonl")
    assert [r.line for r in rows] == [1, 2, 3, 5]
    assert all(r.source == "t" and r.file == str(DATA / "alpaca.jsonl") for r in rows)
    assert rows[1].raw == '{"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}'
    assert rows[1].value == {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}


def test_jsonl_bad_lines_are_rows_with_errors():
    rows = read(DATA / "alpaca_bad.jsonl")
    assert summary(rows)[1] == ("alpaca_bad.jsonl", 2, "bad_json")
    assert rows[1].raw == '{"instruction": "x", "output": '
    assert summary(rows)[6] == ("alpaca_bad.jsonl", 7, "undecodable_bytes")
    assert rows[6].raw == '{"instruction": "caf\ufffd", "output": "x"}'  # shown with a replacement character
    assert len(rows) == 9


def test_jsonl_byte_order_mark_and_crlf(tmp_path):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n\r\n{"text": "b"}\r\n')
    rows = read(f)
    assert [(r.line, r.value, r.raw) for r in rows] == [(1, {"text": "a"}, '{"text": "a"}'), (3, {"text": "b"}, '{"text": "b"}')]


def test_csv_rows_start_lines_and_multiline_raw_text():
    rows = read(DATA / "prompt_completion.csv")
    assert [(r.line, r.value) for r in rows] == [
        (2, {"prompt": "What is 2+2?", "completion": "4"}),  # the byte order mark is not in the header name
        (3, {"prompt": "Write two lines", "completion": "first\r\nsecond"}),
        (5, {"prompt": "Capital of Italy?", "completion": "Rome"}),
    ]
    assert rows[1].raw == 'Write two lines,"first\r\nsecond"'


def test_csv_bad_rows():
    rows = read(DATA / "prompt_completion_bad.csv")
    assert summary(rows) == [("prompt_completion_bad.csv", 2, None), ("prompt_completion_bad.csv", 3, None),
                             ("prompt_completion_bad.csv", 4, "bad_csv_row"),
                             ("prompt_completion_bad.csv", 5, "undecodable_bytes"),
                             ("prompt_completion_bad.csv", 7, None)]
    assert rows[2].raw == "a,b,c" and "3 fields, the header has 2" in rows[2].error.detail


def test_csv_unreadable_header_is_a_data_error(tmp_path):
    f = tmp_path / "h.csv"
    f.write_bytes(b"pr\xffompt,completion\np,c\n")
    with pytest.raises(DataError, match="CSV header on line 1"):
        read(f)


def test_json_array_and_object_of_arrays():
    assert [r.value["conversations"][0]["value"] for r in read(DATA / "sharegpt.json")] == ["Hello", "Be kind.", "Ping"]
    rows = read(DATA / "splits.json")
    assert [(r.line, r.value) for r in rows[:3]] == [
        (1, {"instruction": "A", "output": "1"}), (2, {"instruction": "B", "output": "2"}),
        (3, {"instruction": "C", "output": "3"})]
    # A key whose value is not an array of rows is reported, not skipped.
    assert summary(rows)[3] == ("splits.json", 4, "bad_structure")
    assert "top-level key 'version'" in rows[3].error.detail and rows[3].raw == '"1.0"'


def test_json_broken_document_keeps_rows_before_the_error():
    rows = read(DATA / "broken.json")
    assert summary(rows) == [("broken.json", 1, None), ("broken.json", 2, None), ("broken.json", 3, "bad_json")]
    assert "after row 2" in rows[2].error.detail


def test_json_values_nested_in_rows_are_built_whole(tmp_path):
    f = tmp_path / "nested.json"
    doc = {"a": [{"messages": [{"role": "user", "content": "x", "meta": {"k": [1, 2.5, None]}}]}, 7],
           "b": {"not": "an array"}, "c": []}
    f.write_text(json.dumps(doc))
    rows = read(f)
    assert [r.value for r in rows if r.error is None] == [doc["a"][0], 7]
    assert [r.error.code for r in rows if r.error] == ["bad_structure"]
    assert json.loads(rows[2].raw) == {"not": "an array"}


def test_json_scalar_document(tmp_path):
    f = tmp_path / "scalar.json"
    f.write_text("42")
    assert summary(read(f)) == [("scalar.json", 1, "bad_structure")]


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_parquet_rows_do_not_depend_on_batch_size(chunk_size):
    rows = read(DATA / "text.parquet", chunk_size=chunk_size)
    assert [(r.line, r.value) for r in rows] == [
        (1, {"text": "First document.", "meta": 1}), (2, {"text": "Second document.", "meta": 2}),
        (3, {"text": None, "meta": 3}), (4, {"text": "   ", "meta": 4})]
    assert json.loads(rows[0].raw) == {"text": "First document.", "meta": 1}


def test_corrupt_parquet_is_one_rejected_row():
    assert summary(read(DATA / "corrupt.parquet")) == [("corrupt.parquet", 0, "unreadable_file")]


def test_directory_is_read_recursively_in_sorted_order_and_reports_unknown_files():
    rows = read(DATA / "dir")
    assert [(str(Path(r.file).relative_to(DATA / "dir")), r.line, r.error.code if r.error else None)
            for r in rows] == [
        ("README.md", 0, "unsupported_file"), ("a.jsonl", 1, None), ("a.jsonl", 2, None),
        ("sub/b.csv", 2, None), ("sub/b.csv", 3, None), ("sub/c.parquet", 1, None)]
    assert rows[-1].value == {"prompt": "parquet prompt", "completion": "parquet answer"}


def test_missing_path_is_a_data_error_naming_the_key(tmp_path):
    with pytest.raises(DataError, match=r"data\.sources\.0\.path: .*does not exist"):
        read(tmp_path / "nope.jsonl")


def test_hub_source_streams_the_requested_split(monkeypatch):
    calls = []

    def load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return iter([{"instruction": "i1", "output": "o1"}, {"instruction": "i2", "output": "o2"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    src = SourceConfig(kind="hub", path="org/set", hub_config="cfg", split="test", name="hub")
    rows = list(iter_source(src, DataConfig(sources=[src]), 0))
    assert calls == [("org/set", "cfg", "test", True)]
    assert [(r.source, r.file, r.line, r.value["instruction"]) for r in rows] == [
        ("hub", "hub:org/set", 1, "i1"), ("hub", "hub:org/set", 2, "i2")]


def test_hub_source_through_the_real_datasets_library(tmp_path, monkeypatch):
    # load_dataset also takes a local folder of data files: the same call as for a hub id, offline.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "train.jsonl").write_bytes((DATA / "messages.jsonl").read_bytes())
    src = SourceConfig(kind="hub", path=str(tmp_path), name="local")
    rows = list(iter_source(src, DataConfig(sources=[src]), 0))
    assert [r.line for r in rows] == [1, 2, 3]
    assert rows[0].value == {"messages": [{"role": "user", "content": "What is the capital of Spain?"},
                                          {"role": "assistant", "content": "Madrid."}]}


def test_hub_source_failure_is_a_data_error(monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    src = SourceConfig(kind="hub", path="org/set", name="hub")
    with pytest.raises(DataError, match=r"data\.sources\.0: cannot open hub dataset 'org/set'.*kind: file"):
        list(iter_source(src, DataConfig(sources=[src]), 0))


def test_synthetic_source_yields_messages_rows():
    src = SourceConfig(kind="synthetic", name="syn")
    rows = list(iter_source(src, DataConfig(sources=[src], synthetic=SyntheticConfig(num_records=7)), 0))
    assert [r.line for r in rows] == list(range(1, 8))
    assert all(r.error is None and [m["role"] for m in r.value["messages"]] == ["user", "assistant"] for r in rows)
    assert json.loads(rows[0].raw) == rows[0].value
