"""Device decisions (leantune/devices.py) on simulated CUDA cards: torch's device queries are replaced
by a card's description, so the decisions a T4, V100, RTX 3090/4060/4090, A10, L4, A100 or H100 would
get are checked on the CPU; the test ids name the card."""

import pytest
import torch
from fakes import simulate_cuda

from leantune.config import load_config
from leantune.devices import KNOWN, Device, auto_dtype, choose_attention, describe, quantised_evaluation
from leantune.errors import UserError
from leantune.modeling import resolve_attention, resolve_precision

CARDS = {card.name: card for card in KNOWN}
CUDA = torch.device("cuda")


def with_flash(card: Device, installed: bool = True) -> Device:
    return Device(**{**card.__dict__, "flash_attn_installed": installed})


@pytest.mark.parametrize("card", KNOWN, ids=[c.name for c in KNOWN])
def test_auto_dtype_is_bf16_only_where_native(monkeypatch, card):
    simulate_cuda(monkeypatch, card)
    assert describe(CUDA) == card
    native = card.capability >= (8, 0)
    expected = torch.bfloat16 if native else torch.float16
    assert resolve_precision(load_config(overrides=["model.dtype=auto"]), CUDA) == expected
    assert auto_dtype(card) == ("bf16" if native else "fp16")


def test_cpu_is_fp32():
    assert auto_dtype(Device("cpu", kind="cpu")) == "fp32"
    assert resolve_precision(load_config(overrides=["model.dtype=auto"]), torch.device("cpu")) == torch.float32


def test_explicit_bf16_on_an_emulating_card_warns(monkeypatch, caplog):
    simulate_cuda(monkeypatch, CARDS["T4"])
    assert resolve_precision(load_config(overrides=["model.dtype=bf16"]), CUDA) == torch.bfloat16
    assert "T4 (compute capability (7, 5)) only emulates bf16" in caplog.text
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    with pytest.raises(UserError, match=r"model.dtype: bf16 is not supported by this GPU \(T4\)"):
        resolve_precision(load_config(overrides=["model.dtype=bf16"]), CUDA)


@pytest.mark.parametrize("card", KNOWN, ids=[c.name for c in KNOWN])
@pytest.mark.parametrize("installed", [True, False], ids=["flash_attn", "no-flash_attn"])
def test_auto_attention(monkeypatch, card, installed, caplog):
    card = with_flash(card, installed)
    simulate_cuda(monkeypatch, card)
    caplog.set_level("INFO", logger="leantune.modeling")
    cfg = load_config(overrides=["model.attn_implementation=auto"])
    precision = resolve_precision(cfg, CUDA)
    flash = installed and card.capability >= (8, 0)
    assert resolve_attention(cfg, CUDA, precision) == ("flash_attention_2" if flash else "sdpa")
    assert resolve_attention(cfg, CUDA, torch.float32) == "sdpa"  # no fp32 kernels
    # The log says why.
    if not installed:
        assert "sdpa (no flash_attention_2: the flash_attn package is not installed)" in caplog.text
    elif not flash:
        assert f"{card.name} has compute capability {card.capability[0]}.{card.capability[1]}" in caplog.text
    explicit = load_config(overrides=["model.attn_implementation=flash_attention_2"])
    if flash:
        assert resolve_attention(explicit, CUDA, precision) == "flash_attention_2"
    else:
        with pytest.raises(UserError, match="model.attn_implementation: flash_attention_2 is not usable here"):
            resolve_attention(explicit, CUDA, precision)


def test_choose_attention_reasons():
    h100 = with_flash(CARDS["H100"])
    assert choose_attention(h100, "bf16") == ("flash_attention_2",
                                              "flash_attn installed, Ampere or later, half precision")
    assert choose_attention(h100, "fp32")[0] == "sdpa"
    assert choose_attention(h100, "bf16", "eager") == ("eager", "model.attn_implementation")
    assert choose_attention(with_flash(Device("cpu", kind="cpu")), "fp32") == (
        "sdpa", "no flash_attention_2: it needs a CUDA device, not cpu")


GIB = 2**30


