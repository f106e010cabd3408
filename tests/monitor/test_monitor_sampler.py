"""The resource sampler against a scripted fake NVML: readings, monitor.csv, energy, degrading, the thread."""

import csv
import logging
import time
from types import SimpleNamespace

import pytest
from fakes import FakeNvml

from leantune.config import MonitorConfig
from leantune.monitor.sampler import CSV_COLUMNS, GpuReading, Monitor, Sample, throttle_names


class FakeClock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def make_monitor(script, tmp_path, clock, *, cfg=None, fake_kwargs=None, **kwargs):
    fake = FakeNvml(script, clock, **(fake_kwargs or {}))
    monitor = Monitor(cfg or MonitorConfig(), tmp_path / "monitor.csv", nvml=fake, clock=clock,
                      wall_clock=lambda: 1_700_000_000.0 + clock(), **kwargs)
    return monitor, fake


def test_nvml_readings_become_samples_and_csv_rows(tmp_path):
    clock = FakeClock()
    script = [
        {"t": 0, "memory_used_mb": 2048, "memory_total_mb": 8192, "utilization_pct": 97, "power_w": 110.5,
         "power_limit_w": 115, "temperature_c": 71, "sm_clock_mhz": 2460, "throttle": 0x4, "energy_mj": 5_000_000},
        {"t": 2, "memory_used_mb": 4096, "temperature_c": 74, "throttle": 0x4 | 0x40, "energy_mj": 5_230_000},
    ]
    monitor, _ = make_monitor(script, tmp_path, clock, device_type="cuda", fake_kwargs={"names": ("RTX 4060",)})
    first = monitor.sample_once()
    clock.t = 2.0
    second = monitor.sample_once()
    monitor.stop()

    gpu = first.gpus[0]
    assert (gpu.name, gpu.memory_used_mb, gpu.memory_total_mb, gpu.utilization_pct) == ("RTX 4060", 2048, 8192, 97)
    assert (gpu.power_w, gpu.power_limit_w, gpu.temperature_c, gpu.sm_clock_mhz) == (110.5, 115, 71, 2460)
    assert gpu.throttle_reasons == ("sw_power_cap",) and gpu.energy_j == 0.0 and gpu.energy_source == "counter"
    assert second.gpus[0].throttle_reasons == ("sw_power_cap", "hw_thermal")
    assert second.gpus[0].energy_j == pytest.approx(230.0)  # joules since the monitor started
    assert first.backend == "nvml" and second.elapsed_s == 2.0
    # No torch CUDA in these tests: the free share is NVML's.
    assert second.free_fraction == pytest.approx(0.5)
    assert monitor.latest is not None and monitor.latest.elapsed_s == 2.0  # stop() took a last sample

    table = rows(tmp_path / "monitor.csv")
    assert list(table[0]) == list(CSV_COLUMNS)
    assert len(table) == 3
    assert table[1]["throttle_reasons"] == "sw_power_cap|hw_thermal"
    assert (table[1]["memory_used_mb"], table[1]["energy_j"], table[1]["gpu_name"]) == ("4096", "230", "RTX 4060")
    assert table[0]["time"] == "1700000000" and table[1]["elapsed_s"] == "2"
    assert float(table[0]["ram_total_mb"]) > 0 and float(table[0]["rss_mb"]) > 0


def test_energy_is_integrated_from_power_when_the_counter_is_missing(tmp_path):
    clock = FakeClock()
    script = [{"t": 0, "power_w": 100.0, "unsupported": ["energy_mj"]},
              {"t": 2, "power_w": 200.0, "unsupported": ["energy_mj"]}]
    monitor, _ = make_monitor(script, tmp_path, clock)
    energies = []
    for t in (0.0, 1.0, 2.0, 3.0):
        clock.t = t
        energies.append(monitor.sample_once().gpus[0].energy_j)
    # Trapezoids: 0, 100 W x 1 s, + (100 + 200) / 2 W x 1 s, + 200 W x 1 s.
    assert energies == [0.0, 100.0, 250.0, 450.0]
    assert monitor.latest.gpus[0].energy_source == "integrated"
    # Between samples the energy so far is extrapolated at the latest power draw.
    clock.t = 3.5
    assert monitor.energy_j() == pytest.approx(450.0 + 200.0 * 0.5)


