"""Reliability of the data stage under bad input (issue 14): no row is lost uncounted, formats are
detected per file from rows that parse, and normalisation leaves no invisible or half-empty turns."""

import json
import unicodedata

import pytest
from data_faults import corrupt_parquet_pages

from leantune.config import RunConfig
from leantune.data.formats import to_messages
from leantune.data.prepare import prepare
from leantune.errors import DataError
from leantune.jsonl import iter_jsonl


def config(*paths, chunk_size=1000, **source):
    return RunConfig.model_validate({"data": {"sources": [{"path": str(p), **source} for p in paths],
                                              "chunk_size": chunk_size},
                                     "validation": {"max_reject_fraction": 1.0}})


def alpaca(i):
    return {"instruction": f"question {i}", "input": "", "output": f"answer {i}"}


def messages(i):
    return {"messages": [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": f"hi {i}"}]}


def counts(stats, path):
    s = stats["sources"][str(path)]
    return s["read"], s["kept"], s["rejected"]


def test_json_lines_saved_as_json_reads_every_line(tmp_path):
    path = tmp_path / "jsonl_as.json"
    path.write_text("".join(json.dumps(alpaca(i)) + "\n" for i in range(40)))
    stats = prepare(config(path), tmp_path / "out")
    assert counts(stats, path) == (40, 40, 0)
    # Its line numbers are the file's lines, as for .jsonl.
    path.write_text("{broken\n" + "".join(json.dumps(alpaca(i)) + "\n" for i in range(40)))
    stats = prepare(config(path), tmp_path / "out")
    assert counts(stats, path) == (41, 40, 1)
    [reject] = iter_jsonl(tmp_path / "out" / "rejects.jsonl")
    assert (reject["line"], reject["reason"]) == (1, "bad_json")


def test_json_with_two_top_level_arrays_reads_both(tmp_path):
    path = tmp_path / "two.json"
    path.write_text(json.dumps([alpaca(i) for i in range(20)]) + "\n" + json.dumps([alpaca(i) for i in range(20, 45)]))
    stats = prepare(config(path), tmp_path / "out")
    assert counts(stats, path) == (45, 45, 0)
    # Trailing rubbish after the document is one counted reject, not silence.
    path.write_text(json.dumps([alpaca(i) for i in range(5)]) + " nonsense")
    stats = prepare(config(path), tmp_path / "out")
    assert counts(stats, path) == (6, 5, 1)


def test_json_array_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([alpaca(i) for i in range(40)], indent=2).encode())
    stats = prepare(config(path), tmp_path / "out")
    assert counts(stats, path) == (40, 40, 0)


def test_pretty_printed_json_is_not_taken_for_json_lines(tmp_path):
    path = tmp_path / "pretty.json"
    rows = [alpaca(i) for i in range(6)]
    path.write_text("[\n" + ",\n".join("  " + json.dumps(r) for r in rows) + "\n]\n")
    assert counts(prepare(config(path), tmp_path / "out"), path) == (6, 6, 0)
    path.write_text("{\n\"train\": [\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]}\n")
    assert counts(prepare(config(path), tmp_path / "out"), path) == (6, 6, 0)


def test_a_directory_of_mixed_formats_is_detected_per_file(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "a.jsonl").write_text("".join(json.dumps(alpaca(i)) + "\n" for i in range(30)))
    (d / "b.jsonl").write_text("".join(json.dumps(messages(i)) + "\n" for i in range(10)))
    stats = prepare(config(d), tmp_path / "out")
    s = stats["sources"][str(d)]
    assert (s["read"], s["kept"], s["rejected"], s["format"]) == (40, 40, 0, "alpaca, messages")


def test_format_is_detected_from_the_first_rows_that_parse(tmp_path):
    path = tmp_path / "bad_start.jsonl"
    path.write_text("{oops\n" * 6 + "".join(json.dumps(alpaca(i)) + "\n" for i in range(40)))
    stats = prepare(config(path, chunk_size=5), tmp_path / "out")
    assert counts(stats, path) == (46, 40, 6)
    assert stats["totals"]["reasons"] == {"bad_json": 6}


def test_cr_only_line_endings_are_lines(tmp_path):
    path = tmp_path / "mac.jsonl"
    path.write_bytes(b"".join(json.dumps(alpaca(i)).encode() + b"\r" for i in range(10)))
    assert counts(prepare(config(path), tmp_path / "out"), path) == (10, 10, 0)
    csv_path = tmp_path / "mac.csv"
    csv_path.write_bytes(b"prompt,completion\r" + b"".join(f"p{i},c{i}\r".encode() for i in range(10)))
    assert counts(prepare(config(csv_path), tmp_path / "out"), csv_path) == (10, 10, 0)


def test_invisible_reply_is_empty_and_empty_instruction_leaves_the_input_alone():
    from leantune.data.formats import RowError

    with pytest.raises(RowError) as e:
        to_messages({"prompt": "hi", "completion": "\u200b"}, "prompt_completion")
    assert e.value.code == "empty_content"
    with pytest.raises(RowError):
        to_messages({"prompt": "hi", "completion": " \u200b\u2060\ufeff "}, "prompt_completion")
    # Letters and marks that show nothing: Hangul fillers (Lo), the blank braille pattern (So), a
    # variation selector and the grapheme joiner (Mn) alone.
    for invisible in ["\u3164", "\u115f\u1160", "\u2800\u2800", "\uffa0 ", "\ufe0f\u034f", "\u3164\u200b\u2800"]:
        with pytest.raises(RowError) as e:
            to_messages({"prompt": "hi", "completion": invisible}, "prompt_completion")
        assert e.value.code == "empty_content", ascii(invisible)
    # A letter with them is not empty; neither is a combining mark on a letter, nor Korean text.
    for visible in ["\u3164a", "e\u0301", "\ud55c\uad6d\uc5b4", "\u2800\u2801"]:
        got = to_messages({"prompt": "hi", "completion": visible}, "prompt_completion")[1]["content"]
        assert got == unicodedata.normalize("NFC", visible)
    got = to_messages({"instruction": "", "input": "the input", "output": "x"}, "alpaca")
    assert got[0] == {"role": "user", "content": "the input"}
    got = to_messages({"instruction": "do", "input": "this", "output": "x"}, "alpaca")
    assert got[0] == {"role": "user", "content": "do\n\nthis"}


@pytest.mark.parametrize("backend", ["default", "python"])
@pytest.mark.parametrize("surrogate", ["\udfff", "\ud800", "\udbff"])
def test_a_lone_surrogate_in_a_json_array_is_one_reject_not_the_rest_of_the_file(tmp_path, monkeypatch,
                                                                                   backend, surrogate):
    # yajl's C parser cannot decode "\udfff" (the rows after it used to become one bad_json reject) and
    # turns "\ud800" into "?" (the row used to be kept); the pure-Python parser keeps both as they are.
    if backend == "python":
        import ijson

        monkeypatch.setattr(ijson, "parse", ijson.get_backend("python").parse)
    rows = [alpaca(i) for i in range(30)]
    rows[10]["output"] = f"lone {surrogate} here"
    rows[12]["output"] = "pair \U0001f642 and \\ud800 as text"  # an escaped pair, and a backslash: no lone surrogate
    path = tmp_path / "surrogate.json"
    path.write_text(json.dumps(rows, indent=1))
    stats = prepare(config(path), tmp_path / "out")
    assert counts(stats, path) == (30, 29, 1)
    [reject] = iter_jsonl(tmp_path / "out" / "rejects.jsonl")
    assert (reject["line"], reject["reason"]) == (11, "invalid_unicode")
    assert f"\\u{ord(surrogate):04x}" in (tmp_path / "out" / "rejects.jsonl").read_text()  # written as its escape
    kept = [r["messages"][1]["content"] for r in iter_jsonl(tmp_path / "out" / "records.jsonl")]
    assert kept[11] == "pair \U0001f642 and \\ud800 as text"


def test_lone_surrogate_scan_follows_backslashes_and_block_ends(tmp_path, monkeypatch):
    import leantune.data.sources as sources
    from leantune.data.sources import _has_lone_surrogate

    path = tmp_path / "s.json"
    for text, lone in [(r'["\ud800"]', True), (r'["\\ud800"]', False), (r'["\\\ud800x"]', True),
                       (r'["\ud83d\ude42"]', False), (r'["\uD800\u0041"]', True), (r'["\udc00"]', True),
                       (r'["\\udc00 \ud800\udc00 \udbff\udfff"]', False), (r'["\ud800\ud800\udc00"]', True)]:
        path.write_text(text)
        with open(path, "rb") as f:
            assert _has_lone_surrogate(f) is lone, text
    # Wherever a block boundary cuts it, a pair is a pair and a lone escape is found.
    monkeypatch.setattr(sources, "SCAN_BLOCK", 64)
    for cut in range(-30, 3):
        for tail, lone in [(r'\ud83d\ude42 \\"]', False), (r'\ud83d"]', True), (r'x\ude42"]', True)]:
            path.write_text('["' + "x" * (64 * 3 + cut) + tail)
            with open(path, "rb") as f:
                assert _has_lone_surrogate(f) is lone, (cut, tail)


def test_corrupt_parquet_pages_reject_their_row_groups_only(tmp_path):
    pc = [{"prompt": f"prompt number {i} " * 3, "completion": f"answer number {i} " * 3} for i in range(50)]
    path = tmp_path / "pages.parquet"
    corrupt_parquet_pages(path, pc, 10, [1, 3])
    stats = prepare(config(path, chunk_size=4), tmp_path / "out")
    assert counts(stats, path) == (50, 30, 20)
    kept = {r["messages"][0]["content"] for r in iter_jsonl(tmp_path / "out" / "records.jsonl")}
    assert kept == {(f"prompt number {i} " * 3).strip() for i in (*range(10), *range(20, 30), *range(40, 50))}
    rejects = list(iter_jsonl(tmp_path / "out" / "rejects.jsonl"))
    assert [r["line"] for r in rejects] == [*range(11, 21), *range(31, 41)]
    assert {r["reason"] for r in rejects} == {"unreadable_row_group"}
    assert "row group 1 (rows 11-20) cannot be decoded: Corrupt snappy" in rejects[0]["detail"]
    # Exit 2 (a DataError) only when the rejected share passes validation.max_reject_fraction.
    cfg = config(path)
    cfg.validation.max_reject_fraction = 0.3
    with pytest.raises(DataError, match="20 of 50 rows rejected"):
        prepare(cfg, tmp_path / "out2")
    # An uncompressed page with a flipped byte decodes without error; its page checksum catches it.
    corrupt_parquet_pages(path, pc, 25, [1], checksum=True)
    stats = prepare(config(path), tmp_path / "out3")
    assert counts(stats, path) == (50, 25, 25)
    assert "CRC checksum" in next(iter_jsonl(tmp_path / "out3" / "rejects.jsonl"))["detail"]


def test_minified_objects_of_arrays_one_per_line_are_json_not_json_lines(tmp_path):
    path = tmp_path / "objects.json"
    path.write_text(json.dumps({"rows": [alpaca(i) for i in range(12)]}) + "\n"
                    + json.dumps({"rows": [alpaca(i) for i in range(12, 20)], "more": [alpaca(20)]}) + "\n")
    stats = prepare(config(path), tmp_path / "out")
    assert counts(stats, path) == (21, 21, 0)
    assert [r["messages"][0]["content"] for r in iter_jsonl(tmp_path / "out" / "records.jsonl")] == [
        f"question {i}" for i in range(21)]
    # Rows that themselves hold arrays of objects (messages) are still JSON Lines, one row per line,
    # and so is a one-line file whose line is a row.
    path.write_text("".join(json.dumps(messages(i)) + "\n" for i in range(7)))
    assert counts(prepare(config(path), tmp_path / "out"), path) == (7, 7, 0)
    path.write_text(json.dumps(alpaca(0)) + "\n")
    assert counts(prepare(config(path), tmp_path / "out"), path) == (1, 1, 0)



@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32", "utf-32-le"])
def test_utf16_and_utf32_files_are_decoded(tmp_path, encoding):
    # "utf-16"/"utf-32" write a byte order mark; "-be"/"-le" do not (detected by where the NUL bytes are).
    rows = [{"prompt": f"prompt {i} é 日本 🙂", "completion": f"answer, {i}"} for i in range(12)]
    jsonl, array, table = tmp_path / "a.jsonl", tmp_path / "b.json", tmp_path / "c.csv"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding=encoding)
    array.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding=encoding)
    table.write_text("prompt,completion\n" + "".join(f'{r["prompt"]},"{r["completion"]}"\n' for r in rows),
                     encoding=encoding)
    stats = prepare(config(jsonl, array, table), tmp_path / "out")
    assert [counts(stats, p) for p in (jsonl, array, table)] == [(12, 12, 0), (12, 0, 0), (12, 0, 0)]
    # The same 12 rows in each file: the second and third are duplicates, so nothing was read differently.
    assert stats["totals"]["duplicates"] == 24
    kept = [r["messages"] for r in iter_jsonl(tmp_path / "out" / "records.jsonl")]
    assert kept == [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
                    for r in rows]


def test_an_invalid_utf16_sequence_rejects_its_row_only(tmp_path):
    path = tmp_path / "bad16.jsonl"
    good = [json.dumps(alpaca(i)) + "\n" for i in range(5)]
    data = "".join(good[:2]).encode("utf-16-le") + '{"x": "'.encode("utf-16-le") + b"\x00\xd8"  # a lone surrogate
    path.write_bytes(b"\xff\xfe" + data + '"}\n'.encode("utf-16-le") + "".join(good[2:]).encode("utf-16-le"))
    stats = prepare(config(path), tmp_path / "out")
    assert counts(stats, path) == (6, 5, 1)
    [reject] = iter_jsonl(tmp_path / "out" / "rejects.jsonl")
    assert (reject["line"], reject["reason"]) == (3, "undecodable_bytes")
