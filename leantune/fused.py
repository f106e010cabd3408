"""Fused layers that keep less for backward: LoRA linear layers, and SwiGLU MLPs.

**LoRA linear layers.** peft computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` from
separate modules, so autograd keeps, for every adapted layer, a dropped-out copy of its input and
the dropout's mask (full-size fp32 tensors on the CPU), although the frozen base matmul needs
neither; q, k and v (and gate and up) read the same input and keep three (two) such pairs. Here one
autograd Function per layer keeps the input once (q, k and v share it), the rank-r intermediate and
the dropout's keep mask as bool (a quarter of an fp32 copy's bytes). The mask is drawn from torch's
default generator, with a cheaper draw than torch's dropout: 16 random bits per element,
the drop probability rounded to a multiple of 1/65536 and the kept values scaled by that rounded
probability, so the expected output is unchanged.

**SwiGLU MLPs** (Llama, Mistral, Qwen2, SmolLM2...: `down(silu(gate(x)) * up(x))`): autograd keeps
gate(x), silu(gate(x)) and up(x) for the product's backward, and down's input (the product) for
LoRA's. Here the MLP keeps gate(x) and up(x) only, and backward recomputes the silu and the product
(elementwise, cheap beside the matmuls): Liger Kernel's SwiGLU, and with LoRA on down_proj, its
input too.

**Precision.** The adapter's matmuls run in the compute dtype: autocast's (bf16 or fp16) where it is
on, as peft's do under the training loop's autocast, else the wider of the input's and the adapter's
dtype (peft casts the input to the adapter's). What a layer keeps for backward (its input, the rank-r
intermediate) is in that dtype, and backward multiplies in it too, with no fp32 copy of the input or of
the incoming gradient; the adapter weights' gradients are cast to their own dtype (fp32) before they
are accumulated, as autocast's do.

Gradients equal peft's and transformers' within float rounding for the same dropout mask
(tests/test_fused.py: fp32, and bf16 under autocast). A layer whose base is not a plain nn.Linear (bitsandbytes' 4-bit layers,
GPT-2's Conv1D), that uses DoRA or a LoRA bias, or that runs merged, disabled, with several adapters
or without gradients keeps peft's own forward (down_proj then gets the product as its input). The
adapters stay peft's parameters: saving, loading and merging are unchanged.
"""

from __future__ import annotations

import functools
import types

RANDOM_BITS = 16  # per element of a dropout mask


def fuse_lora(model) -> int:
    """Give every eligible peft LoRA linear layer of `model` the fused forward; returns how many."""
    import torch
    from peft.tuners.lora import Linear as LoraLinear

    fused = 0
    for module in model.modules():
        if (isinstance(module, LoraLinear) and type(module.base_layer) is torch.nn.Linear
                and not module.fan_in_fan_out and not module.lora_variant
                and not any(b.bias is not None for b in module.lora_B.values())):
            module.forward = types.MethodType(_lora_forward_method, module)
            fused += 1
    return fused


def fuse_swiglu(model) -> int:
    """Give every SwiGLU MLP of `model` (gate_proj, up_proj, down_proj and a SiLU act_fn) the fused
    forward; returns how many."""
    import torch
    from transformers.activations import SiLUActivation

    fused = 0
    for module in model.modules():
        if (all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj"))
                and isinstance(getattr(module, "act_fn", None), (SiLUActivation, torch.nn.SiLU))):
            module.forward = types.MethodType(_swiglu_forward_method, module)
            fused += 1
    return fused


def _lora_arguments(layer):
    """(base weight, base bias, A, B, scaling, dropout p) of a fused LoRA layer that takes the fused
    path now, else None."""
    import torch

    if getattr(layer.forward, "__func__", None) is not _lora_forward_method:
        return None
    adapters, base = layer.active_adapters, layer.base_layer
    if (len(adapters) != 1 or adapters[0] not in layer.lora_A or layer.disable_adapters or layer.merged
            or not torch.is_grad_enabled() or base.weight.requires_grad
            or (base.bias is not None and base.bias.requires_grad)):
        return None
    adapter = adapters[0]
    dropout = layer.lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    return (base.weight, base.bias, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight,
            layer.scaling[adapter], p)


