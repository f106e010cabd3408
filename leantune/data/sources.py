"""Read every configured source as a stream of raw rows, each with where it came from.

kind=file reads, by extension: ``.jsonl``/``.ndjson`` (line by line), ``.json`` (an array of rows,
or an object whose values are arrays of rows, streamed with ijson so a big array is never held
whole), ``.csv`` (a header row, streamed; records split by `csvfile`, which gives back the rows a stray
quote swallows), ``.parquet`` (pyarrow record batches of ``data.chunk_size`` rows; memory is bounded by the
file's largest row group, not its size), or a directory of those (files in sorted relative-path
order, recursively). Text files are UTF-8, or UTF-16/32 found by byte order mark or NUL pattern and
decoded (`textfile.open_utf8`). kind=hub streams a Hugging Face dataset; kind=synthetic runs the
built-in generator (conversations, or with train.objective dpo or simpo preference pairs in the
prompt_chosen_rejected format).

Problems of one row or one file never stop a source: they arrive as a `RawRow` whose `error` is set,
and prepare counts and reports it. What leaves nothing to count is a DataError instead: a path that
does not exist, a CSV header that cannot be read, a hub dataset that cannot be opened or streamed. Line numbers: jsonl and csv give the 1-based line of the file
where the row starts (blank lines are not rows); json, parquet, hub and synthetic give the 1-based
position of the row (in a json object of arrays, counted across the arrays in file order). A file
that is unreadable as a whole (an unknown extension, a corrupt parquet footer) is one row with line 0;
a parquet row group that cannot be decoded (a corrupt data page) is one rejected row per row of the
group not read yet (reason unreadable_row_group, naming the group), and the next group is read.
"""

from __future__ import annotations

import io
import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from leantune.config import DataConfig, SourceConfig, source_name
from leantune.data.csvfile import csv_rows
from leantune.data.formats import RowError, row_format, type_name
from leantune.data.textfile import BOM, open_utf8, physical_lines
from leantune.errors import DataError

# How much of a .json file is looked at to tell JSON Lines saved under that name (_is_json_lines).
SNIFF_LINES, SNIFF_BYTES = 5, 1 << 20
SCAN_BLOCK = 1 << 20  # bytes of a .json file searched at a time for lone surrogate escapes
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
    elif kind == "parquet":
        yield from _parquet_rows(name, path, batch_rows)
    else:
        with open_utf8(path) as f:
            yield from {"jsonl": _jsonl_rows, "json": _json_rows, "csv": _csv_rows}[kind](name, path, f)


def _jsonl_rows(name: str, path: Path, f: BinaryIO) -> Iterator[RawRow]:
    for line_no, line in enumerate(physical_lines(f), 1):
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


def _is_json_lines(f: BinaryIO) -> bool:
    """Whether a .json file is really JSON Lines, judged by what its first SNIFF_LINES non-blank whole
    lines (within its first SNIFF_BYTES) parse as. The first line must start unindented with "{" and
    either more lines follow, one of them a whole JSON object (the first may be a broken row), or it
    is the only line and a row of a known format. No line may be an object that holds arrays of rows:
    minified objects of arrays, one per line, are a JSON document's top-level values (each of their
    rows is read). A JSON document's rows are indented or on one line, so it never matches; neither
    does a first line longer than SNIFF_BYTES (one big minified document)."""
    f.seek(0)
    head = f.read(SNIFF_BYTES + 1)
    lines = [line for line in physical_lines(io.BytesIO(head.removeprefix(BOM))) if line.strip()]
    if len(head) > SNIFF_BYTES and lines and not lines[-1].endswith((b"\n", b"\r")):
        lines.pop()  # cut by the end of what was read
    lines = lines[:SNIFF_LINES]
    if not lines or not lines[0].startswith(b"{"):
        return False
    objects = [value for line in lines if line.startswith(b"{") and isinstance(value := _loads_or_none(line), dict)]
    if any(_holds_rows(value) for value in objects):
        return False
    return bool(objects) if len(lines) > 1 else bool(objects) and row_format(objects[0]) is not None


