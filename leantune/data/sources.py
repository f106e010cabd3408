"""Read every configured source as a stream of raw rows, each with where it came from.

kind=file reads, by extension: ``.jsonl``/``.ndjson`` (line by line), ``.json`` (an array of rows,
or an object whose values are arrays of rows, streamed with ijson so a big array is never held
whole), ``.csv`` (csv module, a header row, streamed), ``.parquet`` (pyarrow record batches of
``data.chunk_size`` rows; memory is bounded by the file's largest row group, not its size), or a
directory of those (files in sorted relative-path order, recursively). kind=hub streams a Hugging
Face dataset; kind=synthetic runs the built-in generator (conversations, or with train.objective dpo or
simpo preference pairs in the prompt_chosen_rejected format).

Problems of one row or one file never stop a source: they arrive as a `RawRow` whose `error` is set,
and prepare counts and reports it. What leaves nothing to count is a DataError instead: a path that
does not exist, a CSV header that cannot be read, a hub dataset that cannot be opened or streamed. Line numbers: jsonl and csv give the 1-based line of the file
where the row starts (blank lines are not rows); json, parquet, hub and synthetic give the 1-based
position of the row (in a json object of arrays, counted across the arrays in file order). A file
that is unreadable as a whole (an unknown extension, a corrupt parquet file) is one row with line 0.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leantune.config import DataConfig, SourceConfig, source_name
from leantune.data.formats import RowError, type_name
from leantune.errors import DataError

BOM = b"\xef\xbb\xbf"  # the UTF-8 byte order mark, skipped at the start of a file
# How much of a .json file is looked at to tell JSON Lines saved under that name (_is_json_lines).
SNIFF_LINES, SNIFF_BYTES = 5, 1 << 20
FILE_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class RawRow:
    """One row as read: its parsed value, or the `error` that kept it from being parsed."""

    source: str
    file: str
    line: int
    raw: str
    value: Any = None
    error: RowError | None = None


def iter_source(src: SourceConfig, data: DataConfig, index: int, pairs: bool = False) -> Iterator[RawRow]:
    """Every row of source number `index` of `data.sources` (`src`), in a deterministic order.
    pairs (train.objective dpo or simpo): the synthetic source writes preference pairs."""
    name = source_name(src)
    if src.kind == "synthetic":
        yield from _synthetic_rows(name, data, pairs)
    elif src.kind == "hub":
        yield from _hub_rows(name, src, index)
    else:
        path = Path(src.path)
        if path.is_dir():
            # Sorting by the relative path as a string keeps the order the same on every file system.
            files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
            for file in files:
                yield from _file_rows(name, file, data.chunk_size)
        elif path.is_file():
            yield from _file_rows(name, path, data.chunk_size)
        else:
            raise DataError(f"data.sources.{index}.path: '{src.path}' does not exist (resolved from "
                            f"{Path.cwd()}); give an existing file or directory")


def _file_rows(name: str, path: Path, batch_rows: int) -> Iterator[RawRow]:
    kind = FILE_KINDS.get(path.suffix.lower())
    if kind is None:
        yield RawRow(name, str(path), 0, "", error=RowError(
            "unsupported_file", f"unknown extension '{path.suffix}'; supported: {', '.join(FILE_KINDS)} "
                                "(rename the file, or move it out of the source directory)"))
    elif kind == "jsonl":
        yield from _jsonl_rows(name, path)
    elif kind == "json":
        yield from _json_rows(name, path)
    elif kind == "csv":
        yield from _csv_rows(name, path)
    else:
        yield from _parquet_rows(name, path, batch_rows)


def _physical_lines(f) -> Iterator[bytes]:
    """The lines of binary file `f`, each with its ending: "\\n", "\\r\\n" or a lone "\\r" (old Mac files)."""
    for line in f:
        if b"\r" in line.rstrip(b"\r\n"):
            yield from (part for part in _LONE_CR.split(line) if part)
        else:
            yield line


_LONE_CR = re.compile(rb"(?<=\r)(?!\n)")  # the place just after a "\r" that is not part of "\r\n"


def _jsonl_rows(name: str, path: Path) -> Iterator[RawRow]:
    with open(path, "rb") as f:
        for line_no, line in enumerate(_physical_lines(f), 1):
            if line_no == 1:
                line = line.removeprefix(BOM)  # a UTF-8 byte order mark is not content
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield RawRow(name, str(path), line_no, line.decode("utf-8", "replace").rstrip("\r\n"),
                             error=RowError("undecodable_bytes", f"not UTF-8 at byte {e.start} of the line"))
                continue
            text = text.rstrip("\r\n")
            try:
                yield RawRow(name, str(path), line_no, text, value=json.loads(text))
            except json.JSONDecodeError as e:
                yield RawRow(name, str(path), line_no, text, error=RowError("bad_json", f"{e.msg} at column {e.colno}"))


def _is_json_lines(path: Path) -> bool:
    """Whether a .json file is really JSON Lines: its first line is a whole JSON object and more lines
    follow, or (a broken first row) it starts unindented with "{" and another of its first lines is an
    unindented whole object. A JSON document's rows are indented or on one line, so it never matches."""
    with open(path, "rb") as f:
        lines = []
        for line in _physical_lines(f):
            if line.strip():
                lines.append(line.removeprefix(BOM) if not lines else line)
            if len(lines) == SNIFF_LINES or sum(map(len, lines)) > SNIFF_BYTES:
                break
    if len(lines) < 2 or not lines[0].startswith(b"{"):
        return False
    return any(line.startswith(b"{") and isinstance(_loads_or_none(line), dict) for line in lines)


