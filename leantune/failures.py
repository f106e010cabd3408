"""How a training process fails and how the flow hears of it: the one protocol both sides share.

The training process (`python -m leantune.training.loop`, leantune/training/launch.py starts it) and
the flow that started it agree on three things, all defined here:

- exit codes: 0 finished, EXIT_USER_ERROR a mistake the user must fix (message on stderr),
  EXIT_STOPPED stopped by SIGTERM/SIGINT after a checkpoint, EXIT_NO_SPACE the disk is full,
  1 any other error; a process killed by a signal has the negative signal number (torchrun: 128 + it);
- the failure file, run_dir/attempt_error.json (`write_failure`): the outcome (`classify`), the
  error's type and message and the device facts the next attempt's config depends on; the flow
  turns it, or the exit status when there is none, into an exception (`attempt_failure`);
- log lines: the process started with JSON_LOG_ENV=1 logs one JSON object per line
  (`JsonLogFormatter`; run by hand it logs plain text); the flow decodes the
  lines that parse (`parse_log_line`) and passes any other line (a library's print, a traceback,
  torchrun's own output) on as plain text.

Failures are recognised by their type: torch.OutOfMemoryError, `OutOfMemory` (no micro-batch fits),
`NonFiniteLoss`. The exceptions are allocation failures torch and CUDA libraries raise as a plain
RuntimeError with no type of their own (the CPU allocator, cuBLAS, cuDNN, extensions, bitsandbytes);
`is_out_of_memory` recognises them by their message.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
from pathlib import Path

from leantune.errors import NoSpaceLeft, UserError
from leantune.rundir import RunDir

EXIT_USER_ERROR = 2  # a UserError: its message is on stderr, another attempt would only repeat it
EXIT_NO_SPACE = 28  # the disk is full (ENOSPC's number), perhaps too full for the failure file
EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: stopped cleanly on a signal after a checkpoint; resume to continue
JSON_LOG_ENV = "LEANTUNE_LOG_JSON"  # "1" in the training process's environment: it logs JSON lines
# torchrun's summary of a failed worker (torch.distributed.elastic ChildFailedError): "exitcode  : -9 (pid: 123)".
# torchrun's own text, not the training process's: it is the one line still read by pattern.
TORCHRUN_WORKER_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)\b")


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; another attempt with a lower learning rate may not."""


class OutOfMemory(UserError):
    """Out of memory with a micro-batch of 1 sequence (adaptive.py): the in-process controller cannot go
    lower; the message says which settings need less memory. The flow's attempts may change them."""


class AttemptFailed(RuntimeError):
    """A training process that ended without finishing, as the flow sees it: its outcome (see `classify`),
    what it said (the failure file, or its exit status) and the device facts `adjust` needs."""

    def __init__(self, outcome: str, message: str, returncode: int | None = None, *,
                 device_type: str | None = None, bf16_supported: bool | None = None):
        super().__init__(message)
        self.outcome, self.message, self.returncode = outcome, message, returncode
        self.device_type, self.bf16_supported = device_type, bf16_supported


# Allocation failures that reach Python as a plain RuntimeError, by the text of their message (lower case):
# the CPU allocator; cuBLAS and cuDNN failing to allocate their handles or workspaces; CUDA extensions
# (flash-attn, bitsandbytes, custom kernels) reporting cudaErrorMemoryAllocation through their own checks.
OUT_OF_MEMORY_MESSAGES = (
    "can't allocate memory", "cannot allocate memory",  # DefaultCPUAllocator
    "cublas_status_alloc_failed", "cudnn_status_alloc_failed", "cudnn_status_not_enough_workspace",
    "cuda error: out of memory", "cuda_error_out_of_memory", "cudaerrormemoryallocation",
    "cuda out of memory",  # bitsandbytes' and extensions' own wording
)


def is_out_of_memory(error: BaseException) -> bool:
    """True for torch.OutOfMemoryError (CUDA, MPS) and for the allocation failures torch and CUDA
    libraries raise as a plain RuntimeError (`OUT_OF_MEMORY_MESSAGES`): the CPU allocator's ("can't
    allocate memory"), cuBLAS's CUBLAS_STATUS_ALLOC_FAILED, cuDNN's CUDNN_STATUS_ALLOC_FAILED /
    NOT_ENOUGH_WORKSPACE, "CUDA error: out of memory" from extensions and bitsandbytes. They have no
    type of their own, so the message is the only way to tell them from any other RuntimeError. The
    training loop halves the micro-batch on them and the attempts classify them "oom" (`classify`).
    """
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and any(m in message for m in OUT_OF_MEMORY_MESSAGES)


def classify(error: BaseException | None = None, returncode: int | None = None) -> str:
    """The outcome of an attempt from the error it raised (in-process) or its exit status (subprocess):
    completed, oom, killed, nan, stopped or error (leantune/attempts.py says what each means)."""
    if error is not None:
        if isinstance(error, AttemptFailed):
            return error.outcome
        if isinstance(error, NonFiniteLoss):
            return "nan"
        if isinstance(error, OutOfMemory) or is_out_of_memory(error):
            return "oom"
        return "error"
    if returncode is None or returncode == 0:
        return "completed"
    if returncode in (-signal.SIGKILL, 128 + signal.SIGKILL):
        return "killed"
    if returncode == EXIT_STOPPED:
        return "stopped"
    return "error"


