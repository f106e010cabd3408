"""Markdown tables, as the run report, the artifacts and the profile and sweep tables write them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A GitHub-style markdown table; cells are written with str(), so format numbers first."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
