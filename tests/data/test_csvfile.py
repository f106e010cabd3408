"""The CSV record splitter (issue 30): a stray quote or an over-long field never swallows rows; valid
CSV is split exactly as the csv module splits it."""

import csv
import io
import random

import pytest

import leantune.data.csvfile as csvfile
from leantune.config import RunConfig
from leantune.data.prepare import prepare
from leantune.errors import DataError
from leantune.jsonl import iter_jsonl


def read(tmp_path, text: str):
    path = tmp_path / "t.csv"
    path.write_bytes(text.encode())
    with open(path, "rb") as f:
        return [(line, value, error.code if error else None) for line, _, value, error in csvfile.csv_rows(f, path)]


def pc_lines(n):
    return [f"p{i},c{i}\n" for i in range(n)]


def test_records_split_as_the_csv_module_splits_valid_csv():
    rng = random.Random(30)
    compared = 0
    for _ in range(2000):
        text = "h\n" + "".join(rng.choice(["a", ",", '"', "\n", '""', " ", "\r\n"]) for _ in range(rng.randint(0, 24)))
        got = [csvfile._fields(lines) if error is None else error.code
               for _, lines, error in csvfile._records(io.BytesIO(text.encode()), [])]
        if "unbalanced_quote" in got:  # a quote still open at the end: the csv module reads it to the end
            continue
        compared += 1
        assert got == list(csv.reader(io.StringIO(text, newline=""))), repr(text)
    assert compared > 1000


@pytest.mark.parametrize("at", [0, 10, 99])
def test_a_quote_never_closed_rejects_its_line_only(tmp_path, at):
    lines = pc_lines(100)
    lines[at] = f'p{at},"c{at}\n'
    rows = read(tmp_path, "prompt,completion\n" + "".join(lines))
    assert len(rows) == 100
    assert [(line, code) for line, _, code in rows if code] == [(at + 2, "unbalanced_quote")]
    assert [v["prompt"] for _, v, _ in rows if v] == [f"p{i}" for i in range(100) if i != at]


def test_a_quote_closed_fifty_lines_later_gives_the_rows_back(tmp_path):
    lines = pc_lines(100)
    lines[10], lines[60] = 'p10,"c10\n', 'p60,c60"\n'
    rows = read(tmp_path, "prompt,completion\n" + "".join(lines))
    assert len(rows) == 100 and [(line, code) for line, _, code in rows if code] == [(12, "unbalanced_quote")]
    assert rows[60][1] == {"prompt": "p60", "completion": 'c60"'}  # the closing line, read as its own row
    assert [v["prompt"] for _, v, _ in rows if v] == [f"p{i}" for i in range(100) if i != 10]


def test_valid_multiline_fields_stay_one_record(tmp_path):
    text = ('prompt,completion\np1,"one line\nsecond, with a comma\n\nend, ""quoted"""\n'
            'p2,"Hello, world\nBye, now"\np3,c3\n')
    assert read(tmp_path, text) == [
        (2, {"prompt": "p1", "completion": 'one line\nsecond, with a comma\n\nend, "quoted"'}, None),
        (6, {"prompt": "p2", "completion": "Hello, world\nBye, now"}, None), (8, {"prompt": "p3", "completion": "c3"}, None)]
    # One line swallowed into a record of the wrong width is given back too.
    rows = read(tmp_path, 'prompt,completion\n"p1,c1\np2,c2"\np3,c3\n')
    assert rows == [(2, None, "unbalanced_quote"), (3, {"prompt": "p2", "completion": 'c2"'}, None),
                    (4, {"prompt": "p3", "completion": "c3"}, None)]


def test_a_stray_quote_closed_by_a_later_fields_opening_quote(tmp_path):
    # The next quote in the file opens a valid multi-line field: it closes the stray one, malformed.
    rows = read(tmp_path, 'prompt,completion\np1,"c1\n"two\nlines",c2\np3,c3\n')
    assert rows == [(2, None, "unbalanced_quote"), (3, {"prompt": "two\nlines", "completion": "c2"}, None),
                    (5, {"prompt": "p3", "completion": "c3"}, None)]
    # Also when a line it swallowed is not a row (a broken one, rejected by itself once read again).
    rows = read(tmp_path, 'prompt,completion\np1,"c1\nbroken,row,3\np2,c2\n"two\nlines",c3\n')
    assert [(line, code) for line, _, code in rows] == [(2, "unbalanced_quote"), (3, "bad_csv_row"), (4, None), (5, None)]
    # In a one-column file too.
    rows = read(tmp_path, 'text\n"stray\nrow one\n"quoted, with a comma"\n')
    assert rows == [(2, None, "unbalanced_quote"), (3, {"text": "row one"}, None),
                    (4, {"text": "quoted, with a comma"}, None)]


def test_a_field_past_the_limit_is_one_reject(tmp_path, monkeypatch):
    lines = pc_lines(20)
    lines[2] = 'p2,"' + "x" * 131_073 + '"\n'
    rows = read(tmp_path, "prompt,completion\n" + "".join(lines))
    assert [(line, code) for line, _, code in rows if code] == [(4, "field_too_long")]
    assert [v["prompt"] for _, v, _ in rows if v] == [f"p{i}" for i in range(20) if i != 2]
    # Over several lines: the lines are not kept, the quote is followed to its end, one reject.
    monkeypatch.setattr(csvfile, "FIELD_LIMIT", 50)
    lines[2] = 'p2,"' + "text line\n" * 30 + '"\n'
    rows = read(tmp_path, "prompt,completion\n" + "".join(lines))
    assert [(line, code) for line, _, code in rows if code] == [(4, "field_too_long")] and len(rows) == 20
    # Past the limit and never closed, or closed after lines that are rows: read again from the next line.
    lines[2] = 'p2,"c2\n'
    rows = read(tmp_path, "prompt,completion\n" + "".join(lines) + "x,y\n" * 10)
    assert [(line, code) for line, _, code in rows if code] == [(4, "unbalanced_quote")] and len(rows) == 30
    rows = read(tmp_path, "prompt,completion\n" + "".join(lines) + 'x,"y"\n')
    assert [(line, code) for line, _, code in rows if code] == [(4, "unbalanced_quote")] and len(rows) == 21


def test_an_unbalanced_header_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="CSV header on line 1 .*unbalanced_quote"):
        read(tmp_path, 'prompt,"completion\np,c\n')


def test_prepare_counts_every_line_of_a_file_with_stray_quotes(tmp_path):
    lines = pc_lines(200)
    lines[5], lines[40], lines[80], lines[199] = 'p5,"c5\n', '"p40,c40\n', 'p80,c80"\n', 'p199,"c199\n'
    path = tmp_path / "q.csv"
    path.write_text("prompt,completion\n" + "".join(lines))
    cfg = RunConfig.model_validate({"data": {"sources": [{"path": str(path)}]}, "validation": {"max_reject_fraction": 1}})
    stats = prepare(cfg, tmp_path / "out")
    s = stats["sources"][str(path)]
    assert (s["read"], s["kept"], s["rejected"], s["reasons"]) == (200, 197, 3, {"unbalanced_quote": 3})
    assert [r["line"] for r in iter_jsonl(tmp_path / "out" / "rejects.jsonl")] == [7, 42, 201]
