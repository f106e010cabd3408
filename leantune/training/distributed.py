"""Data-parallel glue for the training loop under torchrun: process group, shares, agreement, gradient sum.

torchrun (`python -m torch.distributed.run`, see launch.py) starts one process per GPU with WORLD_SIZE,
RANK and LOCAL_RANK in the environment; `setup` joins them into a torch.distributed process group
(nccl on CUDA, gloo on the CPU) and puts each rank on cuda:LOCAL_RANK. Without WORLD_SIZE above 1
everything here is a no-op, so the loop has one code path.

How a step runs on N ranks (loop.py): every rank computes the same global batch indices and takes a
disjoint contiguous share of them (`share`); its micro-batches run forward and backward under DDP's
`no_sync`, so no collective happens inside forward or backward; then the ranks agree on the attempt
(`min_all`: an out-of-memory flag and the micro-batch, the smallest wins) and only after a successful
agreement sum their gradients (`sum_gradients`). The loss is divided by the target tokens of the WHOLE
global batch on every rank, so the summed gradient is the single-process one.

Why not let DDP all-reduce in the last micro-batch's backward: a rank that runs out of memory in a
forward would then never reach the all-reduce its peers wait in (a deadlock until the process group
times out). With the agreement first, every rank reaches every collective whatever happened in its
forward or backward; a rank that fails otherwise (a crash, a kill) exits, and torchrun stops the others.
DDP is still what wraps the model: it checks that the replicas have the same parameters and broadcasts
rank 0's weights at the start.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from leantune.config import RunConfig
from leantune.errors import UserError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Elements per all-reduce of the gradients: buckets bound the extra memory of the flattened copy.
BUCKET_ELEMENTS = 1 << 25


@dataclass
class DistContext:
    """This process's place in the data-parallel group (world_size 1: a single process)."""

    device: torch.device
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    # This machine's processes and its place among the machines (torchrun's LOCAL_WORLD_SIZE, GROUP_RANK).
    local_world_size: int = 1
    node_rank: int = 0
    backend: str | None = None
    owns_group: bool = False
    # train.distributed.strategy fsdp with several ranks: the model is sharded (fsdp.py), `root` is what
    # forward runs on, and FSDP reduce-scatters the gradients inside backward.
    sharded: bool = False
    cpu_offload: bool = False  # train.distributed.cpu_offload: the shards in host memory (fsdp.py)
    root: Any = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def nodes(self) -> int:
        """The machines the run spans."""
        return self.world_size // self.local_world_size

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes metrics, checkpoints, the adapter and training.json."""
        return self.rank == 0

    @property
    def _comm_device(self):
        # nccl reduces CUDA tensors only; gloo reduces CPU tensors.
        import torch

        return self.device if self.backend == "nccl" else torch.device("cpu")

    # ------------------------------------------------------------------------------ the data

    def share(self, n: int) -> slice:
        """This rank's contiguous, disjoint slice of a global batch of n sequences (n divisible by world_size)."""
        per_rank = n // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    # ------------------------------------------------------------------------------ collectives

    def min_all(self, values: Sequence[float]) -> list[float]:
        """Element-wise minimum of `values` over every rank (float64, so integers stay exact)."""
        if not self.enabled:
            return [float(v) for v in values]
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t.tolist()

    def gather_all(self, values: Sequence[float]) -> list[list[float]]:
        """`values` of every rank, by rank (a per-rank reading such as peak memory)."""
        if not self.enabled:
            return [[float(v) for v in values]]
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t)
        return [o.tolist() for o in out]

    def sum_all(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of `values` over every rank (float64)."""
        if not self.enabled:
            return [float(v) for v in values]
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (picklable; for small things like a checkpoint path)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_to_main(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` (by rank) on rank 0, None elsewhere (per-rank RNG states for a checkpoint)."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def sum_gradients(self, params: Sequence[torch.nn.Parameter], *extra: torch.Tensor) -> None:
        """Sum the gradients of `params` (and the `extra` tensors, in place) over every rank.

        Called after the ranks agreed that the step's attempt succeeded everywhere. The tensors
        are flattened into buckets so that a step costs a few all-reduces, not one per parameter.
        """
        if not self.enabled:
            return
        import torch
        import torch.distributed as dist

        # FSDP: the weights' gradients are summed already (reduce-scattered in backward); only `extra` is left.
        tensors = [p.grad for p in params if p.grad is not None and not self.sharded] + list(extra)
        bucket: list[torch.Tensor] = []
        size = 0
        for i, tensor in enumerate(tensors):
            bucket.append(tensor)
            size += tensor.numel()
            if size >= BUCKET_ELEMENTS or i == len(tensors) - 1:
                by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
                for b in bucket:
                    by_dtype.setdefault(b.dtype, []).append(b)
                for group in by_dtype.values():
                    flat = torch.cat([g.reshape(-1) for g in group]).to(self._comm_device)
                    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                    start = 0
                    for g in group:
                        g.copy_(flat[start:start + g.numel()].view_as(g))
                        start += g.numel()
                bucket, size = [], 0

    # ------------------------------------------------------------------------------ the model

    def shard(self, model, precision: torch.dtype, full: bool, from_rank0: bool = False, source=None):
        """FSDP: shard `model` in place (before the optimizer takes its parameters) and return the root to
        call forward on; None without sharding. from_rank0: every rank's model is on the meta device and
        receives the weights of rank 0's `source` (fsdp.build_to_shard)."""
        if self.sharded:
            from leantune.training.fsdp import shard_model

            self.root = shard_model(model, self, precision, full, from_rank0, source)
        return self.root

    def before_micro_batch(self, k: int, accumulation_steps: int) -> None:
        """FSDP: whether micro-batch k's backward reduce-scatters the gradients (fsdp.py); nothing otherwise."""
        if self.root is not None:
            from leantune.training.fsdp import before_micro_batch

            before_micro_batch(self.root, k, accumulation_steps)

    def missing_forwards(self, total: int, batch_size: int) -> int:
        """FSDP gathers weights in every forward, so every rank must run as many: the forwards this rank is
        short of the busiest one when the ranks evaluate every world_size-th of `total` sequences."""
        if not self.sharded:
            return 0
        mine = len(range(self.rank, total, self.world_size))
        return math.ceil(math.ceil(total / self.world_size) / batch_size) - math.ceil(mine / batch_size)

    def gather_weights(self, model) -> dict | None:
        """FSDP: the trained weights gathered on rank 0 for the export (every rank calls it); None otherwise."""
        if not self.sharded:
            return None
        from leantune.training.fsdp import gather_weights

        return gather_weights(model)

    def wrap(self, model):
        """The model to call forward on: DDP around it with several ranks, the model itself otherwise.

        DDP's construction broadcasts rank 0's parameters and buffers and checks every rank has the same
        ones. forward_sync_buffers=False: DDP would otherwise broadcast buffers in every forward, a
        collective that a rank redoing a step after out-of-memory would not be in step with.
        """
        if self.root is not None:
            return self.root
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)

    @staticmethod
    def no_sync(forward_model) -> contextlib.AbstractContextManager:
        """DDP's no_sync (gradients stay local until `sum_gradients`); nothing for a plain model."""
        return forward_model.no_sync() if hasattr(forward_model, "no_sync") else contextlib.nullcontext()


