"""How the flow starts training: the command line of the training process (torchrun for several),
running it, and following it.

Training runs in its own process so that an attempt killed by the operating system (host out of
memory) or by a signal is an exit status the flow can read and answer with another attempt, and so
that torchrun can start one process per GPU. The flow itself stays a single process.

`run_training` starts the process, passes its output on line by line (`log_record`: the level of
each logging line, no progress bars) and the steps it appends to metrics.jsonl (`MetricsFollower`),
and stops it with SIGTERM (checkpoint, exit 75) when the caller is interrupted. How it ended is its
exit status plus the failure file it leaves (leantune/failures.py).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from leantune.config import RunConfig, load_config
from leantune.failures import JSON_LOG_ENV, parse_log_line
from leantune.metrics import MetricsFollower
from leantune.rundir import RunDir
from leantune.runlock import held_lock_fds
from leantune.stopping import hold_off_repeats, stop_signal
from leantune.tables import markdown_table

log = logging.getLogger(__name__)


def training_command(cfg: RunConfig, run_dir: Path, resume: bool) -> list[str]:
    """`python -m leantune.training.loop RUN_DIR [--resume]`, under torchrun when train.distributed asks."""
    entry = ["leantune.training.loop", str(run_dir), *(["--resume"] if resume else [])]
    d = cfg.train.distributed
    if d.nproc_per_node == 1 and d.nnodes == 1:
        return [sys.executable, "-m", *entry]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={d.nproc_per_node}",
           f"--nnodes={d.nnodes}",
           # A failed rank fails the run: the flow's attempt loop decides what happens next, not torchrun.
           "--max-restarts=0"]
    if d.nnodes == 1:
        # A free port on this machine, no rendezvous server to set up.
        cmd.append("--standalone")
    else:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={d.rdzv_endpoint}", f"--rdzv-id={d.rdzv_id}",
                f"--rdzv-conf=join_timeout={d.join_timeout_s}"]
    return [*cmd, "-m", *entry]


def node_command(cfg: RunConfig, run_dir: Path, node_rank: int | str, python: str = sys.executable) -> list[str]:
    """The torchrun agent that node `node_rank` (1 to nnodes-1) of a multi-node run starts: the flow's own
    command (`training_command`, which node 0 runs) with the node's rank. Its workers train run_dir with the
    config.yaml the flow wrote there, from the newest checkpoint when there is one (the loop resumes by itself
    once checkpoints exist). torchrun's c10d rendezvous assigns the ranks of the processes; --node-rank
    names the node in its log. `python`: the interpreter on that node ('python' in a container)."""
    cmd = training_command(cfg, run_dir, resume=False)
    at = cmd.index(f"--nnodes={cfg.train.distributed.nnodes}") + 1
    return [python, *cmd[1:at], f"--node-rank={node_rank}", *cmd[at:]]


def run_node_agent(run_dir: Path, node_rank: int, on_log: Callable[[int, str], None]) -> int:
    """Run node `node_rank`'s torchrun agent (`node_command`) for the run directory's config.yaml to its end
    (run_training, its output to on_log); return its exit status. What the train-node flow runs."""
    cfg = load_config(RunDir(run_dir).config)
    return run_training(node_command(cfg, Path(run_dir), node_rank), Path(run_dir), on_log=on_log,
                        on_metrics=lambda lines: None, clear_failure=False)


# torchrun's error when not every node joined the rendezvous in time (its own text, read by pattern).
RENDEZVOUS_TIMEOUT = "RendezvousTimeoutError"


def rendezvous_timeout_message(cfg: RunConfig) -> str:
    """What the flow says when torchrun ended with RENDEZVOUS_TIMEOUT: which setting, which endpoint, what to do."""
    d = cfg.train.distributed
    return (f"train.distributed.join_timeout_s: not all {d.nnodes} nodes joined the rendezvous {d.rdzv_id} at "
            f"{d.rdzv_endpoint} within {d.join_timeout_s} s; start the training on every node with the same "
            "rdzv_endpoint and rdzv_id (each must reach that host and port), or raise train.distributed.join_timeout_s")


# ------------------------------------------------------------------------------- running the process

# How long a training process asked to stop (SIGTERM) may take to save its checkpoint before it is killed.
STOP_GRACE_S = 600.0
# Progress bars draw with carriage returns; on a pipe they are switched off, and these catch any that are not.
# The child logs JSON lines (leantune/failures.py), so that no pattern has to match its logging format.
CHILD_ENV = {"PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", JSON_LOG_ENV: "1"}


def log_record(line: str, previous_level: int) -> tuple[int, str] | None:
    """(level, text) under which a line of the training process's output goes to the flow's log, or None.

    The child's logging lines, JSON (`failures.parse_log_line`), keep their level and read
    "logger: message"; of other lines, a traceback is an error and the rest (print, library warnings,
    torchrun's own output) are info. Of a line redrawn with
    carriage returns (a progress bar) only the last drawing is kept, and an empty one is dropped.
    """
    text = line.rstrip("\r\n").rsplit("\r", 1)[-1].rstrip()
    if not text:
        return None
    if (record := parse_log_line(text)) is not None:
        return record
    if text.startswith("Traceback (most recent call last)"):
        return logging.ERROR, text
    # Continuation lines (a traceback's frames, a multi-line message) stay at the level they belong to.
    return (previous_level if line[:1].isspace() or previous_level >= logging.ERROR else logging.INFO), text


def run_training(cmd: list[str], run_dir: Path, *, on_log: Callable[[int, str], None],
                 on_metrics: Callable[[list[dict]], None], poll_s: float = 0.5,
                 stop_grace_s: float = STOP_GRACE_S, clear_failure: bool = True) -> int:
    """Run the training process `cmd` to its end and return its exit status.

    Its output (stdout and stderr, in order) goes line by line to `on_log(level, text)` (see
    `log_record`); the lines it appends to run_dir/metrics.jsonl go to `on_metrics` as they come.
    Both are called from this thread. The process runs in a session of its own (`own_session`): a
    signal meant for the flow reaches it once, from here. An exception here (Ctrl-C's KeyboardInterrupt,
    Prefect's TerminationSignal for SIGTERM or a cancellation) first stops the process: SIGTERM, which
    makes it save a checkpoint and exit 75, then SIGKILL if it is not gone after `stop_grace_s`; then
    the exception goes on. clear_failure False: another machine's node agent (`run_node_agent`), which
    leaves the failure file to the attempt of the flow's machine.
    """
    run_dir = Path(run_dir)
    # What a failed process leaves (RunDir.failure, leantune.failures.write_failure) must be this attempt's.
    if clear_failure:
        RunDir(run_dir).failure.unlink(missing_ok=True)
    follower = MetricsFollower(run_dir, from_end=True)
    # Bytes, split on newlines only: text mode would turn a progress bar's carriage returns into lines.
    # The run directory's lock, when this process holds it, is inherited: held while the training process
    # lives, even if this one is killed first (leantune/runlock.py). Its own session: see own_session.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **CHILD_ENV},
                            pass_fds=held_lock_fds(run_dir), **own_session())
    lines: queue.Queue[str | None] = queue.Queue()
    # A thread reads the pipe so that a chatty process never blocks on it while this one polls.
    reader = threading.Thread(target=_pump, args=(proc.stdout, lines), name="training-output", daemon=True)
    reader.start()
    level = logging.INFO

    def forward_output() -> None:
        """Pass on the lines read so far."""
        nonlocal level
        while True:
            try:
                line = lines.get_nowait()
            except queue.Empty:
                return
            if line is None:  # the end of the output
                return
            if (record := log_record(line, level)) is not None:
                level = record[0]
                on_log(*record)

    try:
        while proc.poll() is None:
            forward_output()
            if metrics := follower.new_lines():
                on_metrics(metrics)
            time.sleep(poll_s)
    except BaseException as stop:
        try:
            if stop_signal(stop) is not None:
                hold_off_repeats()  # a repeated SIGTERM, the terminal's SIGHUP: not to cost the checkpoint
        finally:  # a repeat that came first (`timeout` sends two) still stops the process after its checkpoint
            _stop(proc, stop_grace_s)
        # What it said while stopping (its checkpoint) still reaches the log.
        reader.join(timeout=10)
        forward_output()
        raise
    reader.join()
    forward_output()
    if metrics := follower.new_lines():
        on_metrics(metrics)
    return proc.returncode


def own_session() -> dict:
    """Popen arguments for a child the flow stops itself: a session (process group) of its own, so that a
    Ctrl-C or SIGTERM to the terminal's group, or Prefect's SIGKILL of the flow run's group after its grace
    period, does not reach it directly; and on Linux a SIGTERM when the flow process dies, so it never
    outlives the flow unasked (a training process saves a checkpoint first).

    Prefect's grace period for a cancelled run is 30 s, fixed in Prefect 3.8.8 (grace_seconds in
    prefect/runner/_cancellation_manager.py and workers/base.py; no setting changes it). A training step
    can be longer (a loaded CPU, a large model): the training then outlives the killed flow process, ends
    its step, saves its checkpoint and exits (a second SIGTERM changes nothing: checkpoint.py)."""
    if not sys.platform.startswith("linux"):
        return {"start_new_session": True}
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return {"start_new_session": True, "preexec_fn": lambda: prctl(PR_SET_PDEATHSIG, signal.SIGTERM)}


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>: the signal a process gets when its parent dies


def _pump(stream, lines: queue.Queue) -> None:
    for raw in stream:
        lines.put(raw.decode("utf-8", errors="replace"))
    lines.put(None)
    stream.close()


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    if proc.poll() is not None:
        return
    log.warning("stopping the training process (pid %d): it saves a checkpoint, then exits", proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except BaseException:
        # Out of time, or interrupted once more while waiting (a second Ctrl-C; a repeated SIGTERM is held
        # off, leantune/stopping.py): stop at once.
        proc.kill()
        proc.wait()
        log.warning("killed the training process (pid %d) before it finished its checkpoint", proc.pid)


def stop_flow_runs_then_interrupt(*_signal_args) -> None:
    """Signal handler of a Prefect runner or worker (deployments/serve.py, deployments/worker.py) that stops.

    Its child processes are flow runs: each gets SIGTERM, which Prefect's engine turns into a crash of
    the run, on the way out of which the train task stops its training process with SIGTERM (a
    checkpoint, then exit 75). They get up to STOP_GRACE_S to end (then they are killed), and the
    runner or worker stops as on Ctrl-C, with no flow run left for it to wait on.
    """
    import psutil

    children = psutil.Process().children()
    for process in children:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=STOP_GRACE_S)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    # Shutting down cancels Prefect's control-channel reads, which asyncio would log as tracebacks.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    raise KeyboardInterrupt


# ------------------------------------------------------------------------------------------ progress

RECENT_STEPS = 10  # the progress table shows this many of the latest steps


def progress_markdown(steps: list[dict], total: int) -> str:
    """Training progress as markdown: where the run is, then a table of its latest metrics.jsonl step lines."""
    last = steps[-1]
    rows = [[m["step"], f"{m['loss']:.4f}", f"{m['lr']:.3g}", f"{m['tokens_per_s']:,.0f}", m["micro_batch_size"],
             f"{m['val_loss']:.4f}" if m.get("val_loss") is not None else "-"] for m in steps[-RECENT_STEPS:]]
    header = ["step", "loss", "lr", "tokens/s", "micro-batch", "validation loss"]
    if "router_aux_loss" in last:  # Mixture of Experts: the router loss and the worst layer's expert imbalance
        header += ["router loss", "expert imbalance (max/mean)"]
        for row, m in zip(rows, steps[-RECENT_STEPS:], strict=True):
            row += [f"{m['router_aux_loss']:.4f}", f"{m['expert_imbalance_max']:.2f}" if "expert_load" in m else "-"]
    return (f"## Training progress\n\nstep {last['step']} of {total} ({last['step'] / total:.0%}): loss "
            f"{last['loss']:.4f}, lr {last['lr']:.3g}, {last['tokens_per_s']:,.0f} tokens/s, micro-batch "
            f"{last['micro_batch_size']}\n\n"
            + markdown_table(header, rows))
