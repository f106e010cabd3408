"""The prepare stage end to end: records, rejects, accounting, dedupe, weights, errors, memory."""

import json
import sys
from pathlib import Path

import pytest

from leantune.config import RunConfig
from leantune.data.normalize import record_id
from leantune.data.prepare import MAX_REJECT_RAW_CHARS, _check_balance, prepare
from leantune.errors import DataError
from leantune.jsonl import iter_jsonl

DATA = Path(__file__).parents[1] / "fixtures"
BENCH = Path(__file__).resolve().parents[2] / "bench"


def config(*sources, max_reject_fraction=1.0, **data):
    return RunConfig.model_validate({"data": {"sources": list(sources), **data},
                                     "validation": {"max_reject_fraction": max_reject_fraction}})


def src(name, **kw):
    """A file source for a fixture under tests/data, named after the file."""
    return {"path": str(DATA / name), "name": name, **kw}


def balanced(stats):
    for s in [*stats["sources"].values(), stats["totals"]]:
        assert s["read"] == s["kept"] + s["rejected"] + s["duplicates"] + s["not_selected"]
    return True


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def pc(i):
    return {"prompt": f"prompt {i}", "completion": f"answer {i}"}


@pytest.mark.parametrize("name, fmt, kept, first", [
    ("alpaca.jsonl", "alpaca", 4, [{"role": "user", "content": "Name a primary colour."},
                                    {"role": "assistant", "content": "Red."}]),
    ("sharegpt.json", "sharegpt", 3, [{"role": "user", "content": "Hello"},
                                      {"role": "assistant", "content": "Hi there"}]),
    ("messages.jsonl", "messages", 3, [{"role": "user", "content": "What is the capital of Spain?"},
                                       {"role": "assistant", "content": "Madrid."}]),
    ("prompt_completion.csv", "prompt_completion", 3, [{"role": "user", "content": "What is 2+2?"},
                                                       {"role": "assistant", "content": "4"}]),
    ("splits.json", "alpaca", 3, [{"role": "user", "content": "A"}, {"role": "assistant", "content": "1"}]),
])
def test_each_format_becomes_canonical_records(tmp_path, name, fmt, kept, first):
    stats = prepare(config(src(name)), tmp_path)
    s = stats["sources"][name]
    assert (s["format"], s["kept"]) == (fmt, kept)
    records = list(iter_jsonl(tmp_path / "records.jsonl"))
    assert len(records) == kept
    assert {k: records[0][k] for k in ("id", "messages", "source")} == {"id": record_id(first), "messages": first,
                                                                         "source": name}
    # Each record says where it was read (quarantine.jsonl names a failing one by them).
    assert all(list(r) == ["id", "messages", "source", "file", "line"] and r["id"] == record_id(r["messages"])
               and Path(r["file"]).name == name and r["line"] >= 1 for r in records)
    assert json.loads((tmp_path / "prepare.json").read_text()) == stats
    assert balanced(stats)


def test_text_records_train_on_the_whole_text(tmp_path):
    stats = prepare(config(src("text.parquet")), tmp_path)
    records = list(iter_jsonl(tmp_path / "records.jsonl"))
    assert [r["messages"] for r in records] == [
        [{"role": "user", "content": ""}, {"role": "assistant", "content": "First document."}],
        [{"role": "user", "content": ""}, {"role": "assistant", "content": "Second document."}]]
    assert stats["sources"]["text.parquet"] == {
        "format": "text", "read": 4, "kept": 2, "rejected": 2, "duplicates": 0, "not_selected": 0,
        "reasons": {"empty_content": 1, "missing_field": 1}}