def world_from_env() -> tuple[int, int, int]:
    """(world_size, rank, local_rank) as torchrun sets them; (1, 0, 0) outside torchrun."""
    return (int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
            int(os.environ.get("LOCAL_RANK", "0")))


def resolve_backend(cfg: RunConfig, device: torch.device) -> str:
    """train.distributed.backend: 'auto' is nccl on CUDA and gloo on the CPU."""
    backend = cfg.train.distributed.backend
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise UserError("train.distributed.backend: nccl needs CUDA devices but training runs on the CPU; "
                        "set train.distributed.backend=gloo (or auto)")
    return backend


def setup(cfg: RunConfig, device: torch.device) -> DistContext:
    """Join the torchrun process group when WORLD_SIZE is above 1; the device becomes cuda:LOCAL_RANK on GPUs."""
    world_size, rank, local_rank = world_from_env()
    if world_size == 1:
        return DistContext(device=device)
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            raise UserError(f"train.distributed.nproc_per_node: process {local_rank} has no GPU of its own "
                            f"({visible} visible); set train.distributed.nproc_per_node to at most {visible}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = resolve_backend(cfg, device)
    if cfg.train.global_batch_size % world_size:
        raise UserError(f"train.global_batch_size: {cfg.train.global_batch_size} does not split evenly over "
                        f"{world_size} training processes; use a multiple of {world_size}")
    owns = not dist.is_initialized()
    if owns:
        # A collective that waits longer fails the run (train.distributed.collective_timeout_s), not stalls it.
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None,
                                timeout=timedelta(seconds=cfg.train.distributed.collective_timeout_s))
    log.info("data parallel: rank %d of %d (local rank %d) on %s, backend %s", rank, world_size, local_rank,
             device, backend)
    return DistContext(device=device, world_size=world_size, rank=rank, local_rank=local_rank, backend=backend,
                       local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
                       node_rank=int(os.environ.get("GROUP_RANK", "0")),
                       owns_group=owns, sharded=cfg.train.distributed.strategy == "fsdp",
                       cpu_offload=cfg.train.distributed.cpu_offload)


def teardown(ctx: DistContext) -> None:
    """Leave the process group `setup` created (no-op for a single process)."""
    if ctx.owns_group:
        import torch.distributed as dist

        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(cfg: RunConfig, device: torch.device) -> Iterator[DistContext]:
    """`setup` ... `teardown`, also when training fails."""
    ctx = setup(cfg, device)
    try:
        yield ctx
    finally:
        teardown(ctx)
