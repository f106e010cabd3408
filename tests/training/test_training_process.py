"""The training process as the flow runs it (leantune/training/launch.py): its output as log records, the
metrics it appends followed as they come, its failure file, and a stop (Ctrl-C, cancellation) that lets it
checkpoint first."""

import json
import logging
import signal
import sys

import pytest
from run_helpers import new_run

from leantune.errors import UserError
from leantune.failures import TORCHRUN_WORKER_EXIT, AttemptFailed, attempt_failure, write_failure
from leantune.stopping import ignore_repeat
from leantune.training.launch import (
    log_record,
    progress_markdown,
    run_training,
    training_command,
)

pytestmark = pytest.mark.slow


def test_log_lines_keep_their_level_and_other_lines_pass_as_text():
    json_line = '{"level": "WARNING", "logger": "leantune.x", "message": "near the limit"}\n'
    assert log_record(json_line, logging.INFO) == (logging.WARNING, "leantune.x: near the limit")
    # The old text format is plain text now: nothing matches a logging format by pattern.
    assert log_record("2026-01-01 12:00:00,123 WARNING leantune.x: near the limit\n", logging.INFO) == (
        logging.INFO, "2026-01-01 12:00:00,123 WARNING leantune.x: near the limit")
    assert log_record("plain print\n", logging.WARNING) == (logging.INFO, "plain print")
    assert log_record("Traceback (most recent call last):\n", logging.INFO) == (logging.ERROR,
                                                                                 "Traceback (most recent call last):")
    # A traceback's frames and its last line stay errors; an indented continuation keeps its record's level.
    assert log_record('  File "x.py", line 1\n', logging.ERROR) == (logging.ERROR, '  File "x.py", line 1')
    assert log_record("ValueError: boom\n", logging.ERROR) == (logging.ERROR, "ValueError: boom")
    assert log_record("  more of it\n", logging.WARNING) == (logging.WARNING, "  more of it")
    # A progress bar redrawn with carriage returns: only its last drawing, and nothing when that is empty.
    assert log_record(" 10%|#  | 1/10\r 20%|## | 2/10\n", logging.INFO) == (logging.INFO, " 20%|## | 2/10")
    assert log_record("\r\n", logging.INFO) is None
    assert log_record("a CRLF line\r\n", logging.INFO) == (logging.INFO, "a CRLF line")


def test_progress_markdown_shows_the_latest_steps():
    steps = [{"step": s, "loss": 1.0 / s, "lr": 1e-4 * s, "tokens_per_s": 1000.0 * s, "micro_batch_size": 4}
             for s in range(1, 13)]
    steps[-1]["val_loss"] = 0.25
    md = progress_markdown(steps, 20)
    assert "step 12 of 20 (60%): loss 0.0833, lr 0.0012, 12,000 tokens/s, micro-batch 4" in md
    assert "| 12 | 0.0833 | 0.0012 | 12,000 | 4 | 0.2500 |" in md
    assert "| 3 | 0.3333 | 0.0003 | 3,000 | 4 | - |" in md and "| 2 |" not in md  # the latest 10 only


