"""The profile sweep: training throughput, time, memory and energy per setting, as in the RTX 4060 seed study.

The grid is every combination of micro-batch size (train.micro_batch_size), sequence length
(tokenize.max_seq_len), optimizer (train.optimizer), precision (model.dtype), GPU power limit
(power.limit_watts) and, for the scratch model, architecture (model.scratch.architecture: an MoE and
its dense counterpart 'llama', same width, depth and attention, one MLP of an expert's width), on top
of one base config. Each combination trains `steps` optimizer steps of
the real training loop (leantune/training/loop.py), in this process, on data prepared once and
tokenized once per sequence length. Its row says:

  tokens_per_s             non-padding tokens per second of optimizer steps, from the end of the
                           first step (warm-up: kernel selection, allocator growth) to the end of the last
  seconds_per_10k_tokens   10000 / tokens_per_s
  peak_memory_mb           CUDA: the most memory allocated by tensors in any step; CPU: the process's
                           peak resident memory during the combination (reset before each one)
  energy_j_per_10k_tokens  GPU energy of the measured steps per 10k tokens, from NVML's energy counter;
                           blank where NVML has none (the CPU, most laptops' drivers)
  step_ms, attention_ms, experts_ms, router_ms, optimizer_ms, other_ms
                           the execution-time breakdown: a second, profiled training of the same steps
                           (torch.profiler, leantune/breakdown.py says how each part is attributed);
                           ms per optimizer step, the parts adding up to step_ms; blank with breakdown off

A combination that cannot run here is a row with status "skipped" and the reason: a power limit
without an NVIDIA GPU (or without the right to set one), fp16 on the CPU, an 8-bit optimizer without
bitsandbytes. One that runs out of memory is a row with status "out_of_memory": that is a result too.

Outputs in the profile directory (`<run.output_dir>/<run.name>/`): profile.csv (one row per
combination, COLUMNS), profile.png (throughput and peak memory per combination), config.yaml (the
base config), data/ and tokens/seq-<L>/ (the shared data), sweep/<combination>/ (each training's
metrics.jsonl, training.json, monitor.csv and adapter; its checkpoints are deleted once measured), and
sweep/<combination>/breakdown/ (the profiled training of the breakdown).
"""

from __future__ import annotations

import csv
import itertools
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from leantune import tables
from leantune.config import (
    ModelConfig,
    RunConfig,
    ScratchModelConfig,
    TrainConfig,
    apply_overrides,
    describe_errors,
)
from leantune.errors import UserError
from leantune.metrics import read_metrics
from leantune.rundir import RunDir, TokenDir, write_config

log = logging.getLogger(__name__)

BREAKDOWN_COLUMNS = ["step_ms", "attention_ms", "experts_ms", "router_ms", "optimizer_ms", "other_ms"]
COLUMNS = ["combination", "micro_batch_size", "max_seq_len", "optimizer", "precision", "power_limit_w",
           "architecture", "status", "steps_measured", "tokens_measured", "tokens_per_s", "seconds_per_10k_tokens",
           "peak_memory_mb", "energy_j_per_10k_tokens", *BREAKDOWN_COLUMNS, "device", "note"]
# The first optimizer step pays one-off costs; every row needs at least one step after it.
MIN_STEPS = 2
EIGHT_BIT_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit")
NO_ENERGY_NOTE = "energy: n/a (no NVML energy counter here)"
# The sweep's value types are the config's own, so the command line and the UI form offer exactly the values
# a config accepts; the defaults: 3 x 2 combinations of the base config's model.
Optimizer = TrainConfig.model_fields["optimizer"].annotation
Precision = ModelConfig.model_fields["dtype"].annotation
Architecture = ScratchModelConfig.model_fields["architecture"].annotation
DEFAULT_MICRO_BATCH_SIZES = [1, 2, 4]
DEFAULT_MAX_SEQ_LENS = [128, 256]
DEFAULT_OPTIMIZERS = ["adamw"]
DEFAULT_PRECISIONS = ["auto"]
DEFAULT_POWER_LIMITS_W = [None]  # no limit
DEFAULT_ARCHITECTURES = [None]  # the base config's model
DEFAULT_STEPS = 5