def test_unsupported_fields_stay_empty_and_are_noted_once(tmp_path, caplog):
    clock = FakeClock()
    script = [{"t": 0, "unsupported": ["throttle"]}]
    monitor, _ = make_monitor(script, tmp_path, clock)
    with caplog.at_level(logging.INFO, logger="leantune.monitor.sampler"):
        samples = [monitor.sample_once() for _ in range(3)]
    assert all(s.gpus[0].throttle_reasons is None for s in samples)
    assert all(s.gpus[0].temperature_c == 40.0 for s in samples)  # the other fields are read
    assert len([r for r in caplog.records if "throttle_reasons" in r.getMessage()]) == 1


@pytest.mark.parametrize("device_type, level", [("cpu", logging.INFO), ("cuda", logging.WARNING)])
def test_missing_nvml_degrades_to_psutil_and_says_so_once(tmp_path, caplog, device_type, level):
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="leantune.monitor.sampler"):
        monitor, _ = make_monitor([], tmp_path, clock, device_type=device_type,
                                  fake_kwargs={"init_error": "LIBRARY_NOT_FOUND"})
        samples = [monitor.sample_once() for _ in range(3)]
        monitor.stop()
    said = [r for r in caplog.records if "NVML is not available" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == level
    assert "NVMLError_LibraryNotFound" in said[0].getMessage()
    assert all(s.backend == "psutil" and s.gpus == () for s in samples)
    assert monitor.energy_j() is None
    table = rows(tmp_path / "monitor.csv")
    assert len(table) == 4 and table[0]["gpu"] == "" and float(table[0]["ram_available_mb"]) > 0


def test_real_pynvml_without_a_driver_degrades_too(tmp_path, caplog):
    import pynvml

    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("NVML is present on this machine")
    except pynvml.NVMLError:
        pass
    with caplog.at_level(logging.INFO, logger="leantune.monitor.sampler"):
        monitor = Monitor(MonitorConfig(), tmp_path / "monitor.csv")
        sample = monitor.sample_once()
        monitor.stop()
    assert sample.backend == "psutil" and monitor.nvml is None
    assert len([r for r in caplog.records if "NVML is not available" in r.getMessage()]) == 1


def test_psutil_backend_never_touches_nvml(tmp_path):
    clock = FakeClock()
    monitor, fake = make_monitor([], tmp_path, clock, cfg=MonitorConfig(backend="psutil"))
    assert monitor.sample_once().gpus == () and not fake.initialised


def test_an_nvml_failure_mid_run_degrades_once_and_sampling_goes_on(tmp_path, caplog):
    clock = FakeClock()
    script = [{"t": 0, "memory_used_mb": 3000}, {"t": 2, "error": "GPU_IS_LOST"}, {"t": 3}]
    monitor, _ = make_monitor(script, tmp_path, clock, device_type="cuda")
    samples = []
    with caplog.at_level(logging.WARNING, logger="leantune.monitor.sampler"):
        for t in (0.0, 1.0, 2.0, 3.0, 4.0):
            clock.t = t
            samples.append(monitor.sample_once())
    assert [s.backend for s in samples] == ["nvml", "nvml", "psutil", "psutil", "psutil"]
    assert samples[2].nvml_error == "NVMLError_GpuIsLost: GPU is lost"
    assert samples[3].nvml_error is None  # said on the sample where it happened only
    # Even when the GPU would answer again, the monitor does not go back to it mid-run.
    assert samples[4].gpus == ()
    assert samples[2].free_fraction is None  # no reading of the training GPU any more
    assert len([r for r in caplog.records if "NVML failed" in r.getMessage()]) == 1


def test_every_gpu_gets_a_row(tmp_path):
    clock = FakeClock()
    script = [{"t": 0, "gpus": [{"memory_used_mb": 100, "energy_mj": 1000}, {"memory_used_mb": 200, "energy_mj": 0}]},
              {"t": 1, "gpus": [{"energy_mj": 3000}, {"energy_mj": 500}]}]
    monitor, _ = make_monitor(script, tmp_path, clock, fake_kwargs={"gpus": 2})
    monitor.sample_once()
    clock.t = 1.0
    sample = monitor.sample_once()
    monitor.stop()
    assert [g.memory_used_mb for g in sample.gpus] == [100, 200]
    assert monitor.energy_j() == pytest.approx(2.0 + 0.5)  # summed over the GPUs, in joules
    table = rows(tmp_path / "monitor.csv")
    assert [r["gpu"] for r in table] == ["0", "1", "0", "1", "0", "1"]


def test_free_fraction_counts_torch_cache_above_the_peak_as_free():
    gpu = GpuReading(index=0, name="x", memory_used_mb=7000, memory_total_mb=8000, utilization_pct=None,
                     power_w=None, power_limit_w=None, temperature_c=None, sm_clock_mhz=None,
                     throttle_reasons=None, energy_j=None, energy_source=None)
    common = dict(time=0.0, elapsed_s=0.0, backend="nvml", gpus=(gpu,), torch_allocated_mb=1500.0,
                  torch_peak_mb=2000.0, torch_reserved_mb=3000.0, rss_mb=1.0, cpu_pct=0.0,
                  ram_available_mb=3000.0, ram_total_mb=4000.0)
    # 1000 MiB free on the card + 1000 MiB reserved by torch above the step's peak.
    assert Sample(device_type="cuda", **common).free_fraction == pytest.approx(0.25)
    # Training on the CPU: the device's memory is host RAM.
    assert Sample(device_type="cpu", **common).free_fraction == pytest.approx(0.75)
    assert Sample(device_type="cpu", **common).host_memory_used_fraction == pytest.approx(0.25)


def test_throttle_names():
    assert throttle_names(0) == ()
    assert throttle_names(0x4 | 0x20 | 0x80) == ("sw_power_cap", "sw_thermal", "hw_power_brake")


def wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_thread_samples_until_stopped_and_survives_a_failing_callback(tmp_path, caplog):
    seen = []

    def on_sample(sample):
        seen.append(sample)
        if len(seen) == 2:
            raise RuntimeError("callback bug")

    fake = FakeNvml([{"t": 0}], time.monotonic)
    cfg = MonitorConfig(interval_seconds=0.01)
    with caplog.at_level(logging.ERROR, logger="leantune.monitor.sampler"):
        with Monitor(cfg, tmp_path / "monitor.csv", nvml=fake, on_sample=on_sample) as monitor:
            assert monitor.latest is not None  # the first sample is taken at start
            wait_for(lambda: len(seen) >= 5)
    count = len(seen)
    assert not fake.initialised  # NVML shut down on stop
    assert len([r for r in caplog.records if "a sample failed" in r.getMessage()]) == 1
    assert len(rows(tmp_path / "monitor.csv")) == count
    time.sleep(0.05)
    assert len(seen) == count  # the thread is gone


# ---------------------------------------------------------------------------------------- MIG slices

MIG_UUID = "4f3b2a10-0c1d-5e6f-8a9b-0c1d2e3f4a5b"  # torch's bare form of a slice's UUID


class MigNvml(FakeNvml):
    """GPU 0 is split into MIG slices; handle 10 is the slice with MIG_UUID. Only "MIG-"+MIG_UUID finds it."""

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid == f"MIG-{MIG_UUID}":
            return 10
        self._raise("NOT_FOUND")

    def nvmlDeviceIsMigDeviceHandle(self, handle):
        return handle == 10

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle):
        return 0

    def nvmlDeviceGetIndex(self, handle):
        if handle == 10:
            self._raise("INVALID_ARGUMENT")  # a slice has no index of its own
        return handle

    def _current(self, handle, field=None):
        if handle == 10 and field not in (None, "memory_used_mb"):
            self._raise("NOT_SUPPORTED")  # NVML reads a slice's memory, not its power, clocks or temperature
        return super()._current(0 if handle == 10 else handle, field)

    def nvmlDeviceGetName(self, handle):
        return "NVIDIA A100-SXM4-40GB MIG 1g.5gb" if handle == 10 else super().nvmlDeviceGetName(handle)