def _compute_dtype(x, lora_a):
    """The dtype of the adapter's matmuls and of what it keeps: autocast's where it is on, else the wider of
    x's and the adapter's."""
    import torch

    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, lora_a.dtype)


def _lora_forward_method(self, x, *args, **kwargs):
    arguments = None if args or kwargs else _lora_arguments(self)
    if arguments is None:
        return type(self).forward(self, x, *args, **kwargs)
    return _functions()[0].apply(x, *arguments)


def _swiglu_forward_method(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)
    lora = _lora_arguments(self.down_proj)
    if lora is not None:
        return _functions()[2].apply(gate, up, *lora)
    return self.down_proj(_functions()[1].apply(gate, up))


def _keep_mask(x, p_int: int, generator=None):
    """Dropout's keep mask for x: False where the element's 16-bit draw falls under p_int. The draw
    comes from `generator`, torch's default one for x's device if None."""
    import torch

    # Four 16-bit draws from each 64-bit one: a quarter of the generator's work of one draw per element.
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device)
    draws = words.random_(-2**63, None, generator=generator).view(torch.int16)[:x.numel()].view(x.shape)
    return draws >= p_int - 2**15


def _apply_mask(x, keep):
    """x with the dropped elements zeroed (x itself without a mask)."""
    import torch

    # A product with the mask's bytes as uint8 takes a quarter (warm cache) to a half (cold) of
    # torch.where's time on the CPU.
    return x if keep is None else x * keep.view(torch.uint8)


def _lora_forward(x, weight, bias, lora_a, lora_b, scaling, p):
    """(output, x in the compute dtype, rank-r intermediate, dropout keep mask or None, dropout scale) of
    base(x) + (dropout(x) @ A.T @ B.T) * scaling; the adapter's part runs in `_compute_dtype`."""
    import torch.nn.functional as F

    # The base reads x as it comes; the adapter reads (and backward keeps) x in the compute dtype: no copy
    # where x has it already (bf16 under bf16 autocast).
    base_x, x = x, x.to(_compute_dtype(x, lora_a))

    p_int = round(p * 2**RANDOM_BITS)
    keep = scale = None
    if p_int:
        # From torch's default generator, so a run stays reproducible from train.seed, and activation
        # checkpointing (which restores the generator) recomputes the same mask. The mask is kept for
        # backward as bool (a quarter of x's fp32 bytes): drawing it again cost more time.
        keep = _keep_mask(x, p_int)
        scale = 2**RANDOM_BITS / (2**RANDOM_BITS - p_int)  # the kept elements' 1 / (1 - p)
    dropped = _apply_mask(x, keep)
    low_rank = F.linear(dropped, lora_a.to(x.dtype))
    del dropped
    if scale is not None:  # applied to the smallest tensor
        low_rank = low_rank * scale
    out = F.linear(base_x, weight, bias)
    lora_out = F.linear(low_rank, lora_b.to(x.dtype))
    if lora_out.dtype == out.dtype:  # one fused multiply-add instead of a scaled copy and a sum
        out = out.add_(lora_out, alpha=scaling)
    else:
        out = out + lora_out.to(out.dtype) * scaling
    return out, x, low_rank, keep, scale


def _lora_backward(grad_out, x, weight, lora_a, lora_b, low_rank, scaling, keep, scale, needs):
    """(grad x, grad A, grad B) of `_lora_forward`, each None where `needs` (x, A, B) says so. The adapter's
    matmuls run in the dtype forward kept the intermediate in; A's and B's gradients come out in theirs."""

    dtype = low_rank.dtype
    x, grad_out_lora = x.to(dtype), grad_out.to(dtype)  # no copies where they have it (bf16 autocast)
    grad_low = grad_out_lora.matmul(lora_b.to(dtype)) * (scaling if scale is None else scaling * scale)
    grad_x = grad_a = grad_b = None
    if needs[2]:
        grad_b = grad_out_lora.flatten(0, -2).T.matmul(low_rank.flatten(0, -2)).to(lora_b.dtype) * scaling
    if needs[1]:
        dropped = _apply_mask(x, keep)
        grad_a = grad_low.flatten(0, -2).T.matmul(dropped.flatten(0, -2)).to(lora_a.dtype)
        del dropped
    if needs[0]:
        # d dropout(x) / dx is the same mask and scale (the scale is in grad_low already).
        grad_x = _apply_mask(grad_low.matmul(lora_a.to(dtype)), keep)
        grad_base = grad_out.to(weight.dtype).matmul(weight)
        if grad_x.dtype == grad_base.dtype == x.dtype:
            grad_x = grad_x.add_(grad_base)
        else:
            grad_x = grad_base.to(x.dtype) + grad_x.to(x.dtype)
    return grad_x, grad_a, grad_b