@pytest.mark.parametrize("card, quantised", [("T4", True), ("V100", True), ("RTX 4060", True), ("RTX 3090", False),
                                              ("L4", False), ("H100", False)])
def test_qlora_evaluation_keeps_4_bits_where_the_unquantised_base_does_not_fit(card, quantised):
    """An 8B base in bf16/fp16 is 15 GiB: over 92% of a 16 GB card, within a 24 GB one."""
    device = CARDS[card]
    base = 8_030_261_248 * 2
    assert quantised_evaluation("qlora", device, base, device.total_memory, 0.92)[0] is quantised
    # LoRA trained on the unquantised base: evaluated on it, wherever.
    assert quantised_evaluation("lora", device, base, device.total_memory, 0.92)[0] is False


def test_qlora_evaluation_counts_free_memory_not_the_total():
    l4 = CARDS["L4"]
    assert quantised_evaluation("qlora", l4, 15 * GIB, 20 * GIB, 0.92)[0] is False
    quantised, why = quantised_evaluation("qlora", l4, 15 * GIB, 10 * GIB, 0.92)
    assert quantised and why == "the unquantised base needs 15.0 GiB, over the 9.2 GiB free on L4: the 4-bit base " \
                                "of training"
    assert quantised_evaluation("qlora", Device("cpu", kind="cpu"), 15 * GIB, 10 * GIB, 0.92)[0] is False


def test_failure_file_reports_native_bf16_only(monkeypatch):
    from leantune.failures import device_facts

    simulate_cuda(monkeypatch, CARDS["T4"])
    assert device_facts(load_config(overrides=["train.device=cuda"])) == ("cuda", False)
    simulate_cuda(monkeypatch, CARDS["A10"])
    assert device_facts(load_config(overrides=["train.device=cuda"])) == ("cuda", True)


def test_fp16_trains_with_a_grad_scaler_that_is_unscaled_and_checkpointed(tokenized_run, tmp_path, monkeypatch):
    """What 'auto' picks on a T4: fp16. On the CPU (autocast in fp16 there) the loop scales the loss,
    unscales before clipping (grad_norm is the true one, not 65536 times it), saves the scaler with each
    checkpoint, and a resume from step 2 ends bitwise equal to the uninterrupted run."""
    import shutil

    from run_helpers import adapter, new_run

    import leantune.modeling
    from leantune.metrics import read_metrics
    from leantune.training.loop import train

    monkeypatch.setattr(leantune.modeling, "resolve_precision", lambda cfg, device: torch.float16)
    common = ["train.max_steps=4", "checkpoint.every_steps=2", "train.eval_every=1000", "monitor.enabled=false",
              "lora.dropout=0.1"]
    cfg, run_dir = new_run(tokenized_run, tmp_path, *common)
    train(cfg, run_dir)
    lines = read_metrics(run_dir, "step")
    assert all(0 < m["grad_norm"] < 100 for m in lines), [m["grad_norm"] for m in lines]
    scaler = torch.load(run_dir / "checkpoints" / "step-2" / "scaler.pt")
    assert scaler["scale"] > 1 and scaler["_growth_tracker"] >= 0
    # Resume from step 2: drop what came after it.
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    for gone in ("adapter", "training.json", "checkpoints/step-4"):
        shutil.rmtree(resumed / gone) if (resumed / gone).is_dir() else (resumed / gone).unlink()
    summary = train(cfg, resumed)
    assert summary["resumed_from_step"] == 2
    a, b = adapter(run_dir), adapter(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_readme_device_table_is_the_codes_output():
    import subprocess
    import sys
    from pathlib import Path

    from leantune.devices import device_table

    root = Path(__file__).resolve().parents[1]
    printed = subprocess.run([sys.executable, "-m", "leantune.cost", "--devices"], capture_output=True, text=True,
                             cwd=root, check=True).stdout.strip()
    assert printed == device_table()
    assert device_table() in (root / "README.md").read_text()
    assert "| T4 | 7.5 | fp16 + GradScaler | sdpa |" in printed and "| H100 | 9.0 | bf16 | flash_attention_2 |" in printed
