"""The evaluation stage on devices it may not fit: after QLoRA the 4-bit base where the unquantised one
does not fit (and the merged export in host memory), the batch started from training's adapted
micro-batch, and out of memory in scoring halved instead of failing the run."""

import json
import logging

import pytest
import torch
from fakes import simulate_cuda
from run_helpers import new_run

from leantune.config import load_config
from leantune.devices import KNOWN
from leantune.evaluation import runner
from leantune.evaluation.runner import evaluate, starting_batch_size
from leantune.failures import OutOfMemory
from leantune.modeling import qlora_base_in_4_bits

EVAL = ["eval.max_items=6", "eval.synthetic_items=12", "eval.batch_size=4", "eval.datasets=[synthetic]"]
T4 = next(c for c in KNOWN if c.name == "T4")
GIB = 2**30


def simulate_memory(monkeypatch, free_gib: float, total_gib: float = 16.0, fraction: float = 1.0,
                    allocated_gib: float = 0.0, reserved_gib: float = 0.0):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (int(free_gib * GIB), int(total_gib * GIB)))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda i=0: fraction)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i=0: int(allocated_gib * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i=0: int(reserved_gib * GIB))


@pytest.mark.parametrize("free_gib, quantised", [(0.0001, True), (15.0, False)], ids=["T4-busy", "T4-free"])
def test_qlora_base_is_sized_against_the_free_memory(monkeypatch, free_gib, quantised):
    simulate_cuda(monkeypatch, T4)
    simulate_memory(monkeypatch, free_gib)
    cfg = load_config(overrides=["model.method=qlora"])  # the scratch model: its size from model.scratch
    assert qlora_base_in_4_bits(cfg, torch.device("cuda"), torch.float16) is quantised
    assert qlora_base_in_4_bits(load_config(overrides=["model.method=lora"]), torch.device("cuda"),
                                torch.float16) is False


def test_free_cuda_memory_counts_the_cache_and_the_per_process_fraction(monkeypatch):
    from leantune.devices import cuda_free_bytes

    cuda = torch.device("cuda", 0)
    simulate_memory(monkeypatch, free_gib=60, total_gib=80, allocated_gib=2, reserved_gib=3)
    assert cuda_free_bytes(cuda) == 61 * GIB  # the 1 GiB torch holds unused is free to it
    # bench/gpu_check.py's 16 GB card on an 80 GB one: a fifth of the card, 2 GiB of it in use.
    simulate_memory(monkeypatch, free_gib=60, total_gib=80, fraction=0.2, allocated_gib=2, reserved_gib=3)
    assert cuda_free_bytes(cuda) == 14 * GIB


def test_starting_batch_follows_trainings_adapted_micro_batch(tmp_path):
    cfg = load_config(overrides=["train.micro_batch_size=4", "train.global_batch_size=8", "eval.batch_size=16"])
    (tmp_path / "adapter").mkdir()
    assert starting_batch_size(cfg, None) == 16
    assert starting_batch_size(cfg, tmp_path / "adapter") == 16  # no training.json
    for ended, expected in ((4, 16), (8, 16), (2, 8), (1, 4)):
        (tmp_path / "training.json").write_text(json.dumps({"micro_batch_size": ended}))
        assert starting_batch_size(cfg, tmp_path / "adapter") == expected


@pytest.fixture(scope="module")
def qlora_run(tokenized_run, tmp_path_factory):
    from leantune.training.loop import train

    # In features of at least 64 (bitsandbytes' CPU inference kernel needs one 4-bit block per row).
    cfg, run_dir = new_run(tokenized_run, tmp_path_factory.mktemp("qlora"), "model.method=qlora",
                           "model.scratch.hidden_size=64", "model.scratch.intermediate_size=128",
                           "train.max_steps=2", "train.lr=5e-2", "train.warmup_steps=0", "train.eval_every=1000",
                           "checkpoint.every_steps=1000", "monitor.enabled=false", *EVAL)
    train(cfg, run_dir)
    return cfg, run_dir


def test_qlora_is_evaluated_on_its_4_bit_base_where_the_unquantised_one_does_not_fit(qlora_run, tmp_path,
                                                                                      monkeypatch):
    import bitsandbytes as bnb

    cfg, run_dir = qlora_run
    built = []
    real_build = runner.build_eval_model

    def spy(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(runner, "qlora_base_in_4_bits", lambda cfg, device, precision: True)
    monkeypatch.setattr(runner, "build_eval_model", spy)
    results = evaluate(cfg, tmp_path / "eval", adapter_dir=run_dir / "adapter")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in built[0].modules())
    assert results["base"]["model"]["base_weights"] == results["tuned"]["model"]["base_weights"] == "4-bit"
    base = [o["logprobs"] for o in results["base"]["sets"]["synthetic"]["items"]]
    tuned = [o["logprobs"] for o in results["tuned"]["sets"]["synthetic"]["items"]]
    assert base != tuned  # the adapter is on for the tuned model, off for the base


def test_merged_export_of_a_qlora_run_goes_to_host_memory_when_the_gpu_is_short(qlora_run, tmp_path, monkeypatch,
                                                                                caplog):
    from transformers import AutoTokenizer

    import leantune.modeling
    from leantune.training import loop

    cfg, run_dir = qlora_run
    monkeypatch.setattr("leantune.modeling.qlora_base_in_4_bits", lambda cfg, device, precision: True)
    real = leantune.modeling.resolve_precision
    # Training computed in bf16 (a GPU's precision); the host merge builds the base in bf16 too.
    monkeypatch.setattr(leantune.modeling, "resolve_precision",
                        lambda c, d: torch.bfloat16 if c.model.dtype == "auto" else real(c, d))
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    with caplog.at_level(logging.INFO):
        out = loop._export_merged(cfg, tokenizer, torch.device("cpu"), run_dir / "adapter", tmp_path / "merged")
    assert "merging in host memory" in caplog.text
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_out_of_memory_in_scoring_halves_the_batch_and_gives_the_same_scores(tokenized_run, tmp_path, monkeypatch):
    cfg = load_config(tokenized_run / "config.yaml", overrides=EVAL)
    tokenizer_dir = tokenized_run / "tokens" / "tokenizer"
    reference = evaluate(load_config(tokenized_run / "config.yaml", overrides=[*EVAL, "eval.batch_size=1"]),
                         tmp_path / "ref", tokenizer_dir=tokenizer_dir)
    real_score = runner.score_encoded
    sizes = []

    def score_fits_one(model, encoded, batch_size, *args, **kwargs):
        sizes.append(batch_size)
        if batch_size > 1:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        return real_score(model, encoded, batch_size, *args, **kwargs)

    monkeypatch.setattr(runner, "score_encoded", score_fits_one)
    results = evaluate(cfg, tmp_path / "eval", tokenizer_dir=tokenizer_dir)
    assert sizes[:3] == [4, 2, 1] and set(sizes[3:]) == {1}
    assert results["base"]["sets"]["synthetic"]["batch_size"] == 1
    ref_items = reference["base"]["sets"]["synthetic"]["items"]
    assert [o["logprobs"] for o in results["base"]["sets"]["synthetic"]["items"]] == [o["logprobs"] for o in ref_items]

    monkeypatch.setattr(runner, "score_encoded", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    with pytest.raises(OutOfMemory, match="evaluation ran out of memory on synthetic with a batch of 1 item"):
        evaluate(cfg, tmp_path / "eval2", tokenizer_dir=tokenizer_dir)
