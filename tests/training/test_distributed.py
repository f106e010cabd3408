"""Data-parallel training under torchrun on the CPU (gloo): 2 processes give the 1-process weights, a killed
rank fails the run without a hang and the run resumes exactly, an out-of-memory error on one rank is absorbed
by both. The 2-process runs go through tests/dist_train.py (per-rank test hooks)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from run_helpers import adapter, assert_same_weights, new_run

from leantune.config import ConfigError, load_config
from leantune.metrics import read_metrics
from leantune.training.loop import train

pytestmark = pytest.mark.slow

LAUNCHER = Path(__file__).parents[1] / "dist_train.py"
MAX_STEPS = 6
# Validation at step 3 and 6 (sharded over the ranks), checkpoints every 2 steps (per-rank RNG states),
# dropout on (each rank draws its own).
OVERRIDES = [f"train.max_steps={MAX_STEPS}", "train.eval_every=3", "checkpoint.every_steps=2",
             "checkpoint.keep_last=5", "monitor.enabled=false", "lora.dropout=0.1"]
# A deadlock would otherwise hang the test session; a healthy run takes a few seconds.
TIMEOUT = 180


def torchrun(run_dir: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             "--max-restarts=0", str(LAUNCHER), str(run_dir), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"torchrun still running after {TIMEOUT}s (a hang):\n{out[-4000:]}")
    return proc.returncode, out


def run_two(run_dir: Path, *args: str) -> None:
    rc, out = finish(torchrun(run_dir, *args))
    assert rc == 0, out[-4000:]


def summaries(run_dir: Path) -> list[dict]:
    return [json.loads((run_dir / f"summary-rank-{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def one_process(tokenized_run, tmp_path_factory) -> Path:
    # Dropout off: with it the ranks draw other random numbers than one process does.
    cfg, run_dir = new_run(tokenized_run, tmp_path_factory.mktemp("one"), *OVERRIDES, "lora.dropout=0.0")
    train(cfg, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def two_processes(tokenized_run, tmp_path_factory) -> Path:
    _, run_dir = new_run(tokenized_run, tmp_path_factory.mktemp("two"), *OVERRIDES, "lora.dropout=0.0")
    run_two(run_dir)
    return run_dir


@pytest.fixture(scope="module")
def two_with_dropout(tokenized_run, tmp_path_factory) -> Path:
    """The uninterrupted 2-process run the killed and resumed one must match."""
    _, run_dir = new_run(tokenized_run, tmp_path_factory.mktemp("two-dropout"), *OVERRIDES)
    run_two(run_dir)
    return run_dir


def test_two_processes_give_the_single_process_weights(one_process, two_processes):
    assert_same_weights(adapter(two_processes), adapter(one_process), rel=1e-5)
    one, two = read_metrics(one_process, "step"), read_metrics(two_processes, "step")
    assert [m["step"] for m in two] == list(range(1, MAX_STEPS + 1))
    # Same global batches (tokens), schedule (lr), loss normalisation, and the sharded validation.
    assert [m["tokens"] for m in two] == [m["tokens"] for m in one]
    assert [m["lr"] for m in two] == [m["lr"] for m in one]
    np.testing.assert_allclose([m["loss"] for m in two], [m["loss"] for m in one], rtol=1e-5)
    np.testing.assert_allclose([m["val_loss"] for m in two if "val_loss" in m],
                               [m["val_loss"] for m in one if "val_loss" in m], rtol=1e-5)
    # Each rank runs its half of the global batch of 8: micro-batches of 4, one per step.
    assert {(m["world_size"], m["micro_batch_size"], m["accumulation_steps"]) for m in two} == {(2, 4, 1)}
    assert {(m["world_size"], m["accumulation_steps"]) for m in one} == {(1, 2)}

    summary = json.loads((two_processes / "training.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == MAX_STEPS and summary["tokens_per_s"] > 0
    assert len(summary["rank_peak_memory_mb"]) == 2 and min(summary["rank_peak_memory_mb"]) > 0
    # Every rank returns the same summary of the same training.
    rank0, rank1 = summaries(two_processes)
    assert rank0["final_loss"] == rank1["final_loss"] == summary["final_loss"]
    # Rank 0 writes the checkpoints, with rank 1's RNG state beside its own.
    checkpoint = two_processes / "checkpoints" / f"step-{MAX_STEPS}"
    assert (checkpoint / "rng.pt").is_file() and (checkpoint / "rng-rank-1.pt").is_file()
    assert json.loads((checkpoint / "manifest.json").read_text())["world_size"] == 2


def test_a_killed_rank_fails_the_run_and_it_resumes_exactly(tokenized_run, tmp_path, two_with_dropout):
    _, run_dir = new_run(tokenized_run, tmp_path, *OVERRIDES)
    proc = torchrun(run_dir, "--pause=1:5")
    paused = run_dir / "rank-1.paused"
    deadline = time.monotonic() + TIMEOUT
    while not paused.is_file() or not paused.read_text():
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "rank 1 never reached step 5"
        time.sleep(0.05)
    # Rank 0 waits for rank 1 in the step's agreement when rank 1 dies.
    os.kill(int(paused.read_text()), signal.SIGKILL)
    killed = time.monotonic()
    rc, out = finish(proc)
    assert rc != 0, out[-4000:]
    assert time.monotonic() - killed < 90, "the run took too long to fail after the kill"
    assert not (run_dir / "adapter").exists() and not (run_dir / "training.json").exists()

    run_two(run_dir, "--resume")
    summary = json.loads((run_dir / "training.json").read_text())
    assert summary["resumed_from_step"] == 4 and summary["steps"] == MAX_STEPS
    # Both ranks restored their own RNG state (dropout on): the weights are the uninterrupted run's, bit for bit.
    reference, resumed = adapter(two_with_dropout), adapter(run_dir)
    assert reference.keys() == resumed.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
    assert [m["loss"] for m in read_metrics(run_dir, "step")] == [m["loss"] for m in read_metrics(two_with_dropout, "step")]


def test_out_of_memory_on_one_rank_halves_the_micro_batch_on_both(tokenized_run, tmp_path, two_processes):
    _, run_dir = new_run(tokenized_run, tmp_path, *OVERRIDES, "lora.dropout=0.0")
    run_two(run_dir, "--oom=1:3:2")
    # Rank 1 ran out of memory at step 3 with micro-batches of 4 and halved; rank 0 (which writes the
    # metrics) took the smaller size from it, and both redid step 3.
    assert [(e["step"], e["old"], e["new"], e["reason"]) for e in read_metrics(run_dir, "micro_batch")] == [(3, 4, 2, "oom_other_rank")]
    assert [m["micro_batch_size"] for m in read_metrics(run_dir, "step")] == [4, 4, 2, 2, 2, 2]
    assert [(s["micro_batch_size"], s["micro_batch_changes"]) for s in summaries(run_dir)] == [(2, 1), (2, 1)]
    assert_same_weights(adapter(run_dir), adapter(two_processes), rel=1e-5)


@pytest.mark.parametrize("overrides, key", [
    (["train.distributed.nproc_per_node=3"], "train.global_batch_size"),
    (["train.distributed.backend=nccl", "train.device=cpu"], "train.distributed.backend"),
])
def test_combinations_that_cannot_run_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["train.global_batch_size=16", "train.micro_batch_size=4", *overrides])
    assert f"{key}:" in str(e.value)
