"""The memory estimator against published figures and measured peaks of tiny CPU models; the start plan."""

import weakref

import numpy as np
import pytest
from model_shapes import LLAMA2_7B, LLAMA3_8B, MISTRAL_7B, QWEN25_05B

from leantune.config import load_config
from leantune.probe import (
    GIB,
    ModelShape,
    estimate_for_config,
    estimate_memory,
    model_shape,
    plan_start,
    probe,
)

# ------------------------------------------------------------------------------- published figures


def test_parameter_counts_match_the_published_ones():
    assert LLAMA2_7B.total_params == 6_738_415_616
    assert LLAMA3_8B.total_params == 8_030_261_248
    assert MISTRAL_7B.total_params == 7_241_732_096
    # Qwen2.5-0.5B: 494,032,768 with its q/k/v biases, which the shape leaves out (27,648).
    assert QWEN25_05B.total_params == pytest.approx(494_032_768, rel=1e-4)


def test_lora_parameter_counts_match_peft():
    # peft's print_trainable_parameters for Llama-2-7B.
    assert LLAMA2_7B.lora_params(16, "all-linear") == 39_976_960
    assert LLAMA2_7B.lora_params(8, ["q_proj", "v_proj"]) == 4_194_304
    # Phi-3 names its fused linears qkv_proj and gate_up_proj: same adapted widths, other shapes.
    assert LLAMA2_7B.lora_params(8, ["qkv_proj"]) == 32 * 8 * (4096 + 3 * 4096)


def qlora(shape, **kw):
    args = dict(method="qlora", compute_bytes=2, micro_batch_size=1, seq_len=512, gradient_checkpointing=True,
                optimizer="paged_adamw_8bit")
    return estimate_memory(shape, **{**args, **kw})


def test_nf4_weights_of_7b_models_are_4_to_5_gb():
    # 4-bit linears (double quantisation) plus embeddings and head, upcast to fp32 by peft.
    assert 4e9 <= qlora(LLAMA2_7B).weights <= 5e9
    assert 4e9 <= qlora(MISTRAL_7B).weights <= 5e9
    # Without double quantisation the constants cost 0.0625 instead of 0.0159 bytes per weight.
    delta = qlora(MISTRAL_7B, double_quant=False).weights - qlora(MISTRAL_7B).weights
    assert delta == pytest.approx(MISTRAL_7B.linear_params * (4 / 64 - 1 / 64 - 4 / (64 * 256)), rel=1e-6)
    # Llama-3's 128k vocabulary: 1.05 B embedding and head parameters in fp32 are 4.2 GB of the total.
    assert qlora(LLAMA3_8B).weights == pytest.approx(3.60e9 + 4.20e9, rel=0.01)


def test_the_known_orders_of_magnitude_of_a_7b_fine_tune():
    # Full fine-tune with AdamW in mixed precision: 16 bytes per parameter before activations.
    full = estimate_memory(LLAMA2_7B, method="full", compute_bytes=2, micro_batch_size=1, seq_len=512,
                           gradient_checkpointing=True)
    assert full.weights + full.gradients + full.optimizer == pytest.approx(6_738_415_616 * 16 + 6_476_005_376 * 2)
    assert full.total > 110e9
    # QLoRA of the same model at micro-batch 1 x 512 tokens with checkpointing fits an 8 GB card.
    assert qlora(LLAMA2_7B).total < 6e9
    lora = estimate_memory(LLAMA2_7B, method="lora", compute_bytes=2, micro_batch_size=1, seq_len=512,
                           gradient_checkpointing=True)
    assert 13e9 < lora.total < 16e9  # bf16 weights (13.5 GB) + adapters, between an RTX 4090 and an L4 24 GB