def test_the_failure_file_becomes_the_error_the_flow_sees(tmp_path):
    import torch

    write_failure(tmp_path, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    failure = attempt_failure(tmp_path, 1)
    assert isinstance(failure, AttemptFailed) and (failure.outcome, failure.returncode) == ("oom", 1)
    assert failure.message == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    write_failure(tmp_path, UserError("train.lr: must be positive; set it above 0"))
    failure = attempt_failure(tmp_path, 2)
    assert type(failure) is UserError and str(failure) == "train.lr: must be positive; set it above 0"
    (tmp_path / "attempt_error.json").unlink()
    assert attempt_failure(tmp_path, -signal.SIGKILL).outcome == "killed"
    assert attempt_failure(tmp_path, 137).outcome == "killed"
    unexplained = attempt_failure(tmp_path, 1)
    assert unexplained.outcome == "error" and "exited with status 1" in unexplained.message


def test_an_interrupted_caller_stops_the_process_after_a_checkpoint(tokenized_run, tmp_path):
    cfg, run_dir = new_run(tokenized_run, tmp_path, "train.max_steps=40", "checkpoint.every_steps=1000",
                         "train.eval_every=1000", "monitor.enabled=false")
    seen, logged = [], []

    def interrupt_at_step_2(lines):
        seen.extend(m["step"] for m in lines if "loss" in m)
        if seen and seen[-1] >= 2:
            raise KeyboardInterrupt

    cmd = training_command(cfg, run_dir, resume=False)
    assert cmd[:3] == [sys.executable, "-m", "leantune.training.loop"]
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with pytest.raises(KeyboardInterrupt):
            run_training(cmd, run_dir, on_log=lambda level, text: logged.append((level, text)),
                         on_metrics=interrupt_at_step_2, poll_s=0.05)
        # The caller is stopping: a repeated SIGTERM or a hangup is held off from now on (leantune/stopping.py).
        assert {sig: signal.getsignal(sig) for sig in handlers} == dict.fromkeys(handlers, ignore_repeat)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    summary = json.loads((run_dir / "training.json").read_text())
    assert summary["completed"] is False and 2 <= summary["steps"] < 40
    [checkpoint] = (run_dir / "checkpoints").glob("step-*")
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert (manifest["step"], manifest["reason"]) == (summary["steps"], "signal")
    # The process's own log lines reached the caller with their levels.
    assert (logging.WARNING, "leantune.training.checkpoint: SIGTERM received: saving a checkpoint at the end of this "
            "step, then stopping (send it again to stop at once)") in logged
    assert any(level == logging.INFO and ": model: {'total_params'" in text for level, text in logged)


def test_a_rank_killed_under_torchrun_is_a_killed_attempt(tmp_path):
    # torchrun's failure summary as torch 2.13 prints it after rank 1 was SIGKILLed (rank 0 then got SIGTERM).
    summary = ["  exitcode  : -15 (pid: 20344)  (SIGTERM)", "  exitcode  : -9 (pid: 20345)  (SIGKILL)",
               "E1129 03:51:39.589000 20339 api.py:1002] failed (exitcode: -9) local_rank: 1 (pid: 20345)"]
    codes = [int(m.group(1)) for line in summary if (m := TORCHRUN_WORKER_EXIT.match(line))]
    assert codes == [-15, -9]
    # The surviving rank's failure file (a broken connection) is not the cause: the kill is.
    write_failure(tmp_path, RuntimeError("Connection closed by peer"))
    failure = attempt_failure(tmp_path, 1, codes)
    assert isinstance(failure, AttemptFailed) and failure.outcome == "killed" and "killed" in failure.message
    assert attempt_failure(tmp_path, 1, [1]).outcome == "error"  # a worker that failed on its own


def test_a_child_in_its_own_session_misses_the_flows_group_signal_and_hears_of_the_flows_death(tmp_path):
    """own_session(): Ctrl-C or SIGTERM to the flow's process group (and Prefect's SIGKILL of it after its
    grace period) does not reach the child; when the flow process dies, the child gets one SIGTERM (Linux)."""
    import os
    import subprocess
    import time

    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux's")
    heard = tmp_path / "heard"
    child = (f"import signal, time\n"  # every signal it hears, in order
             f"def note(name): open({str(heard)!r}, 'a').write(name + ' ')\n"
             "signal.signal(signal.SIGTERM, lambda *a: (note('SIGTERM'), exit(0)))\n"
             "signal.signal(signal.SIGINT, lambda *a: note('SIGINT'))\n"
             "time.sleep(120)")
    flow = (f"import subprocess, sys, time; from leantune.training.launch import own_session\n"
            f"c = subprocess.Popen([sys.executable, '-c', {child!r}], **own_session()); print(c.pid, flush=True)\n"
            "time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", flow], stdout=subprocess.PIPE, text=True, start_new_session=True)
    child_pid = int(parent.stdout.readline())
    time.sleep(1)  # the child's handlers installed
    assert os.getpgid(child_pid) != os.getpgid(parent.pid)
    os.killpg(parent.pid, signal.SIGINT)  # Ctrl-C to the flow's group: the flow dies of it, the child hears only
    parent.wait(timeout=30)               # of the flow's death
    deadline = time.monotonic() + 30
    while not heard.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    assert heard.read_text() == "SIGTERM "
