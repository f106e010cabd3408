"""Every way a run can stop ends clean: Ctrl-C or SIGTERM to a terminal's `python flows/finetune.py` (its
own temporary Prefect server), and a cancellation through a Prefect server. The training saves a
checkpoint, the flow run ends in a final state, the MLflow run is not left RUNNING, the lock is free."""

import contextlib
import ctypes
import fcntl
import io
import json
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_helpers import ENDLESS_TRAINING, SMOKE

from leantune.rundir import RunDir, read_attempts
from leantune.runlock import check_run_dir_free

ROOT = Path(__file__).resolve().parents[2]
TINY = ["data.synthetic.num_records=60", "tokenize.vocab_size=400", "tokenize.max_seq_len=128",
        "data.val_fraction=0.1", "data.chunk_size=64", "tracking.tensorboard=false"]


def first_step_logged(run_dir: Path, process: subprocess.Popen, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and '"step"' in metrics.read_text():
            return
        time.sleep(0.5)
    process.kill()
    raise AssertionError(f"training did not start\n{(process.communicate()[0] or '')[-3000:]}")


def mlflow_status(run_dir: Path) -> str:
    from mlflow import MlflowClient

    tracking = json.loads((run_dir / "tracking.json").read_text())["mlflow"]
    return MlflowClient(tracking["tracking_uri"]).get_run(tracking["run_id"]).info.status


def flow_command(tmp_path, *extra) -> tuple[list[str], dict]:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)  # the user's own temporary server
    command = [sys.executable, str(ROOT / "flows" / "finetune.py"), "--config", str(SMOKE),
               *[f"--set={o}" for o in [*TINY, f"run.output_dir={tmp_path}", *extra]]]
    return command, env


