"""The finetune flow end to end on a small offline config, and its command line."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.finetune import finetune, main
from leantune.config import load_config
from leantune.errors import DataError
from leantune.jsonl import iter_jsonl
from tasks.logs import quiet_user_error_tracebacks

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"

SMALL = [
    "data.synthetic.num_records=300", "data.val_fraction=0.1", "tokenize.vocab_size=400",
    "tokenize.max_seq_len=128", "data.chunk_size=64",
]


def small_config(tmp_path, *extra):
    return load_config(overrides=[*SMALL, f"run.output_dir={tmp_path}", "run.name=t", *extra])


@pytest.mark.flow
def test_flow_writes_the_run_directory(prefect_server, tmp_path):
    cfg = small_config(tmp_path)
    run_dir = finetune(cfg)
    assert run_dir == tmp_path / "t"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["synthetic"]["num_records"] == 300

    prep = json.loads((run_dir / "data" / "prepare.json").read_text())["totals"]
    assert prep["read"] == 300
    assert prep["read"] == prep["kept"] + prep["rejected"] + prep["duplicates"] + prep["not_selected"]

    val = json.loads((run_dir / "data" / "validation.json").read_text())
    n_train = sum(1 for _ in iter_jsonl(run_dir / "data" / "train.jsonl"))
    n_val = sum(1 for _ in iter_jsonl(run_dir / "data" / "val.jsonl"))
    assert (val["train"], val["val"]) == (n_train, n_val)
    assert n_train + n_val + val["quarantined"] == prep["kept"]
    assert 0 < n_val < n_train

    assert "tokens" not in json.loads((run_dir / "data" / "quality.json").read_text())  # validate's only
    assert json.loads((run_dir / "tokens" / "lengths.json").read_text())["count"] == n_train
    counts = json.loads((run_dir / "tokens" / "train" / "index.json").read_text())["counts"]
    assert counts["records_read"] == n_train
    assert counts["records_written"] == n_train - counts["dropped_overlong"] - counts["no_trainable"] - (
        counts["template_error"] + counts["template_unstable"])
    assert counts["records_written"] > 0.7 * n_train
    assert (run_dir / "tokens" / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((run_dir / "tokens" / "validation.json").read_text())["success"] is True


def test_cli_config_error_exits_2_with_every_problem(capsys):
    code = main(["--set", "train.lrr=1", "--set", "model.method=qlra"])
    err = capsys.readouterr().err
    assert code == 2
    assert "train.lrr: unknown key; did you mean 'train.lr'?" in err
    assert "model.method" in err
    assert "Traceback" not in err


@pytest.mark.flow
def test_cli_data_error_exits_2_with_a_message(prefect_server, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n{\"instruction\": \"\", \"output\": \"\"}\n")
    code = main(["--config", str(SMOKE), "--set", f"data.sources=[{{kind: file, path: {bad}}}]",
                 "--set", f"run.output_dir={tmp_path}", "--run-name", "bad"])
    err = capsys.readouterr().err
    assert code == 2
    assert "rejects.jsonl" in err
    assert "Traceback" not in err


@pytest.mark.flow
def test_a_flow_run_from_the_ui_with_a_missing_data_file_is_refused_before_any_stage(prefect_server, tmp_path):
    # The UI and deployments call the flow with a config and no CLI: the flow's first check must refuse it.
    cfg = small_config(tmp_path, f"data.sources=[{{kind: file, path: {tmp_path}/gone.jsonl}}]")
    state = finetune(cfg, return_state=True)
    assert state.is_failed()
    assert f"data.sources.0.path: '{tmp_path}/gone.jsonl' does not exist" in state.message
    assert list(tmp_path.iterdir()) == []  # no run directory, no stage ran


def test_cli_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--config", "--set", "--run-name"):
        assert option in out


@pytest.mark.flow
def test_cli_user_error_prints_no_traceback_in_a_real_process(tmp_path):
    """The user's path: `python flows/finetune.py` with bad data, its own temporary Prefect server."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)  # not the test harness's server: the user's own temporary one
    proc = subprocess.run(
        [sys.executable, str(ROOT / "flows" / "finetune.py"), "--config", str(SMOKE),
         "--set", f"data.sources=[{{kind: file, path: {bad}}}]",
         "--set", f"run.output_dir={tmp_path}", "--run-name", "bad"],
        capture_output=True, text=True, timeout=300, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "Traceback" not in output
    assert "leantune: no record kept from any source" in proc.stderr
    assert "bad_json" in proc.stderr


def test_user_error_tracebacks_are_dropped_and_others_kept():
    quiet_user_error_tracebacks()
    logger = logging.getLogger("prefect.task_runs")
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep()
    logger.addHandler(handler)
    try:
        for exc in (DataError("bad data"), ValueError("a bug")):
            try:
                raise exc
            except Exception:
                logger.error("failed", exc_info=True)
    finally:
        logger.removeHandler(handler)
    assert [r.exc_info is None for r in records] == [True, False]


@pytest.mark.flow
def test_cli_run_log_carries_leantunes_own_messages(tmp_path):
    """The model summary and the monitor's backend reach the run's log, not only the task lines."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "flows" / "finetune.py"), "--config", str(SMOKE), *[f"--set={o}" for o in SMALL],
         "--set", "eval.enabled=false", "--set", "train.max_steps=2", "--set", f"run.output_dir={tmp_path}",
         "--run-name", "logs"],
        capture_output=True, text=True, timeout=300, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    # Training runs in its own process; the train task passes its log lines on as "<logger>: <message>".
    assert "leantune.training.loop: model: {'total_params'" in output
    assert "leantune.monitor.sampler: " in output