@pytest.mark.parametrize("visible", [None, f"MIG-{MIG_UUID}"], ids=["bare-uuid", "CUDA_VISIBLE_DEVICES=MIG"])
def test_a_mig_slice_keeps_nvml(tmp_path, monkeypatch, visible):
    import torch

    from leantune.monitor.sampler import nvml_uuids

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"uuid": MIG_UUID})())
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i: 0)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 0)
    if visible:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    else:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    clock = FakeClock()
    fake = MigNvml([{"t": 0}], clock)
    monitor = Monitor(MonitorConfig(), tmp_path / "monitor.csv", device_type="cuda", device_index=0, nvml=fake,
                      clock=clock)
    assert monitor.nvml is fake and monitor.gpu_handles == [(0, 10)]
    assert monitor.gpu_names == ["NVIDIA A100-SXM4-40GB MIG 1g.5gb"]
    sample = monitor.sample_once()
    assert sample.backend == "nvml" and sample.gpus[0].memory_total_mb == 8192.0 and sample.gpus[0].power_w is None
    assert nvml_uuids(MIG_UUID, visible, 0) == (
        [f"MIG-{MIG_UUID}", f"GPU-{MIG_UUID}"] if visible else [f"GPU-{MIG_UUID}", f"MIG-{MIG_UUID}"])
    assert nvml_uuids(f"GPU-{MIG_UUID}", None, 0) == [f"GPU-{MIG_UUID}"]