def signal_the_terminal(tmp_path, signum: int, *extra, through: tuple[str, ...] = ()) -> tuple[str, int]:
    """`python flows/finetune.py` in a session of its own (a terminal's foreground process group, which
    Ctrl-C signals, as a `timeout` or a CI limit does); `signum` to its whole group once training logged a
    step. Returns its output and the step of the checkpoint it left, after checking what every stop must
    show: exit 128 + signum in seconds, no traceback, one `leantune:` line last with the resume command, the
    attempt recorded as interrupted, the MLflow run KILLED, the run's lock released. `through`: a command
    that runs the script, the group's leader (`timeout`)."""
    command, env = flow_command(tmp_path, *extra)
    flow = subprocess.Popen([*through, *command, "--run-name", "stopped"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    run_dir = tmp_path / "stopped"
    first_step_logged(run_dir, flow)
    os.killpg(flow.pid, signum)
    started = time.monotonic()
    try:
        output = flow.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        os.killpg(flow.pid, signal.SIGKILL)
        raise AssertionError(f"the flow did not stop\n{flow.communicate()[0][-3000:]}") from None
    return check_stopped(run_dir, signum, output, flow.returncode, time.monotonic() - started)


def check_stopped(run_dir: Path, signum: int, output: str, returncode: int, took: float) -> tuple[str, int]:
    """What every stop must show (see `signal_the_terminal`); returns the output and the checkpoint's step."""
    name = signal.Signals(signum).name
    print(f"stopped {took:.1f} s after {name}")
    assert returncode == 128 + signum, output[-3000:]
    # Seconds on an idle machine (one tiny step, its checkpoint); ~30 s measured with seven test runs on two
    # cores. The bound tells "stops" from "hangs" (before: over 6 minutes, until a second Ctrl-C).
    assert took < 60, output[-3000:]
    assert "Traceback" not in output and "ConnectError" not in output, output[-5000:]
    [step] = [int(p.name.removeprefix("step-")) for p in (run_dir / "checkpoints").glob("step-*")]
    lines = output.strip().splitlines()
    assert [line for line in lines if line.startswith("leantune:")] == [lines[-1]]
    assert lines[-1] == (f"leantune: stopped by {name} at step {step}; checkpoint in {run_dir / 'checkpoints'}/"
                         f"step-{step}; resume with: python flows/finetune.py --resume stopped")
    assert [(a["outcome"], a["step"], a["message"]) for a in read_attempts(run_dir)] == [
        ("interrupted", step, f"stopped by {name}")]
    assert mlflow_status(run_dir) == "KILLED"
    check_run_dir_free(run_dir)  # raises RunDirBusy while a process holds it
    assert not (run_dir / ".lock").read_text()  # released cleanly, not left stale
    return output, step


def test_the_first_signal_stops_the_script_and_a_repeated_sigterm_or_the_terminals_hangup_does_not():
    # The handlers of flows/finetune.py's main (Prefect's raises TerminationSignal in the flow run instead).
    from leantune.stopping import Stopped, hang_up, raise_stopped

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGTERM, raise_stopped)
    signal.signal(signal.SIGHUP, hang_up)
    try:
        started = time.monotonic()
        with pytest.raises(Stopped) as stop:  # the terminal hung up: a SIGTERM, a second later
            signal.raise_signal(signal.SIGHUP)
            time.sleep(10)
        assert stop.value.signal == signal.SIGTERM and 1 <= time.monotonic() - started < 5
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGTERM):  # during the stop: nothing more happens
            signal.raise_signal(sig)
        time.sleep(1.5)
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C still stops at once
            signal.raise_signal(signal.SIGINT)
        # A SIGTERM to the group kills the terminal's shell, so its hangup and the SIGTERM come together:
        # one stop, by SIGTERM, and the hangup's SIGTERM a second later does not raise in its middle.
        signal.signal(signal.SIGTERM, raise_stopped)
        signal.signal(signal.SIGHUP, hang_up)
        with pytest.raises(Stopped) as stop:
            signal.raise_signal(signal.SIGHUP)
            signal.raise_signal(signal.SIGTERM)
        time.sleep(1.5)
        assert stop.value.signal == signal.SIGTERM
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@pytest.mark.slow
def test_ctrl_c_stops_the_flow_after_a_checkpoint_and_resume_finishes(tmp_path):
    steps = 40
    _, step = signal_the_terminal(tmp_path, signal.SIGINT, *ENDLESS_TRAINING, f"train.max_steps={steps}")
    assert 0 < step < steps
    command, env = flow_command(tmp_path)
    resumed = subprocess.run([*command, "--resume", "stopped"], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    # The run ends with how long each of its stages took (the resume ran no data stage).
    assert re.search(r"stage times: track \d+s, train (\d+m)?\d+s, report \d+s, track-finish \d+s",
                     resumed.stdout + resumed.stderr), (resumed.stdout + resumed.stderr)[-3000:]
    training = json.loads((tmp_path / "stopped" / "training.json").read_text())
    assert (training["completed"], training["steps"], training["resumed_from_step"]) == (True, steps, step)
    assert [a["outcome"] for a in read_attempts(tmp_path / "stopped")] == ["interrupted", "completed"]
    assert mlflow_status(tmp_path / "stopped") == "FINISHED"


@pytest.mark.slow
def test_sigterm_to_the_group_ends_the_prefect_run_crashed_not_running(tmp_path):
    signal_the_terminal(tmp_path, signal.SIGTERM, *ENDLESS_TRAINING)
    # The temporary server's database: the flow run and its tasks ended in a final state.
    with sqlite3.connect(tmp_path / "prefect" / "prefect.db") as db:
        flow_runs = db.execute("SELECT state_type FROM flow_run").fetchall()
        open_tasks = db.execute("SELECT name FROM task_run WHERE state_type IN ('RUNNING', 'PENDING')").fetchall()
    assert flow_runs == [("CRASHED",)] and open_tasks == []


@pytest.mark.slow
def test_sigterm_to_the_group_of_timeout_reaches_the_flow_twice_and_costs_no_checkpoint(tmp_path):
    # `timeout` passes a SIGTERM it gets (or its own limit's) on to the flow, then to its whole group: the flow
    # gets it twice. Before, the second made the flow kill the training before its checkpoint.
    signal_the_terminal(tmp_path, signal.SIGTERM, *ENDLESS_TRAINING, through=("timeout", "3600"))


@pytest.mark.slow
def test_sigterm_to_the_group_of_a_terminals_shell_stops_the_flow_as_to_the_flow_alone(tmp_path):
    """`setsid bash -c 'python flows/finetune.py ...; ...'` in a terminal, then `kill -TERM -<pgid>`: the shell, the
    session leader, dies of it, and the kernel sends the terminal's foreground group, the flow, SIGHUP in the
    middle of its stop. Before, that killed the flow: no `leantune:` line, a stale lock, no attempt recorded."""
    import threading

    with flow_in_a_terminal(tmp_path) as (terminal, shell, flow):
        chunks = []
        reader = threading.Thread(target=read_terminal, args=(terminal, chunks), daemon=True)
        reader.start()
        first_step_logged(tmp_path / "stopped", shell)
        flow_pid = flow().pid
        os.killpg(shell.pid, signal.SIGTERM)
        started = time.monotonic()
        assert shell.wait(timeout=30) == -signal.SIGTERM
        status = wait_for_exit(flow_pid, timeout=120)
        took = time.monotonic() - started
    reader.join(timeout=10)
    output = b"".join(chunks).decode(errors="replace")
    assert "the shell went on" not in output
    check_stopped(tmp_path / "stopped", signal.SIGTERM, output, status, took)


@pytest.mark.slow
def test_closing_the_terminal_window_stops_the_flow_after_a_checkpoint(tmp_path):
    """A terminal window closed during training: the kernel hangs up the terminal (SIGHUP to its shell and its
    foreground group, the flow's) and every later write to it fails. The flow stops as on SIGTERM: the training's
    checkpoint, the attempt recorded as interrupted, the MLflow run KILLED, the lock released."""
    import threading

    run_dir = tmp_path / "stopped"
    with flow_in_a_terminal(tmp_path) as (terminal, shell, flow):
        closing = threading.Event()
        # The window shows what the flow writes until it closes (a full terminal would block the flow's writes).
        reader = threading.Thread(target=read_terminal, args=(terminal, [], closing), daemon=True)
        reader.start()
        first_step_logged(run_dir, shell)
        flow_pid = flow().pid
        closing.set()
        reader.join(timeout=10)  # it closes the window's side of the terminal
        started = time.monotonic()
        assert shell.wait(timeout=30) == -signal.SIGHUP
        status = wait_for_exit(flow_pid, timeout=120)
        took = time.monotonic() - started
    print(f"stopped {took:.1f} s after the hangup, exit status {status}")
    # The newest checkpoint is the stop's (a slow stop may come after a best-validation checkpoint).
    step = max(int(p.name.removeprefix("step-")) for p in (run_dir / "checkpoints").glob("step-*"))
    assert [(a["outcome"], a["step"], a["message"]) for a in read_attempts(run_dir)] == [
        ("interrupted", step, "stopped by SIGTERM")]
    assert mlflow_status(run_dir) == "KILLED"
    check_run_dir_free(run_dir)
    assert not (run_dir / ".lock").read_text()
    assert status == 128 + signal.SIGTERM


@contextlib.contextmanager
def flow_in_a_terminal(tmp_path):
    """`bash -c 'python flows/finetune.py ... --run-name stopped; echo the shell went on'` on a new pseudo-terminal
    whose session the shell leads, as in a terminal window. Yields the terminal's side (its fd), the shell's Popen
    and a function that returns the flow's psutil.Process; this process adopts the flow (a subreaper) when the
    shell dies first, so that it can read its exit status."""
    import pty
    import termios

    import psutil

    command, env = flow_command(tmp_path, *ENDLESS_TRAINING)
    terminal, flow_side = pty.openpty()
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    assert prctl(PR_SET_CHILD_SUBREAPER, 1) == 0
    try:
        shell = subprocess.Popen(
            ["bash", "-c", f"{shlex.join([*command, '--run-name', 'stopped'])}; echo the shell went on"],
            stdin=flow_side, stdout=flow_side, stderr=flow_side, env=env, start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))  # the terminal is the session's
        os.close(flow_side)

        def flow():
            [process] = psutil.Process(shell.pid).children()
            assert os.getpgid(process.pid) == os.getpgid(shell.pid) == os.getsid(process.pid) == shell.pid
            return process

        yield terminal, shell, flow
    finally:
        prctl(PR_SET_CHILD_SUBREAPER, 0)


PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def read_terminal(fd: int, chunks: list[bytes], closing=None) -> None:
    """What is written to the terminal, until its last writer is gone or `closing` (a threading.Event) is set;
    then the terminal's fd is closed."""
    import select

    while closing is None or not closing.is_set():
        if not select.select([fd], [], [], 0.2)[0]:
            continue
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: no process has the terminal open any more
            break
        if not data:
            break
        chunks.append(data)
    os.close(fd)


def wait_for_exit(pid: int, timeout: float) -> int:
    """The exit status of `pid`, a child of this process, as subprocess reports it (143: stopped by SIGTERM)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"the flow (pid {pid}) did not stop within {timeout} s")


@pytest.mark.slow
@pytest.mark.flow
def test_a_cancel_through_the_server_ends_the_run_cancelled_checkpointed_and_tracked(prefect_server, tmp_path):
    """Cancel (as the UI and `prefect flow-run cancel` do) a deployment run that deployments/serve.py runs,
    during training: Prefect's runner SIGTERMs the flow's process group (SIGKILL 30 s later); the training,
    in its own session, is stopped once by the flow and saves a checkpoint; the runner runs the on_cancellation
    hook, which ends the MLflow run KILLED and gives the progress bar its last word; the lock is free."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL
    from prefect.states import State
    from run_helpers import apply_served_deployments

    from leantune.config import load_config

    apply_served_deployments()
    config = load_config(SMOKE, [*TINY, *ENDLESS_TRAINING, f"run.output_dir={tmp_path}", "run.name=cancelled"])
    flow_run = run_deployment("finetune/adhoc", parameters={"config": config.model_dump(mode="json")}, timeout=0)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    serve = subprocess.Popen([sys.executable, "deployments/serve.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    run_dir = tmp_path / "cancelled"
    try:
        first_step_logged(run_dir, serve)
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run.id, State(type=StateType.CANCELLING))
            deadline = time.monotonic() + 120
            while not (state := client.read_flow_run(flow_run.id).state).is_final() and time.monotonic() < deadline:
                time.sleep(1)
            # The runner's hook ends MLflow's run just before it proposes Cancelled; the lock goes with the training.
            while (RunDir(run_dir).lock.read_text() or mlflow_status(run_dir) == "RUNNING") \
                    and time.monotonic() < deadline:
                time.sleep(1)
            [progress] = client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["training-progress"]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        output = serve.communicate(timeout=120)[0]
    assert state.type == StateType.CANCELLED, f"{state}\n{output[-3000:]}"
    [step] = [int(p.name.removeprefix("step-")) for p in (run_dir / "checkpoints").glob("step-*")]
    assert json.loads(RunDir(run_dir).training.read_text())["steps"] == step
    assert mlflow_status(run_dir) == "KILLED", output[-3000:]
    check_run_dir_free(run_dir)
    assert progress.description == (f"Training stopped at step {step} (the last checkpoint): the flow run "
                                     "ended cancelled; continue it with --resume cancelled")
    assert [(a["outcome"], a["step"]) for a in read_attempts(run_dir)] == [("interrupted", step)]


def stop_the_validate_stage(monkeypatch, signum: int) -> None:
    """The validate stage, once it starts, is stopped by `signum` (its work never begins)."""
    import tasks.validate

    def stopped(*_args):
        signal.raise_signal(signum)
        raise AssertionError(f"{signal.Signals(signum).name} did not stop the stage")

    monkeypatch.setattr(tasks.validate, "cached", stopped)


@pytest.mark.flow
def test_a_sigterm_repeated_while_prefect_records_a_stages_crash_leaves_nothing_running(
        prefect_server, tmp_path, monkeypatch):
    """`timeout`'s second SIGTERM, or the terminal's hangup (a SIGTERM a second later), can come while Prefect
    records the crash of the stage the first SIGTERM stopped, and of the flow run. Before, Prefect's own
    handler was still in place there and raised in the middle of it: the task and the flow run were left
    Running in the server's database. Here the repeat comes at the start of each recording."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.flow_engine import FlowRunEngine
    from prefect.task_engine import SyncTaskRunEngine

    from flows.finetune import main

    def repeat_first(handle_crash):
        def repeated(engine, exc):
            os.kill(os.getpid(), signal.SIGTERM)
            return handle_crash(engine, exc)
        return repeated

    stop_the_validate_stage(monkeypatch, signal.SIGTERM)
    for engine in (SyncTaskRunEngine, FlowRunEngine):
        monkeypatch.setattr(engine, "handle_crash", repeat_first(engine.handle_crash))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    # Its own capture: a capture fixture's stream, closed after the test, would be the one Prefect's log handler
    # (set up by the first import of a flow module) writes to in later tests.
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        code = main(["--config", str(SMOKE), "--run-name", "stopped",
                     *[f"--set={o}" for o in [*TINY, f"run.output_dir={tmp_path}"]]])
    err = said.getvalue()
    run_dir = tmp_path / "stopped"
    assert code == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == (f"leantune: stopped by SIGTERM before the first checkpoint (in {run_dir}); "
                                            "resume with: python flows/finetune.py --resume stopped")
    tracking = json.loads((run_dir / "tracking.json").read_text())["mlflow"]
    mlflow_run = MlflowClient(tracking["tracking_uri"]).get_run(tracking["run_id"])
    with get_client(sync_client=True) as client:
        flow_run_id = mlflow_run.data.tags["prefect.flow_run_id"]
        flow_run = client.read_flow_run(flow_run_id)
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    assert flow_run.state.name == "Crashed"
    assert sorted((t.name.rsplit("-", 1)[0], t.state.name) for t in task_runs) == [
        ("prepare", "Completed"), ("track", "Completed"), ("validate", "Crashed")]
    assert mlflow_run.info.status == "KILLED"
    check_run_dir_free(run_dir)
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers


@pytest.mark.flow
def test_a_flow_called_from_python_and_stopped_leaves_the_signal_handlers_as_they_were(prefect_server, tmp_path,
                                                                                        monkeypatch):
    """A stop holds off repeated SIGTERMs and SIGHUPs (leantune/stopping.py) until the flow has ended; a flow
    called from Python (a notebook, a test) then finds its handlers as they were, not ignored."""
    from flows.finetune import finetune
    from leantune.config import load_config
    from leantune.stopping import ignore_repeat

    stop_the_validate_stage(monkeypatch, signal.SIGINT)
    config = load_config(SMOKE, [*TINY, f"run.output_dir={tmp_path}", "run.name=stopped"])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    during_the_stop = []  # the handlers while Prefect records the crash: held off
    monkeypatch.setattr(finetune, "on_crashed_hooks", [
        lambda flow, flow_run, state: during_the_stop.extend(signal.getsignal(sig) for sig in handlers),
        *finetune.on_crashed_hooks])
    with pytest.raises(KeyboardInterrupt):
        finetune(config)
    assert during_the_stop == [ignore_repeat, ignore_repeat]
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    check_run_dir_free(tmp_path / "stopped")
