"""Text normalisation, record ids, and the compact set of seen ids used for deduplication.

Every message content goes through `normalize_text`: line breaks unified to "\\n", Unicode NFC,
control characters removed (tab and newline kept), surrounding whitespace trimmed.

A record's id is the first 16 hex digits (64 bits) of the sha256 of its messages as canonical
JSON, so the same conversation gets the same id in every run and from every source; the source
name is not part of it, so a conversation repeated across sources is a duplicate.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata

import numpy as np

# C0 and C1 control characters and DEL, except \t (0x09) and \n (0x0a).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def normalize_text(text: str) -> str:
    """NFC, CRLF/CR -> LF, control characters (but \\n and \\t) removed, whitespace trimmed."""
    # Line breaks first: dropping a bare "\r" as a control character would glue two lines together.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", unicodedata.normalize("NFC", text)).strip()


def is_blank(text: str) -> bool:
    """True when `text` shows nothing: only whitespace, separators, invisible format characters
    (Unicode categories Z* and Cf: zero-width space, joiners, BOM, direction marks...), combining
    marks with no letter to sit on (Mn: variation selectors, the grapheme joiner, lone accents), and
    the letters and symbols drawn as nothing (the Hangul fillers, the blank braille pattern)."""
    return all(ch.isspace() or ch in _BLANK_CHARS or unicodedata.category(ch) in _INVISIBLE for ch in text)


_INVISIBLE = {"Zs", "Zl", "Zp", "Cf", "Mn"}
# U+115F and U+1160 Hangul choseong and jungseong fillers, U+3164 Hangul filler, U+FFA0 halfwidth
# Hangul filler (category Lo, default-ignorable), U+2800 braille pattern blank (So).
_BLANK_CHARS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def has_lone_surrogate(text: str) -> bool:
    """True when `text` holds a UTF-16 surrogate (JSON "\\ud800" escapes), which UTF-8 cannot encode."""
    return _SURROGATE.search(text) is not None


def record_id(messages: list[dict]) -> str:
    """sha256 of the messages as canonical JSON (sorted keys, no spaces, UTF-8), 16 hex digits."""
    blob = json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


class IdSet:
    """Set of 64-bit record ids in about 8 bytes per id (a Python set of str costs ~90).

    Ids live sorted in a numpy uint64 buffer that doubles when full; new ids wait in a small Python
    set that is merged in once it holds more than `merge_at` ids or 1/16 of the buffer's ids.
    The merge writes the sorted new ids after the old ones and sorts the buffer in place with
    timsort, which sees two sorted runs and merges them in linear time with a scratch buffer the
    size of the new ids only. (np.union1d would allocate several full-size copies per merge, and
    glibc keeps those freed blocks: peak memory grew ten times faster than the ids.)
    """

    def __init__(self, merge_at: int = 16_384):
        self._buf = np.empty(0, dtype=np.uint64)
        self._size = 0
        self._pending: set[int] = set()
        self._merge_at = merge_at

    def __len__(self) -> int:
        return self._size + len(self._pending)

    def __contains__(self, hex_id: str) -> bool:
        value = int(hex_id, 16)
        if value in self._pending:
            return True
        ids = self._buf[: self._size]
        i = int(np.searchsorted(ids, np.uint64(value)))
        return i < self._size and int(ids[i]) == value

    def add(self, hex_id: str) -> None:
        """Add an id that is not in the set yet (callers check membership first)."""
        self._pending.add(int(hex_id, 16))
        if len(self._pending) > max(self._merge_at, self._size // 16):
            self._merge()

    def _merge(self) -> None:
        old, new = self._size, len(self._pending)
        if old + new > len(self._buf):
            grown = np.empty(max(2 * len(self._buf), old + new), dtype=np.uint64)
            grown[:old] = self._buf[:old]
            self._buf = grown
        self._buf[old : old + new] = np.sort(np.fromiter(self._pending, dtype=np.uint64, count=new))
        self._buf[: old + new].sort(kind="stable")
        self._size = old + new
        self._pending.clear()
