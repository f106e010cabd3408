"""The monitor inside the training loop: scripted GPU scenarios (fake NVML, one reading per step) and
what the loop does about them, with training results unchanged; energy per step; the power limit;
a NaN loss."""

import json
import shutil

import numpy as np
import pytest
from fakes import FakeNvml
from safetensors.torch import load_file

from leantune.config import dump_config, load_config
from leantune.failures import NonFiniteLoss, classify
from leantune.monitor.sampler import Monitor
from leantune.testing import loop_hooks
from leantune.training.loop import train

FAST = ["train.eval_every=1000", "checkpoint.every_steps=1000", "checkpoint.keep_last=20", "train.max_steps=6",
        "monitor.interval_seconds=3600"]  # the thread samples only at start and stop; the test samples per step


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def new_run(tokenized_run, tmp_path, name, *overrides):
    run_dir = tmp_path / name
    shutil.copytree(tokenized_run, run_dir)
    cfg = load_config(run_dir / "config.yaml", overrides=[*FAST, *overrides])
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return cfg, run_dir


def monitored(tokenized_run, tmp_path, name, script, *overrides, fail_at_step=None, **fake_kwargs):
    """Train with a monitor reading `script` (frame t=k is read when step k starts); return
    (summary or the error, run_dir, fake)."""
    cfg, run_dir = new_run(tokenized_run, tmp_path, name, *overrides)
    clock = FakeClock()
    fake = FakeNvml(script, clock, **fake_kwargs)
    # The monitor believes training runs on that GPU, so the scripted memory is the device's.
    monitor = Monitor(cfg.monitor, run_dir / "monitor.csv", device_type="cuda", nvml=fake, clock=clock)
    sampled = set()

    def each_micro_batch(step, k, micro_batch_size):
        if step > 0 and step not in sampled:
            sampled.add(step)
            clock.t = float(step)
            monitor.sample_once()
        if step == fail_at_step:
            raise RuntimeError("the run fails here")
        return False

    try:
        with loop_hooks(oom=each_micro_batch, monitor=monitor):
            return train(cfg, run_dir), run_dir, fake
    except Exception as e:  # noqa: BLE001 - the tests look at it
        return e, run_dir, fake


def lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def steps(run_dir):
    return [m for m in lines(run_dir) if "event" not in m]


def events(run_dir, kind):
    return [m for m in lines(run_dir) if m.get("event") == kind]


@pytest.fixture(scope="module")
def reference(tokenized_run, tmp_path_factory):
    """The same training without a monitor: losses and adapter weights."""
    cfg, run_dir = new_run(tokenized_run, tmp_path_factory.mktemp("ref"), "ref", "monitor.enabled=false")
    summary = train(cfg, run_dir)
    assert summary["monitor_backend"] is None and summary["energy_j"] is None
    assert not (run_dir / "monitor.csv").exists()
    return [m["loss"] for m in steps(run_dir)], load_file(run_dir / "adapter" / "adapter_model.safetensors")


def assert_same_training(run_dir, reference):
    losses, weights = reference
    np.testing.assert_allclose([m["loss"] for m in steps(run_dir)], losses, rtol=1e-5)
    got = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    for key, value in weights.items():
        assert float((got[key] - value).norm() / value.norm()) <= 1e-5, key


def test_memory_creeping_up_shrinks_the_micro_batch_and_training_stays_exact(tokenized_run, tmp_path, reference):
    used = [4000, 5000, 7600, 7700, 6000, 7600, 7600]  # MiB of 8192; 0.92 of it is 7537
    script = [{"t": t, "memory_used_mb": u} for t, u in enumerate(used)]
    summary, run_dir, _ = monitored(tokenized_run, tmp_path, "creep", script)
    assert summary["completed"]
    decisions = events(run_dir, "monitor")
    assert [(d["step"], d["action"], d["reason"]) for d in decisions] == [(2, "shrink", "memory_high"),
                                                                          (5, "shrink", "memory_high")]
    assert decisions[0]["reading"]["gpu_memory_used_mb"] == 7600
    assert decisions[0]["reading"]["memory_used_fraction"] == pytest.approx(7600 / 8192, abs=1e-4)
    assert [(e["step"], e["old"], e["new"], e["reason"]) for e in events(run_dir, "micro_batch")] == [
        (2, 4, 2, "memory_high"), (5, 2, 1, "memory_high")]
    assert [m["micro_batch_size"] for m in steps(run_dir)] == [4, 4, 2, 2, 2, 1]
    assert summary["micro_batch_size"] == 1 and summary["monitor_backend"] == "nvml"
    assert summary["gpu_name"] == "Fake GPU 0" and summary["device"] == "cpu"
    assert_same_training(run_dir, reference)


