"""Data quality metrics of a run, written to `data/quality.json` at the end of validation.

They combine the prepare stage's accounting (`prepare.json`), the validation report
(`validation.json`) and length statistics streamed from the records that passed validation
(`train.jsonl` + `val.jsonl`). Lengths are kept as compact int64 arrays (8 bytes a value), never
as records. The token lengths are tokenize's own output (tokens/lengths.json); the report shows both.
"""

from __future__ import annotations

import json
from array import array
from pathlib import Path

import numpy as np

from leantune.jsonl import iter_jsonl
from leantune.rundir import DataDir

PERCENTILES = (50, 90, 99)
PREPARE_COUNTS = ("read", "kept", "rejected", "duplicates", "not_selected")
SPLIT_COUNTS = ("train", "val", "quarantined")


def length_summary(values: np.ndarray) -> dict:
    """count, total, mean, p50/p90/p99 and max of integer lengths.

    Percentiles are nearest-rank (the smallest observed value with at least q% of the values at
    or below it), so each one is a length that really occurs.
    """
    values = np.asarray(values, dtype=np.int64)
    if values.size == 0:
        return {"count": 0, "total": 0, "mean": None, **{f"p{q}": None for q in PERCENTILES}, "max": None}
    summary = {"count": int(values.size), "total": int(values.sum()), "mean": float(values.mean())}
    for q in PERCENTILES:
        summary[f"p{q}"] = int(np.percentile(values, q, method="inverted_cdf"))
    summary["max"] = int(values.max())
    return summary


def _rate(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _passed_lengths(data_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Characters per conversation, characters per assistant turn, messages per conversation."""
    conversation, assistant, turns = array("q"), array("q"), array("q")
    for path in (DataDir(data_dir).train, DataDir(data_dir).val):
        for record in iter_jsonl(path):
            # A preference pair counts as its prompt and chosen answer.
            messages = record["messages"] if "messages" in record else record["prompt"] + record["chosen"]
            conversation.append(sum(len(m["content"]) for m in messages))
            assistant.extend(len(m["content"]) for m in messages if m["role"] == "assistant")
            turns.append(len(messages))
    return (np.array(conversation, dtype=np.int64), np.array(assistant, dtype=np.int64),
            np.array(turns, dtype=np.int64))


def quality_report(prepare_stats: dict, validation_stats: dict, data_dir: Path) -> dict:
    """Build the quality report from prepare.json's and validation.json's content and the passed records.

    Writes it to `data_dir/quality.json` and returns it. Lengths, turns and the split cover the
    records that passed validation; counts cover every row read.
    """
    data_dir = Path(data_dir)
    sources: dict[str, dict] = {}
    for name, stats in prepare_stats["sources"].items():
        sources[name] = {"format": stats.get("format"), **{k: stats.get(k, 0) for k in PREPARE_COUNTS},
                         **dict.fromkeys(SPLIT_COUNTS, 0), "reject_reasons": stats.get("reasons", {})}
    for name, counts in validation_stats["per_source"].items():
        # A record whose source label is missing or unknown still counts, under its own label.
        entry = sources.setdefault(name, {"format": None, **dict.fromkeys(PREPARE_COUNTS, 0),
                                          **dict.fromkeys(SPLIT_COUNTS, 0), "reject_reasons": {}})
        entry.update({k: counts[k] for k in SPLIT_COUNTS})

    formats: dict[str, dict] = {}
    for entry in sources.values():
        agg = formats.setdefault(str(entry["format"]), dict.fromkeys(PREPARE_COUNTS + SPLIT_COUNTS, 0))
        for key in PREPARE_COUNTS + SPLIT_COUNTS:
            agg[key] += entry[key]

    totals = prepare_stats["totals"]
    validated = validation_stats["records"]
    train, val = validation_stats["train"], validation_stats["val"]
    conversation_chars, assistant_chars, turns = _passed_lengths(data_dir)
    report = {
        "totals": {**{k: totals.get(k, 0) for k in PREPARE_COUNTS}, "validated": validated,
                   **{k: validation_stats[k] for k in SPLIT_COUNTS}},
        "rates": {
            "reject": _rate(totals.get("rejected", 0), totals.get("read", 0)),
            "duplicate": _rate(totals.get("duplicates", 0), totals.get("read", 0)),
            "quarantine": _rate(validation_stats["quarantined"], validated),
        },
        "reject_reasons": dict(sorted(totals.get("reasons", {}).items(), key=lambda kv: -kv[1])),
        # Rows failing per expectation; a row that fails two expectations counts under both.
        "quarantine_reasons": {e["name"]: e["rows_failed"] for e in sorted(
            validation_stats["expectations"], key=lambda e: -e["rows_failed"]) if e["rows_failed"]},
        "sources": sources,
        "formats": formats,
        "split": {"train": train, "val": val, "val_share": _rate(val, train + val)},
        "conversation_chars": length_summary(conversation_chars),
        "assistant_turn_chars": length_summary(assistant_chars),
        "turns": {**length_summary(turns),
                  "histogram": {str(n): int(c) for n, c in enumerate(np.bincount(turns)) if c}},
    }
    DataDir(data_dir).quality.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return report