def test_activations_scale_with_tokens_and_checkpointing_saves_most_of_them():
    from leantune.training.loss import CHUNK_LOGITS

    kw = dict(method="lora", compute_bytes=2, seq_len=1024, lora_dropout=0.05)
    one = estimate_memory(LLAMA2_7B, micro_batch_size=1, gradient_checkpointing=False, **kw)
    four = estimate_memory(LLAMA2_7B, micro_batch_size=4, gradient_checkpointing=False, **kw)
    checkpointed = estimate_memory(LLAMA2_7B, micro_batch_size=4, gradient_checkpointing=True, **kw)
    # Per token, plus one chunk of the target-only loss (training/loss.py) whatever the micro-batch.
    chunk = (CHUNK_LOGITS // LLAMA2_7B.vocab_size) * LLAMA2_7B.vocab_size * (2 + 8)
    assert four.activations - chunk == 4 * (one.activations - chunk)
    assert checkpointed.activations < four.activations / 8
    assert four.weights == one.weights == checkpointed.weights


# ----------------------------------------------------------------------------- measured CPU peaks


def peak_of_training_steps(cfg) -> int:
    """Bytes of every tensor alive at the worst moment of two training steps, measured by tracking each
    storage the step creates (a dispatch mode) plus the model's own parameters and buffers."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from leantune.modeling import build_model
    from leantune.shards import collate
    from leantune.training.loss import target_cross_entropy
    from leantune.training.optim import build_optimizer

    class PeakTracker(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live, self.refs, self.current, self.peak = {}, {}, 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    key = storage.data_ptr()
                    if key and key not in self.live:
                        self.live[key] = storage.nbytes()
                        self.current += storage.nbytes()
                        self.peak = max(self.peak, self.current)
                        self.refs[key] = weakref.ref(storage, lambda _, k=key: self._freed(k))
            return out

        def _freed(self, key):
            self.current -= self.live.pop(key, 0)

    class Tokenizer:  # what build_model reads of a tokenizer
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

        def __len__(self):
            return cfg.tokenize.vocab_size

        def get_vocab(self):
            return {str(i): i for i in range(cfg.tokenize.vocab_size)}

    torch.manual_seed(0)
    model = build_model(cfg, Tokenizer(), torch.device("cpu"))
    optimizer = build_optimizer(cfg, model)
    own = sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()])
    length, rng = cfg.tokenize.max_seq_len, np.random.default_rng(0)
    items = []
    for _ in range(cfg.train.micro_batch_size):
        ids = rng.integers(3, cfg.tokenize.vocab_size, length)
        docs = np.array([length // 2, length - length // 2])  # two packed documents
        items.append({"input_ids": ids, "labels": ids, "doc_lengths": docs,
                      "position_ids": np.concatenate([np.arange(d) for d in docs])})
    with PeakTracker() as tracker:
        for _ in range(2):  # the second step has the optimizer state
            batch = collate(items, 0)
            loss = target_cross_entropy(model, batch, batch.pop("labels"))  # the training loop's loss
            del batch
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss
    return own + tracker.peak


TINY = ["train.device=cpu", "model.scratch.hidden_size=128", "model.scratch.intermediate_size=344",
        "model.scratch.num_layers=4", "model.scratch.num_heads=4", "model.scratch.num_kv_heads=2",
        "tokenize.vocab_size=2000", "tokenize.max_seq_len=256", "train.global_batch_size=8", "train.micro_batch_size=4"]


@pytest.mark.parametrize("overrides", [
    [],
    ["lora.dropout=0.0", "lora.target_modules=[q_proj,v_proj]"],
    ["model.gradient_checkpointing=true"],
    ["model.method=full", "model.attn_implementation=eager", "train.micro_batch_size=2"],
    ["model.method=full", "model.gradient_checkpointing=true"],
    ["model.method=full", "model.dtype=bf16", "train.full_precision=bf16-kahan"],
    ["model.method=full", "model.dtype=bf16", "train.full_precision=bf16-stochastic", "train.optimizer_in_backward=true",
     "train.max_grad_norm=null", "train.global_batch_size=4"],
], ids=["lora", "lora-qv-no-dropout", "lora-checkpointing", "full-eager", "full-checkpointing", "full-bf16-kahan",
        "full-bf16-stochastic-in-backward"])
def test_estimate_is_within_15_percent_of_the_measured_peak(overrides):
    cfg = load_config(overrides=TINY + overrides)
    measured = peak_of_training_steps(cfg)
    estimated = estimate_for_config(cfg, model_shape(cfg), "cpu").total
    assert estimated == pytest.approx(measured, rel=0.15)


# ----------------------------------------------------------------------------------- the plan


def tiny_cfg(*extra):
    return load_config(overrides=TINY + list(extra))


def budget_for(cfg, shape, device_type, **changes):
    """Free memory at which `cfg` with `changes` just fits under monitor.memory_high_fraction."""
    from leantune.config import with_values

    est = estimate_for_config(with_values(cfg, changes), shape, device_type)
    return int(est.total / cfg.monitor.memory_high_fraction) + 1


def test_the_config_as_given_when_it_fits():
    cfg = tiny_cfg()
    shape = model_shape(cfg)
    plan = plan_start(cfg, shape, 64 * GIB, "cpu")
    assert (plan.fits, plan.changes, plan.micro_batch_size, plan.method) == (True, [], 4, "lora")
    assert plan.estimate == estimate_for_config(cfg, shape, "cpu")
    assert plan.budget_bytes == int(64 * GIB * 0.92)


def test_a_tight_budget_lowers_the_micro_batch_first():
    cfg = tiny_cfg()
    shape = model_shape(cfg)
    free = budget_for(cfg, shape, "cpu", **{"train.micro_batch_size": 2})
    plan = plan_start(cfg, shape, free, "cpu")
    assert (plan.micro_batch_size, plan.gradient_checkpointing, plan.fits) == (2, False, True)
    assert plan.changes == ["train.micro_batch_size: 4 -> 2"]
    applied = plan.apply(cfg)
    assert applied.train.micro_batch_size == 2 and applied.train.global_batch_size == 8

    md = plan.markdown()  # the flow's memory-probe artifact
    assert f"free {free / GIB:.2f} GiB, budget {plan.budget_bytes / GIB:.2f} GiB" in md and "fits: True" in md
    assert f"| total | {plan.estimate.total / GIB:.3f} |" in md
    assert md.endswith("changes: train.micro_batch_size: 4 -> 2\n")


def test_then_gradient_checkpointing_then_a_lighter_method():
    cfg = tiny_cfg("model.method=full")
    shape = model_shape(cfg)
    free = budget_for(cfg, shape, "cpu", **{"train.micro_batch_size": 2, "model.gradient_checkpointing": True})
    plan = plan_start(cfg, shape, free, "cpu")
    assert (plan.method, plan.micro_batch_size, plan.gradient_checkpointing) == ("full", 2, True)
    assert plan.changes == ["train.micro_batch_size: 4 -> 2", "model.gradient_checkpointing: False -> True"]

    # Llama-2-7B with LoRA on an 8 GB card: only QLoRA fits (the bf16 weights alone are 13.5 GB).
    cfg = tiny_cfg("tokenize.max_seq_len=512")
    free = budget_for(cfg, LLAMA2_7B, "cuda", **{"model.method": "qlora", "model.gradient_checkpointing": True,
                                                 "train.micro_batch_size": 2})
    plan = plan_start(cfg, LLAMA2_7B, free, "cuda")
    assert (plan.method, plan.micro_batch_size, plan.gradient_checkpointing, plan.fits) == ("qlora", 2, True, True)
    assert free < 8 * GIB
    assert plan.changes == ["train.micro_batch_size: 4 -> 2", "model.gradient_checkpointing: False -> True",
                            "model.method: lora -> qlora"]


def test_nothing_fits_gives_the_lightest_plan_marked_as_not_fitting():
    cfg = tiny_cfg()
    plan = plan_start(cfg, model_shape(cfg), 1000, "cpu")
    # On the CPU QLoRA is no option: the lightest is LoRA at micro-batch 1 with checkpointing.
    assert (plan.fits, plan.method, plan.micro_batch_size, plan.gradient_checkpointing) == (False, "lora", 1, True)
    assert plan.to_dict()["estimate_bytes"]["total"] == plan.estimate.total


def test_model_shape_from_a_local_directory_and_an_unreadable_name(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=500, hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=6,
                num_key_value_heads=2, tie_word_embeddings=True).save_pretrained(tmp_path)
    cfg = load_config(overrides=[f"model.name_or_path={tmp_path}"])
    assert model_shape(cfg) == ModelShape(vocab_size=500, hidden_size=96, num_layers=3, num_heads=6, num_kv_heads=2,
                                          intermediate_size=200, head_dim=16, tied_embeddings=True)
    missing = load_config(overrides=[f"model.name_or_path={tmp_path / 'nope'}"])
    assert model_shape(missing) is None and probe(missing) is None


def test_probe_on_this_machine_plans_from_available_ram():
    cfg = tiny_cfg()
    plan = probe(cfg, vocab_size=1500)
    assert plan.fits and plan.changes == [] and plan.free_bytes > 0
    assert plan.estimate == estimate_for_config(cfg, model_shape(cfg, 1500), "cpu")