def _swiglu_backward(grad_h, gate, up, silu=None):
    """(grad gate, grad up) of h = silu(gate) * up; silu(gate) is recomputed unless given."""
    import torch
    import torch.nn.functional as F

    if silu is None:
        silu = F.silu(gate)
    # torch's silu_backward is grad * silu'(gate) in one pass (memory-bound elementwise work is what
    # the recompute costs on a CPU).
    return torch.ops.aten.silu_backward(grad_h * up, gate), grad_h * silu


@functools.cache
def _functions():
    """The autograd Functions (LoRA linear, SwiGLU, SwiGLU into a LoRA down_proj), defined on first
    use (torch is imported inside functions only)."""
    import torch
    import torch.nn.functional as F

    class FusedLoraLinear(torch.autograd.Function):
        """base(x) + (dropout(x) @ A.T @ B.T) * scaling, with a frozen base weight and bias."""

        @staticmethod
        def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, p):
            out, x, low_rank, keep, ctx.dropout_scale = _lora_forward(x, weight, bias, lora_a, lora_b, scaling, p)
            ctx.save_for_backward(x, weight, lora_a, lora_b, low_rank, keep)
            ctx.scaling = scaling
            return out

        @staticmethod
        def backward(ctx, grad_out):
            x, weight, lora_a, lora_b, low_rank, keep = ctx.saved_tensors
            needs = ctx.needs_input_grad
            grads = _lora_backward(grad_out, x, weight, lora_a, lora_b, low_rank, ctx.scaling, keep,
                                   ctx.dropout_scale, (needs[0], needs[3], needs[4]))
            return grads[0], None, None, grads[1], grads[2], None, None

    class SwiGLU(torch.autograd.Function):
        """silu(gate) * up, keeping gate and up only."""

        @staticmethod
        def forward(ctx, gate, up):
            ctx.save_for_backward(gate, up)
            return F.silu(gate) * up

        @staticmethod
        def backward(ctx, grad_h):
            return _swiglu_backward(grad_h, *ctx.saved_tensors)

    class SwiGLULoraDown(torch.autograd.Function):
        """down(silu(gate) * up) with LoRA on down, keeping gate, up and the rank-r intermediate only."""

        @staticmethod
        def forward(ctx, gate, up, weight, bias, lora_a, lora_b, scaling, p):
            h = F.silu(gate) * up
            out, _, low_rank, keep, ctx.dropout_scale = _lora_forward(h, weight, bias, lora_a, lora_b, scaling, p)
            ctx.save_for_backward(gate, up, weight, lora_a, lora_b, low_rank, keep)
            ctx.scaling = scaling
            return out

        @staticmethod
        def backward(ctx, grad_out):
            gate, up, weight, lora_a, lora_b, low_rank, keep = ctx.saved_tensors
            needs = ctx.needs_input_grad
            silu = F.silu(gate)
            h = silu * up
            grad_h, grad_a, grad_b = _lora_backward(grad_out, h, weight, lora_a, lora_b, low_rank, ctx.scaling,
                                                    keep, ctx.dropout_scale, (needs[0] or needs[1], needs[4], needs[5]))
            del h
            grad_gate, grad_up = _swiglu_backward(grad_h, gate, up, silu) if grad_h is not None else (None, None)
            return grad_gate, grad_up, None, None, grad_a, grad_b, None, None

    return FusedLoraLinear, SwiGLU, SwiGLULoraDown
