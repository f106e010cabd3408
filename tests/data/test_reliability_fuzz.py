"""Property-style fuzz of the data stage (issue 14): 10,000 good records with 13 kinds of corruption mixed
in, over .jsonl, .json, .csv, .parquet and a directory of mixed formats, from a seeded generator. Every
file is read to its last physical row; every good record is kept, byte for byte as normalised; every bad
row is rejected with its file, line and reason; every repeated row is listed with its file and line."""

import csv
import io
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
from data_faults import corrupt_parquet_pages

from leantune.config import RunConfig
from leantune.data.normalize import normalize_text, record_id
from leantune.data.prepare import prepare
from leantune.jsonl import iter_jsonl

SEED = 1414
WORDS = ["the", "sky", "is", "blue", "naïve", "café", "日本語", "emoji 🙂", "tab\there", "a,b", 'say "hi"',
         "e\u0301", "Ａ", "x\r\ny", "  padded  ", "line\nbreak", "\u00a0nbsp"]


class Corpus:
    """The rows of every file, with what each must become: a kept record, a reject reason, or a duplicate."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.n = 0
        self.kept: dict[str, list[dict]] = {}  # record id -> normalised messages
        self.rejects: set[tuple[str, int, str]] = set()  # (file, line, reason)
        self.duplicates: set[tuple[str, int]] = set()
        self.physical: dict[str, int] = {}  # file -> rows in it

    def text(self) -> str:
        self.n += 1
        return f"q{self.n} " + " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(1, 8)))

    def good(self, fmt: str) -> tuple[dict, list[dict]]:
        """A good row of `fmt` and the canonical messages it must become."""
        user, answer = self.text(), self.text()
        if fmt == "alpaca":
            extra = self.text() if self.rng.random() < 0.5 else ""
            instruction = "" if extra and self.rng.random() < 0.1 else user  # an empty instruction is fine
            row = {"instruction": instruction, "input": extra, "output": answer}
            parts = [normalize_text(p) for p in (instruction, extra) if normalize_text(p)]
            return row, [{"role": "user", "content": "\n\n".join(parts)},
                         {"role": "assistant", "content": normalize_text(answer)}]
        messages = [{"role": "user", "content": normalize_text(user)},
                    {"role": "assistant", "content": normalize_text(answer)}]
        if fmt == "prompt_completion":
            return {"prompt": user, "completion": answer}, messages
        if fmt == "messages":
            return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}, messages
        return {"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]}, messages

    def bad(self, fmt: str) -> tuple[object, str]:
        """A bad parsed row of `fmt` and its reject reason (corruptions that survive any file format)."""
        row, _ = self.good(fmt)
        key = {"alpaca": "output", "prompt_completion": "completion"}.get(fmt)
        kind = self.rng.choice(["missing_field", "empty_content", "invalid_unicode"]
                               + (["wrong_role_order", "unknown_role"] if key is None else []))
        if kind == "missing_field":
            row.pop(key or fmt_key(fmt))
        elif kind == "empty_content":
            if key:
                row[key] = self.rng.choice(["   ", "\u200b", " \u2060\ufeff "])
            else:
                turns = row.get("messages") or row["conversations"]
                turns[1]["content" if fmt == "messages" else "value"] = "\u200b"
        elif kind == "invalid_unicode":
            if key:
                row[key] = "lone \ud800 surrogate"
            else:
                turns = row.get("messages") or row["conversations"]
                turns[0]["content" if fmt == "messages" else "value"] = "lone \udfff"
        elif kind == "wrong_role_order":
            turns = row.get("messages") or row["conversations"]
            turns.reverse()
        else:
            turns = row.get("messages") or row["conversations"]
            turns[0]["role" if fmt == "messages" else "from"] = "robot"
        return row, kind

    def rows(self, path: str, fmt: str, n_good: int, extra_bad) -> list[tuple[object, str, list | None]]:
        """n_good good rows, about 4% bad ones (their own or `extra_bad`'s), and a few repeats, shuffled."""
        out = []
        for _ in range(n_good):
            row, messages = self.good(fmt)
            out.append((row, "good", messages))
            if self.rng.random() < 0.01:
                out.append((row, "duplicate", messages))
            if self.rng.random() < 0.04:
                bad, reason = extra_bad(fmt) if self.rng.random() < 0.5 else self.bad(fmt)
                out.append((bad, reason, None))
        return out

    def expect(self, path: str, line: int, kind: str, messages: list | None) -> None:
        if kind == "good":
            self.kept[record_id(messages)] = messages
        elif kind == "duplicate":
            self.duplicates.add((path, line))
        else:
            self.rejects.add((path, line, kind))


def write_jsonl(c: Corpus, path, fmt: str, n: int, encoding: str | None = None) -> None:
    """`encoding`: the file in that encoding (no undecodable bytes then); else UTF-8 with a byte order mark."""
    first, second = {"alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion")}[fmt]

    def extra_bad(fmt):
        return c.rng.choice([(f'{{"{first}": "cut', "bad_json"), ("[1, 2]", "not_an_object"),
                             (json.dumps({first: 5, second: "x"}), "non_text_value"),
                             (json.dumps({first: None, second: "x"}), "missing_field")]
                            + [(json.dumps({first: "low \udc00", second: "x"}), "invalid_unicode")] * bool(encoding)
                            + [(b'{"' + first.encode() + b'": "\xff\xfe"}', "undecodable_bytes")] * (not encoding))
    data, line = bytearray(b"" if encoding else b"\xef\xbb\xbf"), 0
    for row, kind, messages in c.rows(str(path), fmt, n, extra_bad):
        if c.rng.random() < 0.02:  # blank lines are not rows
            data += b"\n"
            line += 1
        raw = row if isinstance(row, bytes | str) else json.dumps(row)
        raw = raw.encode() if isinstance(raw, str) else raw
        data += raw + (b"\r\n" if c.rng.random() < 0.1 else b"\n")
        line += 1
        c.expect(str(path), line, kind, messages)
    path.write_bytes(bytes(data).decode().encode(encoding) if encoding else bytes(data))
    c.physical[str(path)] = sum(1 for text in bytes(data).splitlines() if text.strip())


