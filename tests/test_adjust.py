"""Feedback across attempts: classifying failures, adjust's ladder, reports from a run directory."""

import json
import signal

import pytest
import torch

from leantune.attempts import (
    AttemptReport,
    adjust,
    history_entry,
    history_markdown,
    last_reading,
    report_from_run,
)
from leantune.config import load_config
from leantune.errors import UserError
from leantune.failures import AttemptFailed, NonFiniteLoss, OutOfMemory, classify


def cfg_with(*overrides):
    return load_config(overrides=["train.global_batch_size=16", "train.micro_batch_size=8", *overrides])


def test_classify_errors_and_exit_statuses():
    assert classify(torch.OutOfMemoryError("CUDA out of memory")) == "oom"
    assert classify(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")) == "oom"
    assert classify(OutOfMemory("out of memory at step 3 with a micro-batch of 1 sequence: ...")) == "oom"
    assert classify(NonFiniteLoss("loss is nan at step 7")) == "nan"
    assert classify(ValueError("a bug")) == "error"
    assert classify(UserError("train.device: 'cuda' requested but ...")) == "error"
    assert classify(returncode=0) == "completed"
    assert classify(returncode=-signal.SIGKILL) == "killed" and classify(returncode=137) == "killed"
    assert classify(returncode=75) == "stopped"
    assert classify(returncode=1) == "error"


def test_out_of_memory_walks_the_ladder_one_rung_per_attempt():
    cfg = cfg_with()
    report = AttemptReport(attempt=1, outcome="oom", step=12, micro_batch_size=8, device_type="cuda",
                           reading={"gpu_memory_used_fraction": 0.99, "host_memory_used_fraction": 0.4})
    a1 = adjust(cfg, report)
    assert a1.changes == ["train.micro_batch_size: 8 -> 4"] and a1.resume and not a1.retokenize
    assert a1.reason == "out of memory at step 12 (last reading: GPU memory 99% used, host memory 40% used)"
    # The controller already went down to 1: checkpointing next, still resumable.
    a2 = adjust(a1.config, AttemptReport(attempt=2, outcome="oom", step=15, micro_batch_size=1, device_type="cuda"))
    assert a2.changes == ["model.gradient_checkpointing: False -> True"] and a2.resume
    # Then QLoRA (CUDA only): other weights train, so a fresh start.
    a3 = adjust(a2.config, AttemptReport(attempt=3, outcome="oom", step=15, micro_batch_size=1, device_type="cuda"))
    assert a3.changes == ["model.method: lora -> qlora"] and not a3.resume and not a3.retokenize
    # Then shorter sequences, which need the tokenize stage again.
    a4 = adjust(a3.config, AttemptReport(attempt=4, outcome="oom", micro_batch_size=1, device_type="cuda"))
    assert a4.changes == ["tokenize.max_seq_len: 512 -> 256"] and a4.retokenize and not a4.resume
    assert a4.reason == "out of memory before the first step"


def test_the_ladder_on_the_cpu_skips_qlora_and_ends():
    cfg = cfg_with("model.method=full", "model.gradient_checkpointing=true", "tokenize.max_seq_len=100")
    report = AttemptReport(attempt=1, outcome="oom", micro_batch_size=1, device_type="cpu")
    a1 = adjust(cfg, report)
    assert a1.changes == ["model.method: full -> lora"]
    a2 = adjust(a1.config, report)
    assert a2.changes == ["tokenize.max_seq_len: 100 -> 64"]
    assert adjust(a2.config, report) is None  # nothing left to try


def test_the_micro_batch_is_halved_to_a_divisor_of_the_global_batch():
    cfg = load_config(overrides=["train.global_batch_size=12", "train.micro_batch_size=6"])
    a = adjust(cfg, AttemptReport(attempt=1, outcome="oom", micro_batch_size=6))
    assert a.config.train.micro_batch_size == 3
    # Without a logged step the configured micro-batch is the one that failed.
    assert adjust(cfg, AttemptReport(attempt=1, outcome="oom")).config.train.micro_batch_size == 3


def test_a_killed_process_tries_only_resumable_rungs_then_resumes_unchanged():
    cfg = cfg_with()
    report = AttemptReport(attempt=1, outcome="killed", step=40, micro_batch_size=2,
                           reading={"host_memory_used_fraction": 0.97})
    a = adjust(cfg, report)
    assert a.changes == ["train.micro_batch_size: 8 -> 1"] and a.resume
    assert a.reason == ("process killed at step 40 (last reading: host memory 97% used); host memory was 97% used "
                        "(monitor.memory_high_fraction 0.92)")
    done = cfg_with("train.micro_batch_size=1", "model.gradient_checkpointing=true")
    same = adjust(done, AttemptReport(attempt=2, outcome="killed", step=41, micro_batch_size=1,
                                      reading={"host_memory_used_fraction": 0.97}))
    assert same.config == done and same.changes == [] and same.resume
    assert same.reason.endswith("; resuming unchanged")


def test_a_kill_without_memory_pressure_resumes_with_the_same_settings():
    # A preempted machine or a person: halving the micro-batch would make the resumed weights differ
    # in the last bits from an uninterrupted run's, for nothing.
    cfg = cfg_with()
    for reading in (None, {"host_memory_used_fraction": 0.40}, {"host_memory_used_fraction": 0.5,
                                                                "gpu_memory_used_fraction": 0.91}):
        a = adjust(cfg, AttemptReport(attempt=1, outcome="killed", step=7, micro_batch_size=8, reading=reading))
        assert a.config == cfg and a.changes == [] and a.resume, reading
        assert a.reason.endswith("; no sign of memory pressure; resuming unchanged")
    gpu_full = adjust(cfg, AttemptReport(attempt=1, outcome="killed", step=7, micro_batch_size=8,
                                         reading={"host_memory_used_fraction": 0.5, "gpu_memory_used_fraction": 0.95}))
    assert gpu_full.changes == ["train.micro_batch_size: 8 -> 4"]


def test_nan_halves_the_learning_rate_and_leaves_fp16_where_bf16_is_supported():
    cfg = cfg_with("train.lr=2e-4", "model.dtype=fp16")
    a = adjust(cfg, AttemptReport(attempt=1, outcome="nan", step=30, bf16_supported=True))
    assert a.changes == ["train.lr: 0.0002 -> 0.0001", "model.dtype: fp16 -> bf16"]
    assert not a.resume  # other weights dtype: a fresh start
    b = adjust(cfg, AttemptReport(attempt=1, outcome="nan", step=30, bf16_supported=False))
    assert b.changes == ["train.lr: 0.0002 -> 0.0001"]
    assert b.resume  # a lower lr alone continues from the checkpoint, its schedule rescaled on load


@pytest.mark.parametrize("outcome", ["completed", "stopped", "error"])
def test_other_outcomes_are_not_adjusted(outcome):
    assert adjust(cfg_with(), AttemptReport(attempt=1, outcome=outcome)) is None


def test_adjust_is_pure():
    cfg = cfg_with()
    before = cfg.model_dump()
    report = AttemptReport(attempt=1, outcome="oom", micro_batch_size=8)
    assert adjust(cfg, report) == adjust(cfg, report)
    assert cfg.model_dump() == before


def test_report_from_a_run_directory(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in [
        {"step": 1, "loss": 3.0, "micro_batch_size": 8},
        {"event": "micro_batch", "step": 2, "old": 8, "new": 4, "reason": "oom"},
        {"step": 2, "loss": 2.9, "micro_batch_size": 4},
        {"event": "micro_batch", "step": 2, "old": 4, "new": 2, "reason": "oom"},
    ]) + "\n")
    from fakes import FakeNvml

    from leantune.config import MonitorConfig
    from leantune.monitor.sampler import Monitor

    clock = lambda: 5.0  # noqa: E731
    fake = FakeNvml([{"t": 0, "memory_used_mb": 7700, "memory_total_mb": 8000, "temperature_c": 80}], clock)
    monitor = Monitor(MonitorConfig(), tmp_path / "monitor.csv", nvml=fake, clock=clock, device_type="cuda")
    monitor.sample_once()
    monitor.stop()

    report = report_from_run(2, tmp_path, error=torch.OutOfMemoryError("CUDA out of memory"), device_type="cuda")
    # The controller halved the micro-batch after the last logged step: that is the one that failed.
    assert (report.attempt, report.outcome, report.step, report.micro_batch_size) == (2, "oom", 2, 2)
    assert report.message == "OutOfMemoryError: CUDA out of memory"
    assert report.reading["gpu_memory_used_fraction"] == pytest.approx(0.9625)
    assert report.reading["temperature_c"] == 80.0 and 0 < report.reading["host_memory_used_fraction"] < 1
    assert last_reading(tmp_path / "missing.csv") is None
    killed = report_from_run(3, tmp_path / "empty", returncode=-9)
    assert (killed.outcome, killed.step, killed.reading, killed.message) == ("killed", None, None, "exit status -9")
    # A training process's failure carries its outcome, message and device facts.
    failed = report_from_run(4, tmp_path, error=AttemptFailed("nan", "NonFiniteLoss: the training loss is nan", 1,
                                                             device_type="cuda", bf16_supported=True))
    assert (failed.outcome, failed.message, failed.device_type, failed.bf16_supported, failed.step) == (
        "nan", "NonFiniteLoss: the training loss is nan", "cuda", True, 2)


def test_history_of_two_failures_and_a_success():
    cfg = cfg_with()
    first = AttemptReport(attempt=1, outcome="oom", step=3, micro_batch_size=8, message="OutOfMemoryError")
    a1 = adjust(cfg, first)
    second = AttemptReport(attempt=2, outcome="nan", step=9, message="NonFiniteLoss: loss is nan")
    a2 = adjust(a1.config, second)
    third = AttemptReport(attempt=3, outcome="completed", step=20)
    entries = [history_entry(first, a1), history_entry(second, a2), history_entry(third, None)]
    assert [e["outcome"] for e in entries] == ["oom", "nan", "completed"]
    assert a2.config.train.micro_batch_size == 4 and a2.config.train.lr == pytest.approx(1e-4)
    table = history_markdown(entries)
    assert "| 1 | oom | 3 | out of memory at step 3 | train.micro_batch_size: 8 -> 4 |" in table
    assert "| 2 | nan | 9 | the loss became NaN or infinite at step 9 | train.lr: 0.0002 -> 0.0001 |" in table
    assert "| 3 | completed | 20 | - | - |" in table
