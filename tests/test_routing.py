"""Routing runs to GPU machine classes by their memory estimate, with the real configs and the shipped catalogue."""

from pathlib import Path

import pytest
from model_shapes import LLAMA3_8B, PHI3_MINI, QWEN25_05B, QWEN25_15B

from leantune.config import ConfigError, load_config
from leantune.probe import GIB
from leantune.routing import NoPoolFits, PoolClass, load_pool_classes, route

REPO = Path(__file__).resolve().parents[1]
CATALOGUE = REPO / "deployments" / "pools.yaml"


@pytest.fixture(scope="module")
def pools():
    return load_pool_classes(CATALOGUE)


def test_the_shipped_catalogue_lists_the_classes_smallest_first(pools):
    assert [(p.name, p.memory_gb, p.gpus) for p in pools] == [
        ("gpu-8gb", 8, 1), ("gpu-16gb", 16, 1), ("gpu-24gb", 24, 2), ("gpu-80gb", 80, 1)]


@pytest.mark.parametrize(("config", "shape", "pool", "estimate_gib"), [
    # QLoRA of an 8 B model: 4-bit layers, fp32 embeddings and head, 2 x 2048 tokens with checkpointing.
    ("llama-3.1-8b-qlora", LLAMA3_8B, "gpu-16gb", 9.75),
    # LoRA of the same model keeps bf16 weights (15 GiB) and the activations of 4 x 2048 tokens.
    ("llama-3.1-8b-lora", LLAMA3_8B, "gpu-24gb", 19.13),
    # The chunked target-only loss keeps no [batch, seq, vocab] logits: Qwen's 152k vocabulary no longer
    # decides the class.
    ("qwen2.5-0.5b-lora", QWEN25_05B, "gpu-8gb", 1.42),
    ("qwen2.5-0.5b-full", QWEN25_05B, "gpu-8gb", 5.65),
    ("qwen2.5-1.5b-qlora", QWEN25_15B, "gpu-8gb", 2.49),
    ("phi-3-mini-qlora", PHI3_MINI, "gpu-8gb", 3.43),
    # Full fine-tune of the same 8 B model: bf16 weights (15 GiB), the step in backward (one gradient at a time),
    # the paged 8-bit state on the host, 4 x 2048 tokens with checkpointing.
    ("llama-3.1-8b-full", LLAMA3_8B, "gpu-24gb", 20.70),
])
def test_real_configs_go_to_the_smallest_class_their_estimate_fits(pools, config, shape, pool, estimate_gib):
    chosen = route(load_config(REPO / "configs" / f"{config}.yaml"), pools, shape)
    assert chosen.pool == pool
    assert chosen.estimate.total / GIB == pytest.approx(estimate_gib, abs=0.01)
    fitting = [p for p in pools if chosen.estimate.total <= p.memory_gb * GIB * 0.92]
    assert min(fitting, key=lambda p: p.memory_gb).name == pool
    assert chosen.budget_bytes == int(next(p for p in pools if p.name == pool).memory_gb * GIB * 0.92)


def test_a_lower_micro_batch_moves_a_run_to_a_smaller_class(pools):
    cfg = load_config(REPO / "configs" / "llama-3.1-8b-lora.yaml", ["train.micro_batch_size=8"])
    assert route(cfg, pools, LLAMA3_8B).pool == "gpu-80gb"  # 22.68 GiB (gpu-24gb allows 22.08); at its own micro-batch of 4: gpu-24gb


def test_the_8b_full_fine_tune_needs_its_memory_options_to_fit_24gb(pools):
    config = REPO / "configs" / "llama-3.1-8b-full.yaml"
    chosen = route(load_config(config), pools, LLAMA3_8B)
    assert chosen.estimate.paged_host / GIB == pytest.approx(14.96, abs=0.01)  # 2 bytes per weight, on the host
    accumulating = route(load_config(config, ["train.micro_batch_size=2"]), pools, LLAMA3_8B)
    assert accumulating.pool == "gpu-80gb"  # two micro-batches a step keep every gradient: 15 GiB more
    fp32 = ["train.full_precision=fp32", "train.optimizer_in_backward=false", "train.max_grad_norm=1.0",
            "train.optimizer=adamw"]
    with pytest.raises(NoPoolFits, match="estimated 1[0-9][0-9].[0-9][0-9] GiB"):
        route(load_config(config, fp32), pools, LLAMA3_8B)  # fp32 weights, gradients and AdamW: 16 bytes each


def test_the_offline_default_routes_to_the_smallest_class(pools):
    chosen = route(load_config(), pools)  # the scratch model's shape comes from the config
    assert chosen.pool == "gpu-8gb"
    assert chosen.estimate.total < 0.1 * GIB


def test_no_class_large_enough_is_a_clear_error(pools):
    cfg = load_config(REPO / "configs" / "llama-3.1-8b-lora.yaml")
    small = [p for p in pools if p.memory_gb <= 16]
    with pytest.raises(NoPoolFits) as e:
        route(cfg, small, LLAMA3_8B)
    message = str(e.value)
    assert "19.13 GiB" in message and "gpu-16gb allows 14.7 GiB" in message
    assert "train.micro_batch_size" in message and "pool catalogue" in message


def test_an_unreadable_model_shape_says_how_to_fix_it(pools):
    cfg = load_config(REPO / "configs" / "llama-3.1-8b-qlora.yaml",
                      ["model.name_or_path=/nonexistent/model-dir"])
    with pytest.raises(Exception, match="config.json") as e:
        route(cfg, pools)
    assert "model.name_or_path" in str(e.value)


def test_a_broken_catalogue_names_each_entry_and_key(tmp_path):
    path = tmp_path / "pools.yaml"
    path.write_text("pools:\n  - {name: a, memory_gb: 0}\n  - {name: a, memory_gb: 8}\n  - {memory_gb: 8}\n")
    with pytest.raises(ConfigError) as e:
        load_pool_classes(path)
    problems = "\n".join(e.value.problems)
    assert "pools.0.memory_gb" in problems and "pools.2.name" in problems and "both named 'a'" in problems
    path.write_text("gpus: 2\n")
    with pytest.raises(ConfigError, match="pools: needs a non-empty list"):
        load_pool_classes(path)


def test_pool_classes_sort_by_memory_not_by_catalogue_order():
    pools = [PoolClass(name="big", memory_gb=80), PoolClass(name="small", memory_gb=8)]
    assert route(load_config(), pools).pool == "small"
