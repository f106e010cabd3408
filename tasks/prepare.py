"""Prefect wrapper of the prepare stage: read every source into canonical records, count every row."""

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from leantune.config import RunConfig
from leantune.data.prepare import prepare
from leantune.rundir import RunDir
from leantune.stagecache import run_cached


# Prefect's own result cache stays off: leantune's stage cache (leantune/stagecache.py) restores the
# stage's files into each new run directory, which a cached return value would not.
@task(name="prepare", cache_policy=NO_CACHE, persist_result=False)
def prepare_data(config: RunConfig, run_dir: Path) -> dict:
    log = get_run_logger()
    data = RunDir(run_dir).data_dir
    stats, hit = run_cached(config, "prepare", run_dir, lambda: prepare(config, data.root))
    if hit:
        log.info(f"prepare: skipped, same inputs and settings as an earlier run; outputs restored from "
                 f"the stage cache (key {hit})")
    rows = [{"source": name, **{k: v for k, v in s.items() if k != "reasons"},
             "reasons": ", ".join(f"{r}={n}" for r, n in sorted(s["reasons"].items())) or "-"}
            for name, s in stats["sources"].items()]
    create_table_artifact(rows, key="prepare-sources", description="Rows read, kept, rejected per source")
    t = stats["totals"]
    log.info(f"prepare: read {t['read']} rows -> kept {t['kept']}, rejected {t['rejected']}, "
             f"duplicates {t['duplicates']}, not selected {t['not_selected']} "
             f"(rejects in {data.rejects}, duplicates in {data.duplicates})")
    return stats