def test_a_thermal_spike_checkpoints_at_the_next_step_boundary(tokenized_run, tmp_path, reference):
    script = [{"t": 0, "temperature_c": 60}, {"t": 3, "temperature_c": 91}, {"t": 4, "temperature_c": 70}]
    summary, run_dir, _ = monitored(tokenized_run, tmp_path, "hot", script)
    assert [(d["step"], d["action"], d["reason"]) for d in events(run_dir, "monitor")] == [
        (3, "checkpoint", "temperature")]
    manifest = json.loads((run_dir / "checkpoints" / "step-3" / "manifest.json").read_text())
    assert manifest["reason"] == "requested:temperature"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-3", "step-6"]
    assert_same_training(run_dir, reference)


def test_nvml_vanishing_mid_run_checkpoints_and_training_goes_on(tokenized_run, tmp_path, reference):
    script = [{"t": 0}, {"t": 2, "error": "GPU_IS_LOST"}]
    summary, run_dir, _ = monitored(tokenized_run, tmp_path, "lost", script)
    assert summary["completed"] and summary["monitor_backend"] == "psutil"
    assert [(d["step"], d["reason"]) for d in events(run_dir, "monitor")] == [(2, "nvml_lost")]
    assert (run_dir / "checkpoints" / "step-2").is_dir()
    backends = [line.split(",")[2] for line in (run_dir / "monitor.csv").read_text().splitlines()[1:]]
    assert backends[:2] == ["nvml", "nvml"] and set(backends[2:]) == {"psutil"}
    assert_same_training(run_dir, reference)


def test_energy_per_step_per_run_and_per_1000_tokens(tokenized_run, tmp_path):
    # The counter gains 150 J per step; the power draw (150 W) only extrapolates between samples.
    script = [{"t": t, "energy_mj": 150_000 * t, "power_w": 150.0} for t in range(8)]
    summary, run_dir, _ = monitored(tokenized_run, tmp_path, "energy", script)
    assert [m["energy_j"] for m in steps(run_dir)] == [150.0] * 6
    assert summary["energy_j"] == pytest.approx(900.0) and summary["energy_per_step_j"] == pytest.approx(150.0)
    assert summary["energy_per_1k_tokens_j"] == pytest.approx(900_000 / summary["tokens"])
    rows = (run_dir / "monitor.csv").read_text().splitlines()
    assert rows[0].startswith("time,elapsed_s,backend,gpu") and len(rows) == 1 + 1 + 6 + 1  # start, steps, stop


def test_the_power_limit_is_applied_and_restored_also_when_training_fails(tokenized_run, tmp_path):
    summary, _, fake = monitored(tokenized_run, tmp_path, "power", [{"t": 0, "power_limit_w": 115}],
                                 "power.limit_watts=90")
    assert summary["power_limit"]["status"] == "applied" and summary["power_limit"]["applied_w"] == 90
    assert summary["power_limit"]["restored_w"] == 115 and fake.power_limits_w[0] == 115

    error, _, fake = monitored(tokenized_run, tmp_path, "power-fail", [{"t": 0, "power_limit_w": 115}],
                               "power.limit_watts=90", fail_at_step=3)
    assert isinstance(error, RuntimeError) and str(error) == "the run fails here"
    assert fake.set_calls == [(0, 90.0), (0, 115.0)] and fake.power_limits_w[0] == 115


