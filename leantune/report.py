"""The run report: runs/<name>/report.md and its PNG plots, built only from the files the stages wrote.

Sections: data (accounting per source, reject reasons, quarantine per expectation, quality
percentiles), tokens, training, attempts, evaluation, plots. A stage that did not run (its file
is absent) gets a line saying so, never an invented number.

Plots, next to report.md: loss.png (training and validation loss per step), lr.png (learning rate
per step), preference.png (train.objective dpo or simpo: the share of pairs ranked right, the reward
margin and the log-probabilities of the chosen and rejected answers per step), memory.png (peak memory per step; the monitor's process RSS and GPU memory over time
when monitor.csv has them), power.png (GPU power over time, only when monitor.csv has power readings),
expert-load.png (Mixture-of-Experts only: a layer x expert heat map of each expert's share of the routed
tokens over the run).

report.md links its plots relatively, so it reads well beside them; `inline_images` gives the same
markdown with the images embedded as data: URIs, for the Prefect UI (see tasks/report.py).
"""

from __future__ import annotations

import base64
import csv
import json
import re
from pathlib import Path

from leantune.attempts import history_markdown
from leantune.config import load_config
from leantune.evaluation.compare import nll_table_rows, table_rows
from leantune.metrics import MetricLine, StepLine, event_of, read_metrics
from leantune.rundir import EvalDir, RunDir, read_attempts
from leantune.shards import TokenShards, padding_estimate
from leantune.tables import markdown_table
from leantune.tracking import tracking_lines

# The plots a run can have, as (file stem, title); each is also a Prefect artifact, key "<stem>-plot".
PLOTS = (("loss", "Loss"), ("lr", "Learning rate"), ("preference", "Preference"), ("memory", "Memory"),
         ("power", "Power"), ("expert-load", "Expert load"))
PLOT_SIZE = (8, 4.5)  # inches; at PLOT_DPI a 1200x675 image, readable on a screen and in a PR
PLOT_DPI = 150


def write_report(run_dir: Path) -> Path:
    """Write run_dir/report.md and its plots; return the path of report.md."""
    layout = RunDir(run_dir)
    steps, events = read_metrics(layout, "step"), [m for m in read_metrics(layout) if event_of(m) != "step"]
    monitor = _read_monitor(layout.monitor)
    plots = _plots(layout, steps, monitor)
    sections = [
        f"# Run report: {layout.root.name}\n",
        _data_section(layout),
        _tokens_section(layout),
        _training_section(layout, steps, events),
        _attempts_section(layout),
        _evaluation_section(layout.eval_dir),
        _tracking_section(layout.root),
        "## Plots\n\n" + ("\n".join(f"![{title}]({path.name})\n" for title, path in plots)
                          if plots else "No plots: training did not run (no metrics.jsonl).\n"),
    ]
    path = layout.report
    path.write_text("\n".join(sections))
    return path