def test_rejects_name_source_file_line_reason_and_raw_text(tmp_path):
    stats = prepare(config(src("alpaca_bad.jsonl"), src("messages_bad.jsonl")), tmp_path)
    rejects = list(iter_jsonl(tmp_path / "rejects.jsonl"))
    assert [(r["source"], Path(r["file"]).name, r["line"], r["reason"]) for r in rejects] == [
        ("alpaca_bad.jsonl", "alpaca_bad.jsonl", 2, "bad_json"),
        ("alpaca_bad.jsonl", "alpaca_bad.jsonl", 3, "not_an_object"),
        ("alpaca_bad.jsonl", "alpaca_bad.jsonl", 4, "missing_field"),
        ("alpaca_bad.jsonl", "alpaca_bad.jsonl", 5, "empty_content"),
        ("alpaca_bad.jsonl", "alpaca_bad.jsonl", 6, "non_text_value"),
        ("alpaca_bad.jsonl", "alpaca_bad.jsonl", 7, "undecodable_bytes"),
        ("alpaca_bad.jsonl", "alpaca_bad.jsonl", 8, "invalid_unicode"),
        ("messages_bad.jsonl", "messages_bad.jsonl", 2, "non_text_value"),
        ("messages_bad.jsonl", "messages_bad.jsonl", 3, "unknown_role"),
        ("messages_bad.jsonl", "messages_bad.jsonl", 4, "wrong_role_order"),
        ("messages_bad.jsonl", "messages_bad.jsonl", 5, "empty_content"),
        ("messages_bad.jsonl", "messages_bad.jsonl", 6, "not_an_object"),
        ("messages_bad.jsonl", "messages_bad.jsonl", 7, "bad_structure"),
    ]
    assert rejects[2] == {"source": "alpaca_bad.jsonl", "file": str(DATA / "alpaca_bad.jsonl"), "line": 4,
                          "reason": "missing_field", "detail": "'output' is missing",
                          "raw": '{"instruction": "Hi"}', "raw_truncated": False}
    assert stats["sources"]["alpaca_bad.jsonl"] == {
        "format": "alpaca", "read": 9, "kept": 2, "rejected": 7, "duplicates": 0, "not_selected": 0,
        "reasons": {"bad_json": 1, "empty_content": 1, "invalid_unicode": 1, "missing_field": 1,
                    "non_text_value": 1, "not_an_object": 1, "undecodable_bytes": 1}}
    assert stats["totals"]["reasons"]["empty_content"] == 2
    assert stats["totals"]["rejected"] == 13 == len(rejects)


def test_long_raw_text_is_truncated_in_rejects(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(pc(0)) + "\n" + '{"prompt": "' + "x" * 5000 + "\n")
    prepare(config({"path": str(path), "name": "long"}), tmp_path / "out")
    [reject] = iter_jsonl(tmp_path / "out" / "rejects.jsonl")
    assert (reject["reason"], reject["line"], len(reject["raw"]), reject["raw_truncated"]) == (
        "bad_json", 2, MAX_REJECT_RAW_CHARS, True)


def test_mixed_sources_balance_per_source_and_in_total(tmp_path):
    names = ["alpaca.jsonl", "alpaca_bad.jsonl", "sharegpt.json", "sharegpt_bad.jsonl", "messages.jsonl",
             "messages_bad.jsonl", "prompt_completion.csv", "prompt_completion_bad.csv", "text.parquet",
             "splits.json", "broken.json", "corrupt.parquet", "unknown.jsonl", "dir"]
    stats = prepare(config(*(src(n) for n in names), {"kind": "synthetic", "name": "syn"},
                           synthetic={"num_records": 50}), tmp_path)
    expected = {  # name: (read, kept, rejected)
        "alpaca.jsonl": (4, 4, 0), "alpaca_bad.jsonl": (9, 2, 7), "sharegpt.json": (3, 3, 0),
        "sharegpt_bad.jsonl": (7, 1, 6), "messages.jsonl": (3, 3, 0), "messages_bad.jsonl": (7, 1, 6),
        "prompt_completion.csv": (3, 3, 0), "prompt_completion_bad.csv": (5, 2, 3), "text.parquet": (4, 2, 2),
        "splits.json": (4, 3, 1), "broken.json": (3, 2, 1), "corrupt.parquet": (1, 0, 1),
        "unknown.jsonl": (3, 0, 3), "dir": (6, 5, 1),
        "syn": (50, 48, 0)}  # the generator's plain-form questions can repeat: 2 of 50 are duplicates
    got = {n: (s["read"], s["kept"], s["rejected"]) for n, s in stats["sources"].items()}
    assert got == expected
    assert balanced(stats)
    t = stats["totals"]
    assert (t["read"], t["kept"], t["rejected"]) == tuple(sum(v[i] for v in expected.values()) for i in range(3))
    assert sum(1 for _ in iter_jsonl(tmp_path / "records.jsonl")) == t["kept"]
    assert sum(1 for _ in iter_jsonl(tmp_path / "rejects.jsonl")) == t["rejected"]
    assert stats["sources"]["unknown.jsonl"]["format"] == "unknown"
    assert stats["sources"]["dir"]["reasons"] == {"unsupported_file": 1}
    assert [r["source"] for r in iter_jsonl(tmp_path / "records.jsonl")][:4] == ["alpaca.jsonl"] * 4


