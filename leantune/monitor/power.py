"""An optional GPU power limit for the run (power.limit_watts), always put back afterwards.

`power_limit(watts, nvml, handle)` is a context manager: it clamps the request to what the GPU
accepts, sets it through NVML, reads it back to confirm, and on leaving - a finished run, an
exception, a KeyboardInterrupt - restores the limit it found and reads that back too. Without
permission (setting a limit needs root), without NVML, or on a GPU that does not support it, it
warns, training goes on at the current limit, and the monitor keeps measuring. A process killed
with SIGKILL cannot restore anything: the limit then stays until it is reset
(`sudo nvidia-smi -i N -pl WATTS`) or the driver reloads; the warning says so.

`power_limits(watts, nvml, gpus, record_of)` does that for every GPU the monitor samples (all of a
machine's GPUs in a multi-GPU run), each with its own record, all restored on leaving.

With `record` (the run directory's power_limit_original-node<N>-gpu<I>.json) the limit found before the FIRST cap is
written there before the cap is set, and every attempt restores to that recorded value: the retry of a
killed attempt finds the capped limit on the card and must not take it for the original. The record
names the GPU's UUID (used only for the same card) and is removed once the limit is restored.

The report it yields (also after the block: `restored_w`) goes into training.json:
  status  "applied" (read back equal), "not_confirmed" (read back different), "no_permission",
          "not_supported", "unavailable" (no NVML or no GPU), "failed" (another NVML error)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# A limit read back within this many watts of the request counts as applied (NVML works in mW and
# some boards round to whole watts).
CONFIRM_TOLERANCE_W = 1.0


@dataclass
class PowerLimitReport:
    requested_w: float
    gpu: int | None = None
    target_w: float | None = None  # the request clamped to the GPU's range
    previous_w: float | None = None  # the limit before the run's first cap (recorded across attempts)
    applied_w: float | None = None  # read back after setting
    restored_w: float | None = None  # read back after restoring
    status: str = "unavailable"
    message: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def power_limit(watts: float | None, nvml, handle, gpu: int = 0,
                record: Path | None = None) -> Iterator[PowerLimitReport | None]:
    """Apply `watts` to the GPU `handle` for the duration of the block; see the module docstring.

    watts None: nothing to do (yields None). nvml/handle None: no GPU to limit (warns). record: where the
    original limit is kept across attempts (None: not kept; the limit read now is the original).
    """
    if watts is None:
        yield None
        return
    report = PowerLimitReport(requested_w=watts, gpu=gpu)
    if nvml is None or handle is None:
        report.message = (f"power.limit_watts={watts:g}: no GPU power control here (NVML unavailable or training "
                          "on the CPU); no limit applied")
        log.warning("%s", report.message)
        yield report
        return
    had_record = record is not None and Path(record).is_file()
    changed = _apply(report, nvml, handle, watts, record)
    if not changed and record is not None and not had_record:
        Path(record).unlink(missing_ok=True)  # nothing was capped: nothing to restore later
    try:
        yield report
    finally:
        if changed:
            _restore(report, nvml, handle, record)


@contextlib.contextmanager
def power_limits(watts: float | None, nvml, gpus: list[tuple[int, object]],
                 record_of: Callable[[int], Path]) -> Iterator[list[PowerLimitReport | None]]:
    """`power_limit` on each of `gpus` ((NVML index, handle) pairs, as Monitor.gpu_handles; none: the one
    report of no GPU), GPU i recording its original limit in record_of(i); every GPU set is restored on
    leaving, an exception while setting a later one included. Yields the reports in the order of `gpus`."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(power_limit(watts, nvml, handle, index, record=record_of(index)))
               for index, handle in gpus or [(0, None)]]


def _gpu_uuid(nvml, handle) -> str | None:
    try:
        uuid = nvml.nvmlDeviceGetUUID(handle)
    except nvml.NVMLError:
        return None
    return uuid.decode() if isinstance(uuid, bytes) else str(uuid)


