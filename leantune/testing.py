"""Test seams of the training loop, for tests and benchmarks only: leantune itself never imports this.

`loop_hooks(...)` replaces, for the duration of a `with` block, the loop's own module-level functions
that start a micro-batch, the start-up probe, read the free memory and build the resource monitor
(leantune/training/loop.py), so a test can script what a real run only meets by chance:

    with loop_hooks(oom=lambda step, k, mb: step == 2):   # every micro-batch of step 2 runs out of memory
        train(cfg, run_dir)

oom(step, micro_index, micro_batch_size) -> bool: True makes that micro-batch raise
    torch.OutOfMemoryError before it runs (step 0, micro_index 0: the start-up probe); it may also
    raise any error itself.
headroom(step) -> free memory share (0-1) or None: what the micro-batch controller grows on after
    `step`, instead of the monitor's reading or the device's count.
monitor: the Monitor the loop uses (e.g. one reading tests/fakes.py's FakeNvml) instead of building one
    from cfg.monitor; the loop still sets its on_sample, starts and stops it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def loop_hooks(*, oom: Callable[[int, int, int], bool] | None = None,
               headroom: Callable[[int], float | None] | None = None, monitor=None) -> Iterator[None]:
    import torch

    from leantune.training import loop

    patches = {}
    if oom is not None:
        forward_backward, probe = loop._forward_backward, loop._probe

        def injected_forward_backward(run, share, k, targets, tokens):
            step = run.state.step + 1
            if oom(step, k, run.controller.micro_batch_size):
                raise torch.OutOfMemoryError(f"injected out-of-memory at step {step}, micro-batch {k}")
            return forward_backward(run, share, k, targets, tokens)

        def injected_probe(run, indices):
            if oom(0, 0, run.controller.micro_batch_size):
                raise torch.OutOfMemoryError("injected out-of-memory in the start-up probe")
            return probe(run, indices)

        patches.update(_forward_backward=injected_forward_backward, _probe=injected_probe)
    if headroom is not None:
        patches["_free_share"] = lambda run: headroom(run.state.step)
    if monitor is not None:
        patches["_new_monitor"] = lambda cfg, run_dir, dist: monitor
    saved = {name: getattr(loop, name) for name in patches}
    for name, value in patches.items():
        setattr(loop, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(loop, name, value)
