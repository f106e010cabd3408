"""train.distributed.strategy: fsdp: the weights, gradients and optimizer state sharded over the ranks (FSDP2).

`shard_model` applies torch's `fully_shard` (FSDP2, torch.distributed.fsdp) to every decoder layer
and then to a root: a `TargetLoss` module around the model, whose forward is the loop's whole loss
(loss.py), so that FSDP's root hooks run around the decoder AND the head. What the root gathers (the
embeddings, the final norm, the head and their LoRA) stays gathered for the whole forward, so the
chunked head and cross-entropy take their gradients with respect to the gathered parameters, and
the root's post-backward reduce-scatters them. Each layer is gathered in its forward and again in
its backward, then freed: a rank holds 1/N of the model plus one layer in full.

The loss stays "sum of the per-token cross-entropy, divided by the target tokens of the WHOLE
global batch" (loop.py): the gradients must be SUMMED over the ranks, not averaged. FSDP2 averages
by default; `set_gradient_divide_factor(1.0)` makes it sum, and gloo refuses the pre-multiplied sum
that it asks for ("Cannot use ReduceOp.PREMUL_SUM with Gloo") unless
`set_force_sum_reduction_for_comms(True)` is set too. Both apply to one FSDP module, not to the ones
inside it, so they are set on every layer and on the root.

Gradient accumulation: LoRA's gradients are small, so they stay unsharded and local until the last
micro-batch of a step, whose backward reduce-scatters their sum (`set_requires_gradient_sync`);
full fine-tuning reduce-scatters after every micro-batch, because its unsharded gradients would be
as large as the model.

CPU offload (train.distributed.cpu_offload): FSDP2's CPUOffloadPolicy on every module sharded, so each
rank's shards of the weights, gradients and optimizer state live in (pinned) host memory, are copied to
the GPU for each gather, and the optimizer steps on the CPU. Run here only on the CPU, where it changes
nothing but the code path (tests/training/test_fsdp.py: the one-process weights within 1e-5).

Mixed precision: on CUDA in bf16 the gathered parameters are bf16 and the gradients are reduced in
fp32 (the sharded master copy keeps the dtype it was built in); on the CPU everything is fp32.

Out of memory: FSDP's collectives run inside forward and backward, so a rank cannot drop a step and
redo it smaller while the others wait inside a gather (the data-parallel loop's in-step halving).
The micro-batch controller is off under FSDP (adaptive.py): the rank that runs out of memory raises,
exits with outcome "oom", torchrun stops the others, and the flow's attempt ladder (attempts.py)
halves train.micro_batch_size and resumes from the last checkpoint. The start-up probe (the longest
sequences) runs first, so a micro-batch that cannot fit ends the attempt in seconds.

Checkpoints: the trained weights (LoRA: the adapter only) and the optimizer state go through
torch.distributed.checkpoint (`save_sharded`, `load_sharded`): every rank writes its shards into
the checkpoint's `sharded/` folder, beside rank 0's files (checkpoint.py). The shards are
re-split on load, so a checkpoint of N ranks resumes on M ranks, on one process included.
The adapter (or the model) is exported gathered on rank 0 (`gather_weights`).

Loading (`loads_on_rank0`, `build_to_shard`): only rank 0 reads the weights, into host memory, whatever the
training device (modeling.build_model(host=True); QLoRA's quantised there by bitsandbytes' CPU kernels). Every
rank, rank 0 included, builds the model on the meta device, shards it, and has its shards filled from rank 0's
host copy (set_model_state_dict with broadcast_from_rank0: torch sends one whole tensor at a time, copied from
rank 0's host to the device, and each rank keeps its shard of it). So a GPU never holds more than its shards
(none with cpu_offload), QLoRA's quantisation states and the one tensor being sent; rank 0's host holds the
whole model until the shards are filled, beside the offloaded shards. QLoRA: the meta-built model is the same
4-bit skeleton (modeling._quantized_skeleton: transformers' quantizer swaps in bitsandbytes' Linear4bit, each
weight a packed parameter of the quantised shape, which FSDP shards like any other since
bnb_4bit_quant_storage is the layer's dtype), and every rank receives, besides the packed shards, every layer's
quantisation state whole onto its device (`_receive_quant_states`: absmax, code, nested constants, shape),
which bitsandbytes keeps on the module, outside the parameters that FSDP shards. bitsandbytes quantises on the
CPU with its reference torch code (backends/default/ops.py: two 4-bit codes a byte, the first in the high
nibble, one absmax per block); that its CUDA kernels write and read the same layout, so that a CPU-quantised
model trains on CUDA as a GPU-quantised one, was not checked here (no GPU). With cpu_offload the shards are
placed in host memory. Run on the CPU with gloo only (tests/training/test_fsdp.py). The preflight
refuses a machine whose host memory cannot hold rank 0's copy and the offloaded shards of its processes, or
whose GPU cannot hold what loading puts there (probe.load_memory_problems).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from leantune.errors import UserError

if TYPE_CHECKING:
    import torch

    from leantune.training.distributed import DistContext

log = logging.getLogger(__name__)

# The folder of a checkpoint that torch.distributed.checkpoint writes (every rank its own files).
SHARDED_DIR = "sharded"


def loads_on_rank0(cfg) -> bool:
    """Whether only rank 0 reads the weights, into host memory, every rank building the model on the meta device
    and receiving its shards from rank 0 in `shard_model` (`build_to_shard`): every FSDP run."""
    return cfg.train.distributed.strategy == "fsdp"


def build_to_shard(cfg, tokenizer, device: torch.device, rank: int):
    """(model, source): the model to shard, on the meta device (modeling.build_model(meta=True)), and on rank 0
    the weights it sends, read into host memory whatever `device` is (build_model(host=True)); None elsewhere.
    Only shards and one whole tensor at a time then reach a GPU, in `shard_model`."""
    import torch

    from leantune.modeling import build_model

    source = build_model(cfg, tokenizer, device, host=True) if rank == 0 else None
    # The meta build's LoRA layers draw their initial values on the CPU too: rank 0's RNG goes on from the host
    # build's draws, as one process's does from its only build (its dropout masks are then the same).
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg, tokenizer, device, meta=True)
    return model, source


def shard_model(model, dist: DistContext, precision: torch.dtype, full: bool, from_rank0: bool = False,
                source=None):
    """Shard `model` over the ranks in place; return the root to call forward on (a `TargetLoss`).

    full: full fine-tuning (gradients reduce-scattered after every micro-batch, see the module docstring).
    from_rank0: every rank's `model` is on the meta device, and rank 0's weights are `source`, in host memory
    (`build_to_shard`; None on the other ranks).
    """
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        FSDPModule,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    from leantune.training.loss import target_loss_module

    if precision == torch.float16:
        raise UserError("train.distributed.strategy: fsdp runs in bf16 or fp32, and model.dtype resolves to fp16 "
                        "here (no bf16 on this GPU); set model.dtype=fp32 or train.distributed.strategy=ddp")
    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if dist.device.type == "cuda" and precision == torch.bfloat16 else MixedPrecisionPolicy())
    # train.distributed.cpu_offload: the shards (and the optimizer step) in host memory, pinned for the copies.
    offload = CPUOffloadPolicy(pin_memory=dist.device.type == "cuda") if dist.cpu_offload else OffloadPolicy()
    layers = decoder_layers(model)
    for module in model.modules():
        # bitsandbytes repacks a 4-bit weight in place for its CPU kernel at the first eval-mode forward on a CPU
        # with AVX512-BF16, and marks the layer's quantisation state so; FSDP gathers the weight afresh for every
        # forward, so the repacked copy would be lost and the mark kept (wrong validation losses, and training
        # after them): the repacking stays off for sharded 4-bit layers.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, offload_policy=offload)
    root = target_loss_module(model)
    fully_shard(root, mesh=mesh, mp_policy=policy, offload_policy=offload)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    root.sync_every_micro_batch = full
    if from_rank0:
        _receive_from_rank0(model, source, dist)
    log.info("fsdp: %d decoder layers and the root sharded over %d ranks (%s%s)", len(layers), dist.world_size,
             "bf16 parameters, fp32 gradient reduction" if policy.param_dtype is not None else "fp32",
             "; shards in host memory" if dist.cpu_offload else "")
    return root


def _named_tensors(model):
    """(name, tensor) of the model's parameters and persistent buffers, as its state dict names them."""
    yield from model.named_parameters()
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                yield f"{module_name}.{name}" if module_name else name, buffer


