"""One process at a time in a run directory: runs/<name>/.lock names the process that works in it.

The finetune flow holds the lock from its first stage to the report (a `--resume` too, also one that only
evaluates and reports), and takes it before it starts tracking, so a second command on the same run is
refused before it writes anything: not in the run directory, not in MLflow, not in TensorBoard. A
training process started by itself (`python -m leantune.training.loop`; rank 0 under torchrun) holds it
too. A process whose ancestor holds the lock (the training process the flow started, torchrun's workers)
works under it: the flow passes its lock's descriptor to the training process, so the lock stays held
while that process lives, even if the flow is killed first. The lock is an exclusive `flock` on the file,
which the kernel drops when every holder of the descriptor exits or is killed; the file itself holds the
holder's pid, host, start time and command line, for the message the second process gets. A lock file
whose lock is not held (its holder died) is stale: it is taken over, and the takeover is logged.
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


# The lock descriptors this process holds, by run directory: passed on to the training process it starts.
_HELD: dict[Path, int] = {}


def held_lock_fds(run_dir: Path) -> tuple[int, ...]:
    """The descriptor of `run_dir`'s lock when this process holds it, for a child process to inherit."""
    fd = _HELD.get(Path(run_dir).resolve())
    return () if fd is None else (fd,)


def _held_by_an_ancestor(holder: dict) -> bool:
    """Whether the lock's holder is this process or one it descends from (on this host)."""
    import psutil

    if holder.get("host") != socket.gethostname():
        return False
    return holder.get("pid") in {os.getpid(), *(p.pid for p in psutil.Process().parents())}


@contextmanager
def hold_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir`'s lock for the body; RunDirBusy (nothing written) when a live process holds it, unless
    that process is this one or its ancestor (the body then runs under the ancestor's lock)."""
    path = RunDir(run_dir).lock
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        taken, holder = _try_lock(fd, path)
        if not taken:
            if not _held_by_an_ancestor(holder):
                raise RunDirBusy(_busy_message(run_dir, holder))
            yield  # the flow that started this process holds it, for this process too
            return
        if stale := _read(path):
            log.warning("run directory %s: took over a stale lock of process %s on %s (it is gone)",
                        run_dir, stale.get("pid"), stale.get("host"))
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        _HELD[Path(run_dir).resolve()] = fd
        try:
            yield
        finally:
            del _HELD[Path(run_dir).resolve()]
            os.ftruncate(fd, 0)  # released cleanly: nothing stale is left to report
    finally:
        os.close(fd)  # closing drops the flock


def _try_lock(fd: int, path: Path, settle_s: float = 2.0) -> tuple[bool, dict]:
    """Try the lock once more while the file is empty: a holder writes its details just after it takes the
    lock and empties the file just before it lets go, so an empty file under a held lock is one of those two
    moments, not a holder without a name. Returns (taken, the holder's details when not taken)."""
    deadline = time.monotonic() + settle_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True, {}
        except BlockingIOError:
            pass
        if (holder := _read(path)) or time.monotonic() > deadline:
            return False, holder
        time.sleep(0.02)


def check_run_dir_free(run_dir: Path) -> None:
    """Raise RunDirBusy when a live process other than this one and its ancestors holds `run_dir`'s lock;
    otherwise return at once."""
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
    return (f"run directory {run_dir} is in use by {who}; one process at a time may work in a run. Wait for "
            f"it to finish (or stop it), then resume with --resume {Path(run_dir).name}")
