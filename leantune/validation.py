"""Stage 2: check canonical records with a Great Expectations suite, quarantine the failures, split the rest.

Records stream from `records.jsonl` in chunks of `data.chunk_size`. Each chunk becomes a pandas
frame of per-record features (`record_features`: one row per record) and is validated against
`expectations/records.json` (preference pairs, train.objective dpo or simpo: `pair_features` against
`expectations/pairs.json`, leantune/data/preference.py). Rows that fail any expectation go to `quarantine.jsonl` with the
names of the expectations they failed; the others go to `train.jsonl` or `val.jsonl` by id hash.

Suite files are plain GX suite JSON. Config-dependent bounds are written as a marker,
`{"$param": "validation.max_turns"}`, in an expectation's kwargs; `load_suite` replaces each
marker with `params["validation.max_turns"]` before the suite reaches GX, so GX (and the report)
only ever see plain values. Every expectation names itself in `meta.name`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leantune.config import RunConfig
from leantune.data.preference import pair_messages
from leantune.data.quality import quality_report
from leantune.data.split import is_validation
from leantune.errors import DataError, UserError
from leantune.jsonl import JsonlWriter, chunks, iter_jsonl
from leantune.rundir import DataDir, TokenDir

if TYPE_CHECKING:
    import numpy
    import pandas

log = logging.getLogger(__name__)



def suites_dir(cfg: RunConfig) -> Path:
    """validation.expectations_dir, else expectations/ of the checkout (beside the leantune package),
    else of the working directory: the suites are project files, not package data."""
    v = cfg.validation.expectations_dir
    candidates = [Path(v)] if v else [Path(__file__).resolve().parents[1] / "expectations", Path.cwd() / "expectations"]
    for folder in candidates:
        if all((folder / suite).is_file() for suite in ("records.json", "pairs.json", "tokens.json")):
            return folder
    raise UserError(
        "validation.expectations_dir: no Great Expectations suites (records.json, pairs.json and tokens.json) in "
        + " or ".join(str(c) for c in candidates)
        + "; run from the leantune checkout or set validation.expectations_dir to its expectations/ folder"
    )
EXCERPT_CHARS = 160
TOP_FAILURES_IN_MESSAGE = 5


def load_suite(suite_path: Path, params: dict) -> tuple[str, list[dict]]:
    """Read a suite JSON; return its name and its expectations with `$param` markers resolved.

    Each expectation comes back as `{"name", "type", "kwargs", "description"}`.
    """
    raw = json.loads(Path(suite_path).read_text())
    expectations = []
    for position, exp in enumerate(raw["expectations"]):
        name = exp.get("meta", {}).get("name")
        if not name:
            raise ValueError(f"{suite_path}: expectation #{position} ({exp['type']}) has no meta.name")
        kwargs = {}
        for key, value in exp["kwargs"].items():
            if isinstance(value, dict) and "$param" in value:
                if value["$param"] not in params:
                    raise ValueError(f"{suite_path}: {name}.{key} needs parameter {value['$param']!r}, "
                                     f"which was not given (given: {', '.join(sorted(params))})")
                value = params[value["$param"]]
            kwargs[key] = value
        expectations.append({"name": name, "type": exp["type"], "kwargs": kwargs,
                             "description": exp.get("description")})
    names = [e["name"] for e in expectations]
    if len(set(names)) != len(names):
        raise ValueError(f"{suite_path}: expectation names (meta.name) must be unique: {names}")
    return raw["name"], expectations


class SuiteRunner:
    """One ephemeral GX context holding one suite; `run(frame)` validates a frame against it.

    Build it once and call `run` per chunk: importing GX and building the context take seconds,
    a validation of a chunk takes milliseconds.
    """

    def __init__(self, suite_path: Path, params: dict):
        import great_expectations as gx
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        self.suite_path = Path(suite_path)
        name, self.expectations = load_suite(self.suite_path, params)
        # In memory only, no usage statistics sent anywhere, no per-metric progress bars in the logs.
        context = gx.get_context(mode="ephemeral", project_config=DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(),
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False),
        ))
        asset = context.data_sources.add_pandas("frames").add_dataframe_asset("frame")
        self._batch_definition = asset.add_batch_definition_whole_dataframe("whole frame")
        suite = gx.ExpectationSuite(name=name, expectations=[
            {"type": e["type"], "kwargs": e["kwargs"], "meta": {"name": e["name"]},
             "description": e["description"]}
            for e in self.expectations
        ])
        # GX logs and skips an expectation whose configuration it rejects; a suite must never
        # lose a check silently.
        if len(suite.expectations) != len(self.expectations):
            kept = {e.meta["name"] for e in suite.expectations}
            lost = [e["name"] for e in self.expectations if e["name"] not in kept]
            raise ValueError(f"{self.suite_path}: GX rejected expectation(s) {lost}; check their type and kwargs")
        self._suite = context.suites.add(suite)

    def run(self, frame: pandas.DataFrame) -> list[dict]:
        """Validate `frame`; one dict per expectation, in suite order.

        Each: name, type, kwargs, success, rows_evaluated (rows GX checked: nulls are skipped by
        most expectations), unexpected_rows (0-based row positions in `frame`).
        """
        frame = frame.reset_index(drop=True)
        batch = self._batch_definition.get_batch(batch_parameters={"dataframe": frame})
        result = batch.validate(self._suite, result_format={"result_format": "COMPLETE"})
        by_name = {r.expectation_config.meta["name"]: r for r in result.results}
        outcomes = []
        for exp in self.expectations:
            r = by_name[exp["name"]]
            if _raised(r.exception_info):
                raise RuntimeError(f"{self.suite_path}: expectation {exp['name']} raised: {r.exception_info}")
            outcomes.append({
                "name": exp["name"], "type": exp["type"], "kwargs": exp["kwargs"], "success": bool(r.success),
                "rows_evaluated": r.result["element_count"] - r.result.get("missing_count", 0),
                "unexpected_rows": [int(i) for i in r.result.get("unexpected_index_list", [])],
            })
        return outcomes


def _raised(exception_info: dict) -> bool:
    # GX reports one {raised_exception, ...} dict, or one such dict per failed metric.
    if "raised_exception" in exception_info:
        return bool(exception_info["raised_exception"])
    return any(info.get("raised_exception") for info in exception_info.values())


def run_suite(suite_path: Path, frame: pandas.DataFrame, params: dict) -> list[dict]:
    """Validate one frame against a suite file (see `SuiteRunner.run`); builds a context per call."""
    return SuiteRunner(suite_path, params).run(frame)


# ------------------------------------------------------------------------------- record features


def _id_key(record_id: str) -> int:
    # 8 bytes per seen id instead of the whole string; a false duplicate needs a 64-bit collision.
    return int.from_bytes(hashlib.blake2b(record_id.encode(), digest_size=8).digest(), "big")


def id_features(record: dict, seen_ids: set[int]) -> tuple[str | None, str | None, bool]:
    """A record's id and source (None unless a non-empty string), and whether its id was seen before
    (`seen_ids` is updated)."""
    record_id = record.get("id") if isinstance(record.get("id"), str) and record.get("id") else None
    source = record.get("source") if isinstance(record.get("source"), str) and record.get("source") else None
    seen_before = False
    if record_id is not None:
        key = _id_key(record_id)
        seen_before = key in seen_ids
        seen_ids.add(key)
    return record_id, source, seen_before


def record_features(records: list[dict], seen_ids: set[int]) -> pandas.DataFrame:
    """One row of features per record, the frame the records suite checks.

    `seen_ids` holds the id keys of all earlier records and is updated, so `id_seen_before`
    flags a repeated id across chunks as well as within this one.
    """
    import pandas as pd

    rows = []
    for record in records:
        record_id, source, seen_before = id_features(record, seen_ids)
        messages = record.get("messages")
        malformed = 0
        if not isinstance(messages, list):
            malformed, messages = 1, []
        roles, contents = [], []
        for m in messages:
            role = m.get("role") if isinstance(m, dict) else None
            content = m.get("content") if isinstance(m, dict) else None
            if not (isinstance(role, str) and isinstance(content, str)):
                malformed += 1
            roles.append(str(role))
            contents.append(content if isinstance(content, str) else "")
        turns = roles[1:] if roles[:1] == ["system"] else roles
        # Plain-text rows become [user "", assistant <text>] (see leantune/data/formats.py): the
        # empty prompt is by design, so it is exempt from the length and blank-turn checks.
        plain_text = roles == ["user", "assistant"] and contents[0] == ""
        checked = list(range(1 if plain_text else 0, len(contents)))
        lengths = [len(contents[i]) for i in checked]
        rows.append({
            "id": record_id,
            "source": source,
            "id_seen_before": seen_before,
            "n_messages": len(messages),
            "roles": ",".join(roles) if roles else None,
            "first_role": roles[0] if roles else None,
            "last_role": roles[-1] if roles else None,
            "roles_alternate": all(r == ("user", "assistant")[i % 2] for i, r in enumerate(turns)),
            "malformed_messages": malformed,
            "min_content_chars": min(lengths) if lengths else None,
            "max_content_chars": max(lengths) if lengths else None,
            "total_chars": sum(lengths),
            "blank_turns": sum(1 for i in checked if roles[i] in ("user", "assistant") and not contents[i].strip()),
            "echoed_answers": sum(1 for i in range(1, len(roles))
                                  if roles[i] == "assistant" and roles[i - 1] == "user"
                                  and contents[i].strip() and contents[i].strip() == contents[i - 1].strip()),
        })
    return pd.DataFrame(rows)


def _excerpt(record: dict) -> str:
    messages = record.get("messages", pair_messages(record))
    if isinstance(messages, list):
        text = " | ".join(f"{m.get('role')}: {m.get('content')}" if isinstance(m, dict) else repr(m)
                          for m in messages)
    else:
        text = f"messages: {messages!r}"
    text = " ".join(text.split())
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS - 1] + "…"


def _plain(value: Any) -> Any:
    """A frame cell as a JSON value: numpy scalars unwrapped, NaN as null, whole floats as ints."""
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float):
        return None if math.isnan(value) else (int(value) if value.is_integer() else value)
    return value


# ------------------------------------------------------------------------------------------ stage


def validate_records(cfg: RunConfig, data_dir: Path) -> dict:
    """Validate `data_dir/records.jsonl`; write train/val/quarantine jsonl, validation.json, quality.json.

    Returns the validation report (the content of validation.json). Raises DataError when the
    quarantined share passes `validation.max_reject_fraction` or no training record remains;
    both reports are written first so the message can point at them.
    """
    data = DataDir(data_dir)
    records_path, prepare_path = data.records, data.prepare
    for path in (records_path, prepare_path):
        if not path.is_file():
            raise DataError(f"{path} not found: run the prepare stage first (it writes records.jsonl "
                            "and prepare.json into the run's data/ directory)")
    prepare_stats = json.loads(prepare_path.read_text())
    v = cfg.validation
    params = {f"validation.{key}": value for key, value in v.model_dump().items()}
    pairs = cfg.train.objective != "sft"  # preference pairs: their own suite and features (data/preference.py)
    records_suite = suites_dir(cfg) / ("pairs.json" if pairs else "records.json")
    features = pair_features if pairs else record_features
    runner = SuiteRunner(records_suite, params)
    report = {e["name"]: {**e, "rows_evaluated": 0, "rows_failed": 0, "examples": []}
              for e in runner.expectations}
    seen_ids: set[int] = set()
    per_source: dict[str, Counter] = defaultdict(Counter)
    n_records = 0
    with (JsonlWriter(data.train) as train, JsonlWriter(data.val) as val,
          JsonlWriter(data.quarantine) as quarantine):
        for chunk in chunks(iter_jsonl(records_path), cfg.data.chunk_size):
            frame = features(chunk, seen_ids)
            failed_by_row: dict[int, list[str]] = defaultdict(list)
            for outcome in runner.run(frame):
                entry = report[outcome["name"]]
                entry["rows_evaluated"] += outcome["rows_evaluated"]
                entry["rows_failed"] += len(outcome["unexpected_rows"])
                column = outcome["kwargs"].get("column")
                for row in outcome["unexpected_rows"]:
                    failed_by_row[row].append(outcome["name"])
                    if len(entry["examples"]) < v.examples_per_failure:
                        record = chunk[row]
                        entry["examples"].append({
                            "id": record.get("id"), "source": record.get("source"),
                            "value": _plain(frame.at[row, column]) if column else None,
                            "excerpt": _excerpt(record),
                        })
            for row, record in enumerate(chunk):
                counts = per_source[str(record.get("source"))]
                counts["records"] += 1
                if row in failed_by_row:
                    # Named as rejects.jsonl names a row: its source, file and line (records.jsonl's index too).
                    quarantine.write({"source": record.get("source"), "file": record.get("file"),
                                      "line": record.get("line"), "index": n_records + row, "id": record.get("id"),
                                      "failed": failed_by_row[row], "record": record})
                    counts["quarantined"] += 1
                elif is_validation(record["id"], cfg.data.val_fraction, cfg.data.split_seed):
                    val.write(record)
                    counts["val"] += 1
                else:
                    train.write(record)
                    counts["train"] += 1
            n_records += len(chunk)
    if n_records != train.count + val.count + quarantine.count:
        raise RuntimeError(f"validation accounting is off: {n_records} records in, {train.count} train + "
                           f"{val.count} val + {quarantine.count} quarantined out")

    quarantined_fraction = quarantine.count / n_records if n_records else 0.0
    too_many = quarantined_fraction > v.max_reject_fraction
    failing = sorted((e for e in report.values() if e["rows_failed"]), key=lambda e: -e["rows_failed"])
    result = {
        "suite": str(records_suite),
        "success": not too_many and train.count > 0,
        "records": n_records,
        "train": train.count,
        "val": val.count,
        "quarantined": quarantine.count,
        "quarantined_fraction": quarantined_fraction,
        "max_reject_fraction": v.max_reject_fraction,
        "expectations": list(report.values()),
        "per_source": {name: {key: counts[key] for key in ("records", "train", "val", "quarantined")}
                       for name, counts in per_source.items()},
    }
    data.validation.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    quality_report(prepare_stats, result, data.root)
    log.info("validation: %d records -> %d train, %d val, %d quarantined",
             n_records, train.count, val.count, quarantine.count)

    pointers = (f"See {data.quarantine} for the quarantined records (each with the "
                f"expectations it failed) and {data.validation} for the full report.")
    if too_many:
        top = ", ".join(f"{e['name']} ({e['rows_failed']})" for e in failing[:TOP_FAILURES_IN_MESSAGE])
        raise DataError(
            f"Validation quarantined {quarantine.count} of {n_records} records ({quarantined_fraction:.1%}), "
            f"more than validation.max_reject_fraction={v.max_reject_fraction}. "
            f"Top failing expectations (rows failed): {top}. {pointers} Fix the data, or adjust the bounds in the "
            "validation section (max_turns, min_content_chars, max_content_chars) or raise "
            "validation.max_reject_fraction if these rows are acceptable losses."
        )
    if train.count == 0:
        why = ("records.jsonl is empty: check data.sources and prepare.json" if n_records == 0 else
               f"{val.count} record(s) went to validation (data.val_fraction={cfg.data.val_fraction}) and "
               f"{quarantine.count} were quarantined; add data or lower data.val_fraction")
        raise DataError(f"No training records left after validation: {why}. {pointers}")
    return result


# ----------------------------------------------------------------------------------- token suite



def sequence_features(split_dir: Path, index: numpy.ndarray, docs: numpy.ndarray, meta: dict) -> pandas.DataFrame:
    """One row per sequence of a token split: length, trainable tokens, largest id, documents.

    Computed per shard with `reduceat` over the memory-mapped arrays, so a split of millions of
    sequences is checked without a Python loop over tokens.
    """
    import numpy as np
    import pandas as pd

    shard, offset, length, first_doc, n_docs = (index[:, k] for k in range(5))
    max_id = np.zeros(len(index), dtype=np.int64)
    trainable = np.zeros(len(index), dtype=np.int64)
    for k, files in enumerate(meta["shards"]):
        rows = np.flatnonzero(shard == k)
        if rows.size == 0:
            continue
        tokens = np.load(split_dir / files["tokens"], mmap_mode="r")
        mask = np.load(split_dir / files["mask"], mmap_mode="r")
        # The sequences of one shard are written back to back, so segment i runs from its offset to
        # the next one; the array is cut to the rows' sequences so that it ends at the last one and
        # only their tokens are read (validate_tokens passes a chunk of rows at a time).
        # (A zero-length sequence would break reduceat; the length check below reports any.)
        starts = offset[rows]
        first, end = starts[0], starts[-1] + length[rows[-1]]
        max_id[rows] = np.maximum.reduceat(tokens[first:end], starts - first)
        trainable[rows] = np.add.reduceat(mask[first:end], starts - first, dtype=np.int64)
    doc_cumsum = np.concatenate([[0], np.cumsum(docs[:, 1])])
    document_tokens = doc_cumsum[first_doc + n_docs] - doc_cumsum[first_doc]
    return pd.DataFrame({"length": length, "max_token_id": max_id, "trainable_tokens": trainable,
                         "documents": n_docs, "document_tokens": document_tokens})


def validate_tokens(cfg: RunConfig, tokens_dir: Path) -> dict:
    """Run the token suite over every split in `tokens_dir`; write tokens/validation.json.

    The shards are leantune's own output, so any failure stops the run (DataError) with the
    failing checks and example sequence numbers, before a training step reads them.
    """
    import numpy as np

    tokens = TokenDir(tokens_dir)
    runner = None
    tokens_suite = suites_dir(cfg) / "tokens.json"
    report: dict[str, Any] = {"suite": str(tokens_suite), "splits": {}}
    for split in ("train", "val"):
        split_dir = tokens.split(split)
        if not tokens.index(split).is_file():
            continue
        meta = json.loads(tokens.index(split).read_text())
        index, docs = np.load(split_dir / "index.npy"), np.load(split_dir / "docs.npy")
        if runner is None:
            # A pair's sequence holds its prompt once and both answers (data/preference.py).
            seq_len = cfg.tokenize.max_seq_len * (2 if meta.get("pairs") else 1)
            runner = SuiteRunner(tokens_suite, {"tokenize.max_seq_len": seq_len,
                                                "tokens.max_token_id": meta["tokenizer"]["vocab_size"] - 1})
        failures = []
        for start in range(0, len(index), cfg.data.chunk_size):
            chunk = slice(start, start + cfg.data.chunk_size)
            for outcome in runner.run(sequence_features(split_dir, index[chunk], docs, meta)):
                if outcome["unexpected_rows"]:
                    failures.append((outcome["name"], [start + r for r in outcome["unexpected_rows"]]))
        by_name: dict[str, list[int]] = defaultdict(list)
        for name, rows in failures:
            by_name[name].extend(rows)
        report["splits"][split] = {
            "sequences": len(index),
            "failed": {name: {"sequences": len(rows), "examples": rows[: cfg.validation.examples_per_failure]}
                       for name, rows in by_name.items()},
        }
    report["success"] = all(not s["failed"] for s in report["splits"].values())
    tokens.validation.write_text(json.dumps(report, indent=2))
    if not report["success"]:
        lines = [f"{split}: {name} failed for {f['sequences']} sequence(s), e.g. #{f['examples']}"
                 for split, s in report["splits"].items() for name, f in s["failed"].items()]
        raise DataError("the token shards break the token suite (expectations/tokens.json): " + "; ".join(lines)
                        + f". Details in {tokens.validation}. The tokenizer in "
                        f"{tokens.tokenizer} and tokenize.* settings disagree with the shards: "
                        "delete the run's tokens/ directory and run again")
    return report


# ------------------------------------------------------------------------------------- pairs


def pair_features(records: list[dict], seen_ids: set[int]) -> pandas.DataFrame:
    """One row of features per pair record, the frame expectations/pairs.json checks (as
    validation.record_features is for conversations; `seen_ids` is updated the same way)."""
    import pandas as pd

    rows = []
    for record in records:
        record_id_, source, seen_before = id_features(record, seen_ids)
        parts, malformed = {}, 0
        for name in ("prompt", "chosen", "rejected"):
            value = record.get(name)
            if not isinstance(value, list):
                malformed, value = malformed + 1, []
            messages = []
            for m in value:
                role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
                if not (isinstance(role, str) and isinstance(content, str)):
                    malformed += 1
                messages.append((str(role), content if isinstance(content, str) else ""))
            parts[name] = messages
        prompt_roles = [r for r, _ in parts["prompt"]]
        turns = prompt_roles[1:] if prompt_roles[:1] == ["system"] else prompt_roles
        contents = [c for name in parts for _, c in parts[name]]
        lengths = [len(c) for c in contents]
        rows.append({
            "id": record_id_,
            "source": source,
            "id_seen_before": seen_before,
            "malformed_messages": malformed,
            "n_messages": len(parts["prompt"]) + 1,
            "roles": ",".join(r for name in parts for r, _ in parts[name]) or None,
            "prompt_last_role": prompt_roles[-1] if prompt_roles else None,
            "prompt_roles_alternate": all(r == ("user", "assistant")[i % 2] for i, r in enumerate(turns)),
            "chosen_roles": ",".join(r for r, _ in parts["chosen"]),
            "rejected_roles": ",".join(r for r, _ in parts["rejected"]),
            "chosen_equals_rejected": [c for _, c in parts["chosen"]] == [c for _, c in parts["rejected"]],
            "min_content_chars": min(lengths) if lengths else None,
            "max_content_chars": max(lengths) if lengths else None,
            "blank_turns": sum(1 for c in contents if not c.strip()),
        })
    return pd.DataFrame(rows)