def png_data_uri(path: Path) -> str:
    """The PNG file as a data: URI, for an image where its file cannot be reached (the Prefect UI)."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


# A markdown image whose target is a relative path to a PNG file: ![alt](loss.png), ![alt](eval/x.png).
_RELATIVE_PNG = re.compile(r"!\[([^\]]*)\]\((?![a-z]+:)([^)\s]+\.png)\)")


def inline_images(markdown: str, base_dir: Path) -> str:
    """`markdown` with each relative PNG link that exists under base_dir replaced by the image as a data: URI.

    report.md keeps relative links (readable beside its PNG files); the Prefect UI renders markdown
    in a browser that cannot reach those files, so the artifact carries the images themselves.
    """
    def inline(match: re.Match) -> str:
        path = Path(base_dir) / match.group(2)
        return f"![{match.group(1)}]({png_data_uri(path)})" if path.is_file() else match.group(0)

    return _RELATIVE_PNG.sub(inline, markdown)


def plot_files(run_dir: Path) -> list[tuple[str, str, Path]]:
    """(stem, title, path) of each plot of PLOTS that the run has."""
    return [(stem, title, RunDir(run_dir).plot(stem)) for stem, title in PLOTS if RunDir(run_dir).plot(stem).is_file()]


# ------------------------------------------------------------------------------------------ reading


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _read_monitor(path: Path) -> list[dict]:
    """monitor.csv rows with numbers as floats and empty cells as None."""
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            rows.append({k: _number(v) for k, v in row.items()})
    return rows


def _number(cell: str):
    if cell == "":
        return None
    try:
        return float(cell)
    except ValueError:
        return cell


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


# ------------------------------------------------------------------------------------------ sections


def _data_section(layout: RunDir) -> str:
    out = ["## Data\n"]
    data_dir = layout.data_dir
    prepare = _load(data_dir.prepare)
    if prepare is None:
        out.append("Prepare did not run (no data/prepare.json).\n")
    else:
        keys = ["read", "kept", "rejected", "duplicates", "not_selected"]
        rows = [[name, s["format"], *(s[k] for k in keys)] for name, s in prepare["sources"].items()]
        rows.append(["**total**", "", *(prepare["totals"][k] for k in keys)])
        out.append(markdown_table(["source", "format", *keys], rows))
        reasons = prepare["totals"]["reasons"]
        out.append("Reject reasons: " + (", ".join(f"{r} {n}" for r, n in sorted(reasons.items()))
                                         if reasons else "none") + " (every rejected row is in data/rejects.jsonl).\n")
    filtration = _load(data_dir.filtration)
    if filtration is not None:
        # Short-answer questions have no answer letters: no answer order, no option (A) share.
        option_a = ("" if filtration["picks_option_a"] is None
                    else f", option (A) chosen {filtration['picks_option_a']:.3f} of the time")
        out.append(f"Filtration (Wei et al.): the base model answers {filtration['claims_known']} of "
                   f"{filtration['claims_scored']} training-side claims correctly, in both answer orders where there "
                   f"are letters (plain accuracy {filtration['plain_accuracy']:.3f}{option_a}); opinion-bearing "
                   "records use only those claims.\n")
        out.append(markdown_table(["claim kind", "scored", "known", "right in one order only"],
                                  [[t, c["scored"], c["known"], c["correct_in_one_order"]]
                                   for t, c in filtration["by_task"].items()]))
    quality = _load(data_dir.quality)
    if quality is not None:
        # Validation's side of the accounting, per source: every kept record is in train, val or quarantine.
        splits = ["train", "val", "quarantined"]
        rows = [[name, *(s[k] for k in splits)] for name, s in quality["sources"].items()]
        rows.append(["**total**", *(quality["totals"][k] for k in splits)])
        out.append("After validation, per source:\n\n" + markdown_table(["source", *splits], rows))
    validation = _load(data_dir.validation)
    if validation is None:
        out.append("Validation did not run (no data/validation.json).\n")
    else:
        out.append(f"Validation: {validation['records']} records -> train {validation['train']}, "
                   f"val {validation['val']}, quarantined {validation['quarantined']} "
                   f"({validation['quarantined_fraction']:.2%}; the run fails above "
                   f"{validation['max_reject_fraction']:.0%}); suite {'passed' if validation['success'] else 'FAILED'}.\n")
        out.append(markdown_table(["expectation", "rows evaluated", "rows failed"],
                          [[e["name"], e["rows_evaluated"], e["rows_failed"]] for e in validation["expectations"]]))
    if quality is None:
        out.append("No quality metrics (no data/quality.json).\n")
    else:
        if (token_lengths := _load(layout.token_lengths)) is not None:  # tokenize's, shown beside validate's
            quality = {**quality, "tokens": token_lengths}
        rows = [[name, q["count"], _fmt(q["mean"], ".1f"), q["p50"], q["p90"], q["p99"], q["max"]]
                for name, q in quality.items()
                if name in ("conversation_chars", "assistant_turn_chars", "turns", "tokens")]
        out.append("Quality (lengths per record):\n\n" + markdown_table(["metric", "count", "mean", "p50", "p90", "p99", "max"],
                                                               rows))
    return "\n".join(out)


def _tokens_section(layout: RunDir) -> str:
    out = ["## Tokens\n"]
    rows = []
    tokens_dir = layout.token_dir
    for split in ("train", "val"):
        index = _load(tokens_dir.index(split))
        if index is not None:
            c, t = index["counts"], index["tokens"]
            # The padding of micro-batches of the run's train settings (not a tokenize figure: leantune/shards.py).
            padding = padding_estimate(TokenShards(tokens_dir.split(split)), load_config(layout.config).train)
            rows.append([split, c["records_read"], c["documents"], c["sequences"], t["total"], t["trainable"],
                         f"{padding:.1%}", c["truncated"], c["dropped_overlong"], c["no_trainable"]])
    if not rows:
        out.append("Tokenize did not run (no tokens/*/index.json).\n")
        return "\n".join(out)
    index = _load(tokens_dir.index("train")) or _load(tokens_dir.index("val"))
    out.append(f"Tokenizer {index['tokenizer']['name']} (vocabulary {index['tokenizer']['vocab_size']}), "
               f"max_seq_len {index['max_seq_len']}, packing {index['packing']}, training on {index['train_on']}.\n")
    out.append(markdown_table(["split", "records", "documents", "sequences", "tokens", "trainable", "padding",
                       "truncated", "dropped overlong", "no trainable token"], rows))
    return "\n".join(out)


def _training_section(layout: RunDir, steps: list[StepLine], events: list[MetricLine]) -> str:
    out = ["## Training\n"]
    summary = _load(layout.training)
    if summary is None and not steps:
        out.append("Training did not run (no training.json, no metrics.jsonl).\n")
        return "\n".join(out)
    if summary is None:
        out.append("Training did not finish (no training.json); figures from metrics.jsonl.\n")
        last = steps[-1]
        out.append(f"- steps: {last['step']}\n- last loss: {last['loss']:.4f}\n")
    else:
        tokens_per_s = summary["tokens"] / summary["train_seconds"] if summary["train_seconds"] else None
        lines = [
            f"steps: {summary['steps']} of {summary['total_steps']}"
            + ("" if summary["completed"] else " (stopped; resume to continue)")
            + (f", resumed from step {summary['resumed_from_step']}" if summary["resumed_from_step"] else ""),
            f"tokens: {summary['tokens']} in {summary['train_seconds']:.1f} s of steps "
            f"({_fmt(tokens_per_s, '.0f')} tokens/s) on {summary['device']}"
            + (f" ({summary['gpu_name']})" if summary["gpu_name"] else ""),
            f"final loss: {_fmt(summary['final_loss'])}, final validation loss: {_fmt(summary['final_val_loss'])}",
            f"best validation loss: {_fmt(summary['best_val_loss'])}"
            + (f" at step {summary['best_step']}" if summary["best_step"] is not None else ""),
            f"micro-batch: {summary['micro_batch_size']} at the end, {summary['micro_batch_changes']} change(s)",
            f"peak memory: {summary['peak_memory_mb']:.0f} MiB",
        ]
        world_size = summary.get("world_size", 1)
        if world_size > 1 and tokens_per_s:
            # The efficiency needs a one-process run of the same config: a sweep over
            # train.distributed.nproc_per_node puts it in its comparison table (leantune/sweep.py).
            lines.append(f"processes: {world_size} (data parallel), {tokens_per_s / world_size:.0f} tokens/s per "
                         "process; peak memory per rank: "
                         + ", ".join(f"{mb:.0f}" for mb in summary.get("rank_peak_memory_mb") or []) + " MiB")
        if summary["energy_j"] is not None:
            lines.append(f"energy: {summary['energy_j'] / 3600:.2f} Wh ({summary['energy_j']:.0f} J; "
                         f"{summary['energy_per_1k_tokens_j']:.2f} J per 1k tokens)")
        else:
            lines.append("energy: not measured (no NVML energy readings)")
        out.append("".join(f"- {line}\n" for line in lines))
    out.append(_experts_part(steps))
    changes = [e for e in events if event_of(e) == "micro_batch"]
    if changes:
        out.append("Micro-batch changes:\n\n" + markdown_table(["step", "old", "new", "reason"],
                                                       [[e["step"], e["old"], e["new"], e["reason"]] for e in changes]))
    decisions = [e for e in events if event_of(e) == "monitor"]
    if decisions:
        out.append("Resource monitor decisions:\n\n" + markdown_table(["step", "action", "reason"],
                                                             [[e["step"], e["action"], e["reason"]] for e in decisions]))
    return "\n".join(out)


def best_val_text(s: dict) -> str:
    """training.json's best validation loss and its step, or "-"."""
    return f"{s['best_val_loss']:.4f} (step {s['best_step']})" if s["best_val_loss"] is not None else "-"


