"""The adaptive micro-batch: halve it on out-of-memory, grow it again on sustained memory headroom.

`train.global_batch_size` is fixed for a run; the micro-batch is always a divisor of it, so the
number of micro-batches per optimizer step (gradient accumulation) is a whole number and a step
sees the same sequences however it is split. The controller holds no torch state and reads no
device: the loop reports what happened (an out-of-memory error in a micro-batch, a finished step
with the share of memory that was free) and applies the micro-batch the controller answers with.
The free-memory share is an input so that the resource monitor can feed it and tests can script it.

Growth backs off: an out-of-memory error at a size the controller grew to doubles the number of
headroom steps needed before it tries to grow again.

Data parallel (torchrun): each process has a controller for its share of the global batch
(global_batch_size / world size sequences; `global_batch_size` below is that share). After every
step attempt the processes agree on the smallest micro-batch, which the others `adopt`, and they
grow on the smallest free-memory share of them all, so their controllers stay in step.
"""

from __future__ import annotations

from dataclasses import dataclass

from leantune.config import largest_divisor
from leantune.failures import OutOfMemory


@dataclass(frozen=True)
class Change:
    """One micro-batch change; `event()` is its metrics.jsonl line."""

    step: int
    old: int
    new: int
    # "oom", "oom_after_growth", "probe_oom", "headroom", "memory_high" (the monitor) or
    # "oom_other_rank" (data parallel: another process ran out of memory and halved its micro-batch)
    reason: str

    def event(self) -> dict:
        return {"event": "micro_batch", "step": self.step, "old": self.old, "new": self.new, "reason": self.reason}


class MicroBatchController:
    """Decides the micro-batch size; see the module docstring."""

    def __init__(self, global_batch_size: int, micro_batch_size: int, *, enabled: bool = True,
                 max_micro_batch_size: int | None = None, grow_after_steps: int = 50,
                 headroom_fraction: float = 0.3):
        self.global_batch_size = global_batch_size
        self.enabled = enabled
        self.micro_batch_size = largest_divisor(global_batch_size, micro_batch_size)
        # The cap is a divisor too, so growth never lands on a size that does not split the batch.
        self.cap = largest_divisor(global_batch_size, max_micro_batch_size or global_batch_size)
        self.headroom_fraction = headroom_fraction
        self.grow_after_steps = grow_after_steps
        self.headroom_steps = 0
        # Whether the current size was reached by growing (an OOM there means the growth failed).
        self.grown = False

    @classmethod
    def from_config(cls, cfg, world_size: int = 1) -> MicroBatchController:
        """The controller of one process; with several (data parallel) it splits that process's share
        of the global batch, train.global_batch_size / world_size sequences. FSDP over several processes:
        off (an out-of-memory error ends the attempt, see leantune/training/fsdp.py)."""
        a = cfg.adaptive
        sharded = world_size > 1 and cfg.train.distributed.strategy == "fsdp"
        return cls(cfg.train.global_batch_size // world_size, cfg.train.micro_batch_size,
                   enabled=a.enabled and not sharded,
                   max_micro_batch_size=a.max_micro_batch_size, grow_after_steps=a.grow_after_steps,
                   headroom_fraction=a.headroom_fraction)

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // self.micro_batch_size

    def on_oom(self, step: int, *, probe: bool = False) -> Change:
        """Halve the micro-batch after an out-of-memory error; OutOfMemory (a UserError) when it is already 1.

        The loop calls it only when adaptive.enabled; otherwise the error propagates unchanged.
        """
        old = self.micro_batch_size
        if old == 1:
            where = "in the start-up probe (the longest sequences)" if probe else f"at step {step}"
            raise OutOfMemory(
                f"out of memory {where} with a micro-batch of 1 sequence: one sequence does not fit, and "
                "train.micro_batch_size cannot go lower. Lower tokenize.max_seq_len, set "
                "model.gradient_checkpointing=true, use model.method=lora or qlora instead of full, use "
                "model.dtype=bf16 on a GPU that supports it, or choose a smaller model.name_or_path"
            )
        reason = "oom_after_growth" if self.grown else "probe_oom" if probe else "oom"
        self._back_off(old // 2)
        return Change(step, old, self.micro_batch_size, reason)

    def shrink(self, step: int) -> Change | None:
        """Halve the micro-batch before an out-of-memory error, because the resource monitor saw memory
        near the limit (monitor.memory_high_fraction); None when it is 1 already or adaptation is off.
        A size reached by growing backs off as after an out-of-memory error there."""
        if not self.enabled or self.micro_batch_size == 1:
            return None
        old = self.micro_batch_size
        self._back_off(old // 2)
        return Change(step, old, self.micro_batch_size, "memory_high")

    def adopt(self, step: int, micro_batch_size: int) -> Change | None:
        """Take the smaller micro-batch another data-parallel process settled on (the smallest wins, so every
        process splits its share the same way); None when it is not smaller. A size reached by growing
        backs off as the other process's did after its out-of-memory error."""
        if micro_batch_size >= self.micro_batch_size:
            return None
        old = self.micro_batch_size
        self._back_off(micro_batch_size)
        return Change(step, old, self.micro_batch_size, "oom_other_rank")

    def _back_off(self, at_most: int) -> None:
        """The micro-batch becomes the largest divisor of the global batch not above `at_most`. After a size
        reached by growing failed, do not grow again for a while: each failed growth doubles the headroom
        streak the next growth needs."""
        if self.grown:
            self.grow_after_steps *= 2
        self.micro_batch_size = largest_divisor(self.global_batch_size, at_most)
        self.grown = False
        self.headroom_steps = 0

    def after_step(self, step: int, free_fraction: float | None) -> Change | None:
        """Record a finished step's free-memory share (None: no reading); grow after a long enough streak."""
        if not self.enabled:
            return None
        if free_fraction is not None and free_fraction > self.headroom_fraction:
            self.headroom_steps += 1
        else:
            self.headroom_steps = 0
        if self.headroom_steps < self.grow_after_steps or self.micro_batch_size >= self.cap:
            return None
        old = self.micro_batch_size
        new = largest_divisor(self.global_batch_size, min(2 * old, self.cap))
        if new == old:
            # No divisor in (old, 2*old] (global batch 14: 2 -> 7): the next divisor up, at most the cap.
            new = min(d for d in range(old + 1, self.cap + 1) if self.global_batch_size % d == 0)
        self.micro_batch_size = new
        self.headroom_steps = 0
        self.grown = True
        return Change(step, old, self.micro_batch_size, "headroom")

    def state_dict(self) -> dict:
        return {"micro_batch_size": self.micro_batch_size, "headroom_steps": self.headroom_steps,
                "grow_after_steps": self.grow_after_steps, "grown": self.grown}

    def load_state_dict(self, state: dict) -> None:
        # A config that lowers train.micro_batch_size for a resumed attempt (after a crash the
        # controller could not absorb) wins over the saved size; a higher one does not.
        self.micro_batch_size = largest_divisor(self.global_batch_size,
                                                min(state["micro_batch_size"], self.micro_batch_size))
        self.headroom_steps = state["headroom_steps"]
        self.grow_after_steps = state["grow_after_steps"]
        self.grown = state["grown"] and self.micro_batch_size == state["micro_batch_size"]
