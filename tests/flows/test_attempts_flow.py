"""The finetune flow's attempts, with training in its own process: out of memory the controller could not
absorb, a NaN loss, a process SIGKILLed mid-run and a user error, each injected into the training process by
tests/training_child.py; the adjustments, resumes, history and progress artifacts they leave."""

import json
import sys
from pathlib import Path

import pytest
import yaml
from run_helpers import SMOKE, latest_artifact

import tasks.train
from flows.finetune import finetune
from flows.finetune import main as flow_main
from leantune.config import load_config
from leantune.training.optim import lr_multiplier

pytestmark = pytest.mark.slow

CHILD = Path(__file__).parents[1] / "training_child.py"
SMALL_RUN = [
    "data.synthetic.num_records=120", "data.val_fraction=0.1", "tokenize.vocab_size=400", "tokenize.max_seq_len=128",
    "data.chunk_size=64", "model.scratch.hidden_size=32", "model.scratch.intermediate_size=64",
    "train.global_batch_size=8", "train.micro_batch_size=4", "train.max_steps=5", "train.device=cpu",
    "checkpoint.every_steps=1", "checkpoint.keep_last=10", "eval.enabled=false", "train.max_attempts=3",
]


def inject_faults(monkeypatch, *faults: str) -> list[dict]:
    """Attempt N of the flow runs tests/training_child.py with faults[N-1]; returns what each attempt started with."""
    calls = []

    def command(cfg, run_dir, resume):
        calls.append({"micro": cfg.train.micro_batch_size, "checkpointing": cfg.model.gradient_checkpointing,
                      "lr": cfg.train.lr, "checkpoints": sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))})
        return [sys.executable, str(CHILD), faults[len(calls) - 1], str(run_dir), *(["--resume"] if resume else [])]

    monkeypatch.setattr(tasks.train, "training_command", command)
    return calls


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.flow
def test_two_failed_attempts_and_a_success(prefect_server, tmp_path, monkeypatch):
    # 1: every micro-batch of step 3 runs out of memory (the controller halves down to 1, then gives up);
    # 2: the loss turns NaN at step 4; 3: no fault.
    calls = inject_faults(monkeypatch, "oom@3", "nan@4", "none")
    cfg = load_config(overrides=[*SMALL_RUN, f"run.output_dir={tmp_path}", "run.name=t"])
    run_dir = finetune(cfg)

    h = history(run_dir)
    assert [(e["attempt"], e["outcome"]) for e in h] == [(1, "oom"), (2, "nan"), (3, "completed")]
    # 1: out of memory at micro-batch 1 after step 2 -> checkpointing, resumed from step-2.
    assert h[0]["step"] == 2 and h[0]["changes"] == ["model.gradient_checkpointing: False -> True"]
    assert h[0]["resume"] is True and "out of memory at step 2" in h[0]["reason"]
    # 2: NaN at step 4 -> half the learning rate, resumed from the checkpoint of step 3.
    assert h[1]["changes"] == ["train.lr: 0.0002 -> 0.0001"] and h[1]["resume"] is True
    assert h[1]["message"] == "NonFiniteLoss: the training loss is nan at step 4"
    assert h[2]["step"] == 5

    assert [(c["micro"], c["checkpointing"], c["lr"]) for c in calls] == [(4, False, 2e-4), (4, True, 2e-4),
                                                                          (4, True, 1e-4)]
    assert calls[0]["checkpoints"] == []
    assert calls[1]["checkpoints"] == ["step-1", "step-2"]  # attempt 2 resumed from these
    assert calls[2]["checkpoints"] == ["step-1", "step-2", "step-3"]  # attempt 3 resumed from step-3
    assert not (run_dir / "attempts").exists()  # nothing had to be set aside for a fresh start
    summary = json.loads((run_dir / "training.json").read_text())
    assert summary["completed"] and summary["resumed_from_step"] == 3 and summary["steps"] == 5

    # Step 4 runs at the old schedule's lr times new/old = 1/2, and the rescale is recorded.
    lines = metrics(run_dir)
    [rescale] = [m for m in lines if m.get("event") == "lr_rescale"]
    assert rescale["step"] == 3 and rescale["old"] == [2e-4] and rescale["new"] == [1e-4]
    assert rescale["factor"] == [0.5]
    steps = {m["step"]: m for m in lines if "event" not in m}
    assert sorted(steps) == [1, 2, 3, 4, 5]
    warmup = cfg.train.warmup_steps
    assert steps[3]["lr"] == pytest.approx(2e-4 * lr_multiplier(2, warmup, 5, cfg.train.schedule), rel=1e-12)
    assert steps[4]["lr"] == pytest.approx(2e-4 * lr_multiplier(3, warmup, 5, cfg.train.schedule) * 0.5, rel=1e-12)
    assert steps[5]["lr"] == pytest.approx(1e-4 * lr_multiplier(4, warmup, 5, cfg.train.schedule), rel=1e-12)
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["train"]["lr"] == 1e-4 and resolved["model"]["gradient_checkpointing"] is True


@pytest.mark.flow
def test_a_killed_training_process_is_retried_from_its_checkpoint(prefect_server, tmp_path, monkeypatch):
    calls = inject_faults(monkeypatch, "kill@3", "none")
    cfg = load_config(overrides=[*SMALL_RUN, f"run.output_dir={tmp_path}", "run.name=k",
                                 "monitor.memory_high_fraction=0.999"])
    run_dir = finetune(cfg)

    h = history(run_dir)
    assert [(e["attempt"], e["outcome"], e["step"]) for e in h] == [(1, "killed", 2), (2, "completed", 5)]
    assert h[0]["message"].startswith("the training process was killed (SIGKILL")
    # Memory was not near full (monitor.memory_high_fraction 0.999): the same settings, so the same weights.
    assert h[0]["changes"] == [] and h[0]["resume"] is True
    assert h[0]["reason"].endswith("no sign of memory pressure; resuming unchanged")
    assert calls[1]["checkpoints"] == ["step-1", "step-2"] and calls[1]["micro"] == 4
    summary = json.loads((run_dir / "training.json").read_text())
    assert (summary["completed"], summary["resumed_from_step"], summary["steps"]) == (True, 2, 5)
    steps = [m for m in metrics(run_dir) if "event" not in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5]
    assert [m["micro_batch_size"] for m in steps] == [4] * 5
    assert not (run_dir / "attempt_error.json").exists()  # a SIGKILL leaves no failure file

    # The progress artifacts followed the last attempt to its end.
    assert latest_artifact("training-progress").data == 100.0
    table = latest_artifact("training-metrics").data
    assert "step 5 of 5 (100%)" in table
    assert f"| 5 | {steps[-1]['loss']:.4f} | {steps[-1]['lr']:.3g} |" in table


@pytest.mark.flow
def test_a_user_error_in_the_training_process_ends_the_run_with_its_message(prefect_server, tmp_path, monkeypatch,
                                                                           capsys):
    inject_faults(monkeypatch, "user@2")
    sets = ["--config", str(SMOKE), *(arg for setting in [*SMALL_RUN, f"run.output_dir={tmp_path}"]
                                      for arg in ("--set", setting))]
    assert flow_main([*sets, "--run-name", "u"]) == 2
    assert "leantune: data.sources: injected user error at step 2; fix the config" in capsys.readouterr().err
    [entry] = history(tmp_path / "u")
    assert (entry["outcome"], entry["step"], entry["changes"]) == ("error", 1, [])
