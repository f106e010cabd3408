"""The fused layers (leantune/fused.py): LoRA linear layers and SwiGLU MLPs give peft's and
transformers' loss and gradients (for the same dropout mask), keep less for backward, and leave
peft's other paths alone."""

from __future__ import annotations

import pytest
import torch
from tiny_model import TINY, Tokenizer, batch

from leantune.config import load_config
from leantune.fused import RANDOM_BITS, _keep_mask, fuse_lora, fuse_swiglu
from leantune.modeling import build_model
from leantune.training.loss import target_cross_entropy


def tiny_model(*overrides):
    cfg = load_config(overrides=[*TINY, *overrides])
    return build_model(cfg, Tokenizer(), torch.device("cpu"))


def lora_layers(model):
    from peft.tuners.lora import Linear

    return [m for m in model.modules() if isinstance(m, Linear)]


class FusedLayerDropout(torch.nn.Module):
    """peft's dropout module replaced by the fused layer's own draw (the 16-bit keep mask from torch's
    default generator), so that peft's forward sees the mask the fused forward drew."""

    def __init__(self, p: float):
        super().__init__()
        self.p_int = round(p * 2**RANDOM_BITS)

    def forward(self, x):
        return torch.where(_keep_mask(x, self.p_int), x, 0.0) * (2**RANDOM_BITS / (2**RANDOM_BITS - self.p_int))


