"""The feedback policy: scripted scenarios (memory creeping up, a thermal spike, throttling, NVML
vanishing) through the fake NVML and the real sampler, and the decisions they lead to."""

import pytest
from fakes import FakeNvml

from leantune.config import MonitorConfig
from leantune.monitor.policy import Feedback, PolicyState, decide
from leantune.monitor.sampler import Monitor, Sample


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def run_script(script, device_type="cuda", cfg=None, **fake_kwargs):
    """Sample once per scripted frame (one per second); return (decisions per sample, checkpoint requests)."""
    clock = FakeClock()
    requests = []
    cfg = cfg or MonitorConfig()
    feedback = Feedback(cfg, requests.append)
    monitor = Monitor(cfg, nvml=FakeNvml(script, clock, **fake_kwargs), device_type=device_type,
                      on_sample=feedback, clock=clock)
    per_sample = []
    for t in range(len(script)):
        clock.t = float(t)
        monitor.sample_once()
        per_sample.append([(d.action, d.reason) for d in feedback.drain()])
    return per_sample, requests


def frames(**series):
    """One frame per second from equal-length lists per field."""
    n = len(next(iter(series.values())))
    return [{"t": t, **{k: v[t] for k, v in series.items()}} for t in range(n)]


def test_memory_creeping_up_shrinks_once_per_crossing():
    used = [4000, 6000, 7600, 7900, 7000, 7700, 7800]  # of 8192 MiB; the threshold 0.92 is 7537 MiB
    decisions, requests = run_script(frames(memory_used_mb=used))
    assert decisions == [[], [], [("shrink", "memory_high")], [], [], [("shrink", "memory_high")], []]
    assert requests == []  # a shrink is the loop's to apply, not a checkpoint


def test_a_thermal_spike_asks_for_one_checkpoint_until_it_cools_down():
    temps = [70, 86, 88, 82, 79, 85]  # limit 85 °C, cleared 5 °C below
    decisions, requests = run_script(frames(temperature_c=temps))
    assert decisions == [[], [("checkpoint", "temperature")], [], [], [], [("checkpoint", "temperature")]]
    assert requests == ["temperature", "temperature"]


def test_thermal_and_hardware_throttling_checkpoint_but_a_power_cap_does_not():
    sw_power_cap, hw_slowdown, hw_thermal = 0x4, 0x8, 0x40
    masks = [0, sw_power_cap, sw_power_cap | hw_thermal, hw_thermal, hw_thermal | hw_slowdown, 0, hw_thermal]
    decisions, requests = run_script(frames(throttle=masks))
    assert decisions == [[], [], [("checkpoint", "throttle:hw_thermal")], [],
                         [("checkpoint", "throttle:hw_slowdown")], [], [("checkpoint", "throttle:hw_thermal")]]
    assert requests == ["throttle:hw_thermal", "throttle:hw_slowdown", "throttle:hw_thermal"]


def test_nvml_vanishing_asks_for_one_checkpoint_and_leaves_memory_to_the_loop():
    script = [{"t": 0}, {"t": 1}, {"t": 2, "error": "GPU_IS_LOST"}, {"t": 3}]
    decisions, requests = run_script(script)
    assert decisions == [[], [], [("checkpoint", "nvml_lost")], []]
    assert requests == ["nvml_lost"]


def test_no_nvml_at_all_is_no_loss():
    decisions, requests = run_script([{"t": 0}, {"t": 1}], device_type="cpu", init_error="LIBRARY_NOT_FOUND")
    assert decisions == [[], []] and requests == []


def test_each_gpu_counts_for_temperature():
    script = [{"t": 0, "gpus": [{"temperature_c": 60}, {"temperature_c": 60}]},
              {"t": 1, "gpus": [{"temperature_c": 60}, {"temperature_c": 90}]}]
    decisions, _ = run_script(script, gpus=2)
    assert decisions == [[], [("checkpoint", "temperature")]]


def sample(device_type="cpu", ram_available=8000.0, ram_total=16000.0, gpus=()):
    return Sample(time=0.0, elapsed_s=1.5, backend="psutil", device_type=device_type, gpus=gpus,
                  torch_allocated_mb=None, torch_peak_mb=None, torch_reserved_mb=None, rss_mb=100.0, cpu_pct=50.0,
                  ram_available_mb=ram_available, ram_total_mb=ram_total)


def test_host_memory_on_the_cpu_shrinks_and_checkpoints_with_the_reading():
    cfg = MonitorConfig(memory_high_fraction=0.9)
    state, decisions = decide(PolicyState(), sample(ram_available=1000.0), cfg)
    assert [(d.action, d.reason) for d in decisions] == [("shrink", "memory_high"), ("checkpoint", "host_memory")]
    reading = decisions[0].reading
    assert reading["memory_used_fraction"] == pytest.approx(0.9375)
    assert (reading["ram_available_mb"], reading["elapsed_s"]) == (1000.0, 1.5)
    assert decisions[1].event(12) == {"event": "monitor", "step": 12, "action": "checkpoint",
                                      "reason": "host_memory", "reading": reading}
    # Still high: nothing new; lower again: nothing; high again: both again.
    state, again = decide(state, sample(ram_available=1200.0), cfg)
    assert again == []
    state, _ = decide(state, sample(ram_available=8000.0), cfg)
    _, third = decide(state, sample(ram_available=100.0), cfg)
    assert len(third) == 2


def test_host_memory_while_training_on_a_gpu_checkpoints_only():
    _, decisions = decide(PolicyState(), sample(device_type="cuda", ram_available=500.0), MonitorConfig())
    # No GPU reading: the device's memory is unknown (the loop uses its own reading), no shrink.
    assert [(d.action, d.reason) for d in decisions] == [("checkpoint", "host_memory")]


def test_decide_is_pure():
    state = PolicyState()
    s = sample(ram_available=100.0)
    assert decide(state, s, MonitorConfig()) == decide(state, s, MonitorConfig())
    assert state == PolicyState()


def test_checkpoint_requests_reach_a_real_checkpoint_manager(tmp_path):
    from leantune.config import RunConfig
    from leantune.training.checkpoint import CheckpointManager

    manager = CheckpointManager(RunConfig(), tmp_path, {"config": "x", "data": "y", "tokenizer": "z"})
    clock = FakeClock()
    cfg = MonitorConfig()
    feedback = Feedback(cfg, manager.request)
    monitor = Monitor(cfg, nvml=FakeNvml([{"t": 0, "temperature_c": 90}], clock), device_type="cuda",
                      on_sample=feedback, clock=clock)
    assert manager.due(7) is None
    monitor.sample_once()
    assert manager.due(7) == "requested:temperature"


def test_the_controller_applies_a_shrink_and_backs_off_after_growth():
    from leantune.training.adaptive import MicroBatchController

    c = MicroBatchController(12, 6, grow_after_steps=2, headroom_fraction=0.3)
    assert c.shrink(5).event() == {"event": "micro_batch", "step": 5, "old": 6, "new": 3, "reason": "memory_high"}
    assert c.after_step(6, 0.9) is None and c.after_step(7, 0.9).new == 6  # grown again on headroom
    assert c.shrink(8).new == 3 and c.grow_after_steps == 4  # that growth was too much: grow later
    assert c.shrink(9).new == 1 and c.shrink(10) is None  # 3 // 2 = 1, the largest divisor of 12 up to it
    assert MicroBatchController(12, 6, enabled=False).shrink(1) is None
