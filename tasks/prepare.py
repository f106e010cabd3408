"""Prefect wrapper of the prepare stage: read every source into canonical records, count every row."""

from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact

from leantune.config import RunConfig
from leantune.data.prepare import prepare
from leantune.rundir import RunDir
from tasks.stage import cached, stage_task


@stage_task(name="prepare")
def prepare_data(config: RunConfig, run_dir: Path) -> dict:
    log = get_run_logger()
    data = RunDir(run_dir).data_dir
    stats = cached(config, "prepare", run_dir, lambda: prepare(config, data.root), "inputs and settings")
    rows = [{"source": name, **{k: v for k, v in s.items() if k != "reasons"},
             "reasons": ", ".join(f"{r}={n}" for r, n in sorted(s["reasons"].items())) or "-"}
            for name, s in stats["sources"].items()]
    create_table_artifact(rows, key="prepare-sources", description="Rows read, kept, rejected per source")
    t = stats["totals"]
    log.info(f"prepare: read {t['read']} rows -> kept {t['kept']}, rejected {t['rejected']}, "
             f"duplicates {t['duplicates']}, not selected {t['not_selected']} "
             f"(rejects in {data.rejects}, duplicates in {data.duplicates})")
    return stats
