"""One process at a time in a run directory (issue 14): a second process is refused with the holder's
pid, nothing written; a lock whose holder was killed is stale and taken over."""

import logging
import os
import signal
import subprocess
import sys

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