# ------------------------------------------------------------------------------------ the failure file


def write_failure(run_dir: Path, error: BaseException, cfg=None) -> None:
    """Write run_dir/attempt_error.json: how the training process failed, for the flow to read.

    {"outcome": classify(error), "error_type", "message", "user_error": a UserError that another
    attempt would only repeat, "device_type", "bf16_supported"}. Written whole (a temporary file
    renamed), so the flow reads either all of it or none; a process killed by a signal writes none.

    Under torchrun the ranks that lose their connection to a failed rank fail too, before or after it
    writes: their "error" never replaces an "oom" or "nan" that another rank of the attempt wrote.
    """
    path = RunDir(run_dir).failure
    if classify(error) == "error" and int(os.environ.get("WORLD_SIZE", "1")) > 1 and path.is_file():
        try:
            if json.loads(path.read_text())["outcome"] in ("oom", "nan"):
                return
        except (OSError, ValueError, KeyError, TypeError):  # unreadable: replaced as before
            pass
    device_type = bf16 = None
    if cfg is not None:
        try:
            device_type, bf16 = device_facts(cfg)
        except Exception:  # the failure itself may be the device's; the report goes out without the facts
            pass
    outcome = classify(error)
    data = {"outcome": outcome, "error_type": type(error).__name__, "message": str(error),
            "user_error": isinstance(error, UserError) and outcome == "error",
            "device_type": device_type, "bf16_supported": bf16}
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def attempt_failure(run_dir: Path, returncode: int, worker_exitcodes: list[int] = ()) -> Exception:
    """The error a training process that exited with `returncode` (not 0) stands for in the flow.

    From its failure file when it wrote one: a UserError for a user's mistake (the flow ends with
    its message), else AttemptFailed with its outcome. Without one, from the exit status: killed by
    SIGKILL, or an error. worker_exitcodes: the workers' exit codes torchrun reported (TORCHRUN_WORKER_EXIT).
    """
    path = RunDir(run_dir).failure
    info = json.loads(path.read_text()) if path.is_file() else None
    # Under torchrun a rank killed by SIGKILL writes nothing and torchrun exits 1; its summary names the
    # worker's exit code. That kill is the cause even when a surviving rank wrote a failure file about
    # the broken connection to it, but not when a rank ran out of memory (or its loss became NaN) first:
    # torchrun then SIGKILLs the ranks still waiting for it in a collective (FSDP on NCCL).
    resource = info is not None and info["outcome"] in ("oom", "nan")
    if any(code == -signal.SIGKILL for code in worker_exitcodes) and not resource:
        return AttemptFailed("killed", "a training process was killed (SIGKILL: the kernel's out-of-memory "
                             "killer, a preempted machine or a person); torchrun stopped the others", returncode)
    if info is not None:
        if info["user_error"]:
            return UserError(info["message"])
        return AttemptFailed(info["outcome"], f"{info['error_type']}: {info['message']}", returncode,
                             device_type=info["device_type"], bf16_supported=info["bf16_supported"])
    if returncode == EXIT_NO_SPACE:  # the disk was too full for the failure file
        return NoSpaceLeft(f"no space left on device in {run_dir}; free space and resume with --resume "
                           f"{Path(run_dir).name}")
    outcome = classify(returncode=returncode)
    if outcome == "killed":
        message = ("the training process was killed (SIGKILL: the kernel's out-of-memory killer, a preempted "
                   "machine or a person)")
    else:
        message = (f"the training process exited with status {returncode} without saying why; its log above "
                   "may show the cause")
    return AttemptFailed(outcome, message, returncode)


def device_facts(cfg) -> tuple[str, bool | None]:
    """The device type training runs on, and whether it computes bf16 natively, not emulated (CUDA only;
    else None)."""
    from leantune.devices import describe
    from leantune.modeling import resolve_device

    device = resolve_device(cfg)
    return device.type, describe(device).bf16_native if device.type == "cuda" else None


# ------------------------------------------------------------------------------------------ log lines


class JsonLogFormatter(logging.Formatter):
    """The training process's log records as JSON lines: {"level", "logger", "message"} plus, for a
    record logged with exc_info, "traceback"; the flow's `parse_log_line` reads them back."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line)


def parse_log_line(text: str) -> tuple[int, str] | None:
    """(level, "logger: message") of a line `JsonLogFormatter` wrote (with its traceback, if any), or None
    for any other line."""
    if not text.startswith("{"):
        return None
    try:
        line = json.loads(text)
    except ValueError:
        return None
    if not isinstance(line, dict) or not {"level", "logger", "message"} <= line.keys():
        return None
    message = f"{line['logger']}: {line['message']}"
    if line.get("traceback"):
        message += "\n" + line["traceback"]
    return logging.getLevelName(line["level"]), message
