"""Stage 1, prepare: every source streamed into canonical records, every row accounted for.

For each source in `data.sources`, rows are read in chunks of `data.chunk_size`; the format is
forced by the source's `format`, or detected per file (a directory may mix formats) from the file's
first `data.chunk_size` rows that parse. Each row then ends up in exactly
one bin:

- rejected: it cannot become a valid record (reason codes in `formats`/`sources`); written to
  rejects.jsonl with its source, file, line, reason, detail and raw text;
- duplicate: its id equals a record already kept (any source), when `data.dedupe` is on; written to
  duplicates.jsonl with its source, file, line and the id (the kept copy is the record of that id);
- not_selected: left out by the source's `weight` (a fixed share of ids, chosen by id hash) or past
  its `max_rows`;
- kept: written to records.jsonl.

read = kept + rejected + duplicates + not_selected, per source and in total; prepare checks it and
raises AssertionError if it ever fails. Outputs in `data_dir`: records.jsonl (one canonical record
per line: {"id", "messages", "source", "file", "line"}, file and line where the row was read; with
train.objective dpo or simpo a preference pair {"id", "prompt", "chosen", "rejected", "source", "file", "line"},
leantune/data/preference.py), rejects.jsonl, duplicates.jsonl, prepare.json (the returned
statistics).
The train/validation split is the next stage's job.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from leantune.config import DataConfig, RunConfig, SourceConfig, source_name
from leantune.data.formats import FORMATS, RowError, detect_format, to_messages, type_name
from leantune.data.normalize import IdSet, record_id
from leantune.data.preference import pair_id, to_pair
from leantune.data.sources import RawRow, iter_source
from leantune.errors import DataError
from leantune.jsonl import JsonlWriter, chunks
from leantune.progress import progress_bar
from leantune.rundir import DataDir

# Longest raw text copied into rejects.jsonl; enough to recognise a row, bounded for huge rows.
MAX_REJECT_RAW_CHARS = 2000
BINS = ("kept", "rejected", "duplicates", "not_selected")
DETECT_ROWS_FACTOR = 10  # format detection looks at no more than this many chunks of a file's rows


def prepare(cfg: RunConfig, data_dir: Path) -> dict:
    """Read every source of `cfg.data` into `data_dir`/records.jsonl; return (and write) the statistics.

    Raises DataError when no record is kept, or when the rejected share of rows read exceeds
    `validation.max_reject_fraction`; records.jsonl, rejects.jsonl and prepare.json are written first.
    """
    out = DataDir(data_dir)
    out.root.mkdir(parents=True, exist_ok=True)
    seen = IdSet() if cfg.data.dedupe else None
    sources: dict[str, dict] = {}
    examples: dict[str, dict[str, str]] = {}
    with (JsonlWriter(out.records) as records, JsonlWriter(out.rejects) as rejects,
          JsonlWriter(out.duplicates) as duplicates):
        for index, src in enumerate(cfg.data.sources):
            name = source_name(src)
            sources[name], examples[name] = _prepare_source(src, index, cfg.data, seen, records, rejects, duplicates,
                                                            pairs=cfg.train.objective != "sft")
    totals = {key: sum(s[key] for s in sources.values()) for key in ("read", *BINS)}
    totals["reasons"] = dict(sorted(sum((Counter(s["reasons"]) for s in sources.values()), Counter()).items()))
    _check_balance("all sources", totals)
    if (totals["kept"], totals["rejected"], totals["duplicates"]) != (records.count, rejects.count, duplicates.count):
        raise AssertionError(f"counted kept={totals['kept']}, rejected={totals['rejected']}, duplicates="
                             f"{totals['duplicates']} but wrote {records.count} records, {rejects.count} rejects "
                             f"and {duplicates.count} duplicates")
    stats = {"sources": sources, "totals": totals}
    out.prepare.write_text(json.dumps(stats, indent=2) + "\n")
    _raise_if_unusable(cfg, stats, examples, out.rejects)
    return stats


def _prepare_source(src: SourceConfig, index: int, data: DataConfig, seen: IdSet | None,
                    records: JsonlWriter, rejects: JsonlWriter, duplicates: JsonlWriter,
                    pairs: bool = False) -> tuple[dict, dict[str, str]]:
    """Stream one source into the writers; return its counts and one example per reject reason.
    pairs (train.objective dpo or simpo): rows become preference pair records (data/preference.py)."""
    name = source_name(src)
    stats = {"format": "unknown", "read": 0, **dict.fromkeys(BINS, 0), "reasons": Counter()}
    formats: list[str] = []  # the formats the source's files were read as, in order of first use
    examples: dict[str, str] = {}
    # Sources stream, so their length is unknown: the bar counts rows and shows the rate.
    bar = progress_bar(f"prepare {name}", "row")
    for chunk in chunks(_with_formats(iter_source(src, data, index, pairs), src.format, data.chunk_size),
                        data.chunk_size):
        for row, fmt in chunk:
            stats["read"] += 1
            if fmt is not None and fmt not in formats:
                formats.append(fmt)
            try:
                body = _convert(row, fmt, index, pairs)
            except RowError as e:
                stats["rejected"] += 1
                stats["reasons"][e.code] += 1
                examples.setdefault(e.code, f"{row.file} line {row.line}: {e.detail}")
                rejects.write({"source": name, "file": row.file, "line": row.line, "reason": e.code,
                               "detail": e.detail, "raw": row.raw[:MAX_REJECT_RAW_CHARS],
                               "raw_truncated": len(row.raw) > MAX_REJECT_RAW_CHARS})
                continue
            rid = pair_id(body) if pairs else record_id(body["messages"])
            if seen is not None and rid in seen:
                stats["duplicates"] += 1
                duplicates.write({"source": name, "file": row.file, "line": row.line, "id": rid})
            elif not _selected(rid, name, src.weight):
                stats["not_selected"] += 1
            elif src.max_rows is not None and stats["kept"] >= src.max_rows:
                stats["not_selected"] += 1
            else:
                stats["kept"] += 1
                if seen is not None:
                    seen.add(rid)
                records.write({"id": rid, **body, "source": name, "file": row.file, "line": row.line})
        bar.update(len(chunk))
    bar.close()
    stats["format"] = ", ".join(formats) or "unknown"
    stats["reasons"] = dict(sorted(stats["reasons"].items()))
    _check_balance(f"source '{name}'", stats)
    return stats, examples


def _with_formats(rows: Iterator[RawRow], forced: str, chunk_size: int) -> Iterator[tuple[RawRow, str | None]]:
    """Each row with the format it is read as: `forced`, or the one detected for its file from the
    file's first `chunk_size` rows that parse (looking at most DETECT_ROWS_FACTOR x `chunk_size` rows,
    so a file of broken rows is not held in memory)."""
    if forced != "auto":
        yield from ((row, forced) for row in rows)
        return
    pending: list[RawRow] = []
    parsed, file, fmt = 0, None, None
    for row in rows:
        if row.file != file:
            yield from ((r, detect_format([p.value for p in pending if p.error is None])) for r in pending)
            pending, parsed, file, fmt = [], 0, row.file, None
        if fmt is not None:
            yield row, fmt
            continue
        pending.append(row)
        parsed += row.error is None
        if parsed >= chunk_size or len(pending) >= DETECT_ROWS_FACTOR * chunk_size:
            fmt = detect_format([p.value for p in pending if p.error is None])
            yield from ((r, fmt) for r in pending)
            pending = []
    fmt = detect_format([p.value for p in pending if p.error is None])
    yield from ((r, fmt) for r in pending)


def _convert(row: RawRow, fmt: str | None, index: int, pairs: bool) -> dict:
    if row.error is not None:
        raise row.error
    if fmt is None:
        if not isinstance(row.value, dict):
            raise RowError("not_an_object", f"expected a JSON object, got {type_name(row.value)}")
        fields = ", ".join(sorted(map(str, row.value))[:10]) or "none"
        raise RowError("unknown_format", f"no format detected for this file (this row's fields: {fields}); "
                                         f"set data.sources.{index}.format to one of {', '.join(FORMATS)}")
    return to_pair(row.value, fmt) if pairs else {"messages": to_messages(row.value, fmt)}


def _selected(rid: str, source: str, weight: float) -> bool:
    """Whether a record falls in the `weight` share of its source; salted apart from the val split hash."""
    if weight >= 1:
        return True
    h = int.from_bytes(hashlib.sha256(f"weight:{source}:{rid}".encode()).digest()[:8], "big")
    return h / 2**64 < weight


def _check_balance(where: str, counts: dict) -> None:
    # Not an `assert` statement: it must hold under `python -O` too.
    if counts["read"] != sum(counts[b] for b in BINS):
        raise AssertionError(f"{where}: rows read {counts['read']} != " + " + ".join(f"{b} {counts[b]}" for b in BINS))


def _raise_if_unusable(cfg: RunConfig, stats: dict, examples: dict[str, dict[str, str]], rejects_path: Path) -> None:
    totals = stats["totals"]
    top = sorted(totals["reasons"].items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    reasons = "; ".join(
        f"{code} x{n} (e.g. {next(ex[code] for ex in examples.values() if code in ex)})" for code, n in top
    )
    if totals["kept"] == 0:
        per_source = "; ".join(
            f"data.sources.{i} '{name}' (format {s['format']}): read {s['read']}, rejected {s['rejected']}, "
            f"duplicates {s['duplicates']}, not selected {s['not_selected']}"
            for i, (name, s) in enumerate(stats["sources"].items())
        )
        raise DataError(
            f"no record kept from any source. {per_source}. "
            + (f"Top reject reasons: {reasons}. " if top else "")
            + "Fix: check each data.sources.<i>.path (an empty source reads 0 rows); make the rows match "
            f"a supported format or force one with data.sources.<i>.format ({', '.join(FORMATS)}); a "
            "weight or max_rows too small leaves rows not selected. Every rejected row, with its file, "
            f"line and reason, is in {rejects_path}"
        )
    limit = cfg.validation.max_reject_fraction
    fraction = totals["rejected"] / totals["read"]
    if fraction > limit:
        raise DataError(
            f"{totals['rejected']} of {totals['read']} rows rejected ({fraction:.1%}), more than "
            f"validation.max_reject_fraction = {limit}. Top reasons: {reasons}. Every rejected row, with its "
            f"file, line and reason, is in {rejects_path}. Fix those rows, or raise "
            f"validation.max_reject_fraction (e.g. --set validation.max_reject_fraction={min(1.0, math.ceil(fraction * 100) / 100)}) "
            "if losing them is acceptable"
        )
