"""Target-only, chunked output layer and cross-entropy: no [batch, seq, vocab] logits tensor ever exists.

A causal LM's forward applies its output head to every position; the loss then reads only the
positions whose next token is a target (assistant tokens: a tenth of them in the offline default),
through a full fp32 copy of the logits. Here the decoder runs alone (its last hidden states), the
rows whose next token is a target are selected, and the head and the cross-entropy run over those
rows in chunks of at most CHUNK_LOGITS logits (Liger Kernel's fused linear cross-entropy, Apple's
Cut Cross-Entropy). In training the gradients of a chunk (of its hidden rows and of the head's
trainable parameters) are taken right after its loss, inside the forward of one autograd Function,
so a chunk's logits are freed before the next one is computed and backward only scales what was
kept by the incoming gradient (the loss is a sum, so this is exact). That is Liger's order; Cut
Cross-Entropy recomputes each chunk's logits in backward instead, which costs a third head matmul
for the same memory. What stays alive for backward is one hidden-size row per target token.

The head is the model's output embeddings module as it stands, so LoRA on lm_head (peft's wrapper:
base weight plus the LoRA delta, with its dropout) and tied embeddings (the head's weight is the
embedding matrix: its gradient adds up with the embedding's) need nothing special; final-logit
soft-capping (Gemma-2), Cohere's logit_scale and Granite's logits_scaling are applied as the
model's own forward does.

Equal to the full-logits path (`summed_cross_entropy` on model(...).logits): tests/training/test_loss.py
checks the summed loss and every gradient within 1e-5 in fp32, on the tiny model and on SmolLM2.
"""

from __future__ import annotations

import functools

# Logits of one chunk: rows x vocabulary. 2**23 fp32 logits are 32 MiB (plus as much for their
# gradient); SmolLM2's 49,152-token vocabulary makes that 170 rows per chunk.
CHUNK_LOGITS = 2**23


def causal_lm_parts(model):
    """(decoder, head, config) of a causal LM, seen through DDP and peft wrappers.

    The decoder is what turns input ids into the last hidden states (the base model of a
    *ForCausalLM); the head its output embeddings, with LoRA's wrapper when peft adapted it.
    """
    model = getattr(model, "module", model)  # DistributedDataParallel
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return model.get_decoder(), model.get_output_embeddings(), model.config


def compile_decoder(model, mode: str) -> None:
    """train.compile: torch.compile the decoder in place (TorchInductor, dynamic shapes), the module
    `target_cross_entropy` calls; the head and the loss stay eager (they run on target rows only)."""
    causal_lm_parts(model)[0].compile(mode=mode, dynamic=True)


def target_cross_entropy(model, inputs: dict, labels, chunk_logits: int = CHUNK_LOGITS):
    """Sum (not mean) of the per-token cross-entropy over the target tokens of a micro-batch.

    model: a causal LM (possibly in peft and DDP); inputs: its keyword arguments (input_ids,
    attention_mask, position_ids); labels: -100 where a token is not a target. The same number
    as `summed_cross_entropy(model(**inputs).logits, labels)`, and the same gradients.
    """
    import torch
    import torch.nn.functional as F

    if is_target_loss_module(model):  # FSDP's root (fsdp.py): its hooks run around the whole loss
        return model(inputs, labels)
    rows, row_targets, head, logits_of, chunk = target_rows(model, inputs, labels, chunk_logits)
    params = [p for p in head.parameters() if p.requires_grad]
    if torch.is_grad_enabled() and (rows.requires_grad or params):
        return _chunk_function().apply(rows, row_targets, logits_of, chunk, *params)
    total = rows.new_zeros((), dtype=torch.float32)
    for s in range(0, len(rows), chunk):
        total = total + F.cross_entropy(logits_of(rows[s:s + chunk]).float(), row_targets[s:s + chunk],
                                        reduction="sum")
    return total


def target_rows(model, inputs: dict, labels, chunk_logits: int):
    """The decoder's last hidden states at the positions whose next token is a target, in row-major order,
    and those targets; the head, its logit function and the rows of one chunk of at most chunk_logits logits."""
    import torch.nn.functional as F

    decoder, head, config = causal_lm_parts(model)
    hidden = decoder(**inputs, use_cache=False).last_hidden_state
    # Position t predicts token t+1: shift the labels left; the last position predicts nothing.
    # The first token of every document is never a target, so no prediction crosses documents.
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    keep = targets != -100
    return hidden[keep], targets[keep], head, _logit_function(head, config), max(1, chunk_logits // config.vocab_size)


def target_loss_module(model):
    """A module whose forward(inputs, labels) is `target_cross_entropy(model, inputs, labels)`, and
    forward(inputs, labels, compute) is `compute(model, inputs, labels)` (preference.sequence_logps).

    FSDP (fsdp.py) makes it the root, so that the decoder and the head run inside one forward of
    the root; `target_cross_entropy` called with it calls its forward.
    """
    return _target_loss_class()(model)


def is_target_loss_module(model) -> bool:
    """Whether `model` is a `target_loss_module` (FSDP's root): what runs through the model runs through its forward."""
    return isinstance(model, _target_loss_class())


@functools.cache
def _target_loss_class():
    import torch

    class TargetLoss(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, inputs: dict, labels, compute=None):
            return (compute or target_cross_entropy)(self.model, inputs, labels)

    return TargetLoss


def summed_cross_entropy(logits, labels):
    """The full-logits reference: the same sum from a model's [batch, seq, vocab] logits."""
    import torch.nn.functional as F

    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")


def _logit_function(head, config):
    """hidden rows -> logits, with the model's own transform of its head's output."""
    import torch

    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)  # Cohere multiplies
    divide = getattr(config, "logits_scaling", None)  # Granite divides

    def logits_of(rows):
        logits = head(rows)
        if scale is not None:
            logits = logits * scale
        if divide is not None:
            logits = logits / divide
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return logits_of


@functools.cache
def _chunk_function():
    """The autograd Function, defined on first use (torch is imported inside functions only)."""
    import torch
    import torch.nn.functional as F

    class ChunkedCrossEntropy(torch.autograd.Function):
        """Loss of the target rows; gradients of rows and head parameters taken chunk by chunk in forward."""

        @staticmethod
        def forward(ctx, rows, targets, logits_of, chunk, *params):
            total = torch.zeros((), dtype=torch.float32, device=rows.device)
            grad_rows = torch.zeros_like(rows) if rows.requires_grad else None
            grad_params = [torch.zeros_like(p) for p in params]
            for s in range(0, len(rows), chunk):
                part = rows[s:s + chunk].detach().requires_grad_(rows.requires_grad)
                with torch.enable_grad():
                    ce = F.cross_entropy(logits_of(part).float(), targets[s:s + chunk], reduction="sum")
                    wrt = ([part] if rows.requires_grad else []) + list(params)
                    grads = torch.autograd.grad(ce, wrt)
                total += ce.detach()
                if grad_rows is not None:
                    grad_rows[s:s + chunk] = grads[0]
                    grads = grads[1:]
                for acc, g in zip(grad_params, grads, strict=True):
                    acc += g
            ctx.save_for_backward(*([grad_rows] if grad_rows is not None else []), *grad_params)
            ctx.has_rows = grad_rows is not None
            return total

        @staticmethod
        def backward(ctx, grad_out):
            saved = list(ctx.saved_tensors)
            grad_rows = saved.pop(0) * grad_out if ctx.has_rows else None
            return (grad_rows, None, None, None, *(g * grad_out for g in saved))

    return ChunkedCrossEntropy
