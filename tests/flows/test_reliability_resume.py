"""Kill-and-resume through the flow (issue 14): the training process is SIGKILLed at 5 seeded steps,
then continued by the flow's automatic retry or by `--resume` after the run failed; either way the
adapter ends bitwise equal to an uninterrupted run's, and the run's config.yaml is unchanged."""

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from run_helpers import SMOKE, adapter, new_run

import tasks.train
from flows.finetune import finetune
from flows.finetune import main as flow_main
from leantune.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.flow]

CHILD = Path(__file__).parents[1] / "training_child.py"
MAX_STEPS = 8
# Dropout on, so a resume that failed to restore the RNG would diverge; no monitor, so no reading
# can suggest memory pressure (a kill with memory near full is answered with a smaller micro-batch).
OVERRIDES = [f"train.max_steps={MAX_STEPS}", "checkpoint.every_steps=1", "checkpoint.keep_last=10",
             "lora.dropout=0.1", "train.eval_every=1000", "monitor.enabled=false", "eval.enabled=false"]
# Kill points drawn once from a fixed seed: the same "random" steps on every test run.
KILL_STEPS = sorted(random.Random(14).sample(range(2, MAX_STEPS), 5))


def inject(monkeypatch, *faults: str) -> list[int]:
    """Training attempt N (counted across flow runs) runs tests/training_child.py with faults[N-1]."""
    micro = []

    def command(cfg, run_dir, resume):
        micro.append(cfg.train.micro_batch_size)
        return [sys.executable, str(CHILD), faults[len(micro) - 1], str(run_dir), *(["--resume"] if resume else [])]

    monkeypatch.setattr(tasks.train, "training_command", command)
    return micro


def prepared_run(tokenized_run, tmp_path, name, *overrides):
    """A copy of the tokenized run (data stages done) named `name` under tmp_path."""
    return new_run(tokenized_run, tmp_path, *OVERRIDES, f"run.output_dir={tmp_path}", f"run.name={name}",
                   *overrides, name=name)


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs from the uninterrupted run"


@pytest.fixture(scope="module")
def reference(tokenized_run, tmp_path_factory, prefect_server):
    where = tmp_path_factory.mktemp("reference")
    cfg, run_dir = prepared_run(tokenized_run, where, "ref", "train.max_attempts=1")
    with pytest.MonkeyPatch.context() as mp:
        inject(mp, "none")
        finetune(cfg, resume=True)
    return run_dir


@pytest.mark.parametrize("kill_step", KILL_STEPS)
def test_a_kill_retried_by_the_flow_ends_bitwise_equal(reference, tokenized_run, tmp_path, monkeypatch, kill_step):
    cfg, run_dir = prepared_run(tokenized_run, tmp_path, "auto", "train.max_attempts=2")
    micro = inject(monkeypatch, f"kill@{kill_step}", "none")
    finetune(cfg, resume=True)
    [killed, done] = [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]
    assert (killed["outcome"], killed["step"], killed["changes"]) == ("killed", kill_step - 1, [])
    assert killed["reason"].endswith("no sign of memory pressure; resuming unchanged")
    assert micro == [4, 4] and done["outcome"] == "completed"
    assert json.loads((run_dir / "training.json").read_text())["resumed_from_step"] == kill_step - 1
    assert [m["micro_batch_size"] for m in read_metrics(run_dir, "step")] == [4] * MAX_STEPS
    assert_bitwise_equal(adapter(run_dir), adapter(reference))


@pytest.mark.parametrize("kill_step", KILL_STEPS)
def test_a_kill_continued_with_resume_ends_bitwise_equal(reference, tokenized_run, tmp_path, monkeypatch, kill_step):
    cfg, run_dir = prepared_run(tokenized_run, tmp_path, "manual", "train.max_attempts=1")
    config_before = (run_dir / "config.yaml").read_text()
    micro = inject(monkeypatch, f"kill@{kill_step}", "none")
    with pytest.raises(Exception, match="killed"):
        finetune(cfg, resume=True)
    # The failed run's config is what --resume continues with: nothing the flow thought of is in it.
    assert (run_dir / "config.yaml").read_text() == config_before
    assert flow_main(["--resume", "manual", "--set", f"run.output_dir={tmp_path}"]) == 0
    assert micro == [4, 4]
    assert json.loads((run_dir / "training.json").read_text())["resumed_from_step"] == kill_step - 1
    assert_bitwise_equal(adapter(run_dir), adapter(reference))


def test_resume_after_a_data_error_runs_the_data_stages_again(tmp_path, monkeypatch, capsys, prefect_server):
    data = tmp_path / "chats.jsonl"
    good = [json.dumps({"prompt": f"What is {i} plus {i}?", "completion": f"{i} plus {i} is {2 * i}."})
            for i in range(80)]
    data.write_text("\n".join(good + ["{not json"] * 20) + "\n")
    small = ["tokenize.vocab_size=400", "tokenize.max_seq_len=64", "model.scratch.hidden_size=32",
             "model.scratch.intermediate_size=64", "train.global_batch_size=4", "train.micro_batch_size=4",
             "train.max_steps=2", "train.device=cpu", "eval.enabled=false", "monitor.enabled=false",
             f"run.output_dir={tmp_path}", f"data.sources=[{{path: {data}}}]"]
    sets = ["--config", str(SMOKE), *(arg for setting in small for arg in ("--set", setting))]
    inject(monkeypatch, "none")
    assert flow_main([*sets, "--run-name", "d"]) == 2  # 20 of 100 rows rejected, more than 5%
    assert "validation.max_reject_fraction" in capsys.readouterr().err
    assert flow_main([*sets, "--run-name", "d"]) == 2  # the name is taken: the message says --resume
    assert "--resume d" in capsys.readouterr().err
    assert flow_main(["--resume", "d", "--set", f"run.output_dir={tmp_path}",
                      "--set", "validation.max_reject_fraction=0.25"]) == 0
    run_dir = tmp_path / "d"
    assert json.loads((run_dir / "data" / "prepare.json").read_text())["totals"]["kept"] == 80
    assert json.loads((run_dir / "training.json").read_text())["steps"] == 2


def test_a_lora_target_typo_ends_the_flow_before_the_data_stages(tmp_path, capsys, prefect_server):
    smoke = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"  # the scratch model
    code = flow_main(["--config", str(smoke), "--set", "lora.target_modules=[q_proj, nonexistent_proj]",
                      "--set", f"run.output_dir={tmp_path}", "--run-name", "typo"])
    assert code == 2
    err = capsys.readouterr().err
    assert "lora.target_modules: 'nonexistent_proj' matches no layer of scratch; its linear layers are named" in err
    assert "Traceback" not in err
    assert not (tmp_path / "typo").exists()  # refused before the run directory (and the data stages)
