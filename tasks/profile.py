"""Prefect wrappers of the profile sweep (leantune/profile.py): tokenize per length, a task per combination."""

from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from leantune.config import RunConfig
from leantune.profile import (
    Combination,
    run_combination,
    table_rows,
    tokenize_for_seq_len,
    write_summary,
)
from leantune.report import png_data_uri
from tasks.stage import stage_task


@stage_task(name="tokenize-seq-len", task_run_name="tokenize-seq-{max_seq_len}")
def tokenize_seq_len(config: RunConfig, profile_dir: Path, max_seq_len: int) -> None:
    stats = tokenize_for_seq_len(config, profile_dir, max_seq_len)
    c, t = stats["train"]["counts"], stats["train"]["tokens"]
    # No padding here: it depends on each combination's micro-batch (leantune/shards.py, padding_estimate).
    get_run_logger().info(f"tokenize max_seq_len={max_seq_len}: {c['records_read']} train records -> "
                          f"{c['sequences']} sequences, {t['total']} tokens")


@stage_task(name="profile-combination", task_run_name="profile-{combo.name}")
def profile_combination(config: RunConfig, combo: Combination, profile_dir: Path, breakdown: bool) -> dict:
    row = run_combination(config, combo, profile_dir, breakdown)
    log = get_run_logger()
    if row["status"] == "ok":
        energy = (f", {row['energy_j_per_10k_tokens']:,.1f} J per 10k tokens"
                  if row["energy_j_per_10k_tokens"] is not None else "")
        log.info(f"{combo.name}: {row['tokens_per_s']:,.0f} tokens/s ({row['seconds_per_10k_tokens']:.2f} s per "
                 f"10k tokens), peak memory {row['peak_memory_mb']:,.0f} MiB{energy}")
        if row.get("step_ms") is not None:
            log.info(f"{combo.name}: profiled step {row['step_ms']:,.1f} ms: " + ", ".join(
                f"{part} {row[f'{part}_ms']:,.1f}" for part in ("attention", "experts", "router", "optimizer", "other")))
    else:
        log.warning(f"{combo.name}: {row['status']}: {row['note']}")
    return row


@stage_task(name="publish-profile")
def publish_profile(rows: list[dict], profile_dir: Path) -> dict:
    """profile.csv and profile.png; the table and the plot as artifacts with stable keys."""
    paths = write_summary(rows, profile_dir)
    create_table_artifact(table_rows(rows), key="profile-table",
                          description=f"Training profile per combination (the CSV: {paths['csv']})")
    # A data: URI, because the UI cannot reach files on the machine that ran the flow (see tasks/report.py).
    create_markdown_artifact(f"![training profile]({png_data_uri(paths['png'])})\n", key="profile-plot",
                             description=f"Throughput and peak memory per combination ({paths['png']})")
    ran = sum(r["status"] == "ok" for r in rows)
    get_run_logger().info(f"profile: {ran} of {len(rows)} combination(s) ran; table in {paths['csv']} and the "
                          f"profile-table artifact, plot in {paths['png']}")
    return paths
