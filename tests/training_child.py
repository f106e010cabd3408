"""A training process with an injected fault, for the attempt tests (never used by leantune itself):

    python tests/training_child.py FAULT RUN_DIR [--resume]

FAULT is `none` or KIND@STEP: oom (every micro-batch of that step runs out of memory, so the
micro-batch controller halves down to 1 and gives up), nan (the loss turns NaN), kill (the process
SIGKILLs itself, as the kernel's out-of-memory killer would) or user (a UserError). Then it is
exactly `python -m leantune.training.loop RUN_DIR [--resume]`.
"""

import contextlib
import os
import signal
import sys

from leantune.errors import UserError
from leantune.failures import NonFiniteLoss
from leantune.testing import loop_hooks
from leantune.training import loop


def injector(fault: str):
    kind, _, at = fault.partition("@")
    if kind not in ("oom", "nan", "kill", "user"):
        raise ValueError(f"unknown fault {fault!r}")
    fault_step = int(at)

    def inject(step: int, micro_index: int, micro_batch_size: int) -> bool:
        if step != fault_step:
            return False
        if kind == "nan":
            raise NonFiniteLoss(f"the training loss is nan at step {step}")
        if kind == "user":
            raise UserError(f"data.sources: injected user error at step {step}; fix the config")
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        return True  # oom

    return inject


if __name__ == "__main__":
    fault, *argv = sys.argv[1:]
    with loop_hooks(oom=injector(fault)) if fault != "none" else contextlib.nullcontext():
        sys.exit(loop.main(argv))
