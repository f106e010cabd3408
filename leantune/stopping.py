"""A flow script stopped by a signal: which one, and the one line that says where the run stands.

Ctrl-C (SIGINT) reaches the flow as KeyboardInterrupt; SIGTERM inside a Prefect flow run as Prefect's
TerminationSignal (a cancellation from the UI too), and before or after the run as `Stopped`, which
`raise_stopped` (the script's SIGTERM handler) raises. The training process, in a session of its own,
is stopped by the flow after its checkpoint (leantune/training/launch.py); then the script prints
`stopped_line` and exits 128 + the signal's number (130, 143), as a shell reports a signalled command.
"""

from __future__ import annotations

import signal
from pathlib import Path

from leantune.rundir import RunDir
from leantune.tracking import checkpointed_step


class Stopped(BaseException):
    """SIGTERM outside a Prefect flow run (whose own handler raises TerminationSignal instead)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signal = signum


def raise_stopped(signum: int, _frame) -> None:
    raise Stopped(signum)


def stop_signal(error: BaseException) -> int | None:
    """The signal that `error` stands for (SIGINT, SIGTERM), or None when it is not a stop."""
    if isinstance(error, KeyboardInterrupt):
        return signal.SIGINT
    if isinstance(error, Stopped) or type(error).__name__ == "TerminationSignal":  # Prefect's, never imported here
        return getattr(error, "signal", signal.SIGTERM)
    return None


def stopped_line(signum: int, run_dir: Path) -> str:
    """`leantune: stopped by SIGINT at step N; checkpoint in ...; resume with: ...` (absolute paths)."""
    name = signal.Signals(signum).name
    run_dir = Path(run_dir).resolve()
    if not RunDir(run_dir).config.is_file():
        return f"leantune: stopped by {name} before the run directory {run_dir} was written; nothing to resume"
    resume = f"resume with: python flows/finetune.py --resume {run_dir.name}"
    step = checkpointed_step(run_dir)
    if step == 0:
        return f"leantune: stopped by {name} before the first checkpoint (in {run_dir}); {resume}"
    return f"leantune: stopped by {name} at step {step}; checkpoint in {RunDir(run_dir).checkpoints / f'step-{step}'}; " \
           f"{resume}"
