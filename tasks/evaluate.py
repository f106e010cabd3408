"""Prefect wrapper of the evaluation stage: sycophancy of the base and the tuned model, a table artifact."""

from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from leantune.config import RunConfig
from leantune.evaluation.compare import nll_table_rows, overall_summary, single_table_rows, table_rows
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
    if comparison and (nll_rows := nll_table_rows(comparison)):
        create_table_artifact(nll_rows, key="general-evaluation", description=(
            f"Mean NLL per response token with {config.eval.confidence:.0%} t intervals, base against tuned "
            "(same items; paired t-test)"))
    files = {k: str(v) for k, v in results["files"].items()}
    create_markdown_artifact(
        "## Sycophancy evaluation\n\n" + "\n".join(f"- {k}: `{v}`" for k, v in files.items()) + "\n",
        key="sycophancy-evaluation-files", description="Where the evaluation results and the chart are")
    overall = overall_summary(results)
    for name in overall:
        if comparison and "t_test_p" in (c := comparison["sets"][name]["overall"]):
            log.info(f"evaluate {name}: mean NLL per response token base {c['base']['mean_nll']:.4f}, tuned "
                     f"{c['tuned']['mean_nll']:.4f}, difference {c['difference']:+.4f} [{c['difference_ci'][0]:+.4f}, "
                     f"{c['difference_ci'][1]:+.4f}] over {c['n']} items, paired t-test p {c['t_test_p']:.3g}")
        elif comparison:
            log.info(f"evaluate {name}: sycophancy rate base {c['base']['rate']:.3f}, tuned {c['tuned']['rate']:.3f}, "
                     f"difference {c['difference']:+.3f} [{c['difference_ci'][0]:+.3f}, {c['difference_ci'][1]:+.3f}] "
                     f"over {c['n']} items, McNemar p {c['mcnemar_p']:.3g}")
        elif "mean_nll" in (o := overall[name]["base"]):
            log.info(f"evaluate {name}: mean NLL per response token {o['mean_nll']:.4f} [{o['mean_nll_ci'][0]:.4f}, "
                     f"{o['mean_nll_ci'][1]:.4f}] over {o['n']} items")
        else:
            log.info(f"evaluate {name}: sycophancy rate {o['rate']:.3f} [{o['rate_ci'][0]:.3f}, "
                     f"{o['rate_ci'][1]:.3f}] over {o['n']} items")
    log.info(f"evaluate: results in {Path(out_dir)}, chart {files['chart']}")
    return {"files": files, "overall": overall}
