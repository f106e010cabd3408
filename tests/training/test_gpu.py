"""CUDA-only paths of training: bf16 autocast with the packed 4D mask, fp16 with loss scaling,
fused AdamW, QLoRA with bf16 compute, the CUDA memory readings. Skipped without a CUDA device
(the `gpu` marker, tests/conftest.py); everything else is covered on the CPU."""

import shutil

import pytest
import torch

from leantune.config import dump_config, load_config
from leantune.metrics import read_metrics
from leantune.training.loop import train

pytestmark = pytest.mark.gpu


def new_run(tokenized_run, tmp_path, *overrides):
    run_dir = tmp_path / "run"
    shutil.copytree(tokenized_run, run_dir)
    cfg = load_config(run_dir / "config.yaml", overrides=[
        "train.device=cuda", "train.max_steps=8", "train.eval_every=4", "checkpoint.every_steps=1000",
        *overrides])
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return cfg, run_dir


@pytest.mark.parametrize("method,dtype", [("lora", "bf16"), ("lora", "fp16"), ("full", "bf16"), ("qlora", "bf16")])
def test_cuda_training_runs_and_learns(tokenized_run, tmp_path, method, dtype):
    if dtype == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no native bf16")
    cfg, run_dir = new_run(tokenized_run, tmp_path, f"model.method={method}", f"model.dtype={dtype}")
    summary = train(cfg, run_dir)
    steps = read_metrics(run_dir, "step")
    assert summary["steps"] == 8 and [m["step"] for m in steps] == list(range(1, 9))
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    # CUDA peak memory is the allocator's, in MB: positive and far below the whole device.
    total_mb = torch.cuda.get_device_properties(0).total_memory / 2**20
    assert 0 < steps[-1]["peak_memory_mb"] < total_mb


@pytest.fixture
def tf32_off():
    """TF32 off for the test, the settings it found restored after it (other tests run in this process)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_cuda_split_invariance_in_fp32(tokenized_run, tmp_path, tf32_off):
    """The global-batch loss normalisation holds on the GPU too (fp32, TF32 off)."""
    weights = []
    for micro in (8, 2):
        cfg, run_dir = new_run(tokenized_run, tmp_path / f"m{micro}", "model.dtype=fp32",
                               f"train.micro_batch_size={micro}", "adaptive.enabled=false")
        train(cfg, run_dir)
        from safetensors.torch import load_file

        weights.append(load_file(run_dir / "adapter" / "adapter_model.safetensors"))
    for key in weights[0]:
        err = float((weights[0][key] - weights[1][key]).norm() / weights[1][key].norm())
        assert err <= 1e-4, key


def test_the_real_card_gets_the_decisions_its_description_gives():
    """tests/test_devices.py simulates cards; here the card at hand is described by torch itself."""
    from leantune.devices import auto_dtype, describe
    from leantune.modeling import resolve_precision

    cuda = torch.device("cuda")
    card = describe(cuda)
    assert card.capability == tuple(torch.cuda.get_device_capability(0))
    assert card.bf16_native == (card.capability >= (8, 0))
    expected = {"bf16": torch.bfloat16, "fp16": torch.float16}[auto_dtype(card)]
    assert resolve_precision(load_config(overrides=["train.device=cuda"]), cuda) == expected
