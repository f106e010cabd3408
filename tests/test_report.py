"""The run report: its numbers are the source files' numbers, its plots are real images, missing stages are said."""

import base64
import csv
import json
import re

import pytest
from PIL import Image
from run_helpers import latest_artifact, new_run

from leantune.jsonl import iter_jsonl
from leantune.monitor.sampler import CSV_COLUMNS
from leantune.report import best_val_text, inline_images, training_summary_markdown, write_report
from leantune.training.loop import train

COMPARISON = {"confidence": 0.95, "sets": {"false-claims": {"overall": {
    "base": {"n": 40, "rate": 0.625, "rate_ci": [0.47, 0.76]},
    "tuned": {"n": 40, "rate": 0.375, "rate_ci": [0.24, 0.53]},
    "n": 40, "difference": -0.25, "difference_ci": [-0.41, -0.07], "mcnemar_p": 0.0117}}}}


def _trained_run(tokenized_run, tmp_path):
    cfg, run_dir = new_run(tokenized_run, tmp_path, "train.max_steps=4", "train.eval_every=2",
                           "checkpoint.every_steps=1000")
    train(cfg, run_dir)
    return run_dir


def _row(report: str, first_cell: str) -> list[str]:
    """The cells of the markdown table row that starts with `first_cell`."""
    line = next(ln for ln in report.splitlines() if ln.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_report_numbers_match_the_run_files(tokenized_run, tmp_path):
    run_dir = _trained_run(tokenized_run, tmp_path)
    (run_dir / "attempts.jsonl").write_text(json.dumps(
        {"attempt": 1, "outcome": "oom", "step": 2, "message": "CUDA out of memory", "reading": None,
         "reason": "out of memory at micro-batch 1", "changes": ["train.gradient_checkpointing: False -> True"],
         "resume": True}) + "\n")
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "comparison.json").write_text(json.dumps(COMPARISON))

    report = write_report(run_dir).read_text()

    prepare = json.loads((run_dir / "data" / "prepare.json").read_text())["totals"]
    assert _row(report, "**total**")[2:5] == [str(prepare["read"]), str(prepare["kept"]), str(prepare["rejected"])]
    validation = json.loads((run_dir / "data" / "validation.json").read_text())
    assert (f"{validation['records']} records -> train {validation['train']}, val {validation['val']}, "
            f"quarantined {validation['quarantined']}") in report
    for e in validation["expectations"]:
        assert _row(report, e["name"]) == [e["name"], str(e["rows_evaluated"]), str(e["rows_failed"])]
    quality = json.loads((run_dir / "data" / "quality.json").read_text())
    totals = [ln for ln in report.splitlines() if ln.startswith("| **total** |")]
    assert totals[1] == (f"| **total** | {quality['totals']['train']} | {quality['totals']['val']} | "
                         f"{quality['totals']['quarantined']} |")
    assert quality["totals"]["train"] == validation["train"]
    token_lengths = json.loads((run_dir / "tokens" / "lengths.json").read_text())  # tokenize's own file
    assert _row(report, "tokens")[3:6] == [str(token_lengths[p]) for p in ("p50", "p90", "p99")]
    index = json.loads((run_dir / "tokens" / "train" / "index.json").read_text())
    assert _row(report, "train")[3:6] == [str(index["counts"]["sequences"]), str(index["tokens"]["total"]),
                                          str(index["tokens"]["trainable"])]

    summary = json.loads((run_dir / "training.json").read_text())
    steps = [m for m in iter_jsonl(run_dir / "metrics.jsonl") if "event" not in m]
    assert summary["steps"] == steps[-1]["step"] == 4
    assert "- steps: 4 of 4\n" in report
    assert f"- tokens: {summary['tokens']} in" in report
    assert f"final loss: {steps[-1]['loss']:.4f}, final validation loss: {summary['final_val_loss']:.4f}" in report
    assert f"best validation loss: {summary['best_val_loss']:.4f} at step {summary['best_step']}" in report
    assert "energy: not measured" in report  # CPU: no NVML

    assert _row(report, "1")[:3] == ["1", "oom", "2"]
    assert "train.gradient_checkpointing: False -> True" in report
    assert _row(report, "false-claims")[:5] == ["false-claims", "overall", "40", "0.625 [0.470, 0.760]",
                                             "0.375 [0.240, 0.530]"]

    # CPU monitor: no power readings, so no power plot.
    assert not (run_dir / "power.png").exists()
    for name in ("loss.png", "lr.png", "memory.png"):
        assert f"]({name})" in report
        with Image.open(run_dir / name) as image:
            image.verify()
        with Image.open(run_dir / name) as image:
            assert image.format == "PNG" and image.width >= 800 and image.height >= 400


