"""Resume checks that must hold before anything is written (issue 14): a refused `--resume --set` leaves
config.yaml as it was; an empty or corrupt checkpoints/best.json is ignored and rewritten, not a crash."""

import json
import logging

import pytest
from test_checkpoint import make_cfg, manager, save_steps

from leantune.cli import finetune_request
from leantune.config import dump_config, load_config
from leantune.errors import UserError
from leantune.resume import resume_fingerprint, resume_refusal


def run_with_checkpoint(tmp_path, name="r"):
    """A run directory whose newest checkpoint was written by the run's own config (its manifest is what counts)."""
    run_dir = tmp_path / name
    cfg = load_config(overrides=[f"run.output_dir={tmp_path}", f"run.name={name}"])
    (run_dir / "checkpoints" / "step-3").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-3" / "manifest.json").write_text(json.dumps(
        {"resume_config": resume_fingerprint(cfg)}))
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return cfg, run_dir


def test_a_refused_resume_writes_nothing_and_a_plain_resume_still_works(tmp_path):
    cfg, run_dir = run_with_checkpoint(tmp_path)
    before = (run_dir / "config.yaml").read_text()
    out = ["--set", f"run.output_dir={tmp_path}"]
    with pytest.raises(UserError, match="train.seed changed from 0 to 5: resume needs the same value"):
        finetune_request(["--resume", "r", *out, "--set", "train.seed=5"])
    assert (run_dir / "config.yaml").read_text() == before
    request = finetune_request(["--resume", "r", *out])
    assert request.resume and request.config.train.seed == 0
    # A setting that keeps the updates exact is accepted.
    assert finetune_request(["--resume", "r", *out, "--set", "train.micro_batch_size=2"]).resume


def test_resume_refusal_skips_a_checkpoint_without_a_readable_manifest(tmp_path):
    cfg, run_dir = run_with_checkpoint(tmp_path)
    (run_dir / "checkpoints" / "step-4").mkdir()
    (run_dir / "checkpoints" / "step-4" / "manifest.json").write_text("")
    assert resume_refusal(cfg, run_dir) is None
    assert "train.seed" in resume_refusal(load_config(overrides=["train.seed=5"]), run_dir)
    assert resume_refusal(cfg, tmp_path / "no-such-run") is None


@pytest.mark.parametrize("content", ["", "{", "[]", '{"checkpoint": "step-1"}'])
def test_an_empty_or_corrupt_best_json_is_ignored_and_rewritten(tmp_path, caplog, content):
    mgr = manager(make_cfg("checkpoint.keep_last=2"), tmp_path)
    save_steps(mgr, [1], metrics=[2.0])
    (tmp_path / "checkpoints" / "best.json").write_text(content)
    with caplog.at_level(logging.WARNING):
        assert mgr.best() is None
        save_steps(mgr, [2, 3], metrics=[3.0, None])  # the next save does not crash
    assert "best.json is corrupt" in caplog.text
    assert mgr.best() == {"checkpoint": "step-2", "step": 2, "metric": 3.0}
