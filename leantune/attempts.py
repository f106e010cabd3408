"""Feedback across attempts: why a training attempt failed, and the config the next one trains with.

An attempt ends in one of these outcomes (`leantune.failures.classify`):
  completed  training finished
  oom        an out-of-memory error the in-process controller could not absorb (at micro-batch 1,
             with adaptive.enabled=false, or outside the step loop, e.g. in evaluation)
  killed     the process died without a Python error: SIGKILL (the kernel's out-of-memory killer,
             a preempted machine), exit status -9 / 137
  nan        the training loss became NaN or infinite (`NonFiniteLoss`)
  stopped    SIGTERM/SIGINT after a checkpoint (exit status 75): a person or scheduler asked for it
  interrupted  the flow itself was stopped (Ctrl-C, SIGTERM, a cancellation) and stopped its training
             after a checkpoint; the flow records it (tasks/attempts.py), no attempt follows
  error      anything else: a bug or bad input, which another attempt would only repeat

`adjust(config, report)` is pure: for oom, killed and nan it returns the next config and why
(`Adjustment`), for the others None. The memory ladder, one rung per attempt:
  1. halve the micro-batch (a divisor of the global batch; resumable: the same updates)
  2. turn on gradient checkpointing (resumable: the same gradients)
  3. a lighter method: full -> lora, lora -> qlora on CUDA (a fresh start: other weights train)
  4. halve tokenize.max_seq_len, down to 64 (a fresh start on re-tokenized data)
A killed process resumes unchanged (so its weights end bitwise equal to an uninterrupted run's)
unless the monitor's last reading shows memory use at or above monitor.memory_high_fraction (the
kernel's out-of-memory killer); then it gets rungs 1-2 only. Rung 1 keeps the same updates up to
float rounding (the micro-batches are summed in another grouping), not bitwise. A NaN loss halves
train.lr, and moves fp16 to bf16 where the GPU supports it (fp16's range is the usual cause). The
lower lr alone resumes from the last checkpoint (saved before the NaN step), the schedule rescaled
by new/old on load (checkpoint.py); a dtype change starts fresh.

Training runs in its own process (leantune/training/launch.py). How it tells the flow why it failed
(exit codes, run_dir/attempt_error.json, `AttemptFailed`) is leantune/failures.py.

`Adjustment.resume` says whether the next attempt may continue from the last checkpoint (the
checkpoint manager's resume fingerprint is unchanged); `retokenize` whether the tokenize stage
must run again. The flow trains again up to train.max_attempts and records each attempt
(`history_entry`) for its artifact and the run report.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path

from leantune.config import RunConfig, largest_divisor, method_values, with_values
from leantune.failures import AttemptFailed, classify
from leantune.metrics import event_of, read_metrics
from leantune.resume import resume_fingerprint
from leantune.rundir import RunDir
from leantune.tables import markdown_table

MIN_SEQ_LEN = 64  # attempts do not shorten sequences below this (most records would be cut)


@dataclass
class AttemptReport:
    """What one training attempt ended with; `reading` is the monitor's last sample (monitor.csv)."""

    attempt: int
    outcome: str
    message: str = ""
    step: int | None = None  # optimizer steps completed (metrics.jsonl)
    micro_batch_size: int | None = None  # the last one metrics.jsonl shows (step lines and changes)
    device_type: str | None = None
    bf16_supported: bool | None = None
    reading: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Adjustment:
    """The config of the next attempt, why, and whether it can resume from the last checkpoint."""

    config: RunConfig
    reason: str
    changes: list[str] = field(default_factory=list)  # "key: old -> new"
    resume: bool = True
    retokenize: bool = False


