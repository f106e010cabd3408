"""metrics.jsonl: the one writer and the readers of a run's training metrics.

The training process writes one JSON object per line, flushed line by line, so that a killed run
leaves whole lines except perhaps a torn last one, which every reader here skips. Two kinds of line:

- a step line (no "event" key), one per optimizer step every train.log_every steps: `StepLine`;
- an event line with "event" and "step": "micro_batch" (the adaptive controller changed the
  micro-batch, `MicroBatchEvent`), "monitor" (a decision of the resource monitor, `MonitorEvent`),
  "lr_rescale" (a resume with another train.lr rescaled the schedule, `LrRescaleEvent`).

`event_of(line)` names a line's kind ("step" for a step line); `read_metrics(run_dir, event=...)`
returns the lines of one kind (or all), in file order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, NotRequired, TypedDict

from leantune.rundir import RunDir

Event = Literal["step", "micro_batch", "monitor", "lr_rescale"]


class StepLine(TypedDict):
    """One optimizer step (leantune/training/loop.py documents each field; router_aux_loss and the expert
    load only for a Mixture-of-Experts model, leantune/moe.py; the preference fields only with
    train.objective dpo or simpo, leantune/training/preference.py)."""

    step: int
    epoch: float
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    tokens_per_s: float
    micro_batch_size: int
    accumulation_steps: int
    world_size: int
    peak_memory_mb: float
    elapsed_s: float
    energy_j: NotRequired[float]
    val_loss: NotRequired[float]
    router_aux_loss: NotRequired[float]
    expert_load: NotRequired[list[list[float]]]
    expert_imbalance: NotRequired[list[float]]
    expert_imbalance_max: NotRequired[float]
    expert_assignments: NotRequired[int]
    pref_accuracy: NotRequired[float]
    reward_margin: NotRequired[float]
    logp_chosen: NotRequired[float]
    logp_rejected: NotRequired[float]


class MicroBatchEvent(TypedDict):
    event: Literal["micro_batch"]
    step: int
    old: int
    new: int
    reason: str


class MonitorEvent(TypedDict):
    event: Literal["monitor"]
    step: int
    action: str
    reason: str
    reading: dict


class LrRescaleEvent(TypedDict):
    event: Literal["lr_rescale"]
    step: int
    old: float
    new: float
    factor: float


MetricLine = StepLine | MicroBatchEvent | MonitorEvent | LrRescaleEvent


def event_of(line: dict) -> Event:
    """The kind of a metrics.jsonl line: its "event", or "step" for a step line."""
    return line.get("event", "step")


def parse_lines(data: bytes | str) -> list[MetricLine]:
    """The lines of metrics.jsonl text that parse; a torn line (a killed writer's last) is skipped."""
    lines = []
    for raw in data.splitlines():
        if not raw.strip():
            continue
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue
    return lines


def read_metrics(run_dir: str | Path | RunDir, event: Event | None = None) -> list[MetricLine]:
    """The lines of run_dir/metrics.jsonl of kind `event` (all when None), in file order; [] without the file."""
    path = RunDir.of(run_dir).metrics
    try:
        lines = parse_lines(path.read_bytes())
    except FileNotFoundError:
        return []
    return lines if event is None else [line for line in lines if event_of(line) == event]


class MetricsWriter:
    """run_dir/metrics.jsonl, appended line by line and flushed, so a killed run leaves whole lines.

    On resume from step K (keep_until_step) the lines of steps after K are dropped: those steps will
    run again. A fresh start (K = 0) starts an empty file. enabled False (data parallel, ranks other
    than 0): lines are dropped, rank 0 writes the file.
    """

    def __init__(self, run_dir: str | Path | RunDir, keep_until_step: int, enabled: bool = True):
        self.path = RunDir.of(run_dir).metrics
        self._f = None
        if not enabled:
            return
        kept = [line for line in read_metrics(run_dir) if line["step"] <= keep_until_step] if keep_until_step else []
        self.path.write_text("".join(json.dumps(line) + "\n" for line in kept))
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, line: MetricLine) -> None:
        if self._f is not None:
            self._f.write(json.dumps(line) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


class StepHistory:
    """The step lines of a training attempt as they come (from `MetricsFollower`), events left out; a resume's
    rewind (it drops the steps after its checkpoint and runs them again) replaces the steps it redoes."""

    def __init__(self):
        self.steps: list[StepLine] = []

    def add(self, lines: list[MetricLine]) -> list[StepLine]:
        """Take new lines; return their step lines."""
        new = [line for line in lines if event_of(line) == "step"]
        for line in new:
            while self.steps and self.steps[-1]["step"] >= line["step"]:
                self.steps.pop()
            self.steps.append(line)
        return new


class MetricsFollower:
    """The lines appended to run_dir/metrics.jsonl since the last call: whole lines only, parsed.

    A resume rewrites the file (it drops the steps it will redo); a file shorter than what was read
    is read again from its start. from_end: skip what the file holds now (a previous attempt's
    lines, which the next training process rewrites).
    """

    def __init__(self, run_dir: str | Path | RunDir, from_end: bool = False):
        self.path = RunDir.of(run_dir).metrics
        self._offset = self.path.stat().st_size if from_end and self.path.is_file() else 0

    def new_lines(self) -> list[MetricLine]:
        try:
            if self.path.stat().st_size < self._offset:
                self._offset = 0
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self._offset += end + 1
        return parse_lines(data[:end])