def test_two_runs_write_identical_files(tmp_path):
    cfg = config(src("alpaca_bad.jsonl"), src("dir"), src("sharegpt.json"), {"kind": "synthetic", "name": "syn"},
                 synthetic={"num_records": 300})
    prepare(cfg, tmp_path / "one")
    prepare(cfg, tmp_path / "two")
    for f in ("records.jsonl", "rejects.jsonl", "prepare.json"):
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes()


def test_duplicates_are_removed_and_counted_within_and_across_sources(tmp_path):
    rows = [pc(0), pc(1), pc(0), {"prompt": "  prompt 1 ", "completion": "answer 1\r"}, pc(2)]
    first = write_jsonl(tmp_path / "a.jsonl", rows)
    second = write_jsonl(tmp_path / "b.jsonl", [pc(2), pc(3), {"messages": [
        {"role": "user", "content": "prompt 3"}, {"role": "assistant", "content": "answer 3"}]}])
    cfg = config({"path": first, "name": "a"}, {"path": second, "name": "b", "format": "prompt_completion"})
    stats = prepare(cfg, tmp_path / "on")
    # Row 4 is row 2 after normalisation; b's pc(2) was kept from a; b's last row is forced to the
    # wrong format and rejected, so it is not counted as a duplicate of pc(3).
    assert [(s["kept"], s["duplicates"], s["rejected"]) for s in stats["sources"].values()] == [(3, 2, 0), (1, 1, 1)]
    ids = [r["id"] for r in iter_jsonl(tmp_path / "on" / "records.jsonl")]
    assert len(ids) == len(set(ids)) == 4
    # Each duplicate is listed with where it is, like a reject; its id is the kept copy's.
    assert [(d["source"], Path(d["file"]).name, d["line"]) for d in iter_jsonl(tmp_path / "on" / "duplicates.jsonl")] == [
        ("a", "a.jsonl", 3), ("a", "a.jsonl", 4), ("b", "b.jsonl", 1)]
    assert {d["id"] for d in iter_jsonl(tmp_path / "on" / "duplicates.jsonl")} <= set(ids)
    cfg.data.dedupe = False
    stats = prepare(cfg, tmp_path / "off")
    assert [(s["kept"], s["duplicates"]) for s in stats["sources"].values()] == [(5, 0), (2, 0)]
    assert balanced(stats)
    assert list(iter_jsonl(tmp_path / "off" / "duplicates.jsonl")) == []


def test_weight_keeps_a_deterministic_share_by_id(tmp_path):
    rows = [pc(i) for i in range(1000)]
    path = write_jsonl(tmp_path / "w.jsonl", rows)
    stats = prepare(config({"path": path, "name": "w", "weight": 0.3}), tmp_path / "one")
    s = stats["sources"]["w"]
    assert 240 < s["kept"] < 360 and s["kept"] + s["not_selected"] == 1000 and balanced(stats)
    kept = [r["id"] for r in iter_jsonl(tmp_path / "one" / "records.jsonl")]
    # The choice depends on the record, not on its position: reversed input keeps the same ids.
    reversed_path = write_jsonl(tmp_path / "r.jsonl", rows[::-1])
    prepare(config({"path": reversed_path, "name": "w", "weight": 0.3}), tmp_path / "two")
    assert sorted(r["id"] for r in iter_jsonl(tmp_path / "two" / "records.jsonl")) == sorted(kept)


def test_max_rows_caps_kept_rows_in_file_order(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [pc(i) for i in range(100)] + [{"prompt": 1, "completion": "x"}])
    stats = prepare(config({"path": path, "name": "m", "max_rows": 10}), tmp_path)
    assert {k: stats["sources"]["m"][k] for k in ("read", "kept", "not_selected", "rejected")} == {
        "read": 101, "kept": 10, "not_selected": 90, "rejected": 1}
    assert [r["messages"][0]["content"] for r in iter_jsonl(tmp_path / "records.jsonl")] == [
        f"prompt {i}" for i in range(10)]
    assert balanced(stats)