def loss_and_grads(model, inputs, labels, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = target_cross_entropy(model, inputs, labels)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def unfuse(model, dropout: float):
    """The same model on peft's and transformers' own forwards (with the fused layer's dropout draw
    where dropout > 0)."""
    for layer in lora_layers(model):
        del layer.forward  # the instance attribute fuse_lora set; the class's (peft's) forward is back
        if dropout:
            layer.lora_dropout["default"] = FusedLayerDropout(dropout)
    for mlp in mlps(model):
        del mlp.forward


def mlps(model):
    return [m for m in model.modules() if type(m).__name__ == "LlamaMLP"]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_gives_peft_loss_and_gradients(dropout):
    model = tiny_model(f"lora.dropout={dropout}", "lora.target_modules=all-linear")
    layers = lora_layers(model)
    # build_model fused every adapted linear layer (q, k, v, o, gate, up, down of 2 layers) and both MLPs.
    assert len(layers) == 14 and all("forward" in vars(layer) for layer in layers)
    assert len(mlps(model)) == 2 and all("forward" in vars(mlp) for mlp in mlps(model))
    # B starts at zero, which would hide every error in the adapter path: give it values.
    with torch.no_grad():
        for layer in layers:
            layer.lora_B["default"].weight.normal_(0, 0.05)
    inputs, labels = batch(packed=False)
    fused_loss, fused = loss_and_grads(model, inputs, labels)
    unfuse(model, dropout)
    peft_loss, ref = loss_and_grads(model, inputs, labels)
    assert fused_loss == pytest.approx(peft_loss, rel=1e-6)
    assert fused.keys() == ref.keys() and len(ref) == 28
    for name in ref:
        scale = ref[name].abs().max()
        assert scale > 0, name
        assert torch.allclose(fused[name], ref[name], atol=1e-5 * scale, rtol=0), name
    if dropout:
        # The dropout is live: another seed draws other masks and gives another loss.
        assert loss_and_grads(model, inputs, labels, seed=1)[0] != pytest.approx(peft_loss, rel=1e-6)


def test_dropout_mask_has_the_rounded_rate_and_keeps_the_mean():
    x = torch.ones(1000, 1000)
    p_int = round(0.1 * 2**RANDOM_BITS)
    keep = _keep_mask(x, p_int, torch.Generator().manual_seed(7))
    assert keep.dtype == torch.bool and keep.shape == x.shape
    assert torch.equal(keep, _keep_mask(x, p_int, torch.Generator().manual_seed(7)))
    assert not torch.equal(keep, _keep_mask(x, p_int, torch.Generator().manual_seed(8)))
    # 1e6 draws: the kept share is 1 - p within 5 standard deviations (3e-4 each).
    assert float(keep.float().mean()) == pytest.approx(1 - p_int / 2**RANDOM_BITS, abs=1.5e-3)
    dropped_mean = float((torch.where(keep, x, 0.0) * (2**RANDOM_BITS / (2**RANDOM_BITS - p_int))).mean())
    assert dropped_mean == pytest.approx(1.0, abs=2e-3)


def saved_activation_bytes(model, inputs, labels) -> int:
    """Bytes of the tensors autograd keeps for backward, other than the model's own parameters."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        target_cross_entropy(model, inputs, labels)
    return sum(storages.values())


def test_fused_layers_keep_no_dropout_copies_silu_or_product_for_backward():
    model = tiny_model("lora.dropout=0.1", "lora.target_modules=all-linear")
    inputs, labels = batch(packed=False)
    fused = saved_activation_bytes(model, inputs, labels)
    unfuse(model, 0.0)
    for layer in lora_layers(model):
        layer.lora_dropout["default"] = torch.nn.Dropout(0.1)
    peft = saved_activation_bytes(model, inputs, labels)
    # Per layer, over 3 x 40 padded positions in fp32 (hidden 64, intermediate 128): peft keeps a
    # dropped-out copy of the input and a float mask for each of its 7 adapters (inputs 5 x 64 + 128
    # wide) and the MLP's SiLU; the fused layers keep at most the attention and MLP inputs and o_proj's,
    # and a bool mask (a quarter of an fp32 copy) for each adapter.
    position = 3 * 40 * 4
    dropped = 2 * (5 * 64 + 128) * position
    assert peft - fused >= 2 * (dropped + 128 * position - (3 * 64) * position) - dropped // 4
    assert fused < 0.6 * peft


def test_fused_lora_recomputes_the_same_dropout_under_checkpointing():
    inputs, labels = batch(packed=False)
    plain = tiny_model("lora.dropout=0.1")
    checkpointed = tiny_model("lora.dropout=0.1", "model.gradient_checkpointing=true")
    checkpointed.load_state_dict(plain.state_dict())
    loss, grads = loss_and_grads(plain, inputs, labels)
    checkpointed_loss, checkpointed_grads = loss_and_grads(checkpointed, inputs, labels)
    assert checkpointed_loss == pytest.approx(loss, rel=1e-6)
    for name, g in grads.items():
        assert torch.allclose(checkpointed_grads[name], g, atol=1e-6 * g.abs().max()), name


def test_disabled_merged_and_eval_paths_are_peft_own():
    model = tiny_model("lora.dropout=0.1")
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.05)
    inputs, _ = batch(packed=False)
    model.eval()
    with torch.no_grad():
        tuned = model(**inputs).logits
        with model.disable_adapter():
            base = model(**inputs).logits
        model.merge_adapter()
        merged = model(**inputs).logits
        model.unmerge_adapter()
    assert not torch.allclose(tuned, base, atol=1e-4)
    assert torch.allclose(merged, tuned, atol=1e-5)
    with torch.no_grad(), model.disable_adapter():
        base_again = model(**inputs).logits
    assert torch.allclose(base, base_again, atol=1e-5)  # unmerging subtracts the delta again: rounding


def test_layers_peft_computes_differently_are_not_fused():
    from peft import LoraConfig, get_peft_model

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.plain, self.dora = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    assert fuse_lora(get_peft_model(Two(), LoraConfig(r=2, target_modules=["plain"]))) == 1
    dora = get_peft_model(Two(), LoraConfig(r=2, target_modules=["plain", "dora"], use_dora=True))
    assert fuse_lora(dora) == 0


@pytest.mark.parametrize("method", ["full", "lora-qv"])
def test_fused_swiglu_gives_transformers_gradients(method):
    overrides = ["model.method=full"] if method == "full" else ["lora.target_modules=[q_proj,v_proj]"]
    model = tiny_model(*overrides)
    # down_proj is a plain linear here (trained in full, frozen under LoRA on q/v): the SwiGLU alone is fused.
    assert fuse_swiglu(model) == 2 and len(lora_layers(model)) == (0 if method == "full" else 4)
    if method != "full":
        with torch.no_grad():
            for layer in lora_layers(model):
                layer.lora_B["default"].weight.normal_(0, 0.05)
    inputs, labels = batch(packed=False)
    fused_loss, fused = loss_and_grads(model, inputs, labels)
    unfuse(model, 0.0)
    ref_loss, ref = loss_and_grads(model, inputs, labels)
    assert fused_loss == pytest.approx(ref_loss, rel=1e-6)
    for name in ref:
        torch.testing.assert_close(fused[name], ref[name], rtol=1e-5, atol=1e-5 * ref[name].abs().max(), msg=name)


def bf16_loss_and_grads(model, inputs, labels, seed=0):
    """`loss_and_grads` as the training loop runs bf16: forward under autocast, backward after it."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = target_cross_entropy(model, inputs, labels)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def backward_matmul_dtypes(model, inputs, labels) -> set:
    """The dtypes of the operands of every matmul that backward runs (forward under bf16 autocast)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Matmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default):
                self.dtypes |= {a.dtype for a in args if isinstance(a, torch.Tensor)}
            return func(*args, **(kwargs or {}))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = target_cross_entropy(model, inputs, labels)
    with Matmuls() as seen:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return seen.dtypes


def test_fused_lora_in_bf16_keeps_bf16_at_most_peft_bytes_and_gives_its_gradients():
    model = tiny_model("model.dtype=bf16", "lora.dropout=0.1", "lora.target_modules=all-linear")
    adapters = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in adapters} == {torch.float32}  # peft keeps the adapters in fp32 on a bf16 base
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.05)
    inputs, labels = batch(packed=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused_bytes = saved_activation_bytes(model, inputs, labels)
    # Backward multiplies in bf16: no fp32 copy of an input or of an incoming gradient.
    assert backward_matmul_dtypes(model, inputs, labels) == {torch.bfloat16}
    fused_loss, fused = bf16_loss_and_grads(model, inputs, labels)
    reference = tiny_model("lora.dropout=0.1", "lora.target_modules=all-linear")  # fp32 weights and compute
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    unfuse(model, 0.1)
    unfuse(reference, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft_bytes = saved_activation_bytes(model, inputs, labels)
    peft_loss, peft = bf16_loss_and_grads(model, inputs, labels)
    _, exact = loss_and_grads(reference, inputs, labels)
    # peft under autocast keeps a bf16 copy of the dropped-out input for each of its 7 adapters; the fused
    # layers keep each distinct input once (measured: 0.71x).
    assert fused_bytes < 0.8 * peft_bytes
    assert fused_loss == pytest.approx(peft_loss, rel=1e-2)
    assert fused.keys() == peft.keys() and len(peft) == 28
    for name in peft:
        # bf16 keeps 8 bits of mantissa: both differ from the fp32 gradients by up to 2% of their largest
        # element (measured 1.7%), and from each other by as much.
        scale = exact[name].abs().max()
        assert fused[name].dtype == torch.float32, name
        torch.testing.assert_close(fused[name], peft[name], rtol=0, atol=0.05 * scale, msg=name)
        torch.testing.assert_close(fused[name], exact[name], rtol=0, atol=0.04 * scale, msg=name)
