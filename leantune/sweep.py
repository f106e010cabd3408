"""A sweep's members and its comparison table (no Prefect here; flows/sweep.py submits and waits).

Members are every config file times every combination of the grid's values (dotted keys, as
--set takes them), each with the sweep's common overrides and its own run name
`<sweep>-<index>`. A member's row holds its state and, when its run directory can be read
here, figures from training.json and eval/comparison.json (per evaluation set: base and tuned
sycophancy rates, their difference and McNemar's p).
"""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from leantune.config import ConfigError, RunConfig, load_config
from leantune.probe import GIB
from leantune.rundir import RunDir

# Columns every row has, in order; evaluation columns follow, per set.
BASE_COLUMNS = ["member", "overrides", "config", "pool", "estimate_gib", "state", "flow_run", "run_dir", "steps",
                "final_loss", "final_val_loss", "best_val_loss", "tokens_per_s", "processes", "scaling_efficiency",
                "peak_memory_mb", "error"]
# Grid keys that change only how many processes train; members that differ in nothing else form a scaling series.
PROCESS_KEYS = ("train.distributed.nproc_per_node=", "train.distributed.nnodes=")


@dataclass(frozen=True)
class Member:
    """One run of a sweep: where its config comes from and the overrides that make it differ."""

    index: int
    config_path: Path
    overrides: list[str]  # the grid's, for this member; the sweep's common ones are already in `config`
    config: RunConfig

    @property
    def name(self) -> str:
        assert self.config.run.name is not None  # expand_members always names the run
        return self.config.run.name

    @property
    def label(self) -> str:
        return " ".join(self.overrides) or "(base)"

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run.output_dir) / self.name


def grid_overrides(grid: dict[str, list]) -> list[list[str]]:
    """Every combination of the grid's values as --set strings, the first key varying slowest."""
    if not grid:
        return [[]]
    keys = list(grid)
    for key in keys:
        if not isinstance(grid[key], list) or not grid[key]:
            raise ConfigError([f"{key}: the grid needs a non-empty list of values, e.g. {key}=[8, 16]"], "sweep grid")
    return [[f"{key}={_override_text(value)}" for key, value in zip(keys, combo, strict=True)]
            for combo in itertools.product(*(grid[k] for k in keys))]


def _override_text(value) -> str:
    """A grid value as --set takes it: text as typed (the CLI's `--grid train.lr=1e-4,2e-4`), anything
    else as JSON, which is YAML, so it parses back to the same value (0.0001 stays a number)."""
    return value if isinstance(value, str) else json.dumps(value)


def expand_members(config_paths: list[str | Path], grid: dict[str, list], overrides: list[str],
                   sweep_name: str) -> list[Member]:
    """Every config file x every grid combination, validated now (a bad key fails before anything runs)."""
    members = []
    for path in config_paths:
        for combo in grid_overrides(grid):
            index = len(members)
            config = load_config(path, [*overrides, *combo, f"run.name={sweep_name}-{index:02d}"])
            members.append(Member(index=index, config_path=Path(path), overrides=combo, config=config))
    return members


def member_row(member: Member, *, pool: str | None, estimate_bytes: int | None, state: str,
               flow_run: str | None, error: str | None = None) -> dict:
    """The member's row: what it was, where it ran, its state, and its results when its run directory has them."""
    row = {
        "member": member.name, "overrides": member.label, "config": str(member.config_path), "pool": pool,
        "estimate_gib": round(estimate_bytes / GIB, 3) if estimate_bytes is not None else None,
        "state": state, "flow_run": flow_run, "run_dir": str(member.run_dir), "error": error,
    }
    training = _read_json(RunDir(member.run_dir).training)
    if training is not None:
        seconds = training.get("train_seconds")
        row.update({
            "steps": training.get("steps"), "final_loss": _round(training.get("final_loss")),
            "final_val_loss": _round(training.get("final_val_loss")),
            "best_val_loss": _round(training.get("best_val_loss")),
            "tokens_per_s": round(training["tokens"] / seconds, 1) if seconds else None,
            "processes": training.get("world_size", 1),
            "peak_memory_mb": _round(training.get("peak_memory_mb"), 1),
        })
    comparison = _read_json(RunDir(member.run_dir).eval_dir.comparison)
    for set_name, groups in (comparison or {}).get("sets", {}).items():
        overall = groups["overall"]
        # The general set compares mean NLL per token (paired t-test), the others rates (McNemar).
        measure, test = ("mean_nll", "t_test_p") if "t_test_p" in overall else ("rate", "mcnemar_p")
        row.update({
            f"{set_name} items": overall["n"],
            f"{set_name} base {measure.replace('_', ' ')}": _round(overall["base"][measure]),
            f"{set_name} tuned {measure.replace('_', ' ')}": _round(overall["tuned"][measure]),
            f"{set_name} difference": _round(overall["difference"]),
            f"{set_name} {'paired t-test p' if test == 't_test_p' else 'McNemar p'}": _round(overall[test]),
        })
    return row


def add_scaling_efficiency(members: list[Member], rows: list[dict]) -> None:
    """Fill `scaling_efficiency` of each member that trained with N > 1 processes: its tokens/s over N x the
    tokens/s of the member with one process and otherwise the same config and overrides (a sweep with
    `--grid train.distributed.nproc_per_node=1,2,4`). Left empty without such a one-process member."""
    def series(member: Member) -> tuple:
        return member.config_path, tuple(o for o in member.overrides if not o.startswith(PROCESS_KEYS))

    single = {series(m): r["tokens_per_s"] for m, r in zip(members, rows, strict=True)
              if r.get("processes") == 1 and r.get("tokens_per_s")}
    for member, row in zip(members, rows, strict=True):
        n, tokens_per_s, reference = row.get("processes"), row.get("tokens_per_s"), single.get(series(member))
        if n and n > 1 and tokens_per_s and reference:
            row["scaling_efficiency"] = round(tokens_per_s / (n * reference), 3)


def table_columns(rows: list[dict]) -> list[str]:
    """The base columns, then every evaluation column any row has, in first-seen order."""
    extra = [key for row in rows for key in row if key not in BASE_COLUMNS]
    return BASE_COLUMNS + list(dict.fromkeys(extra))


def complete_rows(rows: list[dict]) -> list[dict]:
    """Rows with every column (None where a member has no value), in table order."""
    columns = table_columns(rows)
    return [{c: row.get(c) for c in columns} for row in rows]


def table_path(members: list[Member], sweep_name: str) -> Path:
    """Where the sweep's comparison table goes: <run.output_dir of the first member>/<sweep>/comparison.csv."""
    return Path(members[0].config.run.output_dir) / sweep_name / "comparison.csv"


def write_csv(rows: list[dict], path: Path) -> Path:
    """The comparison table as CSV (empty cells for missing values)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=table_columns(rows))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        # Not written (failed or unfinished run, evaluation off) or not readable from this machine.
        return None


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)
