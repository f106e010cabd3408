"""Terminal progress bars for the long stages, and quiet third-party libraries in the flows.

A bar draws only when stderr is an interactive terminal (like the training loop's); in logs, under
a Prefect worker and in tests it is a no-op, so log files never fill with carriage returns.
"""

from __future__ import annotations

import logging
import os
import sys


def progress_bar(desc: str, unit: str, total: int | None = None, initial: int = 0):
    """A tqdm bar on an interactive terminal; disabled (a no-op that still counts) elsewhere."""
    from tqdm import tqdm

    return tqdm(desc=desc, unit=unit, total=total, initial=initial, file=sys.stderr, dynamic_ncols=True,
                disable=not sys.stderr.isatty())


class TrainingBar:
    """The training's bar in the flow's terminal, drawn from the step lines of metrics.jsonl.

    The training process's own bar cannot draw: its output reaches the flow through a pipe. This
    one shows the step of total, the pace and ETA (tqdm's, from the steps as they arrive), the loss
    and tokens/s. Like `progress_bar`, it draws only on an interactive terminal.
    """

    def __init__(self, total: int):
        self.total = total
        self._bar = None

    def update(self, step_lines: list[dict]) -> None:
        if not step_lines:
            return
        last = step_lines[-1]
        if self._bar is None:
            # A resumed attempt starts at its checkpoint: its first line's step less one, not 0.
            self._bar = progress_bar("train", "step", self.total, initial=step_lines[0]["step"] - 1)
        if last["step"] < self._bar.n:  # a resume went back to its checkpoint
            self._bar.reset(total=self.total)
        self._bar.set_postfix_str(f"loss {last['loss']:.4f}, {last['tokens_per_s']:,.0f} tokens/s", refresh=False)
        self._bar.update(last["step"] - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


PROGRESS_EVERY_S = 10.0  # a long in-process stage logs where it is at most this often


class StageProgress:
    """Where a long in-process stage is (filtration, evaluation): `label: N of TOTAL items (P%), R items/s,
    ETA M:SS`, logged every `every_s` seconds while it runs. A log line, not a bar: it reaches the run's
    log in the UI as well as the terminal, where it stands on its own line. A stage shorter than
    `every_s` logs nothing here (its own summary line says what it did)."""

    def __init__(self, label: str, total: int, unit: str = "items", every_s: float = PROGRESS_EVERY_S,
                 clock=None):
        import time

        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self._clock = clock or time.monotonic
        self.started = self._logged_at = self._clock()
        self.done = 0
        self.lines: list[str] = []

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self._clock()
        if now - self._logged_at >= self.every_s and self.done < self.total:
            self._logged_at = now
            rate = self.done / (now - self.started)
            line = (f"{self.label}: {self.done} of {self.total} {self.unit} ({self.done / self.total:.0%}), "
                    f"{rate:.3g} {self.unit}/s, ETA {_interval((self.total - self.done) / rate)}")
            self.lines.append(line)
            # The numbers ride along for a handler that draws them (tasks/logs.py: a Prefect progress artifact).
            logging.getLogger(__name__).info(line, extra={"stage_progress": 100.0 * self.done / self.total})


def stage_times_text(seconds: dict[str, float]) -> str:
    """'stage times: prepare 2s, validate 16s, train 3m05s' (in the order given)."""
    def short(s: float) -> str:
        s = round(s)
        return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"

    return "stage times: " + ", ".join(f"{name} {short(s)}" for name, s in seconds.items())


def _interval(seconds: float) -> str:
    from tqdm import tqdm

    return tqdm.format_interval(seconds)


def quiet_third_party() -> None:
    """Silence the progress bars and chatter of datasets, huggingface_hub, transformers, GX and bitsandbytes
    (idempotent).

    Called by the flows at start-up: the terminal and the Prefect log should show leantune's stages
    (each logs what it loaded and read), not one bar per downloaded file, per checkpoint shard or per
    GX metric. The libraries read their environment variables when first imported, so these are set
    first (a user's own setting wins); a library already imported is told directly.
    """
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Bars drawn with tqdm directly (transformers' GGUF conversion); leantune's own bars pass `disable`.
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # bitsandbytes: its CPU backend's notice that the `kernels` package could not load its 4-bit matmul (it
    # only speeds up 4-bit matmuls on the CPU), printed by every process that imports it (peft imports it).
    for name in ("datasets", "transformers", "huggingface_hub", "peft", "great_expectations", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()


def training_eta_s(steps: list[dict], total: int) -> float | None:
    """Seconds to the last of `total` steps at the pace of the step lines so far (their elapsed_s); None
    before two lines of one attempt."""
    first, last = steps[0], steps[-1]
    if last["step"] <= first["step"] or "elapsed_s" not in first or "elapsed_s" not in last:
        return None
    return (last["elapsed_s"] - first["elapsed_s"]) / (last["step"] - first["step"]) * (total - last["step"])


def training_percent(step: int, total: int) -> float:
    """The training-progress artifact's value: percent done, to one decimal (the UI prints it as it is)."""
    return round(100.0 * step / total, 1)


def training_progress_text(steps: list[dict], total: int) -> str:
    """'Training: step 31 of 462, ETA 14:22; loss 0.2134, 13,509 tokens/s': the training-progress artifact's description."""
    from tqdm import tqdm

    last = steps[-1]
    eta = training_eta_s(steps, total)
    when = "" if eta is None else f", ETA {tqdm.format_interval(eta)}"
    return (f"Training: step {last['step']} of {total}{when}; loss {last['loss']:.4f}, "
            f"{last['tokens_per_s']:,.0f} tokens/s")

