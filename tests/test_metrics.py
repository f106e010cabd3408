"""metrics.jsonl: one writer (resume truncation, rank > 0 writes nothing) and one reader of typed lines."""

import json

from leantune.metrics import MetricsFollower, MetricsWriter, StepHistory, event_of, read_metrics
from leantune.rundir import RunDir

STEP = {"step": 1, "epoch": 0.5, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.7, "tokens": 96, "tokens_per_s": 48.0,
        "micro_batch_size": 4, "accumulation_steps": 2, "world_size": 1, "peak_memory_mb": 512.0, "elapsed_s": 2.0}
SHRINK = {"event": "micro_batch", "step": 1, "old": 4, "new": 2, "reason": "out of memory"}
MONITOR = {"event": "monitor", "step": 2, "action": "checkpoint", "reason": "temperature", "reading": {"t": 90}}
RESCALE = {"event": "lr_rescale", "step": 2, "old": 1e-3, "new": 5e-4, "factor": 0.5}


def write(run_dir, lines):
    writer = MetricsWriter(run_dir, keep_until_step=0)
    for line in lines:
        writer.write(line)
    writer.close()


def test_reader_returns_each_kind_in_file_order_and_skips_a_torn_last_line(tmp_path):
    second = {**STEP, "step": 2, "loss": 2.25, "val_loss": 2.4}
    write(tmp_path, [STEP, SHRINK, second, MONITOR, RESCALE])
    with open(RunDir(tmp_path).metrics, "a") as f:
        f.write('{"step": 3, "lo')  # a killed writer's half line
    assert read_metrics(tmp_path) == [STEP, SHRINK, second, MONITOR, RESCALE]
    assert read_metrics(tmp_path, event="step") == [STEP, second]
    assert read_metrics(tmp_path, event="micro_batch") == [SHRINK]
    assert read_metrics(RunDir(tmp_path), event="monitor") == [MONITOR]
    assert read_metrics(tmp_path, event="lr_rescale") == [RESCALE]
    assert [event_of(line) for line in read_metrics(tmp_path)] == ["step", "micro_batch", "step", "monitor",
                                                                   "lr_rescale"]
    assert read_metrics(tmp_path / "no-run") == []


def test_writer_on_resume_keeps_the_lines_up_to_the_checkpoint_step(tmp_path):
    lines = [STEP, SHRINK, {**STEP, "step": 2}, MONITOR, {**STEP, "step": 3}]
    write(tmp_path, lines)
    writer = MetricsWriter(tmp_path, keep_until_step=2)
    writer.write({**STEP, "step": 3, "loss": 1.0})
    writer.close()
    assert [(event_of(m), m["step"]) for m in read_metrics(tmp_path)] == [
        ("step", 1), ("micro_batch", 1), ("step", 2), ("monitor", 2), ("step", 3)]
    assert read_metrics(tmp_path)[-1]["loss"] == 1.0
    write(tmp_path, [])  # a fresh start empties the file
    assert RunDir(tmp_path).metrics.read_text() == ""


def test_a_disabled_writer_neither_truncates_nor_writes(tmp_path):
    write(tmp_path, [STEP])
    other_rank = MetricsWriter(tmp_path, keep_until_step=0, enabled=False)
    other_rank.write({**STEP, "step": 2})
    other_rank.close()
    assert [json.loads(line) for line in RunDir(tmp_path).metrics.read_text().splitlines()] == [STEP]


def test_the_follower_reads_whole_new_lines_and_rereads_a_rewritten_file(tmp_path):
    path = RunDir(tmp_path).metrics
    follower = MetricsFollower(tmp_path)
    assert follower.new_lines() == []  # not there yet
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert follower.new_lines() == [{"step": 1}, {"step": 2}]
    assert follower.new_lines() == []  # the half-written line waits for its end
    with open(path, "a") as f:
        f.write('ep": 3}\n')
    assert follower.new_lines() == [{"step": 3}]
    path.write_text('{"step": 1}\n')  # a resume from step 1 rewrites the file
    assert follower.new_lines() == [{"step": 1}]
    # A new attempt's follower skips the old lines until the process rewrites the file or appends.
    path.write_text('{"step": 1}\n{"step": 2}\n')
    next_attempt = MetricsFollower(tmp_path, from_end=True)
    assert next_attempt.new_lines() == []
    path.write_text('{"step": 1}\n')
    assert next_attempt.new_lines() == [{"step": 1}]


def test_step_history_leaves_events_out_and_replaces_the_steps_a_resume_redoes():
    history = StepHistory()
    first = [{**STEP, "step": s} for s in (1, 2, 3)]
    assert history.add([first[0], SHRINK, first[1], MONITOR, first[2]]) == first
    redo = [{**STEP, "step": 3, "loss": 1.0}, {**STEP, "step": 4}]  # resumed from the checkpoint at step 2
    assert history.add([{**STEP, "step": 2, "loss": 9.0}, *redo]) == [{**STEP, "step": 2, "loss": 9.0}, *redo]
    assert [(m["step"], m["loss"]) for m in history.steps] == [(1, 2.5), (2, 9.0), (3, 1.0), (4, 2.5)]
    assert history.add([RESCALE]) == []