def _loads_or_none(line: bytes) -> Any:
    try:
        return json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None


def _json_rows(name: str, path: Path) -> Iterator[RawRow]:
    if _is_json_lines(path):
        yield from _jsonl_rows(name, path)
        return
    import ijson

    row_no = 0
    # yajl's C parser cannot decode the escape of a lone UTF-16 surrogate ("\\udfff", which a row
    # may hold; it becomes an invalid_unicode reject): the pure-Python parser then reads the file
    # again, from the row after the last one read.
    for backend in (ijson, ijson.get_backend("python")):
        with open(path, "rb") as f:
            if f.read(len(BOM)) != BOM:  # a UTF-8 byte order mark is not content
                f.seek(0)
            try:
                # multiple_values: a second document after the first is read too, never silently left out.
                values = _json_values(backend.parse(f, use_float=True, multiple_values=True))
                for where, value in itertools.islice(values, row_no, None):
                    row_no += 1
                    raw = json.dumps(value, ensure_ascii=False)
                    if where is None:
                        yield RawRow(name, str(path), row_no, raw, value=value)
                    else:
                        yield RawRow(name, str(path), row_no, raw, error=RowError(
                            "bad_structure", f"{where} is {type_name(value)}, expected an array of rows"))
                return
            except (ijson.JSONError, UnicodeDecodeError) as e:
                if isinstance(e, UnicodeDecodeError) and backend is ijson:
                    continue
                # The document is broken from here on: what was read stays, the rest is one rejected row.
                detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                yield RawRow(name, str(path), row_no + 1, "", error=RowError(
                    "bad_json", f"the JSON document is invalid after row {row_no}: {detail}"))
                return


def _json_values(events: Iterator[tuple]) -> Iterator[tuple[str | None, Any]]:
    """(None, row) for each row of a top-level array, or of each array value of a top-level object;
    (where, value) for anything else: a top-level object's value that is not an array, or a
    top-level value that is neither an array nor an object. Every top-level value of the file is
    read, in order (several arrays one after another count as one array)."""
    from ijson.common import ObjectBuilder

    for document, (_, event, value) in enumerate(events, 1):
        if event == "start_array":
            yield from ((None, item) for item in _array_items(events))
            continue
        if event != "start_map":
            yield ("the document" if document == 1 else f"top-level value {document}"), value
            continue
        key = None
        for _, event, value in events:
            if event == "map_key":
                key = value
            elif event == "start_array":
                yield from ((None, item) for item in _array_items(events))
            elif event == "start_map":
                builder = ObjectBuilder()
                builder.event(event, value)
                _build(events, builder)
                yield f"top-level key '{key}'", builder.value
            elif event == "end_map":
                break
            else:
                yield f"top-level key '{key}'", value


def _array_items(events: Iterator[tuple]) -> Iterator[Any]:
    """The elements of the array whose 'start_array' event was just consumed, built one at a time."""
    from ijson.common import ObjectBuilder

    for _, event, value in events:
        if event == "end_array":
            return
        if event in ("start_map", "start_array"):
            builder = ObjectBuilder()
            builder.event(event, value)
            _build(events, builder)
            yield builder.value
        else:
            yield value