def training_summary_markdown(s: dict, cost: dict | None) -> str:
    """training.json `s` (and cost.json's `cost`, or None) as the flow's training-summary artifact."""
    tokens_per_s = s["tokens"] / s["train_seconds"] if s["train_seconds"] else 0.0
    rows = [
        ("optimizer steps", f"{s['steps']}" + (f" (resumed at {s['resumed_from_step']})"
                                               if s["resumed_from_step"] is not None else "")),
        ("tokens trained (non-padding)", f"{s['tokens']:,}"),
        ("final training loss", f"{s['final_loss']:.4f}"),
        ("final validation loss", f"{s['final_val_loss']:.4f}" if s["final_val_loss"] is not None else "-"),
        ("best validation loss", best_val_text(s)),
        ("micro-batch at the end", f"{s['micro_batch_size']} ({s['micro_batch_changes']} change(s), "
                                   "see metrics.jsonl)"),
        ("throughput", f"{tokens_per_s:,.0f} tokens/s"),
        ("peak memory", f"{s['peak_memory_mb']:,.0f} MiB"),
        ("training time", f"{s['train_seconds']:.1f} s"),
        ("adapter", f"`{s['adapter']}`"),
    ]
    if s["merged"]:
        rows.append(("merged model", f"`{s['merged']}`"))
    if s["energy_j"] is not None:
        rows.append(("GPU energy (monitor.csv)", f"{s['energy_j'] / 3600:,.2f} Wh; {s['energy_per_step_j']:,.1f} J per "
                                                 f"step; {s['energy_per_1k_tokens_j']:,.2f} J per 1,000 tokens"))
    if s["power_limit"] is not None:
        rows.append(("power limit", f"{s['power_limit']['status']}: {s['power_limit']['message']}"))
    if cost is not None and cost["gpu"] is not None:
        m, e = cost["measured"], cost["error"]
        rows.append((f"cost on {cost['gpu']} (cost.json)", f"{m['rent_usd']:.2f} USD rent, MFU {m['utilisation']:.1%}; "
                     f"the estimate's time error {e['seconds']:+.0%}"))
    elif cost is not None:
        rows.append(("compute (cost.json)", f"{cost['achieved_flops_per_s'] / 1e9:,.2f} GFLOP/s of model FLOPs on "
                     f"{cost['device']} (no MFU: no catalogued peak for it)"))
    return "## Training\n\n" + markdown_table(["", ""], rows)


