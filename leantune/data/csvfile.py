"""CSV rows that cannot swallow each other: a record splitter that tracks quotes itself.

The csv module alone reads a quote that is opened and never closed as one field holding the rest of
the file, and one closed 50 lines later as one record holding those 50 rows; after a field longer
than its limit it goes on from the middle of the record. Here the physical lines are split into
records first, by the quote rules of the csv module's default dialect (a quote opens a quoted field
only at the start of a field; "" inside it is a quote), and each record is then parsed alone by
the csv module. A record that spans several lines is taken as it is, except:

- unbalanced_quote: its quote is never closed (the file ends), or it looks like rows swallowed by a
  stray quote: a quote after its first line closes malformed (followed by something else than a
  comma or the line's end, as when the stray quote is closed by the opening quote of a later
  field), or, with 2 columns or more, every non-blank line between its first and its last, read
  alone, is a whole row of the header's width, and there are 3 or more such lines, or at least one
  (the last line counts) in a record not of the header's width. Its first line is rejected and
  reading starts again at the next physical line. (A valid quoted field of a few lines that each
  hold one comma looks the same as one or two rows swallowed into a record of the right width and
  closed by a quote at the end of a line: those stay one record, as in valid CSV; a 2-column file
  whose quoted fields run over 3 or more lines of exactly one comma each is read as rows, its first
  line rejected.)
- field_too_long: a quoted field grows past FIELD_LIMIT characters (the csv module's limit). The
  quote is followed, without keeping the lines, to where it closes: the lines to there are one
  rejected row, or, if the quote never closes or the lines between are rows as above, the first
  line is rejected as unbalanced_quote and reading starts again at the next line (a seek back).
  A field past the limit on one line is a field_too_long reject too.

Memory is bounded by FIELD_LIMIT plus the longest line. Every physical line is in a record that is
read or in a reject that names the record's first line.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from leantune.data.formats import RowError
from leantune.data.textfile import BOM, physical_lines
from leantune.errors import DataError

FIELD_LIMIT = csv.field_size_limit()  # 131,072 characters unless something raised it


def csv_rows(f: BinaryIO, path: Path) -> Iterator[tuple[int, str, dict | None, RowError | None]]:
    """(first line, raw text, row as {column: value} or None, error or None) for each row of CSV
    file `f` after its header; raises DataError when the header (the first record) cannot be read."""
    header: list[str] = []  # filled from the first record; _records reads its width
    for first_line, lines, error in _records(f, header):
        raw = "".join(text for text, _ in lines).rstrip("\r\n")
        fields = None
        if error is None:
            try:
                fields = _fields(lines)
            except csv.Error as e:
                code = "field_too_long" if "field larger than field limit" in str(e) else "bad_csv_row"
                error = RowError(code, str(e))
        if fields == []:  # a blank line is not a row
            continue
        if error is None and not all(ok for _, ok in lines):
            error = RowError("undecodable_bytes", "the row holds bytes that are not UTF-8")
        if not header:
            if error is not None:
                raise DataError(f"{path}: cannot read the CSV header on line {first_line} ({error}); "
                                "the first line must name the columns, in UTF-8")
            header.extend(fields)
        elif error is None and len(fields) != len(header):
            yield first_line, raw, None, RowError("bad_csv_row", f"{len(fields)} fields, the header has {len(header)}")
        else:
            yield first_line, raw, None if error else dict(zip(header, fields, strict=True)), error


def _fields(lines: list[tuple[str, bool]]) -> list[str]:
    """The fields of a record, as the csv module parses it (raising its csv.Error); a line without
    quotes is split on commas directly, which is the same and quicker."""
    text = lines[0][0]
    if len(lines) == 1 and '"' not in text and len(text) <= FIELD_LIMIT:
        text = text.rstrip("\r\n")
        return text.split(",") if text else []
    return next(csv.reader(text for text, _ in lines), [])


def _records(f: BinaryIO, header: list[str]) -> Iterator[tuple[int, list[tuple[str, bool]], RowError | None]]:
    """(first line, its lines as (text, was UTF-8), error or None) for each record of `f`; `header`
    is the caller's header, empty until the first record is read."""
    line_no, offset = 0, 0  # the number of the line read last, and the byte offset after it
    while True:
        record = None  # a record whose quoted field runs past its first line
        for data in physical_lines(f):
            start, line_no, offset = offset, line_no + 1, offset + len(data)
            text, ok = _decode(data.removeprefix(BOM) if start == 0 else data)
            if record is None:
                inside, fields, open_from, _ = _scan(text, False)
                if inside:
                    record = _Quoted(line_no, offset, text, ok, fields, open_from)
                else:
                    yield line_no, [(text, ok)], None
                continue
            if record.add(text, ok, len(header)):
                continue
            if why := record.stray_quote(len(header)):
                yield record.first, record.lines[:1], _unbalanced(f"ends only on line {line_no} and {why}")
                break
            yield record.first, record.lines, RowError(
                "field_too_long", f"a quoted field of more than {FIELD_LIMIT} characters, lines {record.first}-"
                                  f"{line_no}") if record.overflow else None
            record = None
        else:
            if record is None:
                return
            yield record.first, record.lines[:1], _unbalanced(f"is never closed (the file ends on line {line_no})")
        line_no, offset = record.first, record.next_line  # read again from the line after the record's first
        f.seek(offset)