def _build(events: Iterator[tuple], builder: Any) -> None:
    """Feed events to `builder` until the container it started is closed."""
    depth = 1
    for _, event, value in events:
        builder.event(event, value)
        if event in ("start_map", "start_array"):
            depth += 1
        elif event in ("end_map", "end_array"):
            depth -= 1
            if depth == 0:
                return


def _csv_rows(name: str, path: Path) -> Iterator[RawRow]:
    # The csv reader pulls physical lines from `lines()`, which remembers them: that gives each row
    # its raw text, its first line number, and whether any of its bytes were not UTF-8.
    consumed: list[tuple[str, bool]] = []

    def lines(f) -> Iterator[str]:
        for i, line in enumerate(_physical_lines(f)):
            if i == 0:
                line = line.removeprefix(BOM)
            try:
                text, ok = line.decode("utf-8"), True
            except UnicodeDecodeError:
                text, ok = line.decode("utf-8", "replace"), False
            consumed.append((text, ok))
            yield text

    with open(path, "rb") as f:
        reader = csv.reader(lines(f))
        header: list[str] | None = None
        line_no = 0  # physical lines consumed before the current row
        while True:
            consumed.clear()
            try:
                fields = next(reader)
                error = None
            except StopIteration:
                return
            except csv.Error as e:
                fields, error = None, RowError("bad_csv_row", str(e))
            first_line, line_no = line_no + 1, line_no + len(consumed)
            raw = "".join(text for text, _ in consumed).rstrip("\r\n")
            if fields == []:  # a blank line is not a row
                continue
            if error is None and not all(ok for _, ok in consumed):
                error = RowError("undecodable_bytes", "the row holds bytes that are not UTF-8")
            if header is None:
                if error is not None:
                    raise DataError(f"{path}: cannot read the CSV header on line {first_line} ({error}); "
                                    "the first line must name the columns, in UTF-8")
                header = fields
                continue
            if error is None and len(fields) != len(header):
                error = RowError("bad_csv_row", f"{len(fields)} fields, the header has {len(header)}")
            if error is not None:
                yield RawRow(name, str(path), first_line, raw, error=error)
            else:
                yield RawRow(name, str(path), first_line, raw, value=dict(zip(header, fields, strict=True)))


def _parquet_rows(name: str, path: Path, batch_rows: int) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # Unbuffered reads would fetch each column chunk whole; a 1 MiB read buffer and no
        # pre-buffering keep memory near one decoded row group (parquet's unit of reading).
        parquet = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
    except (pa.ArrowException, OSError) as e:
        yield RawRow(name, str(path), 0, "", error=RowError("unreadable_file", f"not a readable parquet file: {e}"))
        return
    row_no = 0
    for batch in parquet.iter_batches(batch_size=batch_rows):
        for value in batch.to_pylist():
            row_no += 1
            yield RawRow(name, str(path), row_no, json.dumps(value, ensure_ascii=False, default=repr), value=value)


def _hub_rows(name: str, src: SourceConfig, index: int) -> Iterator[RawRow]:
    import datasets

    where = f"data.sources.{index}"
    try:
        dataset = datasets.load_dataset(src.path, name=src.hub_config, split=src.split, streaming=True)
        rows = iter(dataset)
    except Exception as e:  # network, unknown id, unknown config or split: all are the user's to fix
        raise DataError(
            f"{where}: cannot open hub dataset '{src.path}' (config {src.hub_config!r}, split '{src.split}'): "
            f"{type(e).__name__}: {e}. Check {where}.path, .hub_config and .split and the network; offline, "
            f"download the data and use kind: file"
        ) from e
    row_no = 0
    while True:
        try:
            value = next(rows)
        except StopIteration:
            return
        except Exception as e:  # the stream broke mid-way (network): say where, do not pretend it ended
            raise DataError(f"{where}: reading hub dataset '{src.path}' failed after {row_no} rows: "
                            f"{type(e).__name__}: {e}; retry, or download the data and use kind: file") from e
        row_no += 1
        yield RawRow(name, f"hub:{src.path}", row_no, json.dumps(value, ensure_ascii=False, default=repr), value=value)


def _synthetic_rows(name: str, data: DataConfig, pairs: bool) -> Iterator[RawRow]:
    from leantune.data.synthetic import generate

    for row_no, item in enumerate(generate(data.synthetic, "train"), 1):
        value = item.pair() if pairs else {"messages": item.messages()}
        yield RawRow(name, "synthetic", row_no, json.dumps(value, ensure_ascii=False), value=value)