def test_local_rank_0_samples_every_gpu_of_its_machine_matched_by_uuid(tmp_path, monkeypatch):
    """Machine 1 of a 2 x 3-process run on 4-GPU machines: CUDA devices 0-2 are NVML's GPUs 1-3 (CUDA
    renumbers them), so those three are sampled, the own GPU first, and their energy is summed."""
    import sys

    import torch

    from leantune.training.distributed import DistContext
    from leantune.training.loop import _new_monitor

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"uuid": f"fake-{i + 1}"})())
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved"):
        monkeypatch.setattr(torch.cuda, name, lambda i: 0)
    clock = FakeClock()
    script = [{"t": 0, "gpus": [{"energy_mj": 0, "power_w": 50.0 + 10 * i} for i in range(4)]},
              {"t": 1, "gpus": [{"energy_mj": 1000 * (i + 1)} for i in range(4)]}]
    fake = FakeNvml(script, clock, gpus=4)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    dist = DistContext(device=torch.device("cuda", 0), world_size=6, rank=3, local_rank=0, local_world_size=3,
                       node_rank=1)
    monitor = _new_monitor(SimpleNamespace(monitor=MonitorConfig()), tmp_path, dist)
    monitor._clock = clock  # _new_monitor takes the real clock; the fake one from here on
    assert monitor.gpu_handles == [(1, 1), (2, 2), (3, 3)]
    assert monitor.gpu_names == ["Fake GPU 1", "Fake GPU 2", "Fake GPU 3"]
    monitor.sample_once()
    clock.t = 1.0
    sample = monitor.sample_once()
    monitor.stop()
    assert [g.power_w for g in sample.gpus] == [60.0, 70.0, 80.0]
    assert monitor.energy_j() == pytest.approx(2.0 + 3.0 + 4.0)  # GPUs 1-3: 0 to 2, 3 and 4 J; not GPU 0's 1 J
    table = rows(tmp_path / "monitor-node1.csv")
    assert [(r["gpu"], r["gpu_name"]) for r in table[:3]] == [("1", "Fake GPU 1"), ("2", "Fake GPU 2"),
                                                             ("3", "Fake GPU 3")]
    assert len(table) == 9 and not (tmp_path / "monitor.csv").exists()  # 3 samples x 3 GPUs, in its own file
