"""The failure protocol between the training process and the flow (leantune/failures.py): typed
recognition of failures, exit codes defined once, and log records as JSON lines."""

import ast
import logging
import sys
from pathlib import Path

import torch

from leantune.errors import UserError
from leantune.failures import (
    EXIT_STOPPED,
    JsonLogFormatter,
    NonFiniteLoss,
    OutOfMemory,
    classify,
    is_out_of_memory,
    parse_log_line,
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