def _receive_from_rank0(model, source, dist: DistContext) -> None:
    """Every rank's shards of the weights of rank 0's `source` (None on the others), the buffers, which the state
    dict leaves out (the rotary frequencies), and QLoRA's quantisation states (`_receive_quant_states`), into the
    sharded `model`, on the meta device until here."""
    import torch
    import torch.distributed as tdist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # With cpu_offload the shards live on the host (FSDP pins them there); buffers are never offloaded.
    model.to_empty(device=torch.device("cpu") if dist.cpu_offload else dist.device)
    if dist.cpu_offload:
        for module in model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                setattr(module, name, buffer.to(dist.device))
    # Rank 0's parameters and persistent buffers (not the quantisation states bitsandbytes adds to a state dict,
    # sent on their own). torch sends one whole tensor at a time, copied from the host to the device, and each
    # rank keeps its shard of it (_state_dict_utils._broadcast_state_dict).
    weights = dict(_named_tensors(source)) if source is not None else {}
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    own = dict(source.named_buffers()) if source is not None else {}
    for name, buffer in model.named_buffers():
        if source is not None:
            buffer.copy_(own[name])
        tdist.broadcast(buffer, src=0)
    _receive_quant_states(model, source, dist)
    log.info("fsdp: rank %d %s", dist.rank, "filled its shards from the weights it read into host memory"
             if source is not None else "received its shards of rank 0's weights")


