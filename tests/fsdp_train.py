"""Test-only launcher for tests/training/test_fsdp.py, run by torchrun once per rank:

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/fsdp_train.py PLAN.json

PLAN.json is a list of trainings, run in order in one process group (one launch for several checks),
each through the training process's own entry point (leantune.training.loop.main: exit status,
failure file): {"run_dir": ..., "resume": bool, "oom": "RANK:STEP" or null}. "oom": on rank RANK, the
first micro-batch of step STEP runs out of memory (leantune.testing.loop_hooks). A training that fails
ends the launch with its exit status, so such an entry comes last.
"""

import json
import os
import sys
from pathlib import Path


def main() -> None:
    import torch
    import torch.distributed as dist

    from leantune.testing import loop_hooks
    from leantune.training import loop

    # One intra-op thread: the same reduction order in every process, whatever else runs on the machine.
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    # The group outlives each train() (which leaves a group it did not create in place).
    dist.init_process_group("gloo")
    for entry in json.loads(Path(sys.argv[1]).read_text()):
        run_dir = Path(entry["run_dir"])
        oom = None
        if entry.get("oom"):
            oom_rank, oom_step = (int(x) for x in entry["oom"].split(":"))
            if rank == oom_rank:
                def oom(step, k, mb, oom_step=oom_step):
                    return step == oom_step
        with loop_hooks(oom=oom):
            code = loop.main([str(run_dir), *(["--resume"] if entry.get("resume") else [])])
        if code:
            sys.exit(code)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