@dataclass(frozen=True)
class Combination:
    micro_batch_size: int
    max_seq_len: int
    optimizer: str
    precision: str
    power_limit_w: float | None
    architecture: str | None = None  # model.scratch.architecture; None: the base config's model

    @property
    def name(self) -> str:
        """A short label, also the directory name: mb4-seq256-adamw-fp32-nolimit(-olmoe)."""
        power = "nolimit" if self.power_limit_w is None else f"{self.power_limit_w:g}W"
        arch = "" if self.architecture is None else f"-{self.architecture}"
        return f"mb{self.micro_batch_size}-seq{self.max_seq_len}-{self.optimizer}-{self.precision}-{power}{arch}"

    def overrides(self, steps: int, global_batch_size: int) -> list[str]:
        power = "null" if self.power_limit_w is None else f"{self.power_limit_w:g}"
        return [
            f"train.micro_batch_size={self.micro_batch_size}",
            f"train.global_batch_size={global_batch_size}",
            f"tokenize.max_seq_len={self.max_seq_len}",
            f"train.optimizer={self.optimizer}",
            f"model.dtype={self.precision}",
            f"power.limit_watts={power}",
            f"train.max_steps={steps}",
            # The micro-batch asked for is what is measured: no adaptive shrinking or growing, no
            # memory-probe adjustments; an out-of-memory is the row's result.
            "adaptive.enabled=false",
            "adaptive.max_micro_batch_size=null",
            "train.export_merged=false",
            # One checkpoint at the end (the loop always writes it), none in between to time.
            f"checkpoint.every_steps={steps + 1}",
            "checkpoint.every_minutes=1000000",
            # The dense counterpart has no experts for lora.target_parameters to reach.
            *([f"model.scratch.architecture={self.architecture}"] if self.architecture else []),
            *(["lora.target_parameters=[]"] if self.architecture == "llama" else []),
        ]


def combinations(micro_batch_sizes: list[int], max_seq_lens: list[int], optimizers: list[str],
                 precisions: list[str], power_limits_w: list[float | None],
                 architectures: list[str | None] = (None,)) -> list[Combination]:
    """Every combination, in the order given (sequence length outermost, so each tokenization is used in a row)."""
    axes = {"micro_batch_sizes": micro_batch_sizes, "max_seq_lens": max_seq_lens, "optimizers": optimizers,
            "precisions": precisions, "power_limits_w": power_limits_w, "architectures": architectures}
    for name, values in axes.items():
        if not values:
            raise UserError(f"profile: {name} is empty; give at least one value")
    unique = {name: list(dict.fromkeys(values)) for name, values in axes.items()}
    return [Combination(mb, seq, opt, prec, power, arch) for seq, mb, opt, prec, power, arch in itertools.product(
        unique["max_seq_lens"], unique["micro_batch_sizes"], unique["optimizers"], unique["precisions"],
        unique["power_limits_w"], unique["architectures"])]


