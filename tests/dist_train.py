"""Test-only launcher for tests/training/test_distributed.py, run by torchrun once per rank:

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/dist_train.py RUN_DIR [options]

It calls leantune.training.loop.train() with hooks for ONE rank, which production code has no
way to receive from the environment: an out-of-memory injector, and a pause (the rank writes its
pid to RUN_DIR/rank-R.paused and sleeps) so that a test can kill it at a known point.
Each rank writes its summary to RUN_DIR/summary-rank-R.json.
"""

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir", type=Path)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--oom", metavar="RANK:STEP:MB",
                   help="on rank RANK, every micro-batch of step STEP larger than MB runs out of memory")
    p.add_argument("--pause", metavar="RANK:STEP", help="rank RANK stops for good at the start of step STEP")
    args = p.parse_args()

    import torch

    from leantune.config import load_config
    from leantune.testing import loop_hooks
    from leantune.training.loop import train

    # One intra-op thread: the same reduction order in every process, whatever else runs on the machine.
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    hooks = []
    if args.oom:
        oom_rank, oom_step, above = (int(x) for x in args.oom.split(":"))
        if rank == oom_rank:
            hooks.append(lambda step, k, mb: step == oom_step and mb > above)
    if args.pause:
        pause_rank, pause_step = (int(x) for x in args.pause.split(":"))
        if rank == pause_rank:
            def pause(step, k, mb):
                if step == pause_step:
                    (args.run_dir / f"rank-{rank}.paused").write_text(str(os.getpid()))
                    time.sleep(600)  # the test kills this process long before
                return False
            hooks.append(pause)

    def oom_injector(step: int, k: int, mb: int) -> bool:
        return any([hook(step, k, mb) for hook in hooks])

    cfg = load_config(args.run_dir / "config.yaml")
    with loop_hooks(oom=oom_injector if hooks else None):
        summary = train(cfg, args.run_dir, resume=args.resume)
    (args.run_dir / f"summary-rank-{rank}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