def _original_limit(nvml, handle, found_w: float, record: Path | None) -> float:
    """The limit to restore at the end: the recorded original when `record` holds one for this GPU (an
    earlier attempt capped it), else `found_w`, which is recorded first."""
    if record is None:
        return found_w
    uuid = _gpu_uuid(nvml, handle)
    try:
        kept = json.loads(Path(record).read_text())
    except (OSError, ValueError):
        kept = None
    if isinstance(kept, dict) and kept.get("uuid") == uuid and isinstance(kept.get("original_w"), int | float):
        if abs(kept["original_w"] - found_w) > CONFIRM_TOLERANCE_W:
            log.warning("GPU power limit reads %g W, left by an earlier attempt of this run; the original %g W "
                        "recorded in %s is what will be restored", found_w, kept["original_w"], record)
        return float(kept["original_w"])
    tmp = Path(record).with_name(f".{Path(record).name}.{os.getpid()}")
    tmp.write_text(json.dumps({"uuid": uuid, "original_w": found_w}) + "\n")
    os.replace(tmp, record)
    return found_w


def _apply(report: PowerLimitReport, nvml, handle, watts: float, record: Path | None = None) -> bool:
    """Set the limit; True when it was changed (so it must be restored)."""
    try:
        low_mw, high_mw = nvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)
        found_w = nvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000
        report.previous_w = _original_limit(nvml, handle, found_w, record)
        target = min(max(watts, low_mw / 1000), high_mw / 1000)
        report.target_w = target
        if target != watts:
            log.warning("power.limit_watts=%g is outside GPU %s's range %g-%g W; using %g W",
                        watts, report.gpu, low_mw / 1000, high_mw / 1000, target)
        nvml.nvmlDeviceSetPowerManagementLimit(handle, int(round(target * 1000)))
    except nvml.NVMLError as e:
        if e.value == nvml.NVML_ERROR_NO_PERMISSION:
            report.status = "no_permission"
            report.message = (f"power.limit_watts={watts:g}: setting a GPU power limit needs root ({e}); training "
                              f"goes on at the current limit of {report.previous_w:g} W. Run as root, or set it "
                              f"yourself: sudo nvidia-smi -i {report.gpu} -pl {report.target_w:g}")
        elif e.value == nvml.NVML_ERROR_NOT_SUPPORTED:
            report.status = "not_supported"
            report.message = (f"power.limit_watts={watts:g}: GPU {report.gpu} does not support a power limit ({e}); "
                              "training goes on without one")
        else:
            report.status = "failed"
            report.message = f"power.limit_watts={watts:g}: setting the limit failed ({type(e).__name__}: {e})"
        log.warning("%s", report.message)
        return False
    try:
        report.applied_w = nvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000
    except nvml.NVMLError as e:
        report.applied_w = None
        log.warning("power limit: set to %g W but could not be read back (%s)", target, e)
    if report.applied_w is not None and abs(report.applied_w - target) <= CONFIRM_TOLERANCE_W:
        report.status = "applied"
        report.message = f"GPU {report.gpu} power limit {report.applied_w:g} W (was {report.previous_w:g} W)"
        log.info("%s", report.message)
    else:
        report.status = "not_confirmed"
        report.message = (f"GPU {report.gpu} power limit set to {target:g} W but reads back as "
                          f"{report.applied_w} W")
        log.warning("%s", report.message)
    return True


def _restore(report: PowerLimitReport, nvml, handle, record: Path | None = None) -> None:
    previous = report.previous_w
    try:
        nvml.nvmlDeviceSetPowerManagementLimit(handle, int(round(previous * 1000)))
        report.restored_w = nvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000
    except nvml.NVMLError as e:
        log.error("could not restore GPU %s's power limit to %g W (%s: %s); it stays at %s W until you run: "
                  "sudo nvidia-smi -i %s -pl %g", report.gpu, previous, type(e).__name__, e, report.applied_w,
                  report.gpu, previous)
        return
    if abs(report.restored_w - previous) > CONFIRM_TOLERANCE_W:
        log.error("GPU %s's power limit reads %g W after restoring %g W; reset it: sudo nvidia-smi -i %s -pl %g",
                  report.gpu, report.restored_w, previous, report.gpu, previous)
        return
    log.info("GPU %s power limit restored to %g W", report.gpu, report.restored_w)
    if record is not None:
        Path(record).unlink(missing_ok=True)  # restored: the next attempt finds the original on the card
