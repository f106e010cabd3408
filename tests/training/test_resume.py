"""Exact resume: a training subprocess killed (SIGKILL) or stopped (SIGTERM) mid-run, then resumed with
--resume, ends with adapter weights bitwise equal to an uninterrupted run's (CPU, fp32, deterministic)."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leantune.config import dump_config, load_config
from leantune.failures import EXIT_STOPPED
from leantune.training.checkpoint import CheckpointManager, run_fingerprints

pytestmark = pytest.mark.slow

MAX_STEPS = 12
# Dropout on, so a resume that failed to restore the torch RNG would diverge.
RESUME_OVERRIDES = [f"train.max_steps={MAX_STEPS}", "checkpoint.every_steps=1", "checkpoint.keep_last=2",
                    "lora.dropout=0.1", "train.eval_every=1000", "monitor.enabled=false"]
# Kill points drawn once from a fixed seed: "random" steps that are the same on every test run.
KILL_STEPS = sorted(random.Random(20240611).sample(range(2, MAX_STEPS - 3), 3))
SUBPROCESS_TIMEOUT = 240


def make_run(tokenized_run: Path, where: Path, *overrides: str) -> Path:
    run_dir = where / "run"
    shutil.copytree(tokenized_run, run_dir)
    cfg = load_config(run_dir / "config.yaml",
                      overrides=[*RESUME_OVERRIDES, f"run.output_dir={where}", *overrides])
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return run_dir


def start(run_dir: Path, *extra: str) -> subprocess.Popen:
    # One intra-op thread: every process reduces in the same order, whatever else runs on the machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "leantune.training.loop", str(run_dir), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    return proc.returncode, out


def run_to_end(run_dir: Path, *extra: str) -> str:
    rc, out = finish(start(run_dir, *extra))
    assert rc == 0, out
    return out


def metric_lines(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        # The last line of a killed process may be half written.
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [m for m in lines if "loss" in m and "step" in m]


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while not any(m["step"] >= step for m in metric_lines(run_dir)):
        assert proc.poll() is None, f"training ended before step {step}: {proc.communicate()[0]}"
        assert time.monotonic() < deadline, f"no step {step} in metrics.jsonl after {SUBPROCESS_TIMEOUT}s"
        time.sleep(0.01)
    # The interruption must land inside the run, not after it, or nothing is being tested.
    assert proc.poll() is None, "training finished before it could be interrupted; raise MAX_STEPS"


def adapter_tensors(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def assert_bitwise_equal(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs from the uninterrupted run"


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in (run_dir / "checkpoints").glob("step-*"))


def resume_and_check(run_dir: Path, reference: Path, expected_start: int) -> None:
    """Resume; it must continue from checkpoint `expected_start` and end exactly where the reference ended."""
    run_to_end(run_dir, "--resume")
    assert json.loads((run_dir / "training.json").read_text())["resumed_from_step"] == expected_start
    # Same data position and RNG: every step logs the uninterrupted run's numbers, bit for bit.
    assert [deterministic(m) for m in metric_lines(run_dir)] == [deterministic(m) for m in metric_lines(reference)]
    assert_bitwise_equal(adapter_tensors(run_dir), adapter_tensors(reference))


def deterministic(line: dict) -> dict:
    """A metrics line without its timing and memory readings."""
    return {k: v for k, v in line.items() if k not in ("tokens_per_s", "elapsed_s", "peak_memory_mb")}


@pytest.fixture(scope="module")
def reference(tokenized_run, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must match."""
    run_dir = make_run(tokenized_run, tmp_path_factory.mktemp("reference"))
    run_to_end(run_dir)
    assert [m["step"] for m in metric_lines(run_dir)] == list(range(1, MAX_STEPS + 1))
    return run_dir


# Sparser checkpoints make the resumed run redo steps the killed one had already logged.
@pytest.mark.parametrize("kill_step, every_steps", zip(KILL_STEPS, (1, 2, 3), strict=True))
def test_sigkill_then_resume_is_bitwise_equal(tokenized_run, reference, tmp_path, kill_step, every_steps):
    # every_steps only changes when checkpoints are taken, so the reference run stays comparable.
    run_dir = make_run(tokenized_run, tmp_path, f"checkpoint.every_steps={every_steps}")
    proc = start(run_dir)
    wait_for_step(proc, run_dir, kill_step)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=SUBPROCESS_TIMEOUT)
    assert not (run_dir / "adapter").exists()

    cfg = load_config(run_dir / "config.yaml")
    latest = CheckpointManager(cfg, run_dir, run_fingerprints(cfg, run_dir)).latest()
    assert latest is not None and int(latest.name.removeprefix("step-")) >= kill_step - every_steps
    resume_and_check(run_dir, reference, int(latest.name.removeprefix("step-")))


