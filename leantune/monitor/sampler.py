"""The resource sampler: a background thread that reads the GPU (NVML) and the process (psutil).

`Monitor` takes a `Sample` every `monitor.interval_seconds`: per GPU memory used/total,
utilisation, power draw and limit, temperature, SM clock, throttle reasons and energy; the torch
allocator's current, peak and reserved memory (CUDA); the process RSS and CPU share; host RAM
(available and total; in a container the cgroup's limit when it is tighter, hostmem.py).
Each sample is appended to monitor.csv (flushed, so a killed run keeps its readings) and stored
as `Monitor.latest`, an immutable object the training loop reads without any lock (replacing a
reference is atomic in CPython), and handed to `on_sample` (the feedback policy, policy.py).

NVML is optional: without the library, without a driver, with `monitor.backend=psutil`, or when
an NVML call fails in the middle of a run (a GPU falling off the bus), the monitor says so once,
samples what psutil can read, and training goes on. A field one GPU does not support (the energy
counter before Volta, throttle reasons on some boards) is left empty and noted once.

Energy: NVML's total-energy counter (millijoules since the driver loaded) read as joules since the
monitor started; where the counter is missing, the power draw integrated over the samples
(trapezoids); `energy_source` in monitor.csv says which.

Tests and the overhead benchmark pass `nvml=` a scripted stand-in for the pynvml module (tests/fakes.py
FakeNvml); the code that reads it is the code that reads a real GPU.

monitor.csv: one row per sample and GPU (one row with empty GPU columns where there is no GPU);
the columns are `CSV_COLUMNS`; memory in MiB, power in W, energy in J, temperature in °C,
`time` in Unix seconds, `elapsed_s` since the monitor started, `throttle_reasons` as names joined
by '|'. A resumed run appends to the file.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from leantune.config import MonitorConfig
from leantune.monitor.hostmem import host_memory

log = logging.getLogger(__name__)

MIB = 2**20

# NVML clocks-event ("throttle") reason bits (nvml.h, nvmlClocksEventReason*), named as in nvidia-smi.
THROTTLE_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal",
    0x40: "hw_thermal",
    0x80: "hw_power_brake",
    0x100: "display_clocks",
}


def throttle_names(mask: int | None) -> tuple[str, ...]:
    """The names of the reasons set in an NVML clocks-event bitmask."""
    if not mask:
        return ()
    return tuple(name for bit, name in THROTTLE_REASONS.items() if mask & bit)


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one moment; None where the GPU does not report the field."""

    index: int
    name: str | None
    memory_used_mb: float | None
    memory_total_mb: float | None
    utilization_pct: float | None
    power_w: float | None
    power_limit_w: float | None
    temperature_c: float | None
    sm_clock_mhz: float | None
    throttle_reasons: tuple[str, ...] | None
    energy_j: float | None  # since the monitor started
    energy_source: str | None  # "counter" or "integrated"


