"""Prefect wrapper of the validate stage: Great Expectations over record chunks, quarantine, quality."""

from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact

from leantune.config import RunConfig
from leantune.rundir import RunDir
from leantune.validation import validate_records
from tasks.stage import cached, stage_task


@stage_task(name="validate")
def validate_data(config: RunConfig, run_dir: Path) -> dict:
    log = get_run_logger()
    data = RunDir(run_dir).data_dir
    report = cached(config, "validate", run_dir, lambda: validate_records(config, data.root), "records and settings")
    rows = [{"expectation": e["name"], "rows": e["rows_evaluated"], "failed": e["rows_failed"],
             "first failing ids": ", ".join(x["id"] for x in e["examples"][:3]) or "-"}
            for e in report["expectations"]]
    create_table_artifact(rows, key="validation-summary", description="Records suite, per expectation")
    log.info(f"validate: {report['records']} records -> train {report['train']}, val {report['val']}, "
             f"quarantined {report['quarantined']} (see {data.validation})")
    return report