def write_json(c: Corpus, path, fmt: str, n: int, encoding: str = "utf-8") -> None:
    rows = []
    for row, kind, messages in c.rows(str(path), fmt, n, lambda fmt: c.rng.choice(
            [(42, "not_an_object"), ({fmt_key(fmt): "not a list"}, "bad_structure")] if fmt in ("messages", "sharegpt")
            else [(42, "not_an_object")])):
        rows.append(row)
        c.expect(str(path), len(rows), kind, messages)
    path.write_text(json.dumps(rows, indent=1), encoding=encoding)
    c.physical[str(path)] = len(rows)


def write_json_objects(c: Corpus, path, fmt: str, n: int) -> None:
    """Minified objects of arrays, one per line (not JSON Lines: each holds arrays of rows)."""
    rows = []
    for row, kind, messages in c.rows(str(path), fmt, n, lambda fmt: (42, "not_an_object")):
        rows.append(row)
        c.expect(str(path), len(rows), kind, messages)
    third = len(rows) // 3
    objects = [{"train": rows[:third]}, {"more": rows[third:2 * third], "rest": rows[2 * third:]}]
    path.write_text("".join(json.dumps(o, separators=(",", ":")) + "\n" for o in objects))
    c.physical[str(path)] = len(rows)


def fmt_key(fmt: str) -> str:
    return {"messages": "messages", "sharegpt": "conversations"}[fmt]