@dataclass(frozen=True)
class Sample:
    """One reading of every source; `device_type` is where training runs ("cuda" or "cpu")."""

    time: float
    elapsed_s: float
    backend: str  # "nvml" when GPU readings came from NVML, else "psutil"
    device_type: str
    gpus: tuple[GpuReading, ...]
    torch_allocated_mb: float | None
    torch_peak_mb: float | None
    torch_reserved_mb: float | None
    rss_mb: float
    cpu_pct: float | None
    ram_available_mb: float
    ram_total_mb: float
    nvml_error: str | None = None  # set on the sample at which NVML failed

    @property
    def free_fraction(self) -> float | None:
        """Share of the training device's memory that is free (None: no reading for that device).

        GPU: NVML's free memory plus what torch holds reserved above the step's allocation peak
        (its cache can reuse it), over the total. CPU: available host RAM over the total.
        """
        if self.device_type != "cuda":
            return self.ram_available_mb / self.ram_total_mb
        if not self.gpus or self.gpus[0].memory_used_mb is None or not self.gpus[0].memory_total_mb:
            return None
        gpu = self.gpus[0]
        reusable = 0.0
        if self.torch_reserved_mb is not None and self.torch_peak_mb is not None:
            reusable = max(self.torch_reserved_mb - self.torch_peak_mb, 0.0)
        return min(1.0, (gpu.memory_total_mb - gpu.memory_used_mb + reusable) / gpu.memory_total_mb)

    @property
    def host_memory_used_fraction(self) -> float:
        return 1.0 - self.ram_available_mb / self.ram_total_mb

    def brief(self) -> dict:
        """The values a decision rests on, for logs and metrics.jsonl."""
        out: dict = {"elapsed_s": round(self.elapsed_s, 3), "backend": self.backend}
        free = self.free_fraction
        if free is not None:
            out["memory_used_fraction"] = round(1.0 - free, 4)
        if self.gpus:
            g = self.gpus[0]
            out.update(gpu=g.index, gpu_memory_used_mb=g.memory_used_mb, gpu_memory_total_mb=g.memory_total_mb,
                       temperature_c=max((x.temperature_c for x in self.gpus if x.temperature_c is not None),
                                         default=None),
                       throttle_reasons=sorted({n for x in self.gpus for n in (x.throttle_reasons or ())}),
                       power_w=g.power_w)
        out.update(ram_available_mb=round(self.ram_available_mb, 1), ram_total_mb=round(self.ram_total_mb, 1))
        if self.nvml_error:
            out["nvml_error"] = self.nvml_error
        return out


CSV_COLUMNS = (
    "time", "elapsed_s", "backend", "gpu", "gpu_name", "memory_used_mb", "memory_total_mb", "utilization_pct",
    "power_w", "power_limit_w", "temperature_c", "sm_clock_mhz", "throttle_reasons", "energy_j",
    "energy_source", "torch_allocated_mb", "torch_peak_mb", "torch_reserved_mb", "rss_mb", "cpu_pct",
    "ram_available_mb", "ram_total_mb",
)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, tuple):
        return "|".join(value)
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value)


