"""Test doubles: FakeNvml, a scripted stand-in for the pynvml module (GPU readings, errors, power limits);
`simulate_cuda`, torch seeing a described CUDA card."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

from leantune.devices import Device
from leantune.monitor.sampler import MIB

FAKE_FIELDS = {
    "memory_used_mb": 1000.0, "memory_total_mb": 8192.0, "utilization_pct": 0.0, "power_w": 50.0,
    "power_limit_w": 115.0, "temperature_c": 40.0, "sm_clock_mhz": 1500.0, "throttle": 0, "energy_mj": 0.0,
}


class FakeNvml:
    """A stand-in for the pynvml module, driven by a script of timed readings.

    script: frames {"t": seconds on `clock`, field: value, ...}; a frame is current from its "t" until
        the next one and changes only the fields it names (FAKE_FIELDS, with their start values).
        One GPU takes flat frames; several take {"t": ..., "gpus": [{...}, {...}]}. A frame may also hold
        "error": "GPU_IS_LOST" (any NVML_ERROR_* name): while it is current every call raises that
        NVMLError; and "unsupported": ["energy_mj", ...]: those readings raise NOT_SUPPORTED.
    init_error: an NVML_ERROR_* name nvmlInit raises (e.g. "LIBRARY_NOT_FOUND").
    power_constraints_w: the (min, max) limit the GPUs accept; can_set_power: False makes setting the
        limit raise NO_PERMISSION (not root). Set limits are kept in `power_limits_w`.
    """

    def __init__(self, script: list[dict], clock: Callable[[], float], *, gpus: int = 1,
                 names: tuple[str, ...] | None = None, init_error: str | None = None,
                 power_constraints_w: tuple[float, float] = (60.0, 130.0), can_set_power: bool = True):
        import pynvml

        # The real error class and constants, so the reading code cannot tell the difference.
        for name in dir(pynvml):
            if name.startswith(("NVML_", "NVMLError")):
                setattr(self, name, getattr(pynvml, name))
        self._clock = clock
        self._gpus = gpus
        self._names = names or tuple(f"Fake GPU {i}" for i in range(gpus))
        self._init_error = init_error
        self._constraints = power_constraints_w
        self._can_set_power = can_set_power
        self.initialised = False
        self._frames = self._resolve(script)
        self.power_limits_w = {i: self._frames[0][1][i][0]["power_limit_w"] for i in range(gpus)}
        self.set_calls: list[tuple[int, float]] = []

    def _resolve(self, script: list[dict]) -> list[tuple[float, list[tuple[dict, str | None, set]]]]:
        state = [dict(FAKE_FIELDS) for _ in range(self._gpus)]
        frames = []
        for frame in sorted(script, key=lambda f: f["t"]):
            per_gpu = frame.get("gpus", [{k: v for k, v in frame.items() if k not in ("t", "error", "unsupported")}])
            for i, changes in enumerate(per_gpu):
                state[i].update(changes)
            frames.append((frame["t"], [(dict(s), frame.get("error"), set(frame.get("unsupported", ())))
                                        for s in state]))
        return frames or [(0.0, [(dict(s), None, set()) for s in state])]

    def _current(self, handle: int, field: str | None = None):
        now = self._clock()
        frame = self._frames[0][1]
        for t, gpus in self._frames:
            if t <= now:
                frame = gpus
        values, error, unsupported = frame[handle]
        if not self.initialised:
            self._raise("UNINITIALIZED")
        if error:
            self._raise(error)
        if field in unsupported:
            self._raise("NOT_SUPPORTED")
        return values

    def _raise(self, name: str):
        raise self.NVMLError(getattr(self, f"NVML_ERROR_{name}"))

    # ---- the pynvml functions the monitor and the power limit use
    def nvmlInit(self):
        if self._init_error:
            self._raise(self._init_error)
        self.initialised = True

    def nvmlShutdown(self):
        self.initialised = False

    def nvmlDeviceGetCount(self):
        self._current(0)
        return self._gpus

    def nvmlDeviceGetHandleByIndex(self, index):
        self._current(index)
        return index

    def nvmlDeviceGetIndex(self, handle):
        return handle

    def nvmlDeviceGetName(self, handle):
        self._current(handle)
        return self._names[handle]

    def nvmlDeviceGetMemoryInfo(self, handle):
        v = self._current(handle, "memory_used_mb")
        used, total = int(v["memory_used_mb"] * MIB), int(v["memory_total_mb"] * MIB)
        return SimpleNamespace(used=used, total=total, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=self._current(handle, "utilization_pct")["utilization_pct"], memory=0)

    def nvmlDeviceGetPowerUsage(self, handle):
        return int(self._current(handle, "power_w")["power_w"] * 1000)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        self._current(handle, "power_limit_w")
        return int(self.power_limits_w[handle] * 1000)

    def nvmlDeviceGetPowerManagementLimit(self, handle):
        return self.nvmlDeviceGetEnforcedPowerLimit(handle)

    def nvmlDeviceGetUUID(self, handle):
        self._current(handle)
        return f"GPU-fake-{handle}"

    def nvmlDeviceGetHandleByUUID(self, uuid):
        for i in range(self._gpus):
            if uuid == f"GPU-fake-{i}":
                self._current(i)
                return i
        self._raise("NOT_FOUND")

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle):
        self._current(handle)
        return [int(self._constraints[0] * 1000), int(self._constraints[1] * 1000)]

    def nvmlDeviceSetPowerManagementLimit(self, handle, limit_mw):
        self._current(handle)
        if not self._can_set_power:
            self._raise("NO_PERMISSION")
        if not self._constraints[0] * 1000 <= limit_mw <= self._constraints[1] * 1000:
            self._raise("INVALID_ARGUMENT")
        self.power_limits_w[handle] = limit_mw / 1000
        self.set_calls.append((handle, limit_mw / 1000))

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return self._current(handle, "temperature_c")["temperature_c"]

    def nvmlDeviceGetClockInfo(self, handle, clock_type):
        return self._current(handle, "sm_clock_mhz")["sm_clock_mhz"]

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        return self._current(handle, "throttle")["throttle"]

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        return int(self._current(handle, "energy_mj")["energy_mj"])


def simulate_cuda(monkeypatch, card: Device) -> None:
    """torch sees `card` as cuda:0 (bf16 'supported' with emulation on every card, as torch says)."""
    import importlib.util

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: card.name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: card.capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda *a: type("Props", (), {"total_memory": card.total_memory, "name": card.name})())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or card.bf16_native)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        (object() if card.flash_attn_installed else None) if name == "flash_attn" else real(name, *a)))
