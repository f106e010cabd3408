"""Prefect wrapper of the evaluation stage: sycophancy of the base and the tuned model, a table artifact."""

from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from leantune.config import RunConfig
from leantune.evaluation.compare import overall_summary, single_table_rows, table_rows
from leantune.evaluation.runner import evaluate
from tasks.logs import stage_progress_artifact
from tasks.stage import stage_task


@stage_task(name="evaluate")
def evaluate_sycophancy(config: RunConfig, out_dir: Path, adapter_dir: Path | None = None,
                        tokenizer_dir: Path | None = None) -> dict:
    """Run the evaluation; return the output files and each set's overall summaries (no per-item data)."""
    log = get_run_logger()
    with stage_progress_artifact("evaluation-progress", "Evaluation: items scored, per model and set"):
        results = evaluate(config, out_dir, adapter_dir=adapter_dir, tokenizer_dir=tokenizer_dir)
    comparison = results.get("comparison")
    rows = table_rows(comparison) if comparison else single_table_rows(results["base"])
    what = "base against tuned (same items; difference with Newcombe's paired interval)" if comparison else \
        "one model"
    create_table_artifact(rows, key="sycophancy-evaluation",
                          description=f"Sycophancy rate with {config.eval.confidence:.0%} Wilson intervals, {what}")
    files = {k: str(v) for k, v in results["files"].items()}
    create_markdown_artifact(
        "## Sycophancy evaluation\n\n" + "\n".join(f"- {k}: `{v}`" for k, v in files.items()) + "\n",
        key="sycophancy-evaluation-files", description="Where the evaluation results and the chart are")
    overall = overall_summary(results)
    for name in overall:
        if comparison:
            c = comparison["sets"][name]["overall"]
            log.info(f"evaluate {name}: sycophancy rate base {c['base']['rate']:.3f}, tuned {c['tuned']['rate']:.3f}, "
                     f"difference {c['difference']:+.3f} [{c['difference_ci'][0]:+.3f}, {c['difference_ci'][1]:+.3f}] "
                     f"over {c['n']} items, McNemar p {c['mcnemar_p']:.3g}")
        else:
            o = overall[name]["base"]
            log.info(f"evaluate {name}: sycophancy rate {o['rate']:.3f} [{o['rate_ci'][0]:.3f}, "
                     f"{o['rate_ci'][1]:.3f}] over {o['n']} items")
    log.info(f"evaluate: results in {Path(out_dir)}, chart {files['chart']}")
    return {"files": files, "overall": overall}