def _holds_rows(value: dict) -> bool:
    """An object that is not a row itself but has an array holding a row of a known format."""
    return row_format(value) is None and any(
        isinstance(v, list) and any(isinstance(item, dict) and row_format(item) for item in v) for v in value.values())


def _loads_or_none(line: bytes) -> Any:
    try:
        return json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None


def _json_rows(name: str, path: Path, f: BinaryIO) -> Iterator[RawRow]:
    if _is_json_lines(f):
        f.seek(0)
        yield from _jsonl_rows(name, path, f)
        return
    import ijson

    row_no = 0
    # yajl's C parser turns the escape of a lone high UTF-16 surrogate ("\\ud800") into "?" without a
    # word and fails on a lone low one ("\\udfff"), which a row may hold (an invalid_unicode reject):
    # a file holding either is read by the pure-Python parser, which keeps them for the check. A
    # UnicodeDecodeError from the C parser (bytes that are not UTF-8) has the pure-Python parser read
    # the file again from the row after the last one read, to report it the same way.
    python = ijson.get_backend("python")
    for backend in [python] if _has_lone_surrogate(f) else [ijson, python]:
        f.seek(0)
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
            if isinstance(e, UnicodeDecodeError) and backend is not python:
                continue
            # The document is broken from here on: what was read stays, the rest is one rejected row.
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            yield RawRow(name, str(path), row_no + 1, "", error=RowError(
                "bad_json", f"the JSON document is invalid after row {row_no}: {detail}"))
            return


# A JSON escape of a surrogate pair, or of a lone surrogate (group 1 then 6 bytes long), preceded by an
# even number of backslashes (an odd number would make its own backslash a literal one).
_SURROGATE_ESCAPE = re.compile(
    rb"(?<!\\)(?:\\\\)*(\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|\\u[dD][89a-fA-F][0-9a-fA-F]{2})")


def _has_lone_surrogate(f: BinaryIO) -> bool:
    """Whether the JSON file holds the escape of a lone surrogate, high or low (read in SCAN_BLOCK blocks)."""
    f.seek(0)
    text, block = b"", f.read(SCAN_BLOCK)
    while block:
        following = f.read(SCAN_BLOCK)
        text += block
        decided = 0  # where the escapes decided so far end
        for m in _SURROGATE_ESCAPE.finditer(text):
            if len(m.group(1)) == 6:
                if following and m.end() > len(text) - 6:
                    break  # maybe the first half of a pair that the next block completes
                return True
            decided = m.end()
        # The undecided tail (the last 12 bytes, less any pair, and the backslashes before them) goes on.
        start = max(len(text) - 12, decided)
        while start > decided and text[start - 1] == 0x5C:
            start -= 1
        text, block = text[start:], following
    return False


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


def _csv_rows(name: str, path: Path, f: BinaryIO) -> Iterator[RawRow]:
    for line, raw, value, error in csv_rows(f, path):
        yield RawRow(name, str(path), line, raw, value=value, error=error)


def _parquet_rows(name: str, path: Path, batch_rows: int) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # Unbuffered reads would fetch each column chunk whole; a 1 MiB read buffer and no
        # pre-buffering keep memory near one decoded row group (parquet's unit of reading).
        parquet = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as e:
        yield RawRow(name, str(path), 0, "", error=RowError("unreadable_file", f"not a readable parquet file: {e}"))
        return
    row_no = 0
    # A corrupt data page (the footer intact) fails only its row group: the rows of the group not
    # read yet become rejects, one per row, and the next group is read. Page checksums, where the
    # writer stored them, are verified, so a flipped byte in an uncompressed page is caught too.
    for group in range(parquet.num_row_groups):
        first, size = row_no + 1, parquet.metadata.row_group(group).num_rows
        try:
            for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[group]):
                for value in batch.to_pylist():
                    row_no += 1
                    yield RawRow(name, str(path), row_no, json.dumps(value, ensure_ascii=False, default=repr),
                                 value=value)
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:  # (bad UTF-8 in a string page)
            error = RowError("unreadable_row_group", f"row group {group} (rows {first}-{first + size - 1}) "
                                                     f"cannot be decoded: {str(e).strip()}")
            for lost in range(row_no + 1, first + size):
                yield RawRow(name, str(path), lost, "", error=error)
            row_no = first + size - 1


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