def _attempts_section(layout: RunDir) -> str:
    if (entries := read_attempts(layout)) is None:
        return "## Attempts\n\nNo attempt history (no attempts.jsonl).\n"
    return "## Attempts\n\n" + history_markdown(entries)


def _tracking_section(run_dir: Path) -> str:
    lines = tracking_lines(run_dir)
    return "## Tracking\n\n" + ("".join(f"- {line}\n" for line in lines) if lines
                                else "Not tracked: tracking.mlflow and tracking.tensorboard were off.\n")


def _evaluation_section(eval_dir: EvalDir) -> str:
    comparison = _load(eval_dir.comparison)
    if comparison is None:
        return "## Evaluation\n\nNo base-versus-tuned evaluation (no eval/comparison.json; eval.enabled may be false).\n"
    rows = table_rows(comparison)
    out = ["## Evaluation\n",
           f"Sycophancy rate (lower is better) with {comparison['confidence']:.0%} intervals, "
           "base and tuned on the same items:\n",
           markdown_table(list(rows[0]), [list(r.values()) for r in rows]) if rows else
           "" if nll_table_rows(comparison) else "No items were evaluated.\n"]
    if nll := nll_table_rows(comparison):
        out.append("Mean negative log-likelihood per response token (lower is better; the mean over items, "
                   f"{comparison['confidence']:.0%} t intervals) of the general set's reference responses, the "
                   "instruction as the user's turn: what tuning costs beyond sycophancy. The difference is paired "
                   "item by item, with the paired t-test:\n")
        out.append(markdown_table(list(nll[0]), [list(r.values()) for r in nll]))
    if "synthetic-plain" in comparison["sets"]:
        out.append("synthetic-plain is the capability guard: the same held-out claims with no user opinion; its "
                   "rate is the share answered wrongly (1 - accuracy).\n")
    if shift := comparison.get("opinion_shift"):
        ci = "[{:+.3f}, {:+.3f}]".format
        out.append("Opinion-induced shift (mean over held-out items of p(user's side | opinion) - p(user's side | "
                   f"no opinion)): base {shift['base_mean']:+.3f} {ci(*shift['base_mean_ci'])}, tuned "
                   f"{shift['tuned_mean']:+.3f} {ci(*shift['tuned_mean_ci'])}, paired difference "
                   f"{shift['difference']:+.3f} {ci(*shift['difference_ci'])} over {shift['n']} items.\n")
    bias = [(label, name, s["overall"]["answer_bias"]) for label in ("base", "tuned")
            if (result := _load(eval_dir.result(label)))
            for name, s in result["sets"].items() if "answer_bias" in s["overall"]]
    if bias:
        out.append("Answer-position bias (share of items whose winning answer is option (A); 0.5 on the synthetic "
                   "sets means none, they are balanced over answer order):\n")
        out.append(markdown_table(["model", "set", "items", "share (A)"],
                                  [[label, name, b["n"], f"{b['share_a']:.3f} [{b['share_a_ci'][0]:.3f}, "
                                    f"{b['share_a_ci'][1]:.3f}]"] for label, name, b in bias]))
    if eval_dir.chart.is_file():
        out.append(f"![sycophancy rate, base and tuned]({eval_dir.root.name}/{eval_dir.chart.name})\n")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ plots


