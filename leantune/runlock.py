"""One process at a time in a run directory: runs/<name>/.lock names the process that trains in it.

The training process (rank 0 under torchrun) holds the lock from start to exit, and the flow's train
task checks it before it writes anything, so two `--resume` of one run cannot train at once (they
would write the same checkpoints and metrics). The lock is an exclusive `flock` on the file, which
the kernel drops when its holder exits or is killed; the file itself holds the holder's pid, host,
start time and command line, for the message the second process gets. A lock file whose lock is
not held (its holder died) is stale: it is taken over, and the takeover is logged.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from leantune.errors import UserError
from leantune.rundir import RunDir

log = logging.getLogger(__name__)


class RunDirBusy(UserError):
    """Another live process holds the run directory's lock."""


@contextmanager
def hold_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir`'s lock for the body; RunDirBusy (nothing written) when a live process holds it."""
    path = RunDir(run_dir).lock
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirBusy(_busy_message(run_dir, _read(path))) from None
        if stale := _read(path):
            log.warning("run directory %s: took over a stale lock of process %s on %s (it is gone)",
                        run_dir, stale.get("pid"), stale.get("host"))
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # released cleanly: nothing stale is left to report
    finally:
        os.close(fd)  # closing drops the flock


def check_run_dir_free(run_dir: Path) -> None:
    """Raise RunDirBusy when a live process holds `run_dir`'s lock; otherwise return at once."""
    path = RunDir(run_dir).lock
    if not path.is_file():
        return
    with hold_run_dir(run_dir):
        pass


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _busy_message(run_dir: Path, holder: dict) -> str:
    who = (f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')}: {holder.get('command')})"
           if holder else "another process")
    return (f"run directory {run_dir} is in use by {who}; one process at a time may train in a run. Wait for "
            f"it to finish (or stop it), then resume with --resume {Path(run_dir).name}")