def write_csv(c: Corpus, path, fmt: str, n: int, faults: bool = False, encoding: str | None = None) -> None:
    """`faults`: stray quotes never closed, on the first row, at random rows and on the last (each
    rejected as unbalanced_quote, the rows after it read), and fields of 131,073 characters
    (field_too_long); `encoding`: the file in that encoding (no undecodable bytes then)."""
    columns = {"alpaca": ["instruction", "input", "output"], "prompt_completion": ["prompt", "completion"]}[fmt]
    out, line, count = bytearray(), 1, 0
    out += (",".join(columns) + "\n").encode()

    def extra_bad(fmt):
        return c.rng.choice([(["only", "too", "many", "fields"], "bad_csv_row")]
                            + [(None, "undecodable_bytes")] * (not encoding)
                            + [(None, "unbalanced_quote"), (None, "field_too_long")] * faults)

    def plain(close: bool) -> tuple[str, str, list]:
        """A row of plain text (no quote, comma or line break), ending in a quote if `close`."""
        c.n += 1
        values = [f"plain {c.n} {column}" if column != "input" else "" for column in columns]
        values[-1] += '"' * close
        return ",".join(values), "good", [{"role": "user", "content": values[0]},
                                          {"role": "assistant", "content": values[-1]}]

    rows = c.rows(str(path), fmt, n, extra_bad)
    stray = [(None, "unbalanced_quote", None)] * faults
    # A stray quote that a quote at the end of a row 6 lines later closes: the rows between come back.
    closed_later = [*stray, *(plain(False) for _ in range(5)), plain(True)] if faults else []
    for row, kind, messages in [*stray, *rows[:n // 2], *closed_later, *rows[n // 2:], *stray]:
        if kind == "invalid_unicode":  # a CSV file cannot hold a lone surrogate: make it a short row instead
            row, kind = ["short"], "bad_csv_row"
        buf = io.StringIO(row + "\n" if isinstance(row, str) else None)
        if not isinstance(row, str):
            csv.writer(buf, lineterminator="\n").writerow(
                row if isinstance(row, list) else [row.get(k, "") for k in columns] if row else ["x"] * len(columns))
        raw = buf.getvalue().encode()
        if kind == "undecodable_bytes":
            raw = b"\xff\xfe," + b"x," * (len(columns) - 1) + b"\n"
        elif kind == "unbalanced_quote":
            raw = f'stray {line},"never closed, {line}\n'.encode()
        elif kind == "field_too_long":
            raw = f'long,"{"y, " * 43_691}"\n'.encode()  # 131,073 characters
        if kind == "missing_field":  # a CSV row always has every column: an empty one is the same fault
            kind = "empty_content"
        c.expect(str(path), line + 1, kind, messages)
        out += raw
        line += raw.count(b"\n")
        count += 1
    path.write_bytes(bytes(out).decode().encode(encoding) if encoding else bytes(out))
    c.physical[str(path)] = count


def parquet_rows(c: Corpus, path, fmt: str, n: int) -> list[tuple[dict, str, list | None]]:
    out = []
    for row, kind, messages in c.rows(str(path), fmt, n, lambda fmt: c.bad(fmt)):
        if kind == "missing_field":
            row = {fmt_key(fmt): None}
        if kind == "invalid_unicode":  # parquet stores UTF-8, which cannot hold a lone surrogate
            row, _ = c.good(fmt)
            row["conversations"][0]["from"], kind = "robot", "unknown_role"
        out.append((row, kind, messages))
    return out


def write_parquet(c: Corpus, path, fmt: str, n: int) -> None:
    rows = []
    for row, kind, messages in parquet_rows(c, path, fmt, n):
        rows.append(row)
        c.expect(str(path), len(rows), kind, messages)
    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    table = pa.table({"conversations": pa.array([r["conversations"] for r in rows], pa.list_(turn))})
    pq.write_table(table, path, row_group_size=700)
    c.physical[str(path)] = len(rows)


def write_corrupt_parquet(c: Corpus, path, fmt: str, n: int) -> None:
    """Row groups of 100 rows, groups 1 and 4 with a corrupt data page: their rows are rejected as
    unreadable_row_group (a repeat of one of them is then kept instead)."""
    items, bad = parquet_rows(c, path, fmt, n), (1, 4)
    corrupt_parquet_pages(path, [row for row, _, _ in items], 100, list(bad))
    for i, (_, kind, messages) in enumerate(items):
        if i // 100 in bad:
            kind, messages = "unreadable_row_group", None
        elif kind == "duplicate" and record_id(messages) not in c.kept:
            kind = "good"
        c.expect(str(path), i + 1, kind, messages)
    c.physical[str(path)] = len(items)


def test_fuzzed_sources_account_for_every_row(tmp_path):
    c = Corpus(SEED)
    (tmp_path / "dir").mkdir()
    files = [
        (write_jsonl, tmp_path / "a.jsonl", "alpaca", 3000),
        (write_json, tmp_path / "b.json", "messages", 2000),
        (write_csv, tmp_path / "c.csv", "prompt_completion", 2000),
        (write_parquet, tmp_path / "d.parquet", "sharegpt", 1500),
        (write_jsonl, tmp_path / "dir" / "e1.jsonl", "prompt_completion", 500),
        (write_csv, tmp_path / "dir" / "e2.csv", "alpaca", 500),
        (write_json, tmp_path / "dir" / "e3.json", "sharegpt", 500),
    ]
    for write, path, fmt, n in files:
        write(c, path, fmt, n)
    paths = [tmp_path / name for name in ("a.jsonl", "b.json", "c.csv", "d.parquet", "dir")]
    cfg = RunConfig.model_validate({"data": {"sources": [{"path": str(p)} for p in paths], "chunk_size": 64},
                                    "validation": {"max_reject_fraction": 1.0}})
    stats = prepare(cfg, tmp_path / "out")

    assert len(c.kept) == 10_000 and len({r for _, _, r in c.rejects}) >= 11 and c.duplicates
    out = tmp_path / "out"
    # Read equals the physical rows of each file (a directory: of all its files).
    assert sum(s["read"] for s in stats["sources"].values()) == sum(c.physical.values())
    for p in paths:
        expected = sum(v for f, v in c.physical.items() if f.startswith(str(p)))
        assert stats["sources"][str(p)]["read"] == expected, p
    # Every good record is kept, exactly as normalised; nothing else is.
    records = {r["id"]: r["messages"] for r in iter_jsonl(out / "records.jsonl")}
    assert records == c.kept
    # Every bad row is rejected with its file, line and reason; every repeat is listed with its line.
    assert {(r["file"], r["line"], r["reason"]) for r in iter_jsonl(out / "rejects.jsonl")} == c.rejects
    assert {(d["file"], d["line"]) for d in iter_jsonl(out / "duplicates.jsonl")} == c.duplicates
    assert stats["totals"]["kept"] == 10_000
    assert stats["sources"][str(tmp_path / "dir")]["format"] == "prompt_completion, alpaca, sharegpt"


def test_fuzzed_faults_of_issue_30_account_for_every_row(tmp_path, monkeypatch):
    """Stray quotes and over-long fields in CSV, lone high and low surrogates in .json (under both ijson
    parsers) and .jsonl, UTF-16 and UTF-32 files of each text kind, minified objects of arrays one per
    line, parquet with corrupt data pages: every good row kept, read = kept + rejected + duplicates."""
    import ijson

    c = Corpus(SEED + 30)
    files = [
        (write_csv, "quotes.csv", "prompt_completion", 600, {"faults": True}),
        (write_csv, "quotes16.csv", "alpaca", 150, {"faults": True, "encoding": "utf-16"}),
        (write_csv, "plain32.csv", "prompt_completion", 100, {"encoding": "utf-32-le"}),
        (write_jsonl, "a16.jsonl", "alpaca", 150, {"encoding": "utf-16-be"}),
        (write_jsonl, "b32.jsonl", "prompt_completion", 100, {"encoding": "utf-32"}),
        (write_json, "high.json", "alpaca", 250, {}),  # its bad rows hold "\ud800", those of messages "\udfff"
        (write_json, "low16.json", "messages", 150, {"encoding": "utf-16"}),
        (write_json, "c32.json", "prompt_completion", 100, {"encoding": "utf-32-be"}),
        (write_json_objects, "objects.json", "alpaca", 250, {}),
        (write_corrupt_parquet, "pages.parquet", "sharegpt", 600, {}),
    ]
    for write, name, fmt, n, kwargs in files:
        write(c, tmp_path / name, fmt, n, **kwargs)
    cfg = RunConfig.model_validate({"data": {"sources": [{"path": str(tmp_path / name)} for _, name, *_ in files],
                                             "chunk_size": 64}, "validation": {"max_reject_fraction": 1.0}})
    reasons = {reason for _, _, reason in c.rejects}
    assert {"unbalanced_quote", "field_too_long", "invalid_unicode", "unreadable_row_group"} <= reasons
    assert sum(1 for _, _, r in c.rejects if r == "unbalanced_quote") >= 6
    for backend in ("default", "python"):
        if backend == "python":
            monkeypatch.setattr(ijson, "parse", ijson.get_backend("python").parse)
        out = tmp_path / backend
        stats = prepare(cfg, out)
        for _, name, *_ in files:
            s = stats["sources"][str(tmp_path / name)]
            assert s["read"] == c.physical[str(tmp_path / name)] == s["kept"] + s["rejected"] + s["duplicates"], name
        assert {r["id"]: r["messages"] for r in iter_jsonl(out / "records.jsonl")} == c.kept
        assert {(r["file"], r["line"], r["reason"]) for r in iter_jsonl(out / "rejects.jsonl")} == c.rejects
        assert {(d["file"], d["line"]) for d in iter_jsonl(out / "duplicates.jsonl")} == c.duplicates