def test_weight_and_max_rows_together(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [pc(i) for i in range(400)])
    stats = prepare(config({"path": path, "name": "m", "weight": 0.5, "max_rows": 50}), tmp_path)
    s = stats["sources"]["m"]
    assert (s["kept"], s["not_selected"]) == (50, 350)


def test_forced_format(tmp_path):
    stats = prepare(config(src("dir", format="prompt_completion"), src("alpaca.jsonl", format="alpaca")), tmp_path)
    assert [s["format"] for s in stats["sources"].values()] == ["prompt_completion", "alpaca"]
    assert stats["totals"]["kept"] == 9
    # Forcing a format that does not fit rejects every row with missing_field.
    with pytest.raises(DataError):
        prepare(config(src("alpaca.jsonl", format="messages")), tmp_path / "forced")
    [s] = json.loads((tmp_path / "forced" / "prepare.json").read_text())["sources"].values()
    assert (s["format"], s["rejected"], s["reasons"]) == ("messages", 4, {"missing_field": 4})


def test_no_record_kept_is_a_data_error_that_names_the_fix(tmp_path):
    with pytest.raises(DataError) as e:
        prepare(config(src("unknown.jsonl")), tmp_path)
    msg = str(e.value)
    assert "no record kept" in msg and "unknown_format x3" in msg and "data.sources.<i>.format" in msg
    assert "question" in msg  # the row's fields are shown
    assert str(tmp_path / "rejects.jsonl") in msg
    assert [(r["line"], r["reason"]) for r in iter_jsonl(tmp_path / "rejects.jsonl")] == [
        (1, "unknown_format"), (2, "unknown_format"), (3, "unknown_format")]


def test_empty_source_is_a_data_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"no record kept.*read 0"):
        prepare(config({"path": str(empty), "name": "empty"}), tmp_path / "out")


def test_too_many_rejects_is_a_data_error_naming_the_threshold(tmp_path):
    cfg = config(src("alpaca_bad.jsonl"), src("alpaca.jsonl"), max_reject_fraction=0.54)
    stats = prepare(cfg, tmp_path / "ok")  # 7 of 13 rows (53.8%) rejected: within the limit
    assert (stats["totals"]["rejected"], stats["totals"]["read"]) == (7, 13)
    cfg.validation.max_reject_fraction = 0.05
    with pytest.raises(DataError) as e:
        prepare(cfg, tmp_path / "fail")
    msg = str(e.value)
    assert "7 of 13 rows rejected (53.8%)" in msg and "validation.max_reject_fraction = 0.05" in msg
    assert "--set validation.max_reject_fraction=0.54" in msg
    assert str(tmp_path / "fail" / "rejects.jsonl") in msg and "bad_json x1" in msg
    # The outputs are written before the error, so the user can look at them.
    assert json.loads((tmp_path / "fail" / "prepare.json").read_text())["totals"]["rejected"] == 7


def test_unbalanced_counts_raise_assertion_error():
    with pytest.raises(AssertionError, match="rows read 5"):
        _check_balance("source 'x'", {"read": 5, "kept": 2, "rejected": 1, "duplicates": 0, "not_selected": 1})


def test_lost_record_is_detected(tmp_path, monkeypatch):
    from leantune.jsonl import JsonlWriter

    real_write = JsonlWriter.write

    def drop_records(self, obj):
        if self.path.name != "records.jsonl":
            real_write(self, obj)

    monkeypatch.setattr(JsonlWriter, "write", drop_records)
    with pytest.raises(AssertionError, match="wrote 0 records"):
        prepare(config(src("alpaca.jsonl")), tmp_path)


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_input(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        from prepare_memory import peak_rss_kib
    finally:
        sys.path.remove(str(BENCH))
    small, _ = peak_rss_kib(5_000, tmp_path)
    large, _ = peak_rss_kib(50_000, tmp_path)
    assert large <= 1.10 * small + 15 * 1024, (small, large)
