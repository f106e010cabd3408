"""The cost model: the catalogue, the FLOP formula by hand, measured MFU and estimate errors, the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from leantune.config import load_config
from leantune.cost import (
    DEFAULT_UTILISATION,
    POWER_FRACTION,
    Workload,
    estimate,
    estimate_error,
    find_gpu,
    load_catalogue,
    main,
    measured,
    parse_count,
    run_costs,
)
from leantune.errors import UserError
from leantune.probe import ModelShape


def test_the_catalogue_has_the_gpus_the_issue_names_with_sane_figures():
    catalogue = load_catalogue()
    for name in ("RTX 4060", "RTX 4090", "L4", "A10G", "A100 40GB", "A100 80GB", "H100", "H200"):
        gpu = catalogue[name]
        assert gpu.bf16_tflops > 0 and gpu.memory_gb > 0 and gpu.board_power_w > 0 and gpu.price_per_hour > 0
    assert (catalogue["H100"].bf16_tflops, catalogue["H200"].memory_gb, catalogue["RTX 4060"].memory_gb) == (989, 141, 8)


def test_gpus_are_found_by_the_names_nvml_reports():
    catalogue = load_catalogue()
    assert find_gpu(catalogue, "NVIDIA H100 80GB HBM3").name == "H100"
    assert find_gpu(catalogue, "NVIDIA GeForce RTX 4060").name == "RTX 4060"
    assert find_gpu(catalogue, "a100-sxm4-80gb").name == "A100 80GB"
    assert find_gpu(catalogue, "h100").name == "H100"
    assert find_gpu(catalogue, "Tesla T4") is None


def test_the_formula_by_hand():
    h100 = load_catalogue()["H100"]
    lora = Workload(params=1_000_000_000, tokens=1_000_000, seq_len=1024, method="lora")
    figures = estimate(lora, h100, price_per_kwh=0.5)
    # 2 x forward (2N) per token, at 35% of 989 TFLOP/s.
    seconds = 1e6 * 4e9 / (989e12 * 0.35)
    assert figures.seconds == pytest.approx(seconds)
    assert figures.energy_j == pytest.approx(seconds * 700 * POWER_FRACTION)
    assert figures.rent_usd == pytest.approx(seconds / 3600 * 2.99)
    assert figures.electricity_usd == pytest.approx(seconds * 700 * POWER_FRACTION / 3.6e6 * 0.5)
    assert figures.utilisation == DEFAULT_UTILISATION["lora"]
    # A full fine-tune computes weight gradients too: 3 forwards; checkpointing adds one more.
    full_gc = Workload(params=10**9, tokens=10**6, seq_len=1024, method="full", gradient_checkpointing=True)
    assert full_gc.model_flops_per_token == 6e9 and full_gc.hardware_flops_per_token == 8e9
    # Causal attention: 2 L a T per token on top of 2N.
    with_shape = Workload(params=10**9, tokens=10**6, seq_len=2048, method="lora", layers=16, attention_width=2048)
    assert with_shape.forward_flops_per_token == 2e9 + 2 * 16 * 2048 * 2048
    # fp32 runs get a tenth of the tensor peak.
    assert estimate(lora, h100, precision="fp32", utilisation=0.35).seconds == pytest.approx(10 * seconds)


def test_measured_mfu_and_the_estimates_error():
    gpu = load_catalogue()["RTX 4060"]
    work = Workload(params=500_000_000, tokens=2_000_000, seq_len=512, method="lora")
    est = estimate(work, gpu, utilisation=0.3)
    # The run took twice as long and drew 70% of the energy the estimate assumed.
    got = measured(work, gpu, seconds=2 * est.seconds, energy_j=0.7 * est.energy_j)
    assert got.utilisation == pytest.approx(0.15)
    assert estimate_error(est, got) == pytest.approx({"seconds": -0.5, "energy_j": 1 / 0.7 - 1})
    no_energy = measured(work, gpu, seconds=est.seconds, energy_j=None)
    assert no_energy.electricity_usd is None and estimate_error(est, no_energy) == pytest.approx({"seconds": 0.0})


def test_run_costs_from_a_training_summary():
    cfg = load_config(overrides=["tokenize.max_seq_len=256"])
    shape = ModelShape(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=128, head_dim=16, tied_embeddings=False)
    gpu = load_catalogue()["L4"]
    out = run_costs(cfg, {"tokens": 1_000_000, "train_seconds": 10.0, "energy_j": 500.0}, gpu, shape)
    flops = 2 * (2 * shape.total_params + 2 * 2 * 64 * 256) * 1_000_000
    assert out["measured"]["utilisation"] == pytest.approx(flops / (10.0 * 121e12))
    assert out["error"]["seconds"] == pytest.approx(out["estimate"]["seconds"] / 10.0 - 1)
    assert out["measured"]["electricity_usd"] == pytest.approx(500.0 / 3.6e6 * 0.30)


def test_cost_json_for_a_run_on_a_catalogued_gpu(tmp_path):
    from leantune.cost import run_cost_report
    from leantune.probe import model_shape

    (tmp_path / "tokens" / "train").mkdir(parents=True)
    (tmp_path / "tokens" / "train" / "index.json").write_text(json.dumps({"tokenizer": {"vocab_size": 900}}))
    cfg = load_config()
    summary = {"device": "cuda", "gpu_name": "NVIDIA GeForce RTX 4060", "tokens": 50_000, "train_seconds": 2.0,
               "energy_j": 180.0}
    report = run_cost_report(cfg, tmp_path, summary)
    assert report["gpu"] == "RTX 4060" and json.loads((tmp_path / "cost.json").read_text()) == report
    flops = 50_000 * 2 * (2 * model_shape(cfg, 900).total_params + 2 * 2 * 64 * 512)
    assert report["measured"]["utilisation"] == pytest.approx(flops / (2.0 * 30.2e12))
    assert report["achieved_flops_per_s"] == pytest.approx(flops / 2.0)
    # power.gpu names the GPU when NVML could not; a CPU run or an unknown GPU gets the achieved FLOP/s only.
    named = load_config(overrides=["power.gpu=H100"])
    assert run_cost_report(named, tmp_path, {**summary, "gpu_name": None})["gpu"] == "H100"
    for other in ({**summary, "device": "cpu", "gpu_name": None}, {**summary, "gpu_name": "Tesla T4"}):
        (tmp_path / "cost.json").unlink()
        report = run_cost_report(cfg, tmp_path, other)
        assert json.loads((tmp_path / "cost.json").read_text()) == report
        assert (report["gpu"], report["measured"], report["estimate"], report["device"]) == (
            None, None, None, other["device"])
        assert (report["model_flops"], report["achieved_flops_per_s"]) == (pytest.approx(flops),
                                                                           pytest.approx(flops / 2.0))


def test_a_broken_catalogue_names_the_gpu_and_field(tmp_path):
    path = tmp_path / "gpus.yaml"
    path.write_text("Mine:\n  aliases: []\n  bf16_tflops: 10\n")
    with pytest.raises(UserError, match="'Mine' fp16_tflops: Field required; 'Mine' memory_gb: Field required; "
                       "'Mine' board_power_w: Field required; 'Mine' price_per_hour: Field required; "
                       "'Mine' source: Field required; fix the file"):
        load_catalogue(path)
    path.write_text("Mine:\n  aliases: []\n  bf16_tflops: fast\n  fp16_tflops: 1\n  memory_gb: 1\n  board_power_w: 1\n"
                    "  price_per_hour: 1\n  source: me\n")
    with pytest.raises(UserError, match="'Mine' bf16_tflops: Input should be a valid number"):
        load_catalogue(path)
    path.write_text("Mine:\n  aliases: []\n  bf16_tflops: 1\n  fp16_tflops: 1\n  memory_gb: 0\n  board_power_w: 1\n"
                    "  price_per_hour: 1\n  source: me\n  colour: red\n")
    with pytest.raises(UserError, match="'Mine' memory_gb: Input should be greater than 0; 'Mine' colour: Extra inputs"):
        load_catalogue(path)


def test_parse_count():
    assert parse_count("8B") == 8_000_000_000 and parse_count("0.5b") == 500_000_000
    assert parse_count("20M") == 20_000_000 and parse_count("1500") == 1500 and parse_count("Qwen/x") is None


def test_cli_table_json_and_errors(capsys, tmp_path):
    assert main(["--model", "8B", "--tokens", "20M", "--method", "qlora"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["GPU", "fits", "memory"] and len(table) == 1 + len(load_catalogue())

    from transformers import LlamaConfig

    LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32).save_pretrained(tmp_path)
    assert main(["--model", str(tmp_path), "--tokens", "1M", "--gpu", "RTX 4060", "--gpu", "A100 80GB",
                 "--method", "lora", "--seq-len", "512", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    # Llama-2-7B's shape with LoRA in bf16: 13.5 GB of weights fit an A100 80GB, not an 8 GB card.
    assert [r["fits"].split()[0] for r in rows] == ["no", "yes"]
    assert rows[0]["seconds"] == pytest.approx(1e6 * 2 * (2 * 6_738_415_616 + 2 * 32 * 4096 * 512) / (30.2e12 * 0.35))

    assert main(["--model", "8B", "--tokens", "1M", "--gpu", "Tesla T4"]) == 2
    assert "'Tesla T4' is not in the catalogue; known: RTX 4060" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "missing"), "--tokens", "1M"]) == 2
    assert "give a local directory, or its parameter count" in capsys.readouterr().err


def test_cli_memory_check_of_the_8b_full_fine_tune_config(capsys, tmp_path):
    from transformers import LlamaConfig

    # Llama-3.1-8B's shape (the hub is out of reach here): --model names it; without, the config's model is read.
    LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8).save_pretrained(tmp_path)
    config = str(Path(__file__).resolve().parents[1] / "configs" / "llama-3.1-8b-full.yaml")
    assert main(["--config", config, "--model", str(tmp_path), "--tokens", "20M", "--gpu", "RTX 4060", "--gpu",
                 "RTX 4090", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["fits"] for r in rows] == ["no (20.7 GiB)", "yes (20.7 GiB)"]
    # --method lora leaves the full fine-tune's own settings behind: LoRA of the same model on its bf16 base.
    assert main(["--config", config, "--model", str(tmp_path), "--tokens", "20M", "--gpu", "RTX 4090",
                 "--method", "lora", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["fits"] == "yes (18.9 GiB)"
    assert main(["--tokens", "20M"]) == 2
    assert "--model: required without --config" in capsys.readouterr().err


def test_cli_help_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "leantune.cost", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "--model" in result.stdout and "--gpu" in result.stdout


def test_cli_takes_the_model_of_the_config(capsys, tmp_path):
    """`--config` names the model: --model is not needed (a config with a model directory, as a user's is)."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32).save_pretrained(tmp_path / "model")
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  name_or_path: {tmp_path / 'model'}\n  method: lora\ntokenize:\n  max_seq_len: 512\n")
    common = ["--tokens", "1M", "--gpu", "A100 80GB", "--json"]
    assert main(["--config", str(config), *common]) == 0
    from_config = json.loads(capsys.readouterr().out)
    assert main(["--config", str(config), "--model", str(tmp_path / "model"), *common]) == 0
    assert from_config == json.loads(capsys.readouterr().out)
    assert from_config[0]["seconds"] == pytest.approx(1e6 * 2 * (2 * 6_738_415_616 + 2 * 32 * 4096 * 512)
                                                      / (312e12 * 0.35), rel=0.05)
    assert main(["--tokens", "1M"]) == 2
    assert "--model: required without --config" in capsys.readouterr().err