def test_resume_skips_a_corrupt_latest_checkpoint(tokenized_run, reference, tmp_path):
    run_dir = make_run(tokenized_run, tmp_path)
    proc = start(run_dir)
    wait_for_step(proc, run_dir, KILL_STEPS[-1])
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=SUBPROCESS_TIMEOUT)
    # Drop a half-written save, if the kill left one, so the newest step-N is a complete checkpoint.
    for leftover in (run_dir / "checkpoints").glob(".tmp-*"):
        shutil.rmtree(leftover)
    older, newest = checkpoint_steps(run_dir)[-2:]
    weights = run_dir / "checkpoints" / f"step-{newest}" / "adapter.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))

    resume_and_check(run_dir, reference, older)


def test_sigterm_saves_at_the_stop_step_and_exits_cleanly(tokenized_run, reference, tmp_path):
    # No periodic checkpoints: the only one is the signal's.
    run_dir = make_run(tokenized_run, tmp_path, "checkpoint.every_steps=1000")
    proc = start(run_dir)
    wait_for_step(proc, run_dir, KILL_STEPS[0])
    proc.send_signal(signal.SIGTERM)
    rc, out = finish(proc)
    assert rc == EXIT_STOPPED, out
    assert json.loads((run_dir / "training.json").read_text())["completed"] is False
    stop_step = metric_lines(run_dir)[-1]["step"]
    assert stop_step < MAX_STEPS
    assert checkpoint_steps(run_dir) == [stop_step]
    manifest = json.loads((run_dir / "checkpoints" / f"step-{stop_step}" / "manifest.json").read_text())
    assert (manifest["step"], manifest["reason"]) == (stop_step, "signal")
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))

    resume_and_check(run_dir, reference, stop_step)


def test_resume_with_another_lr_continues_the_schedule_rescaled(tokenized_run, tmp_path):
    """--resume --set train.lr=... (and the NaN retry): from the checkpoint on, every step's lr is the
    old schedule's times new/old, and the rescale is in metrics.jsonl."""
    from run_helpers import new_run

    from leantune.training.loop import train

    cfg, run_dir = new_run(tokenized_run, tmp_path, "train.max_steps=6", "checkpoint.every_steps=1",
                           "checkpoint.keep_last=10", "train.eval_every=1000", "monitor.enabled=false",
                           "train.warmup_steps=2", "train.schedule=cosine")
    train(cfg, run_dir)
    reference = {m["step"]: m["lr"] for m in metric_lines(run_dir)}
    for step in (4, 5, 6):
        shutil.rmtree(run_dir / "checkpoints" / f"step-{step}")
    lower = load_config(run_dir / "config.yaml", overrides=["train.lr=4e-3"])  # conftest's 1e-2 times 0.4
    (run_dir / "config.yaml").write_text(dump_config(lower))

    summary = train(lower, run_dir, resume=True)
    assert summary["resumed_from_step"] == 3 and summary["steps"] == 6
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    [rescale] = [m for m in lines if m.get("event") == "lr_rescale"]
    # One parameter group: LoRA's matrices (no biases or norms train).
    assert rescale == {"event": "lr_rescale", "step": 3, "old": [1e-2], "new": [4e-3], "factor": [pytest.approx(0.4)]}
    resumed = {m["step"]: m["lr"] for m in metric_lines(run_dir)}
    assert [resumed[s] for s in (1, 2, 3)] == [reference[s] for s in (1, 2, 3)]  # the kept lines
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(reference[step] * 0.4, rel=1e-12)
    # The new peak is the config's from now on: a checkpoint saved after the resume holds it.
    assert CheckpointManager(lower, run_dir, run_fingerprints(lower, run_dir)).latest().name == "step-6"
    import torch

    saved = torch.load(run_dir / "checkpoints" / "step-6" / "scheduler.pt", weights_only=True)
    assert saved["base_lrs"] == [4e-3]
