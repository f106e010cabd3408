"""Text data files as UTF-8 bytes, split into physical lines.

A file that starts with a UTF-16 or UTF-32 byte order mark, or without one whose first four bytes
hold NUL bytes where UTF-16/32 puts them around an ASCII character (the pattern of RFC 4627), is
decoded into a temporary UTF-8 copy: the readers then see the same lines (line numbers unchanged)
as in a UTF-8 file. A sequence that is not valid in its encoding becomes the byte 0xFF in the copy,
which is not UTF-8 either, so the row holding it is rejected as undecodable, not read as something
else. Any other file is read as it is (UTF-8, whose byte order mark the readers skip).
"""

from __future__ import annotations

import codecs
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

BOM = codecs.BOM_UTF8  # the UTF-8 byte order mark, skipped at the start of a file
# UTF-32's marks first: the UTF-32-LE mark starts with the UTF-16-LE one.
_MARKS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
          (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
# Which of the first four bytes are NUL -> the encoding, for text starting with an ASCII character.
_NULS = {(1, 1, 1, 0): "utf-32-be", (0, 1, 1, 1): "utf-32-le", (1, 0, 1, 0): "utf-16-be", (0, 1, 0, 1): "utf-16-le"}
_INVALID = "\udcff"  # encoded with surrogateescape: the byte 0xFF


def _mark_invalid(error: UnicodeDecodeError) -> tuple[str, int]:
    return _INVALID, error.end


codecs.register_error("leantune-mark-invalid", _mark_invalid)


def encoding(head: bytes) -> tuple[str, int] | None:
    """(encoding, length of its byte order mark) of a UTF-16/32 file starting with `head` (its first
    bytes), or None for anything else."""
    for mark, name in _MARKS:
        if head.startswith(mark):
            return name, len(mark)
    name = _NULS.get(tuple(int(b == 0) for b in head[:4])) if len(head) >= 4 else None
    return (name, 0) if name else None


@contextmanager
def open_utf8(path: Path) -> Iterator[BinaryIO]:
    """The file at `path` opened for binary reading, as UTF-8 (a decoded temporary copy of a UTF-16/32 file)."""
    with open(path, "rb") as f:
        found = encoding(f.read(4))
        f.seek(0)
        if found is None:
            yield f
            return
        name, skip = found
        f.seek(skip)
        decoder = codecs.getincrementaldecoder(name)(errors="leantune-mark-invalid")
        with tempfile.TemporaryFile(prefix="leantune-utf8-") as copy:
            while block := f.read(1 << 20):
                copy.write(decoder.decode(block).encode("utf-8", "surrogateescape"))
            copy.write(decoder.decode(b"", final=True).encode("utf-8", "surrogateescape"))
            copy.seek(0)
            yield copy


def physical_lines(f: BinaryIO) -> Iterator[bytes]:
    """The lines of binary file `f`, each with its ending: "\\n", "\\r\\n" or a lone "\\r" (old Mac files)."""
    for line in f:
        if b"\r" in line.rstrip(b"\r\n"):
            yield from (part for part in _LONE_CR.split(line) if part)
        else:
            yield line


_LONE_CR = re.compile(rb"(?<=\r)(?!\n)")  # the place just after a "\r" that is not part of "\r\n"