def last_reading(monitor_csv: Path) -> dict | None:
    """The last sample of monitor.csv as the numbers `adjust` reads (its first GPU's row)."""
    if not monitor_csv.is_file():
        return None
    with open(monitor_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    last_time = rows[-1]["time"]
    row = next(r for r in rows if r["time"] == last_time)

    def number(key: str) -> float | None:
        return float(row[key]) if row.get(key) else None

    reading = {"elapsed_s": number("elapsed_s"), "backend": row["backend"],
               "host_memory_used_fraction": round(1 - number("ram_available_mb") / number("ram_total_mb"), 4)}
    if number("memory_total_mb"):
        reading.update(gpu_memory_used_fraction=round(number("memory_used_mb") / number("memory_total_mb"), 4),
                       temperature_c=number("temperature_c"), power_w=number("power_w"))
    return reading


def report_from_run(attempt: int, run_dir: Path, *, error: BaseException | None = None,
                    returncode: int | None = None, device_type: str | None = None,
                    bf16_supported: bool | None = None) -> AttemptReport:
    """An AttemptReport from what the attempt left in `run_dir` (metrics.jsonl, monitor.csv)."""
    step = micro = None
    for line in read_metrics(run_dir):
        if event_of(line) == "step":
            step, micro = line["step"], line["micro_batch_size"]
        elif event_of(line) == "micro_batch":
            micro = line["new"]  # the controller changed it after the last logged step
    if isinstance(error, AttemptFailed):
        message = error.message
        device_type = error.device_type or device_type
        bf16_supported = error.bf16_supported if error.bf16_supported is not None else bf16_supported
    elif error is not None:
        message = f"{type(error).__name__}: {error}"
    else:
        message = f"exit status {returncode}" if returncode else ""
    return AttemptReport(attempt=attempt, outcome=classify(error, returncode), message=message, step=step,
                         micro_batch_size=micro, device_type=device_type, bf16_supported=bf16_supported,
                         reading=last_reading(RunDir.of(run_dir).monitor))


def adjust(config: RunConfig, report: AttemptReport) -> Adjustment | None:
    """The next attempt's config after a failed one, or None when another attempt would not help."""
    where = f"at step {report.step}" if report.step is not None else "before the first step"
    seen = _describe_reading(report.reading)
    if report.outcome == "oom":
        changes = _memory_rung(config, report, allow_fresh_start=True)
        reason = f"out of memory {where}{seen}"
    elif report.outcome == "killed":
        # Only a kill with memory near full is answered with less memory: any other kill (a preempted
        # machine, a person) resumes unchanged, so the run ends bitwise equal to an uninterrupted one.
        pressure = _memory_pressure(config, report.reading)
        changes = _memory_rung(config, report, allow_fresh_start=False) if pressure else None
        reason = f"process killed {where}{seen}" + (f"; {pressure}" if pressure else "; no sign of memory pressure")
        if not changes:
            return Adjustment(config, reason + "; resuming unchanged")
    elif report.outcome == "nan":
        changes = {"train.lr": config.train.lr / 2}
        if config.model.dtype == "fp16" and report.bf16_supported:
            changes["model.dtype"] = "bf16"
        reason = f"the loss became NaN or infinite {where}"
    else:
        return None
    if changes is None:
        return None
    new = with_values(config, changes)
    return Adjustment(
        config=new, reason=reason, changes=[f"{k}: {_get(config, k)} -> {_get(new, k)}" for k in changes],
        resume=resume_fingerprint(new) == resume_fingerprint(config),
        retokenize=new.section_hash("tokenize") != config.section_hash("tokenize"),
    )


def _memory_pressure(cfg: RunConfig, reading: dict | None) -> str | None:
    """Why the last monitor reading suggests the kill was for memory (use at or above
    monitor.memory_high_fraction), or None when it does not or there is no reading."""
    limit = cfg.monitor.memory_high_fraction
    for key, what in (("gpu_memory_used_fraction", "GPU"), ("host_memory_used_fraction", "host")):
        used = (reading or {}).get(key)
        if used is not None and used >= limit:
            return f"{what} memory was {used:.0%} used (monitor.memory_high_fraction {limit})"
    return None


def _memory_rung(cfg: RunConfig, report: AttemptReport, allow_fresh_start: bool) -> dict | None:
    """The first rung of the memory ladder (module docstring) that still changes something."""
    micro = report.micro_batch_size or cfg.train.micro_batch_size
    if micro > 1:
        return {"train.micro_batch_size": largest_divisor(cfg.train.global_batch_size, micro // 2)}
    if not cfg.model.gradient_checkpointing:
        return {"model.gradient_checkpointing": True}
    if not allow_fresh_start:
        return None
    if cfg.model.method == "full":
        return method_values(cfg, "lora")
    if cfg.model.method == "lora" and report.device_type == "cuda":
        return {"model.method": "qlora"}
    if cfg.tokenize.max_seq_len > MIN_SEQ_LEN:
        return {"tokenize.max_seq_len": max(MIN_SEQ_LEN, cfg.tokenize.max_seq_len // 2)}
    return None


def _get(cfg: RunConfig, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _describe_reading(reading: dict | None) -> str:
    if not reading:
        return ""
    parts = []
    if reading.get("gpu_memory_used_fraction") is not None:
        parts.append(f"GPU memory {reading['gpu_memory_used_fraction']:.0%} used")
    parts.append(f"host memory {reading['host_memory_used_fraction']:.0%} used")
    if reading.get("temperature_c") is not None:
        parts.append(f"{reading['temperature_c']:.0f} °C")
    return " (last reading: " + ", ".join(parts) + ")"


def history_entry(report: AttemptReport, adjustment: Adjustment | None) -> dict:
    """One attempt for the history artifact and the run report: outcome, reading, and the change made."""
    return {"attempt": report.attempt, "outcome": report.outcome, "step": report.step, "message": report.message,
            "reading": report.reading, "reason": adjustment.reason if adjustment else None,
            "changes": adjustment.changes if adjustment else [],
            "resume": adjustment.resume if adjustment else None}


def history_markdown(entries: list[dict]) -> str:
    """The attempt history as a markdown table."""
    rows = []
    for e in entries:
        change = "; ".join(e["changes"]) or ("resume unchanged" if e["reason"] else "-")
        if e["changes"] and e["resume"] is False:
            change += " (fresh start)"
        rows.append([e["attempt"], e["outcome"], e["step"] if e["step"] is not None else "-",
                     e["reason"] or e["message"] or "-", change])
    return markdown_table(["attempt", "outcome", "step", "reason", "change for the next attempt"], rows)
