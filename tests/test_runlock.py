"""One process at a time in a run directory (issue 14): a second process is refused with the holder's
pid, nothing written; a lock whose holder was killed is stale and taken over."""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leantune.rundir import RunDir
from leantune.runlock import RunDirBusy, check_run_dir_free, hold_run_dir

HOLD = "import sys, time; from leantune.runlock import hold_run_dir\nwith hold_run_dir(sys.argv[1]):\n" \
       "    print('held', flush=True); time.sleep(120)"


@pytest.fixture
def holder(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path, holder):
    with pytest.raises(RunDirBusy, match=f"in use by process {holder.pid} on ") as e:
        with hold_run_dir(tmp_path):
            pytest.fail("entered a run directory another process holds")
    assert f"--resume {tmp_path.name}" in str(e.value)
    with pytest.raises(RunDirBusy):
        check_run_dir_free(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [RunDir(tmp_path).lock.name]


# Takes the lock and names itself only 0.3 s later, then empties the file 0.3 s before it lets go: the two
# moments a second process would see a held lock with an empty file.
SLOW_HOLD = """import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print('locked', flush=True); time.sleep(0.3)
os.pwrite(fd, b'{"pid": %d, "host": "h"}' % os.getpid(), 0); time.sleep(1.0)
os.ftruncate(fd, 0); print('emptied', flush=True); time.sleep(0.3)
"""


def test_a_held_lock_with_an_empty_file_is_waited_on_not_reported_as_another_process(tmp_path):
    lock = RunDir(tmp_path).lock
    proc = subprocess.Popen([sys.executable, "-c", SLOW_HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirBusy, match=f"in use by process {proc.pid} on h "):
            check_run_dir_free(tmp_path)  # the file is still empty: waits for the holder to name itself
        assert proc.stdout.readline().strip() == "emptied"
        with hold_run_dir(tmp_path):  # the holder is letting go: waits for it instead of refusing
            assert f'"pid": {os.getpid()}' in lock.read_text()
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holders_lock_is_stale_and_taken_over(tmp_path, holder, caplog):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with caplog.at_level(logging.WARNING, logger="leantune.runlock"), hold_run_dir(tmp_path):
        assert f'"pid": {os.getpid()}' in RunDir(tmp_path).lock.read_text()
    assert f"took over a stale lock of process {holder.pid}" in caplog.text
    check_run_dir_free(tmp_path)  # released: free again, and nothing stale left
    assert RunDir(tmp_path).lock.read_text() == ""


@pytest.mark.slow
def test_a_second_training_process_exits_2_and_writes_nothing(tmp_path, holder):
    before = sorted(p.name for p in tmp_path.iterdir())
    out = subprocess.run([sys.executable, "-m", "leantune.training.loop", str(tmp_path), "--resume"],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 2, out.stderr
    assert f"leantune: run directory {tmp_path} is in use by process {holder.pid}" in out.stderr
    assert "Traceback" not in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no attempt_error.json, no metrics


def test_a_busy_run_is_not_recorded_as_a_failed_attempt_of_it(tmp_path, holder):
    from leantune.config import load_config
    from tasks.attempts import after_failure

    with pytest.raises(RunDirBusy) as e:
        check_run_dir_free(tmp_path)
    assert after_failure(load_config(), tmp_path, 1, e.value) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [RunDir(tmp_path).lock.name]  # no attempts.jsonl in the other's run


# A flow holding the lock starts a training process, which works under it (the flow is its ancestor) and
# inherits the lock's descriptor, so the run stays locked while it lives, even once the flow is killed.
PARENT = """import subprocess, sys, time
from leantune.runlock import held_lock_fds, hold_run_dir
CHILD = "import sys, time; from leantune.runlock import hold_run_dir\\nwith hold_run_dir(sys.argv[1]):\\n    print('child in', flush=True); time.sleep(120)"
with hold_run_dir(sys.argv[1]):
    child = subprocess.Popen([sys.executable, "-c", CHILD, sys.argv[1]], pass_fds=held_lock_fds(sys.argv[1]))
    print(child.pid, flush=True)
    time.sleep(120)
"""


def test_a_child_works_under_its_parents_lock_and_keeps_it_once_the_parent_is_killed(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    child_pid = None
    try:
        child_pid = int(parent.stdout.readline())
        assert parent.stdout.readline().strip() == "child in"  # not refused: its parent holds the lock
        with pytest.raises(RunDirBusy, match=f"in use by process {parent.pid} on "):
            check_run_dir_free(tmp_path)  # a process outside that family is refused
        parent.kill()
        parent.wait()
        with pytest.raises(RunDirBusy):
            check_run_dir_free(tmp_path)  # the training child still holds the lock
    finally:
        parent.kill()
        parent.wait()
        if child_pid:
            os.kill(child_pid, signal.SIGKILL)
    for _ in range(100):  # the child is gone once the lock is free
        try:
            check_run_dir_free(tmp_path)
            break
        except RunDirBusy:
            time.sleep(0.1)
    else:
        pytest.fail("the lock was not released when the child was killed")


def every_file(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.flow
def test_one_command_at_a_time_in_a_run_from_the_first_stage_to_the_report(prefect_server, tmp_path, capsys):
    """A --resume while another command works in the run (after training: evaluation and report only) is
    refused with exit 2 and one line, by the command line and by the flow (the race the command line cannot
    close), and changes nothing: no file under run.output_dir (attempts.jsonl, TensorBoard, the MLflow store)
    differs. Two --resume started together: exactly one evaluates and reports."""
    from mlflow import MlflowClient

    from flows.finetune import main as flow_main
    from leantune.cli import FinetuneRequest
    from leantune.config import load_config

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "runs"
    sets = ["--config", str(root / "configs" / "smoke.yaml"), "--set", f"run.output_dir={out}",
            *(arg for s in ["data.synthetic.num_records=120", "data.val_fraction=0.1", "tokenize.vocab_size=400",
                            "tokenize.max_seq_len=128", "train.max_steps=2", "eval.max_items=8"] for arg in ("--set", s))]
    assert flow_main([*sets, "--run-name", "r"]) == 0
    run_dir = out / "r"
    (run_dir / "report.md").unlink()  # as if stopped after training: a --resume evaluates and reports
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    [mlflow_run] = client.search_runs([client.get_experiment_by_name("leantune").experiment_id])
    assert mlflow_run.info.status == "FINISHED"
    figure = "eval/synthetic/overall/tuned/rate"
    assert len(client.get_metric_history(mlflow_run.info.run_id, figure)) == 1
    attempts = (run_dir / "attempts.jsonl").read_text()

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = every_file(out)
        capsys.readouterr()
        assert flow_main(["--resume", "r", "--set", f"run.output_dir={out}"]) == 2  # the command line's check
        config = load_config(run_dir / "config.yaml")
        assert flow_main(request=FinetuneRequest(config, "smoke", resume=True)) == 2  # the flow's, holding it
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("leantune:")]
        assert lines == [f"leantune: run directory {run_dir} is in use by process {holder.pid} on "
                         f"{lines[0].split(' on ', 1)[1]}"] * 2
        assert every_file(out) == before
    finally:
        holder.kill()
        holder.wait()

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, str(root / "flows" / "finetune.py"), "--resume", "r", "--set", f"run.output_dir={out}"]
    both = [subprocess.Popen(command, env={**env, "PREFECT_HOME": str(tmp_path / f"prefect-{i}")}, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    results = [(p.wait(timeout=400), *p.communicate()) for p in both]
    assert sorted(code for code, _, _ in results) == [0, 2], results
    _, _, refused = next(r for r in results if r[0] == 2)
    said = [line for line in refused.splitlines() if line.startswith("leantune:")]
    # Refused by the flow holding the lock, or, had the other finished first, as a finished run.
    assert len(said) == 1 and said[0].startswith((f"leantune: run directory {run_dir} is in use by process ",
                                                  "leantune: run r has already finished")), refused
    assert (run_dir / "report.md").is_file()
    assert (run_dir / "attempts.jsonl").read_text() == attempts  # neither trained nor wrote an error line
    assert len(client.search_runs([mlflow_run.info.experiment_id])) == 1
    assert len(client.get_metric_history(mlflow_run.info.run_id, figure)) == 1
    assert client.get_run(mlflow_run.info.run_id).info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.flow
def test_evaluating_a_run_another_command_works_in_is_refused(prefect_server, tmp_path, holder, capsys):
    from flows.evaluate import main
    from leantune.config import load_config
    from leantune.rundir import write_config

    write_config(tmp_path, load_config(overrides=["eval.max_items=4"]))
    assert main(["--run", str(tmp_path)]) == 2  # no adapter yet: the message names the run to resume
    assert f"resume it with python flows/finetune.py --resume {tmp_path.name})" in capsys.readouterr().err
    RunDir(tmp_path).adapter.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["--run", str(tmp_path)]) == 2
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("leantune:")]
    assert len(said) == 1 and said[0].startswith(f"leantune: run directory {tmp_path} is in use by process {holder.pid}")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no eval/
