"""The run directory: created with the resolved config; an existing run is never overwritten."""

import ast
from pathlib import Path

import pytest
import yaml

from leantune.config import load_config
from leantune.errors import UserError
from leantune.rundir import (
    SPLIT_INDEX,
    SPLIT_LENGTHS,
    DataDir,
    EvalDir,
    RunDir,
    TokenDir,
    append_attempt,
    create_run_dir,
    existing_run_dir,
    read_attempts,
    set_aside_attempt,
    write_config,
)


def test_creates_layout_and_resolved_config(tmp_path):
    cfg = load_config(overrides=[f"run.output_dir={tmp_path}", "run.name=a", "train.lr=3e-4"])
    run_dir = create_run_dir(cfg)
    assert run_dir == tmp_path / "a"
    assert (run_dir / "data").is_dir() and (run_dir / "tokens").is_dir()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["lr"] == 3e-4


def test_default_name_is_config_name_and_timestamp(tmp_path):
    run_dir = create_run_dir(load_config(overrides=[f"run.output_dir={tmp_path}"]), "qwen")
    assert run_dir.parent == tmp_path and run_dir.name.startswith("qwen-20")


def test_existing_run_is_refused_with_the_ways_out(tmp_path):
    cfg = load_config(overrides=[f"run.output_dir={tmp_path}", "run.name=a"])
    create_run_dir(cfg)
    with pytest.raises(UserError) as info:
        create_run_dir(cfg)
    message = str(info.value)
    assert "already exists" in message and "--resume a" in message and "--run-name" in message


def test_run_dir_names_each_output_under_its_root(tmp_path):
    layout = RunDir(tmp_path / "r")
    assert RunDir.of(tmp_path / "r") == layout and RunDir.of(layout) is layout
    assert layout.config == tmp_path / "r" / "config.yaml"
    assert layout.train_index == tmp_path / "r" / "tokens" / "train" / "index.json"
    assert layout.token_validation == tmp_path / "r" / "tokens" / "validation.json"
    assert layout.metrics == tmp_path / "r" / "metrics.jsonl"
    assert layout.plot("loss") == tmp_path / "r" / "loss.png"


def test_write_config_is_what_load_config_reads_back(tmp_path):
    cfg = load_config(overrides=["train.lr=2e-4", "train.seed=7"])
    path = write_config(tmp_path, cfg)
    assert path == RunDir(tmp_path).config
    assert load_config(path) == cfg


def test_a_failed_attempt_is_set_aside_whole_and_a_clean_one_leaves_nothing(tmp_path):
    layout = RunDir(tmp_path)
    assert set_aside_attempt(layout, 1) is None and not layout.attempts.exists()
    (layout.checkpoints / "step-2").mkdir(parents=True)
    (layout.checkpoints / "step-2" / "state.json").write_text("{}")
    layout.metrics.write_text('{"step": 1}\n')
    kept = set_aside_attempt(layout, 2)
    assert kept == layout.attempts / "attempt-2"
    assert (kept / "checkpoints" / "step-2" / "state.json").read_text() == "{}"
    assert (kept / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert not layout.checkpoints.exists() and not layout.metrics.exists()


def test_attempt_history_appends_in_order(tmp_path):
    assert read_attempts(tmp_path) is None
    append_attempt(tmp_path, {"attempt": 1, "outcome": "oom"})
    append_attempt(tmp_path, {"attempt": 2, "outcome": "completed"})
    assert read_attempts(tmp_path) == [{"attempt": 1, "outcome": "oom"}, {"attempt": 2, "outcome": "completed"}]


def test_resume_needs_a_named_run_with_its_config(tmp_path):
    cfg = load_config(overrides=[f"run.output_dir={tmp_path}", "run.name=a"])
    with pytest.raises(UserError, match="is not a leantune run directory"):
        existing_run_dir(cfg)
    run_dir = create_run_dir(cfg)
    assert existing_run_dir(cfg) == run_dir
    with pytest.raises(UserError, match="--resume RUN_NAME"):
        existing_run_dir(load_config(overrides=[f"run.output_dir={tmp_path}"]))


def _layout_names() -> set[str]:
    """The file and folder names the layouts (RunDir, DataDir, TokenDir, EvalDir) define."""
    names = {SPLIT_INDEX, SPLIT_LENGTHS}
    for layout in (RunDir("r"), DataDir("r"), TokenDir("r"), EvalDir("r")):
        for attr, value in vars(type(layout)).items():
            if isinstance(value, property) and isinstance(path := getattr(layout, attr), Path):
                names.add(path.name)
    return names


def test_run_files_are_named_only_by_the_layouts():
    """No `something / "metrics.jsonl"` (or any other run file's name) outside leantune/rundir.py."""
    names = _layout_names()
    assert {"metrics.jsonl", "tokens", "config.yaml", "quality.json", "lengths.json", "comparison.json"} <= names
    root = Path(__file__).resolve().parents[1]
    joins = []
    for path in sorted(p for d in ("leantune", "tasks", "flows") for p in (root / d).rglob("*.py")):
        if path.name == "rundir.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant)
                    and node.right.value in names):
                joins.append(f"{path.relative_to(root)}:{node.lineno} / {node.right.value!r}")
    assert joins == []