def _receive_quant_states(model, source, dist: DistContext) -> None:
    """The quantisation state of every 4-bit linear (QLoRA) of rank 0's `source`, whole, on every rank's device:
    bitsandbytes keeps it beside the parameter (Linear4bit.quant_state, which its forward gives the gathered weight
    back), so neither sharding nor the state dict carries it. Sent as QuantState.as_dict(packed=True): tensors
    only (absmax, the code, the nested ones, the rest packed), whose shapes and dtypes go first."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "is_loaded_in_4bit", False):  # transformers' mark of a 4-bit model
        return
    import bitsandbytes as bnb
    import torch
    import torch.distributed as tdist
    from bitsandbytes.functional import QuantState

    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    if not modules:
        return
    states = ({name: m.quant_state.as_dict(packed=True) for name, m in source.named_modules()
               if isinstance(m, bnb.nn.Linear4bit)} if source is not None else {})
    layout = [{name: {k: (t.shape, t.dtype) for k, t in state.items()} for name, state in states.items()}]
    tdist.broadcast_object_list(layout, src=0)
    for name, module in modules:
        received = {}
        for key, (shape, dtype) in layout[0][name].items():
            tensor = (states[name][key].to(dist.device) if source is not None
                      else torch.empty(shape, dtype=dtype, device=dist.device))
            tdist.broadcast(tensor, src=0)
            received[key] = tensor
        module.quant_state = QuantState.from_dict(received, device=dist.device)


def decoder_layers(model) -> list:
    """The model's decoder layers: the modules of the classes transformers never splits (`_no_split_modules`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise UserError(f"train.distributed.strategy: fsdp finds no decoder layers in {type(base).__name__} "
                        "(its _no_split_modules names none); use train.distributed.strategy=ddp")
    return layers


def before_micro_batch(root, k: int, accumulation_steps: int) -> None:
    """Whether micro-batch k's backward reduce-scatters: the last one always, every one for full fine-tuning."""
    root.set_requires_gradient_sync(root.sync_every_micro_batch or k == accumulation_steps - 1)


# ---------------------------------------------------------------------------------- checkpoints


def _state_options(full: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # LoRA: only the adapter (the frozen base is rebuilt from the model, as in every checkpoint), which is
    # also why loading is not strict: the frozen weights are not in it (dcp.load checks the trained ones).
    return StateDictOptions(ignore_frozen_params=True, full_state_dict=full, cpu_offload=full, strict=False)


def _states(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model, options=_state_options()),
            "optimizer": get_optimizer_state_dict(model, optimizer, options=_state_options())}


def save_sharded(model, optimizer, directory: Path) -> None:
    """Every rank writes its shards of the trained weights and the optimizer state into `directory`."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_states(model, optimizer), checkpoint_id=str(directory))


def load_sharded(model, optimizer, directory: Path) -> None:
    """Restore what `save_sharded` wrote, re-split for this run's ranks (one process included)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    states = _states(model, optimizer)
    try:
        dcp.load(states, checkpoint_id=str(directory), no_dist=not dist.is_initialized())
    except Exception as e:  # a checkpoint of another model.method or LoRA layout: its keys do not match
        if "Missing key" in str(e) or "Size mismatch" in str(e):
            raise UserError(f"checkpoint {directory.parent}: its sharded weights do not match the model being "
                            "trained; resume with the model, model.method and lora settings the run was started "
                            "with") from None
        raise
    set_model_state_dict(model, states["model"], options=_state_options())
    set_optimizer_state_dict(model, optimizer, states["optimizer"], options=_state_options())


def gather_weights(model) -> dict:
    """The trained weights gathered on rank 0 (on the CPU) for the PEFT-format export; {} on the others.

    Every rank must call it (all-gathers). LoRA: the adapter; full fine-tuning: every weight.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_state_options(full=True))
