"""The failure protocol between the training process and the flow (leantune/failures.py): typed
recognition of failures, exit codes defined once, and log records as JSON lines."""

import ast
import logging
import sys
from pathlib import Path

import pytest
import torch

from leantune.errors import UserError
from leantune.failures import (
    EXIT_STOPPED,
    JsonLogFormatter,
    NonFiniteLoss,
    OutOfMemory,
    attempt_failure,
    classify,
    is_out_of_memory,
    parse_log_line,
    write_failure,
)
from leantune.training.adaptive import MicroBatchController

ROOT = Path(__file__).resolve().parents[1]


def test_out_of_memory_is_recognised_by_type_not_by_its_text():
    assert classify(torch.OutOfMemoryError("CUDA out of memory")) == "oom"
    # The controller's verdict at a micro-batch of 1 is typed; a UserError that merely says the words is not oom.
    try:
        MicroBatchController(8, 1).on_oom(step=3)
    except OutOfMemory as e:
        verdict = e
    assert isinstance(verdict, UserError) and classify(verdict) == "oom"
    assert classify(UserError("out of memory at step 3 with a micro-batch of 1 sequence")) == "error"
    assert classify(NonFiniteLoss("the training loss is nan at step 7")) == "nan"
    # The one failure torch gives no type: the CPU allocator's RuntimeError, recognised by its message.
    try:
        torch.empty(1 << 62, dtype=torch.uint8)
    except RuntimeError as e:
        assert type(e) is RuntimeError and is_out_of_memory(e) and classify(e) == "oom"
    assert classify(returncode=EXIT_STOPPED) == "stopped" and EXIT_STOPPED == 75


# Real messages of allocation failures that torch raises as a plain RuntimeError on CUDA.
CUDA_ALLOCATION_FAILURES = {
    "cublas": "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "cudnn": "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    "cudnn-workspace": "cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
    "extension": "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API "
                 "call, so the stacktrace below might be incorrect.",
    "bitsandbytes": "Error cudaErrorMemoryAllocation at line 71 in file /src/csrc/ops.cu",
    "driver": "CUDA_ERROR_OUT_OF_MEMORY: out of memory",
}


@pytest.mark.parametrize("message", CUDA_ALLOCATION_FAILURES.values(), ids=CUDA_ALLOCATION_FAILURES.keys())
def test_cuda_library_allocation_failures_are_out_of_memory(tmp_path, message):
    error = RuntimeError(message)
    assert is_out_of_memory(error) and classify(error) == "oom"
    # The attempt the flow sees: the failure file's outcome.
    write_failure(tmp_path, error)
    assert attempt_failure(tmp_path, 1).outcome == "oom"


def test_other_cuda_errors_are_not_out_of_memory():
    assert classify(RuntimeError("CUDA error: an illegal memory access was encountered")) == "error"
    assert classify(RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx`")) == "error"
    assert classify(ValueError("CUBLAS_STATUS_ALLOC_FAILED")) == "error"


def test_a_cublas_allocation_failure_mid_step_halves_the_micro_batch(tokenized_run, tmp_path):
    from run_helpers import new_run

    from leantune.metrics import read_metrics
    from leantune.testing import loop_hooks
    from leantune.training.loop import train

    cfg, run_dir = new_run(tokenized_run, tmp_path, "train.max_steps=3", "train.eval_every=1000",
                           "monitor.enabled=false", "checkpoint.every_steps=1000")
    fired = []

    def cublas_fails_once(step, k, mb):
        if step == 2 and not fired:
            fired.append(mb)
            raise RuntimeError(CUDA_ALLOCATION_FAILURES["cublas"])
        return False

    with loop_hooks(oom=cublas_fails_once):
        summary = train(cfg, run_dir)
    assert summary["completed"] and fired == [4] and summary["micro_batch_size"] == 2
    assert [(e["step"], e["old"], e["new"], e["reason"]) for e in read_metrics(run_dir, "micro_batch")] == [
        (2, 4, 2, "oom")]


def test_exit_codes_are_defined_once_in_the_failure_module():
    definitions = {}
    for package in ("leantune", "tasks", "flows", "deployments"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Assign):
                    for target in node.targets:
                        if isinstance(target, ast.Name) and target.id.startswith("EXIT_"):
                            definitions.setdefault(target.id, []).append(str(path.relative_to(ROOT)))
    assert definitions == {name: ["leantune/failures.py"] for name in
                           ("EXIT_USER_ERROR", "EXIT_NO_SPACE", "EXIT_STOPPED")}


def test_log_records_go_out_as_json_lines_and_come_back_with_their_level():
    formatter = JsonLogFormatter()
    record = logging.LogRecord("leantune.training.loop", logging.WARNING, __file__, 1,
                               "stopped after step %d:\nsecond line", (2,), None)
    line = formatter.format(record)
    assert "\n" not in line  # one record, one line, whatever its message holds
    assert parse_log_line(line) == (logging.WARNING, "leantune.training.loop: stopped after step 2:\nsecond line")
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("leantune.x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    level, text = parse_log_line(formatter.format(failed))
    assert level == logging.ERROR and text.startswith("leantune.x: failed\nTraceback (most recent call last)")
    assert text.endswith("ValueError: boom")
    # Anything else is not a log record of the training process: plain text, a JSON value of another shape.
    for other in ("plain print", "{not json", '{"step": 3, "loss": 1.0}', "[1, 2]"):
        assert parse_log_line(other) is None