def test_every_gpu_of_the_machine_is_capped_restored_and_its_energy_summed(tokenized_run, tmp_path):
    # Three GPUs found at 115, 120 and 125 W; their counters gain 100, 150 and 200 J per step.
    script = [{"t": t, "gpus": [{"power_limit_w": 115 + 5 * i, "energy_mj": (100_000 + 50_000 * i) * t,
                                 "power_w": 100.0} for i in range(3)]} for t in range(8)]
    summary, run_dir, fake = monitored(tokenized_run, tmp_path, "three", script, "power.limit_watts=90",
                                       gpus=3)
    assert [(p["gpu"], p["status"], p["previous_w"], p["applied_w"], p["restored_w"])
            for p in summary["power_limits"]] == [(0, "applied", 115, 90, 115), (1, "applied", 120, 90, 120),
                                                  (2, "applied", 125, 90, 125)]
    assert summary["power_limit"] == summary["power_limits"][0]
    assert fake.power_limits_w == {0: 115, 1: 120, 2: 125}
    assert [m["energy_j"] for m in steps(run_dir)] == [450.0] * 6
    assert summary["energy_j"] == pytest.approx(2700.0)
    table = (run_dir / "monitor.csv").read_text().splitlines()
    assert [row.split(",")[3:5] for row in table[1:4]] == [["0", "Fake GPU 0"], ["1", "Fake GPU 1"],
                                                          ["2", "Fake GPU 2"]]
    assert not list(run_dir.glob("power_limit_original*"))  # every record removed once restored

    # A failing run restores every GPU too; the record of each was written before its cap.
    error, run_dir, fake = monitored(tokenized_run, tmp_path, "three-fail", script, "power.limit_watts=90",
                                     fail_at_step=2, gpus=3)
    assert str(error) == "the run fails here"
    assert fake.set_calls == [(0, 90.0), (1, 90.0), (2, 90.0), (2, 125.0), (1, 120.0), (0, 115.0)]
    assert not list(run_dir.glob("power_limit_original*"))


def test_the_step_energy_is_summed_over_the_machines():
    """Each machine's local rank 0 adds its monitor's step energy; other ranks add 0; a machine without a
    reading makes the sum unknown rather than too small."""
    from types import SimpleNamespace

    from leantune.training.loop import _all_nodes_energy

    def run_on(local_rank, others, nodes=2):
        sums = []

        def sum_all(values):
            sums.append(values)
            return [values[0] + others]
        return SimpleNamespace(dist=SimpleNamespace(nodes=nodes, local_rank=local_rank, sum_all=sum_all),
                               cfg=SimpleNamespace(monitor=SimpleNamespace(enabled=True))), sums

    run, sums = run_on(0, others=70.0)
    assert _all_nodes_energy(run, 100.0, 130.0) == 100.0 and sums == [[30.0]]
    run, sums = run_on(1, others=100.0)
    assert _all_nodes_energy(run, None, None) == 100.0 and sums == [[0.0]]
    run, _ = run_on(0, others=float("nan"))
    assert _all_nodes_energy(run, 100.0, 130.0) is None
    run, sums = run_on(0, others=70.0, nodes=1)
    assert _all_nodes_energy(run, 100.0, 130.0) == 30.0 and sums == []  # one machine: no exchange


def test_a_nan_loss_stops_the_attempt_before_it_is_checkpointed(tokenized_run, tmp_path, monkeypatch):
    import leantune.training.loop as loop

    calls = []
    real = loop.target_cross_entropy

    def poisoned(model, inputs, labels):
        calls.append(1)
        ce = real(model, inputs, labels)
        return ce * float("nan") if len(calls) > 4 else ce  # 2 micro-batches per step: step 3 turns NaN

    monkeypatch.setattr(loop, "target_cross_entropy", poisoned)
    cfg, run_dir = new_run(tokenized_run, tmp_path, "nan", "checkpoint.every_steps=1", "adaptive.probe_longest_first=false")
    with pytest.raises(NonFiniteLoss, match="the training loss is nan at step 3") as caught:
        train(cfg, run_dir)
    assert classify(caught.value) == "nan"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-1", "step-2"]
