"""A flow script stopped by a signal: which one, and the one line that says where the run stands.

Ctrl-C (SIGINT) reaches the flow as KeyboardInterrupt; SIGTERM inside a Prefect flow run as Prefect's
TerminationSignal (a cancellation from the UI too), and before or after the run as `Stopped`, which
`raise_stopped` (the script's SIGTERM handler) raises. The training process, in a session of its own,
is stopped by the flow after its checkpoint (leantune/training/launch.py); then the script prints
`stopped_line` and exits 128 + the signal's number (130, 143), as a shell reports a signalled command.

A stop takes the first signal only. A SIGTERM to a process group that holds a session leader brings more:
`timeout` forwards the SIGTERM it gets to its group after its child, so the flow gets it twice, and a
terminal's session leader (the shell of `setsid bash -c '...'`) killed by it makes the kernel send SIGHUP to
the terminal's foreground group, the flow's, whose default action kills the flow mid-stop (no last line, a
stale lock). So the terminal's SIGHUP is a SIGTERM unless a stop begins with it (`hang_up`), and once a
stop has begun a repeated SIGTERM or SIGHUP is ignored (`hold_off_repeats`); a second Ctrl-C still stops
at once. A stop begins wherever the flow is: in training, a data stage or between stages
(`holding_off_repeats`, around every stage task and the flow's body), so a repeat cannot cut short Prefect's
recording of the crash either (a task left "Running"). When the flow has ended, the handlers the hold-off
replaced are put back (`release_repeats`, a flow state hook), so that a flow called from Python (a notebook,
a test) leaves them as they were.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from leantune.rundir import RunDir, checkpointed_step


class Stopped(BaseException):
    """SIGTERM outside a Prefect flow run (whose own handler raises TerminationSignal instead)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signal = signum


def raise_stopped(signum: int, _frame) -> None:
    """The script's SIGTERM handler (Prefect's takes over inside the flow run): the stop begins."""
    hold_off_repeats()
    raise Stopped(signum)


# How long after the terminal's SIGHUP the script sends itself the SIGTERM that stops it, unless a stop has
# begun by then: the group's SIGTERM that killed the terminal's shell reaches the script at the same moment.
HANGUP_WAIT_S = 1.0


def hang_up(_signum: int, _frame) -> None:
    """The script's SIGHUP handler: the terminal hung up (its session leader exited). Stop as on SIGTERM, a
    second later unless a stop has begun: raised here, it could land in the middle of the stop that a SIGTERM
    to the group has just begun, and cut it short."""
    timer = threading.Timer(HANGUP_WAIT_S, _stop_unless_stopping)
    timer.daemon = True
    timer.start()


def _stop_unless_stopping() -> None:
    if signal.getsignal(signal.SIGHUP) is hang_up:  # no stop has begun (`hold_off_repeats` replaces it)
        os.kill(os.getpid(), signal.SIGTERM)


def ignore_repeat(_signum: int, _frame) -> None:
    """SIGTERM and SIGHUP once a stop has begun: nothing more to do."""


# The handlers `hold_off_repeats` replaced, by signal, for `release_repeats` to put back.
_held_off: dict[int, object] = {}


def hold_off_repeats() -> None:
    """Once a stop has begun: a later SIGTERM or SIGHUP (see the module's docstring) must not cut it short,
    so from here on they are ignored, until `release_repeats`. Signals can be set in the main thread only;
    setting one first runs the handlers of signals already received, so a repeat that came meanwhile is let
    pass here."""
    if threading.current_thread() is not threading.main_thread():
        return
    while True:
        try:
            for sig in (signal.SIGTERM, signal.SIGHUP):
                previous = signal.signal(sig, ignore_repeat)
                if previous is not ignore_repeat:  # held off already: the first replaced handler is kept
                    _held_off[sig] = previous
            return
        except BaseException as repeat:
            if stop_signal(repeat) in (None, signal.SIGINT):  # not a repeat: a second Ctrl-C, an error
                raise


def release_repeats() -> None:
    """The stop is over: the handlers `hold_off_repeats` replaced are back, where it is still in place."""
    if threading.current_thread() is not threading.main_thread():
        return
    while _held_off:
        sig, previous = _held_off.popitem()
        if signal.getsignal(sig) is ignore_repeat:
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)  # None: set outside Python


@contextmanager
def holding_off_repeats():
    """A stop (Ctrl-C, SIGTERM, a cancellation) that passes through here holds off repeats
    (`hold_off_repeats`) before it goes on; also a decorator."""
    try:
        yield
    except BaseException as stop:
        if stop_signal(stop) is not None:
            hold_off_repeats()
        raise


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