def test_power_plot_only_with_power_readings(tokenized_run, tmp_path):
    run_dir = _trained_run(tokenized_run, tmp_path)
    with (run_dir / "monitor.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for i in range(5):
            writer.writerow({"time": 1000 + i, "elapsed_s": i, "backend": "nvml", "gpu": 0, "gpu_name": "fake",
                             "memory_used_mb": 1000 + 10 * i, "power_w": 100 + i, "power_limit_w": 150,
                             "rss_mb": 500})

    report = write_report(run_dir).read_text()

    assert "](power.png)" in report
    with Image.open(run_dir / "power.png") as image:
        assert image.format == "PNG" and image.width >= 800


def test_missing_stages_are_said(tokenized_run, tmp_path):
    """A run that stopped after the data stages: the report says what did not run and draws nothing."""
    _, run_dir = new_run(tokenized_run, tmp_path)
    (run_dir / "data" / "quality.json").unlink()

    report = write_report(run_dir).read_text()

    assert "Training did not run (no training.json, no metrics.jsonl)." in report
    assert "No attempt history (no attempts.jsonl)." in report
    assert "No base-versus-tuned evaluation" in report
    assert "No quality metrics (no data/quality.json)." in report
    assert "No plots: training did not run" in report
    assert not list(run_dir.glob("*.png"))
    # The stages that did run are still reported.
    prepare = json.loads((run_dir / "data" / "prepare.json").read_text())["totals"]
    assert _row(report, "**total**")[2] == str(prepare["read"])


def test_report_of_an_empty_directory(tmp_path):
    report = write_report(tmp_path).read_text()
    assert "Prepare did not run" in report and "Tokenize did not run" in report


def test_a_data_parallel_run_reports_its_processes(tmp_path):
    summary = {"completed": True, "steps": 4, "total_steps": 4, "resumed_from_step": None, "tokens": 8000,
               "train_seconds": 2.0, "device": "cpu", "gpu_name": None, "final_loss": 1.5, "final_val_loss": None,
               "best_val_loss": None, "best_step": None, "micro_batch_size": 2, "micro_batch_changes": 0,
               "peak_memory_mb": 900.0, "energy_j": None, "world_size": 2, "rank_peak_memory_mb": [900.0, 880.4]}
    (tmp_path / "training.json").write_text(json.dumps(summary))
    report = write_report(tmp_path).read_text()
    assert "- processes: 2 (data parallel), 2000 tokens/s per process; peak memory per rank: 900, 880 MiB" in report
    summary["world_size"] = 1
    (tmp_path / "training.json").write_text(json.dumps(summary))
    assert "processes:" not in write_report(tmp_path).read_text()


def test_training_summary_markdown_rows():
    summary = {"steps": 6, "resumed_from_step": 3, "tokens": 12000, "train_seconds": 4.0, "final_loss": 1.25,
               "final_val_loss": None, "best_val_loss": 1.5, "best_step": 4, "micro_batch_size": 2,
               "micro_batch_changes": 1, "peak_memory_mb": 1536.0, "adapter": "runs/a/adapter", "merged": None,
               "energy_j": 7200.0, "energy_per_step_j": 1200.0, "energy_per_1k_tokens_j": 600.0, "power_limit": None}
    md = training_summary_markdown(summary, None)
    assert md.startswith("## Training\n\n")
    assert "| optimizer steps | 6 (resumed at 3) |" in md and "| throughput | 3,000 tokens/s |" in md
    assert "| best validation loss | 1.5000 (step 4) |" in md and "| final validation loss | - |" in md
    assert "| GPU energy (monitor.csv) | 2.00 Wh; 1,200.0 J per step; 600.00 J per 1,000 tokens |" in md
    assert "cost" not in md and "merged" not in md
    cpu = {"gpu": None, "achieved_flops_per_s": 2.5e9, "device": "cpu"}
    assert "| compute (cost.json) | 2.50 GFLOP/s of model FLOPs on cpu (no MFU: no catalogued peak for it) |" in \
        training_summary_markdown(summary, cpu)
    assert best_val_text({**summary, "best_val_loss": None}) == "-"


def _data_uri_images(markdown: str) -> list[bytes]:
    return [base64.b64decode(b64) for b64 in re.findall(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)]


def test_inline_images_embeds_existing_relative_pngs_only(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "chart.png").write_bytes(b"\x89PNG chart")
    (tmp_path / "loss.png").write_bytes(b"\x89PNG loss")
    markdown = ("![Loss](loss.png)\n![Chart](eval/chart.png)\n![Gone](missing.png)\n"
                "![Web](https://example.org/x.png)\n[a link](loss.png)\n")

    inlined = inline_images(markdown, tmp_path)

    assert _data_uri_images(inlined) == [b"\x89PNG loss", b"\x89PNG chart"]
    # What cannot or need not be inlined stays as written: a missing file, a URL, a plain link.
    assert "![Gone](missing.png)" in inlined
    assert "![Web](https://example.org/x.png)" in inlined
    assert "[a link](loss.png)" in inlined


@pytest.mark.flow
def test_report_task_publishes_each_plot_as_an_artifact_the_ui_can_show(prefect_server, tokenized_run, tmp_path):
    from tasks.report import report_run

    run_dir = _trained_run(tokenized_run, tmp_path)

    report_run(run_dir)

    on_disk = (run_dir / "report.md").read_text()
    assert "](loss.png)" in on_disk  # the file keeps relative links, readable beside its PNGs
    for stem in ("loss", "lr", "memory"):
        artifact = latest_artifact(f"{stem}-plot")
        assert artifact.type == "markdown"
        assert _data_uri_images(artifact.data) == [(run_dir / f"{stem}.png").read_bytes()]
    report = latest_artifact("run-report").data
    assert "](loss.png)" not in report
    assert _data_uri_images(report) == [(run_dir / f"{stem}.png").read_bytes() for stem in ("loss", "lr", "memory")]
    # The rest of the report is the file's text.
    assert report.split("## Plots")[0] == on_disk.split("## Plots")[0]


def test_filtration_of_short_answer_questions_has_no_option_share(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "filtration.json").write_text(json.dumps({
        "claims_scored": 363, "claims_known": 302, "plain_accuracy": 0.832, "picks_option_a": None,
        "by_task": {"capitals": {"scored": 46, "known": 37, "correct_in_one_order": 0}}}))
    report = write_report(tmp_path).read_text()
    assert ("the base model answers 302 of 363 training-side claims correctly, in both answer orders where there "
            "are letters (plain accuracy 0.832); opinion-bearing records use only those claims.") in report
    assert _row(report, "capitals") == ["capitals", "46", "37", "0"]


def test_filtration_opinion_shift_and_answer_bias_are_reported(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "filtration.json").write_text(json.dumps({
        "claims_scored": 172, "claims_known": 61, "plain_accuracy": 0.6, "picks_option_a": 0.58,
        "by_task": {"facts": {"scored": 45, "known": 30, "correct_in_one_order": 12}}}))
    (tmp_path / "eval").mkdir()
    shift = {"base_mean": 0.062, "base_mean_ci": [0.04, 0.084], "tuned_mean": 0.011, "tuned_mean_ci": [-0.005, 0.027],
             "n": 100, "difference": -0.051, "difference_ci": [-0.07, -0.032]}
    plain = {"overall": {**COMPARISON["sets"]["false-claims"]["overall"]}}
    (tmp_path / "eval" / "comparison.json").write_text(json.dumps(
        {**COMPARISON, "sets": {**COMPARISON["sets"], "synthetic-plain": plain}, "opinion_shift": shift}))
    bias = {"n": 100, "picks_a": 58, "share_a": 0.58, "share_a_ci": [0.482, 0.672]}
    (tmp_path / "eval" / "base.json").write_text(json.dumps({"sets": {"synthetic": {"overall": {"answer_bias": bias}}}}))
    report = write_report(tmp_path).read_text()
    assert ("the base model answers 61 of 172 training-side claims correctly, in both answer orders where there "
            "are letters (plain accuracy 0.600, option (A) chosen 0.580 of the time)") in report
    assert _row(report, "facts") == ["facts", "45", "30", "12"]
    assert ("base +0.062 [+0.040, +0.084], tuned +0.011 [-0.005, +0.027], paired difference -0.051 "
            "[-0.070, -0.032] over 100 items") in report
    assert _row(report, "base") == ["base", "synthetic", "100", "0.580 [0.482, 0.672]"]
    assert "capability guard" in report
