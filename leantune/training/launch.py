"""How the flow starts training: the command line of the training process (torchrun for several).

Training runs in its own process so that an attempt killed by the operating system (host out of
memory) or by a signal is an exit status the flow can read and answer with another attempt, and so
that torchrun can start one process per GPU. The flow itself stays a single process.
"""

from __future__ import annotations

import sys
from pathlib import Path

from leantune.config import RunConfig


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
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={d.rdzv_endpoint}", f"--rdzv-id={d.rdzv_id}"]
    return [*cmd, "-m", *entry]