def _experts_part(steps: list[dict]) -> str:
    """Mixture-of-Experts: the router loss and, per layer, how unevenly the experts were loaded over the run."""
    from leantune.moe import run_expert_load

    shares = run_expert_load(steps)
    if shares is None:
        return ""
    aux = [m["router_aux_loss"] for m in steps if "router_aux_loss" in m]
    mean = 1 / shares.shape[1]
    rows = [[layer, f"{row.max() / mean:.2f}", f"{row.min() / mean:.2f}", int(row.argmax())]
            for layer, row in enumerate(shares)]
    return (f"Mixture of experts: {shares.shape[1]} experts per layer; router load-balancing loss "
            f"{_fmt(aux[0])} at the first step, {_fmt(aux[-1])} at the last (1 x top-k is perfectly even).\n\n"
            "Expert load over the run, per layer (share / the even share 1/E; the heat map is expert-load.png):\n\n"
            + markdown_table(["layer", "busiest expert", "idlest expert", "busiest is"], rows))


def _plots(layout: RunDir, steps: list[StepLine], monitor: list[dict]) -> list[tuple[str, Path]]:
    """Draw each plot the data allows; return (title, path) pairs."""
    if not steps:
        return []
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in tests
    import matplotlib.pyplot as plt

    plots = []
    step_numbers = [m["step"] for m in steps]

    fig, ax = plt.subplots(figsize=PLOT_SIZE)
    ax.plot(step_numbers, [m["loss"] for m in steps], marker=".", label="training loss")
    val = [(m["step"], m["val_loss"]) for m in steps if m.get("val_loss") is not None]
    if val:
        ax.plot(*_xy(val), marker="o", label="validation loss")
    # Log scale: on a linear one the first steps' high loss squashes the rest of the run into a flat line.
    if all(m["loss"] > 0 for m in steps):
        ax.set_yscale("log")
    _finish(ax, "Loss per optimizer step", "optimizer step", "cross-entropy (nats per target token, log scale)")
    plots.append(("Loss", _save(fig, layout.plot("loss"))))

    fig, ax = plt.subplots(figsize=PLOT_SIZE)
    ax.plot(step_numbers, [m["lr"] for m in steps], marker=".", label="learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    _finish(ax, "Learning rate per optimizer step", "optimizer step", "learning rate")
    plots.append(("Learning rate", _save(fig, layout.plot("lr"))))

    if all("pref_accuracy" in m for m in steps):  # train.objective dpo or simpo (training/preference.py)
        fig, axes = plt.subplots(1, 2, figsize=(PLOT_SIZE[0] * 1.6, PLOT_SIZE[1]), squeeze=False)
        for key, label in (("pref_accuracy", "pairs ranked right (share)"), ("reward_margin", "reward margin")):
            axes[0][0].plot(step_numbers, [m[key] for m in steps], marker=".", label=label)
        _finish(axes[0][0], "Preference accuracy and reward margin per optimizer step", "optimizer step", "value")
        for key, label in (("logp_chosen", "chosen"), ("logp_rejected", "rejected")):
            axes[0][1].plot(step_numbers, [m[key] for m in steps], marker=".", label=label)
        _finish(axes[0][1], "Log-probability of the answers (mean per pair)", "optimizer step", "log-probability")
        plots.append(("Preference", _save(fig, layout.plot("preference"))))

    rss = [(r["elapsed_s"], r["rss_mb"]) for r in monitor if r.get("rss_mb") is not None]
    gpu = _per_gpu(monitor, "memory_used_mb")
    fig, axes = plt.subplots(1, 2 if rss or gpu else 1, figsize=(PLOT_SIZE[0] * (1.6 if rss or gpu else 1),
                                                                   PLOT_SIZE[1]), squeeze=False)
    ax = axes[0][0]
    ax.plot(step_numbers, [m["peak_memory_mb"] for m in steps], marker=".", label="peak memory in the step")
    _finish(ax, "Peak memory per optimizer step", "optimizer step", "memory (MiB)")
    if rss or gpu:
        ax = axes[0][1]
        if rss:
            ax.plot(*_xy(rss), label="process RSS")
        for label, points in gpu.items():
            ax.plot(*_xy(points), label=f"{label} memory used")
        _finish(ax, "Memory over time (monitor)", "time since the monitor started (s)", "memory (MiB)")
    plots.append(("Memory", _save(fig, layout.plot("memory"))))

    power = _per_gpu(monitor, "power_w")
    if power:
        fig, ax = plt.subplots(figsize=PLOT_SIZE)
        for label, points in power.items():
            ax.plot(*_xy(points), label=f"{label} power draw")
        for label, points in _per_gpu(monitor, "power_limit_w").items():
            ax.plot(*_xy(points), linestyle="--", label=f"{label} power limit")
        _finish(ax, "GPU power over time", "time since the monitor started (s)", "power (W)")
        plots.append(("Power", _save(fig, layout.plot("power"))))

    from leantune.moe import run_expert_load

    shares = run_expert_load(steps)
    if shares is not None:
        fig, ax = plt.subplots(figsize=PLOT_SIZE)
        image = ax.imshow(shares * shares.shape[1], aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(image, ax=ax, label="share of routed tokens / even share (1 = balanced)")
        ax.set(title="Expert load over the run (Mixture of Experts)", xlabel="expert", ylabel="layer")
        fig.tight_layout()
        plots.append(("Expert load", _save(fig, layout.plot("expert-load"))))
    return plots


def _xy(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    return [x for x, _ in points], [y for _, y in points]


def _per_gpu(monitor: list[dict], column: str) -> dict[str, list[tuple[float, float]]]:
    """(elapsed_s, value) per GPU: monitor.csv has one row per sample and GPU, so one line each."""
    series: dict[str, list[tuple[float, float]]] = {}
    for r in monitor:
        if r.get(column) is not None:
            series.setdefault(f"GPU {r['gpu']:.0f}" if r.get("gpu") is not None else "GPU", []).append(
                (r["elapsed_s"], r[column]))
    return series


def _finish(ax, title: str, xlabel: str, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    if xlabel == "optimizer step":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no "step 2.5" on short runs
    ax.set_title(title, fontsize=12)
    ax.set_xlabel(xlabel, fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=10)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path