def global_batch_for(base: RunConfig, micro_batch_size: int) -> int:
    """The base config's global batch, raised to the next multiple of the micro-batch when it is not one.

    Every combination then does the same work per optimizer step wherever it can, so an optimizer
    step's fixed cost weighs the same in each row.
    """
    g = base.train.global_batch_size
    # A micro-batch below 1 keeps g, so that the config check names train.micro_batch_size.
    return -(-g // micro_batch_size) * micro_batch_size if micro_batch_size >= 1 else g


def combination_config(base: RunConfig, combo: Combination, steps: int) -> RunConfig:
    """The base config with the combination's settings; an invalid value is a UserError naming the sweep axis."""
    from pydantic import ValidationError

    if combo.architecture is not None and base.model.name_or_path != "scratch":
        raise UserError(f"profile: architectures sweeps model.scratch.architecture, but model.name_or_path is "
                        f"'{base.model.name_or_path}', not 'scratch'; leave architectures at [null] and profile the "
                        "MoE config and its dense counterpart as two runs")
    raw = base.model_dump(mode="json")
    problems = apply_overrides(raw, combo.overrides(steps, global_batch_for(base, combo.micro_batch_size)))
    try:
        if problems:
            raise UserError("; ".join(problems))
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise UserError(f"profile: combination {combo.name} is not a valid config: " + "; ".join(describe_errors(e))
                        + " (the sweep's values go into train.micro_batch_size, tokenize.max_seq_len, "
                        "train.optimizer, model.dtype, power.limit_watts and model.scratch.architecture)") from None


def plan(base: RunConfig, combos: list[Combination], steps: int) -> dict[Combination, RunConfig]:
    """Each combination's config, all checked before anything heavy starts."""
    if steps < MIN_STEPS:
        raise UserError(f"profile: steps is {steps}; use at least {MIN_STEPS} (the first step is warm-up and "
                        "is not measured)")
    return {combo: combination_config(base, combo, steps) for combo in combos}


def seq_len_config(base: RunConfig, max_seq_len: int) -> RunConfig:
    raw = base.model_dump(mode="json")
    raw["tokenize"]["max_seq_len"] = max_seq_len
    return RunConfig.model_validate(raw)


def seq_len_tokens(profile_dir: Path, max_seq_len: int) -> Path:
    """The profile's tokens for one sequence length: tokens/seq-<L>/ (a `TokenDir`)."""
    return RunDir(profile_dir).tokens / f"seq-{max_seq_len}"


def tokenize_for_seq_len(base: RunConfig, profile_dir: Path, max_seq_len: int) -> dict:
    """Tokenize the profile's data/ for one sequence length into tokens/seq-<L>/ (with the token suite)."""
    from leantune.tokenization import tokenize_checked

    cfg = seq_len_config(base, max_seq_len)
    return tokenize_checked(cfg, RunDir(profile_dir).data, seq_len_tokens(profile_dir, max_seq_len))


# ------------------------------------------------------------------------------------------ running


def skip_reason(cfg: RunConfig) -> str | None:
    """Why this combination cannot run on this machine, known before training; None when it can try."""
    import importlib.util

    from leantune.modeling import resolve_device

    device = resolve_device(cfg)
    if cfg.power.limit_watts is not None and device.type != "cuda":
        return (f"power.limit_watts={cfg.power.limit_watts:g}: training runs on the CPU here; a power limit needs "
                "an NVIDIA GPU with NVML")
    if cfg.train.optimizer in EIGHT_BIT_OPTIMIZERS and importlib.util.find_spec("bitsandbytes") is None:
        return f"train.optimizer={cfg.train.optimizer}: bitsandbytes is not installed (pip install bitsandbytes)"
    # The rest (fp16 on the CPU, bf16 on a GPU without it) the loop refuses with a UserError.
    return None


def _training_dir(run_dir: Path, cfg: RunConfig, shared_tokens: Path) -> Path:
    """A fresh run directory for one training of the sweep, its tokens linked to the shared ones."""
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a rerun of the same profile directory measures afresh
    layout, shared = RunDir(run_dir), TokenDir(shared_tokens)
    layout.tokens.mkdir(parents=True)
    # Training reads tokens/train and tokens/tokenizer only; the shared shards are linked, not copied.
    # No tokens/val: validation loss is not what is measured, so it is not computed.
    layout.train_tokens.symlink_to(shared.train, target_is_directory=True)
    layout.tokenizer.symlink_to(shared.tokenizer, target_is_directory=True)
    write_config(layout, cfg)
    return run_dir


def run_combination(cfg: RunConfig, combo: Combination, profile_dir: Path, breakdown: bool = False) -> dict:
    """Train `combo` for cfg.train.max_steps steps in sweep/<name>/ and return its CSV row.

    breakdown: then train the same steps again under torch.profiler in sweep/<name>/breakdown/ for the
    execution-time breakdown columns (a second run, so the profiler's overhead is not in the throughput).
    """
    from leantune.failures import is_out_of_memory
    from leantune.training.loop import train

    row = {**_settings(combo), "architecture": _architecture(cfg), "device": "", "note": ""}
    reason = skip_reason(cfg)
    if reason is not None:
        return {**row, "status": "skipped", "note": reason}
    shared = seq_len_tokens(Path(profile_dir).resolve(), combo.max_seq_len)
    run_dir = _training_dir(Path(profile_dir) / "sweep" / combo.name, cfg, shared)
    peak_reset = reset_peak_rss()
    try:
        summary = train(cfg, run_dir)
    except UserError as e:
        return {**row, "status": "skipped", "note": str(e)}
    except Exception as e:
        if is_out_of_memory(e):
            return {**row, "status": "out_of_memory", "note": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
        raise
    finally:
        shutil.rmtree(RunDir(run_dir).checkpoints, ignore_errors=True)
        _release_memory()
    limit = summary.get("power_limit")
    if limit is not None and limit["status"] != "applied":
        # It trained at the GPU's current limit, so the numbers are not this row's.
        return {**row, "device": summary["device"], "status": "skipped", "note": limit["message"]}
    row.update(measure(run_dir), device=summary["device"] + (
        f" ({summary['gpu_name']})" if summary.get("gpu_name") else ""), status="ok")
    notes = []
    if row["energy_j_per_10k_tokens"] is None:
        notes.append(NO_ENERGY_NOTE)
    if summary["device"] == "cpu" and not peak_reset:
        notes.append("peak memory: the process's peak so far (its peak RSS could not be reset)")
    row["note"] = "; ".join(notes)
    if breakdown:
        row.update(profile_breakdown(cfg, run_dir / "breakdown", shared))
    return row


def profile_breakdown(cfg: RunConfig, run_dir: Path, shared_tokens: Path) -> dict:
    """The execution-time breakdown (BREAKDOWN_COLUMNS) of cfg's training, profiled in run_dir."""
    from leantune.breakdown import breakdown, profiled_parts
    from leantune.training.loop import train

    _training_dir(run_dir, cfg, shared_tokens)
    try:
        with profiled_parts() as events:
            train(cfg, run_dir)
    finally:
        shutil.rmtree(RunDir(run_dir).checkpoints, ignore_errors=True)
        _release_memory()
    parts = breakdown(events)
    return {k: parts[k] for k in BREAKDOWN_COLUMNS}


def _architecture(cfg: RunConfig) -> str:
    """model.scratch.architecture for the scratch model; blank for a pretrained one."""
    return cfg.model.scratch.architecture if cfg.model.name_or_path == "scratch" else ""


def _settings(combo: Combination) -> dict:
    return {"combination": combo.name, **asdict(combo)}


def _release_memory() -> None:
    """Free what one combination left (a failed one's tensors linger in its traceback) before the next starts."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS, so a combination's peak is its own.

    Linux only ("5" to /proc/self/clear_refs, since 4.0); True when it worked.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(run_dir: Path) -> dict:
    """Throughput, memory and energy of one combination from its metrics.jsonl step lines."""
    steps = read_metrics(run_dir, "step")
    if len(steps) < MIN_STEPS:
        raise RuntimeError(f"{RunDir(run_dir).metrics}: {len(steps)} step line(s); the profile needs {MIN_STEPS} "
                           "or more")
    measured = steps[1:]  # step 1 is warm-up
    tokens = sum(m["tokens"] for m in measured)
    # Each line's tokens_per_s is tokens / that step's seconds, so the seconds come back exactly.
    seconds = sum(m["tokens"] / m["tokens_per_s"] for m in measured)
    tokens_per_s = tokens / seconds
    energy = [m.get("energy_j") for m in measured]
    energy_per_10k = 10_000 * sum(energy) / tokens if all(e is not None for e in energy) else None
    return {
        "steps_measured": len(measured),
        "tokens_measured": tokens,
        "tokens_per_s": round(tokens_per_s, 2),
        "seconds_per_10k_tokens": round(10_000 / tokens_per_s, 4),
        "peak_memory_mb": max(m["peak_memory_mb"] for m in steps),
        "energy_j_per_10k_tokens": round(energy_per_10k, 2) if energy_per_10k is not None else None,
    }


# ------------------------------------------------------------------------------------------ outputs


def write_csv(rows: list[dict], path: Path) -> Path:
    """profile.csv: COLUMNS, one row per combination; a missing number is an empty cell."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})
    return path


def read_csv(path: Path) -> list[dict]:
    """profile.csv back as rows like those written: numbers as numbers, empty cells as None."""
    numbers = {"micro_batch_size": int, "max_seq_len": int, "steps_measured": int, "tokens_measured": int,
               "power_limit_w": float, "tokens_per_s": float, "seconds_per_10k_tokens": float,
               "peak_memory_mb": float, "energy_j_per_10k_tokens": float,
               **dict.fromkeys(BREAKDOWN_COLUMNS, float)}
    with open(path, newline="") as f:
        return [{k: (numbers[k](v) if v != "" else None) if k in numbers else v for k, v in row.items()}
                for row in csv.DictReader(f)]


def table_rows(rows: list[dict]) -> list[dict]:
    """The rows as the table artifact and the terminal show them: readable headers, n/a for no number."""
    def cell(value, spec):
        return "n/a" if value is None else format(value, spec)

    out = []
    for r in rows:
        ok = r["status"] == "ok"
        out.append({
            "micro-batch": r["micro_batch_size"], "seq len": r["max_seq_len"], "optimizer": r["optimizer"],
            "precision": r["precision"],
            "power limit": "none" if r["power_limit_w"] is None else f"{r['power_limit_w']:g} W",
            "architecture": r.get("architecture") or "",
            "status": r["status"],
            "tokens/s": cell(r.get("tokens_per_s") if ok else None, ",.0f"),
            "s / 10k tokens": cell(r.get("seconds_per_10k_tokens") if ok else None, ".2f"),
            "peak memory (MiB)": cell(r.get("peak_memory_mb") if ok else None, ",.0f"),
            "J / 10k tokens": cell(r.get("energy_j_per_10k_tokens") if ok else None, ",.1f"),
            **_breakdown_cells(r if ok else {}),
            # The energy note would repeat on every row; markdown_table says it once under the table.
            "note": "; ".join(n for n in (r.get("note") or "").split("; ") if n and n != NO_ENERGY_NOTE),
        })
    return out


def _breakdown_cells(r: dict) -> dict:
    """The profiled step time and each part's share of it; n/a without a breakdown."""
    step = r.get("step_ms")
    cells = {"profiled step (ms)": "n/a" if step is None else f"{step:,.1f}"}
    for part in ("attention", "experts", "router", "optimizer", "other"):
        cells[f"{part} %"] = "n/a" if step is None else f"{100 * r[f'{part}_ms'] / step:.1f}"
    return cells


def markdown_table(rows: list[dict]) -> str:
    shown = table_rows(rows)
    header = list(shown[0])
    table = tables.markdown_table(header, ([r[h] for h in header] for r in shown))
    if any(NO_ENERGY_NOTE in (r.get("note") or "") for r in rows):
        table += f"\n{NO_ENERGY_NOTE[0].upper()}{NO_ENERGY_NOTE[1:]}.\n"
    return table


def plot(rows: list[dict], path: Path, title: str) -> Path:
    """profile.png: one horizontal bar per combination, throughput on the left, peak memory on the right.

    Skipped and out-of-memory combinations keep their line, with the status written in place of a bar.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    labels = [_plot_label(r) for r in rows]
    has_energy = any(r.get("energy_j_per_10k_tokens") is not None for r in rows)
    on_cpu = all(r.get("device", "").startswith("cpu") for r in rows if r["status"] == "ok")
    panels = [("tokens_per_s", "throughput (tokens/s, higher is better)", ",.0f"),
              ("peak_memory_mb", "peak memory (MiB" + (", process RSS)" if on_cpu else ", CUDA allocated)"), ",.0f")]
    if has_energy:
        panels.append(("energy_j_per_10k_tokens", "energy (J per 10k tokens, lower is better)", ",.0f"))
    height = max(3.0, 0.45 * len(rows) + 1.6)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels) + 2.4, height), sharey=True, squeeze=False)
    y = list(range(len(rows)))
    for ax, (key, xlabel, spec) in zip(axes[0], panels, strict=True):
        values = [r.get(key) if r["status"] == "ok" else None for r in rows]
        top = max((v for v in values if v is not None), default=1.0)
        ax.barh(y, [v or 0 for v in values], color="tab:blue", height=0.6)
        for yi, v, r in zip(y, values, rows, strict=True):
            text = format(v, spec) if v is not None else ("n/a" if r["status"] == "ok" else r["status"])
            ax.text((v or 0) + top * 0.01, yi, text, va="center", fontsize=9,
                    color="black" if v is not None else "tab:red")
        ax.set_xlim(0, top * 1.25)
        ax.set_xlabel(xlabel, fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0][0].set_yticks(y, labels, fontsize=9)
    axes[0][0].invert_yaxis()  # first combination on top, as in the table
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _plot_label(r: dict) -> str:
    power = "" if r["power_limit_w"] is None else f", {r['power_limit_w']:g} W"
    arch = f", {r['architecture']}" if r.get("architecture") else ""
    return f"mb {r['micro_batch_size']}, seq {r['max_seq_len']}, {r['optimizer']}, {r['precision']}{power}{arch}"


def write_summary(rows: list[dict], profile_dir: Path) -> dict:
    """profile.csv and profile.png in the profile directory; returns their paths."""
    profile_dir = Path(profile_dir)
    csv_path = write_csv(rows, profile_dir / "profile.csv")
    device = next((r["device"] for r in rows if r.get("device")), "this machine")
    ok = sum(r["status"] == "ok" for r in rows)
    png = plot(rows, profile_dir / "profile.png",
               f"Training profile on {device}: {ok} of {len(rows)} combinations ran")
    return {"csv": csv_path, "png": png}