class _Quoted:
    """A record whose quoted field runs past its first line (its lines, only the first once the field
    passes FIELD_LIMIT), with what tells a stray quote: the lines after the first that, read alone,
    are rows of the header's width."""

    def __init__(self, line_no: int, next_line: int, text: str, ok: bool, fields: int, open_from: int):
        self.first, self.next_line, self.lines = line_no, next_line, [(text, ok)]
        self.fields, self.open_chars, self.overflow = fields, len(text) - open_from, False
        self.middle, self.middle_rows, self.closing_row, self.bad_close = 0, True, False, False

    def add(self, text: str, ok: bool, width: int) -> bool:
        """Add the record's next line; whether the quoted field is still open after it."""
        inside, fields, open_from, bad_close = _scan(text, True)
        self.fields += fields - 1
        alone_inside, alone_fields, _, _ = _scan(text, False)
        row = bool(text.strip()) and not alone_inside and alone_fields == width
        if inside and text.strip():
            self.middle, self.middle_rows = self.middle + 1, self.middle_rows and row
        elif not inside:
            self.closing_row = row
        self.bad_close = self.bad_close or bad_close
        if not self.overflow:
            self.lines.append((text, ok))
        self.open_chars = len(text) - open_from if open_from >= 0 else self.open_chars + len(text)
        if inside and self.open_chars > FIELD_LIMIT:
            self.overflow, self.lines = True, self.lines[:1]
        return inside

    def stray_quote(self, width: int) -> str | None:
        """Why the closed record is rows swallowed by a stray quote, or None: a quote after its first
        line closes malformed (followed by something else than a comma or the line's end: the opening
        quote of a later field), or, with 2 columns or more, every non-blank line between its first
        and last is a row of the header's width and there are 3 or more such lines, or 1 or more, the
        last line counted, in a record that is not of the header's width."""
        if self.bad_close:
            return "is closed malformed (the closing quote is followed by more text, as a later field's opening quote is)"
        rows = self.middle + self.closing_row
        if width >= 2 and self.middle_rows and (self.middle >= 3 or rows >= 1 and self.fields != width):
            return f"{rows} of the lines after it are, read alone, rows of {width} fields"
        return None


def _unbalanced(how: str) -> RowError:
    return RowError("unbalanced_quote", f"the quote opened on this line {how}; the line is rejected and "
                                        "the lines after it are read as rows")


def _decode(data: bytes) -> tuple[str, bool]:
    try:
        return data.decode("utf-8"), True
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace"), False


def _scan(text: str, inside: bool) -> tuple[bool, int, int, bool]:
    """Follow the quotes of one line the way the csv module does, starting inside a quoted field or
    at the start of a record: (whether the line ends inside a quoted field, the number of fields it
    started, the index where its last quoted field opened or -1 if that field opened before it,
    whether a closing quote is followed by something else than a comma or the line's end)."""
    if '"' not in text:
        return inside, 1 if inside else text.count(",") + 1, -1, False
    i, fields, open_from, at_field_start, bad_close = 0, 1, -1, not inside, False
    while True:
        if inside:
            j = text.find('"', i)
            if j < 0:
                return True, fields, open_from, bad_close
            if text.startswith('"', j + 1):  # "" is a quote inside the field
                i = j + 2
                continue
            inside, at_field_start, i = False, False, j + 1
            bad_close = bad_close or text[i:i + 1] not in (",", "\r", "\n", "")
        elif at_field_start and text.startswith('"', i):
            inside, open_from, i = True, i, i + 1
        else:
            j = text.find(",", i)
            if j < 0:
                return False, fields, -1, bad_close
            fields, at_field_start, i = fields + 1, True, j + 1
