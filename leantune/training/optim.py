"""Optimizer, learning-rate schedule and step count for a run, all from RunConfig.train."""

from __future__ import annotations

import math
from fractions import Fraction

from leantune.config import RunConfig
from leantune.errors import DataError


def build_optimizer(cfg: RunConfig, model):
    """train.optimizer over the trainable parameters; weight decay spares biases and norm weights.

    'adamw' is torch's AdamW (the fused kernel on CUDA); 'adamw_8bit' and 'paged_adamw_8bit' are
    bitsandbytes' 8-bit-state AdamW, the paged one spilling its state to host memory under pressure.
    Full fine-tuning with train.full_precision=bf16 or train.optimizer_in_backward gets one such
    optimizer per weight (paramwise.py: bf16 weights rounded with Kahan summation or stochastically,
    the step in backward).
    """
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    t = cfg.train

    def make(groups):
        if t.optimizer == "adamw":
            on_cuda = all(p.device.type == "cuda" for g in groups for p in g["params"])
            return torch.optim.AdamW(groups, lr=t.lr, fused=True if on_cuda else None)
        import bitsandbytes as bnb

        cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[t.optimizer]
        return cls(groups, lr=t.lr)

    # Biases and norm weights are vectors: decaying them towards zero only hurts (nanoGPT's rule).
    if cfg.model.method == "full" and (t.full_precision != "fp32" or t.optimizer_in_backward):
        from leantune.training.paramwise import paramwise_optimizer

        return paramwise_optimizer([(p, t.weight_decay if p.ndim >= 2 else 0.0) for p in trainable], make,
                                   rounding=t.full_precision.removeprefix("bf16-"), seed=t.seed,
                                   in_backward=t.optimizer_in_backward)
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    return make([g for g in ({"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}) if g["params"]])


def lr_multiplier(step: int, warmup_steps: int, total: int, schedule: str) -> float:
    """Share of the peak lr used by optimizer step `step` (0-based).

    Warm-up ramps linearly over the first `warmup_steps` steps, (step+1)/(warmup+1), so no step runs
    at lr 0 and step `warmup_steps` is the first at the peak; then cosine or linear decay reaches 0
    at step `total` (just after the last step), or the lr stays constant.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def build_scheduler(cfg: RunConfig, optimizer, total_steps: int):
    """A LambdaLR applying `lr_multiplier`; call its step() once after each optimizer step."""
    from torch.optim.lr_scheduler import LambdaLR

    t = cfg.train
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, t.warmup_steps, total_steps, t.schedule))


def total_steps(cfg: RunConfig, num_sequences: int) -> int:
    """Optimizer steps of the run: train.max_steps, else ceil(epochs x sequences / global batch)."""
    t = cfg.train
    if t.max_steps is not None:
        return t.max_steps
    if num_sequences <= 0:
        raise DataError("no training sequences to train on; check the data sources and the validation "
                        "rejects, or lower data.val_fraction")
    # Exact arithmetic: 0.1 epochs of 30 sequences in batches of 3 is 1 step, not ceil(1.0000000000000002).
    return math.ceil(Fraction(str(t.epochs)) * num_sequences / t.global_batch_size)
