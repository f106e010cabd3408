"""Streaming JSON-lines helpers shared by the stages: read in chunks, write line by line."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

_SURROGATE = re.compile("[\ud800-\udfff]")


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    """Yield one object per line of a jsonl file that leantune wrote itself (trusted, valid)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Group an iterable into lists of at most `size` items, without materialising it."""
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


class JsonlWriter:
    """Append objects to a jsonl file, one per line; a context manager that counts what it wrote."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self._f = open(self.path, "w", encoding="utf-8")

    def write(self, obj: dict) -> None:
        text = json.dumps(obj, ensure_ascii=False)
        if _SURROGATE.search(text):  # a rejected row's lone surrogate: UTF-8 cannot hold it, its escape can
            text = json.dumps(obj)
        self._f.write(text + "\n")
        self.count += 1

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