class MonitorCsv:
    """monitor.csv: a header when the file is new, then one flushed row per sample and GPU."""

    def __init__(self, path: Path):
        new = not path.is_file() or path.stat().st_size == 0
        self._f = open(path, "a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._f)
        if new:
            self._writer.writerow(CSV_COLUMNS)
            self._f.flush()

    def write(self, s: Sample) -> None:
        shared = [s.time, s.elapsed_s, s.backend]
        process = [s.torch_allocated_mb, s.torch_peak_mb, s.torch_reserved_mb, s.rss_mb, s.cpu_pct,
                   s.ram_available_mb, s.ram_total_mb]
        for g in s.gpus or (None,):
            gpu = [None] * 12 if g is None else [
                g.index, g.name, g.memory_used_mb, g.memory_total_mb, g.utilization_pct, g.power_w,
                g.power_limit_w, g.temperature_c, g.sm_clock_mhz, g.throttle_reasons, g.energy_j, g.energy_source]
            self._writer.writerow([_cell(v) for v in shared + gpu + process])
        self._f.flush()

    def close(self) -> None:
        self._f.close()


# ------------------------------------------------------------------------------------------ NVML


class _NvmlReader:
    """Reads GPUs through `nvml` (the pynvml module or a stand-in with its functions); NVMLError other than
    'not supported' propagates (the monitor then stops using NVML)."""

    def __init__(self, nvml, devices: list[tuple[int, object]]):
        self.nvml = nvml
        self.devices = devices
        self.names = {i: _text(nvml.nvmlDeviceGetName(h)) for i, h in devices}
        self._unsupported: set[tuple[int, str]] = set()
        self._energy_start: dict[int, float] = {}
        self._integrated: dict[int, float] = {}
        self._last_power: dict[int, tuple[float, float]] = {}

    def _get(self, index: int, field: str, fn, *args):
        if (index, field) in self._unsupported:
            return None
        try:
            return fn(*args)
        except self.nvml.NVMLError as e:
            if e.value not in (self.nvml.NVML_ERROR_NOT_SUPPORTED, self.nvml.NVML_ERROR_FUNCTION_NOT_FOUND):
                raise
            self._unsupported.add((index, field))
            log.info("GPU %d does not report %s (%s); that column stays empty", index, field, e)
            return None

    def read(self, now: float) -> tuple[GpuReading, ...]:
        nv = self.nvml
        readings = []
        for i, h in self.devices:
            memory = self._get(i, "memory", nv.nvmlDeviceGetMemoryInfo, h)
            util = self._get(i, "utilization", nv.nvmlDeviceGetUtilizationRates, h)
            power_mw = self._get(i, "power", nv.nvmlDeviceGetPowerUsage, h)
            limit_mw = self._get(i, "power_limit", nv.nvmlDeviceGetEnforcedPowerLimit, h)
            temperature = self._get(i, "temperature", nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU)
            clock = self._get(i, "sm_clock", nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_SM)
            throttle = self._get(i, "throttle_reasons", nv.nvmlDeviceGetCurrentClocksEventReasons, h)
            energy_mj = self._get(i, "energy_counter", nv.nvmlDeviceGetTotalEnergyConsumption, h)
            power_w = None if power_mw is None else power_mw / 1000
            energy, source = self._energy(i, now, energy_mj, power_w)
            readings.append(GpuReading(
                index=i, name=self.names[i],
                memory_used_mb=None if memory is None else memory.used / MIB,
                memory_total_mb=None if memory is None else memory.total / MIB,
                utilization_pct=None if util is None else float(util.gpu),
                power_w=power_w, power_limit_w=None if limit_mw is None else limit_mw / 1000,
                temperature_c=None if temperature is None else float(temperature),
                sm_clock_mhz=None if clock is None else float(clock),
                throttle_reasons=None if throttle is None else throttle_names(throttle),
                energy_j=energy, energy_source=source,
            ))
        return tuple(readings)

    def _energy(self, index: int, now: float, counter_mj, power_w) -> tuple[float | None, str | None]:
        if counter_mj is not None:
            start = self._energy_start.setdefault(index, counter_mj)
            return (counter_mj - start) / 1000, "counter"
        if power_w is None:
            return None, None
        previous = self._last_power.get(index)
        if previous is not None:
            t0, p0 = previous
            self._integrated[index] = self._integrated.get(index, 0.0) + (now - t0) * (p0 + power_w) / 2
        self._last_power[index] = (now, power_w)
        return self._integrated.get(index, 0.0), "integrated"


def _text(value) -> str:
    # Older pynvml returns bytes for names.
    return value.decode() if isinstance(value, bytes) else str(value)


def _training_gpu(nvml, device_index: int | None):
    """The NVML handle of the CUDA device torch trains on, matched by UUID (NVML and CUDA may
    number GPUs differently, and CUDA_VISIBLE_DEVICES renumbers them); None when torch has not
    initialised CUDA. A MIG slice is found by its "MIG-" UUID (`nvml_uuids`)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    index = torch.cuda.current_device() if device_index is None else device_index
    candidates = nvml_uuids(str(torch.cuda.get_device_properties(index).uuid),
                            os.environ.get("CUDA_VISIBLE_DEVICES"), index)
    for uuid in candidates[:-1]:
        try:
            return nvml.nvmlDeviceGetHandleByUUID(uuid)
        except nvml.NVMLError:
            continue  # not a GPU of that kind: the next prefix
    return nvml.nvmlDeviceGetHandleByUUID(candidates[-1])


def nvml_uuids(torch_uuid: str, visible_devices: str | None, index: int) -> list[str]:
    """The NVML UUIDs to try, in order, for CUDA device `index` whose UUID torch gives as `torch_uuid`.

    torch gives the bare hex UUID for whole GPUs and MIG slices alike; NVML names a GPU "GPU-<uuid>"
    and a MIG slice "MIG-<uuid>". A slice named in CUDA_VISIBLE_DEVICES ("MIG-...") is tried as one
    first; otherwise the GPU prefix first, then the MIG one."""
    if torch_uuid.startswith(("GPU-", "MIG-")):
        return [torch_uuid]
    visible = [d.strip() for d in (visible_devices or "").split(",") if d.strip()]
    if index < len(visible) and visible[index].startswith("MIG-"):
        return [f"MIG-{torch_uuid}", f"GPU-{torch_uuid}"]
    return [f"GPU-{torch_uuid}", f"MIG-{torch_uuid}"]


def _nvml_index(nvml, handle) -> int:
    """NVML's index of `handle`; for a MIG slice, the index of the GPU it is part of."""
    try:
        if nvml.nvmlDeviceIsMigDeviceHandle(handle):
            handle = nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
    except (AttributeError, nvml.NVMLError):
        pass  # an NVML without MIG: a whole GPU
    return nvml.nvmlDeviceGetIndex(handle)


# ----------------------------------------------------------------------------------------- Monitor


class Monitor:
    """Samples resources every `cfg.interval_seconds` in a daemon thread; see the module docstring.

    device_type / device_index: where training runs; on CUDA only the training GPU is sampled
        (found through torch), otherwise every GPU NVML sees.
    device_indices: on CUDA, the GPUs to sample instead (the CUDA devices of every training process on
        this machine, device_index's first: the local rank 0 of a multi-GPU run samples them all, and
        energy_j() sums them).
    nvml: the NVML module to use (default: pynvml; tests pass a FakeNvml).
    on_sample(sample): called in the sampler thread after each sample (the feedback policy).
    clock / wall_clock: monotonic and Unix time (tests inject fakes).

    Use as a context manager, or call start() and stop(); sample_once() takes one sample now.
    """

    def __init__(self, cfg: MonitorConfig, csv_path: Path | None = None, *, device_type: str = "cpu",
                 device_index: int | None = None, device_indices: Sequence[int] | None = None, nvml=None,
                 on_sample: Callable[[Sample], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time):
        import psutil

        self.cfg = cfg
        self.device_type = device_type
        self.device_index = device_index
        self.on_sample = on_sample
        self._clock = clock
        self._wall_clock = wall_clock
        self._t0 = clock()
        self._csv = MonitorCsv(Path(csv_path)) if csv_path is not None else None
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # the first call only starts psutil's CPU-time window
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_failed = False
        self.latest: Sample | None = None
        self.nvml = None
        self.gpu_handles: list[tuple[int, object]] = []
        self.gpu_names: list[str] = []  # as NVML names them, in the order of gpu_handles
        self._reader: _NvmlReader | None = None
        self._pending_nvml_error: str | None = None
        if cfg.backend == "psutil":
            log.info("monitor.backend=psutil: no GPU readings; sampling the process and host memory")
        else:
            self._start_nvml(nvml, list(device_indices) if device_indices else [device_index])

    # ---------------------------------------------------------------------------------- NVML

    def _start_nvml(self, nvml, device_indices: list[int | None]) -> None:
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError as e:
                self._say_degraded(f"NVML is not available ({e})")
                return
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as e:  # no library (NVMLError_LibraryNotFound), no driver, ...
            self._say_degraded(f"NVML is not available ({type(e).__name__}: {e})")
            return
        try:
            handles = [_training_gpu(nvml, i) for i in device_indices] if self.device_type == "cuda" else [None]
            if None not in handles:
                devices = [(_nvml_index(nvml, h), h) for h in handles]
            else:
                devices = [(i, nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(nvml.nvmlDeviceGetCount())]
            self._reader = _NvmlReader(nvml, devices)
        except nvml.NVMLError as e:
            self._say_degraded(f"NVML could not open the GPUs ({type(e).__name__}: {e})")
            _shutdown_quietly(nvml)
            return
        self.nvml = nvml
        self.gpu_handles = devices
        self.gpu_names = [self._reader.names[i] for i, _ in devices]
        log.info("monitor: NVML sampling GPU(s) %s every %.3g s",
                 ", ".join(f"{i} ({self._reader.names[i]})" for i, _ in devices), self.cfg.interval_seconds)

    def _say_degraded(self, why: str) -> None:
        # Expected on CPU machines, a real loss when training on a GPU (or when NVML was asked for).
        level = logging.WARNING if self.device_type == "cuda" or self.cfg.backend == "nvml" else logging.INFO
        log.log(level, "%s: sampling the process and host memory with psutil only (no GPU power, temperature "
                "or energy); training goes on", why)

    def _lose_nvml(self, error: Exception) -> None:
        log.warning("NVML failed in the middle of the run (%s: %s): continuing with psutil readings only",
                    type(error).__name__, error)
        self._pending_nvml_error = f"{type(error).__name__}: {error}"
        # NVML stays initialised (shut down in stop()): restoring a power limit may still work.
        self._reader = None

    # ------------------------------------------------------------------------------- sampling

    def sample_once(self) -> Sample:
        """Take one sample now: store it as `latest`, write it to monitor.csv, call on_sample."""
        now = self._clock()
        gpus: tuple[GpuReading, ...] = ()
        if self._reader is not None:
            try:
                gpus = self._reader.read(now)
            except self._reader.nvml.NVMLError as e:
                self._lose_nvml(e)
        allocated = peak = reserved = None
        torch = sys.modules.get("torch")
        # Only when training has initialised CUDA: the monitor must never create a CUDA context.
        if self.device_type == "cuda" and torch is not None and torch.cuda.is_initialized():
            # An explicit device: this thread's "current device" is not the training thread's.
            index = self.device_index or 0
            allocated = torch.cuda.memory_allocated(index) / MIB
            peak = torch.cuda.max_memory_allocated(index) / MIB
            reserved = torch.cuda.memory_reserved(index) / MIB
        # In a container its cgroup's limit, not the host's RAM, is what the process can use.
        ram = host_memory()
        sample = Sample(
            time=self._wall_clock(), elapsed_s=now - self._t0, backend="nvml" if gpus else "psutil",
            device_type=self.device_type, gpus=gpus, torch_allocated_mb=allocated, torch_peak_mb=peak,
            torch_reserved_mb=reserved, rss_mb=self._process.memory_info().rss / MIB,
            cpu_pct=self._process.cpu_percent(None), ram_available_mb=ram.available_bytes / MIB,
            ram_total_mb=ram.total_bytes / MIB, nvml_error=self._pending_nvml_error,
        )
        self._pending_nvml_error = None
        self.latest = sample
        if self._csv is not None:
            self._csv.write(sample)
        if self.on_sample is not None:
            self.on_sample(sample)
        return sample

    def energy_j(self) -> float | None:
        """Energy of the sampled GPUs since the monitor started, up to now: the latest sample's
        energy plus its power draw over the time since it was taken. None without GPU energy."""
        s = self.latest
        if s is None or not s.gpus or any(g.energy_j is None for g in s.gpus):
            return None
        since = self._clock() - self._t0 - s.elapsed_s
        return sum(g.energy_j + (g.power_w or 0.0) * since for g in s.gpus)

    # --------------------------------------------------------------------------------- thread

    def start(self) -> Monitor:
        """Take a first sample now (so `latest` is set), then sample in a daemon thread."""
        self.sample_once()
        self._thread = threading.Thread(target=self._run, name="leantune-monitor", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.cfg.interval_seconds):
            try:
                self.sample_once()
            except Exception:
                # The monitor must never stop training; one traceback, then it keeps trying.
                if not self._thread_failed:
                    log.exception("monitor: a sample failed; training goes on")
                    self._thread_failed = True

    def stop(self) -> None:
        """Stop the thread, take a last sample (the run's final energy), close monitor.csv and NVML."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            self.sample_once()
        finally:
            if self._csv is not None:
                self._csv.close()
                self._csv = None
            if self.nvml is not None:
                _shutdown_quietly(self.nvml)
                self.nvml = None

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _shutdown_quietly(nvml) -> None:
    try:
        nvml.nvmlShutdown()
    except nvml.NVMLError:
        pass  # NVML that already failed may not shut down cleanly; nothing is left to release
