"""Experiment tracking (leantune/tracking.py): MLflow on a local store and TensorBoard event files, read back
through MLflow's client and TensorBoard's event reader; steps logged once a checkpoint holds them, never twice
across a kill and resume; an unreachable server reported once while the run goes on."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from leantune.config import load_config
from leantune.rundir import RunDir
from leantune.tracking import Tracker, mlflow_uri, numbers, start_parent_run

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def step_line(step: int, loss: float, **extra) -> dict:
    return {"step": step, "epoch": step / 10, "loss": loss, "lr": 1e-3, "grad_norm": 0.5, "tokens": 100,
            "tokens_per_s": 1000.0, "micro_batch_size": 4, "peak_memory_mb": 10.0, **extra}


def write_steps(run_dir: Path, lines: list[dict], checkpoint: int) -> None:
    """metrics.jsonl as a training process leaves it, and its newest checkpoint directory."""
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run_dir / "checkpoints" / f"step-{checkpoint}").mkdir(parents=True, exist_ok=True)


def loss_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(raw) for raw in (run_dir / "metrics.jsonl").read_text().splitlines() if raw.strip()]
    return [m for m in lines if "event" not in m and "loss" in m]


def tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(RunDir(run_dir).tensorboard))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_figures_are_numbers_with_intervals_split():
    comparison = {"synthetic": {"overall": {"tuned": {"rate": 0.25, "rate_ci": [0.1, 0.5]}, "mcnemar_p": 0.03,
                                            "intervals_overlap": False, "note": "text"}}}
    assert numbers(comparison, "eval") == {
        "eval/synthetic/overall/tuned/rate": 0.25, "eval/synthetic/overall/tuned/rate_ci_low": 0.1,
        "eval/synthetic/overall/tuned/rate_ci_high": 0.5, "eval/synthetic/overall/mcnemar_p": 0.03,
        "eval/synthetic/overall/intervals_overlap": 0.0}


@pytest.mark.slow
def test_steps_reach_mlflow_once_a_checkpoint_holds_them_and_never_twice(tmp_path):
    """Also: a sweep member is a child run of the sweep's run."""
    from mlflow import MlflowClient

    cfg = load_config(SMOKE, [f"run.output_dir={tmp_path}", "run.name=r"])
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    first = [step_line(s, 2.0 - 0.1 * s) for s in range(1, 7)]
    write_steps(run_dir, first, checkpoint=4)  # killed after step 6; step-4 is its newest checkpoint
    tracker = Tracker(cfg, run_dir)
    tracker.start({"prefect.flow_run_id": "one"})
    tracker.log_steps()
    client = MlflowClient(tracking_uri=mlflow_uri(cfg))
    assert [m.step for m in client.get_metric_history(tracker.run_id, "train/loss")] == [1, 2, 3, 4]

    # The resumed process ran steps 5 and 6 again with another lr (other losses), then 7 and 8.
    final = first[:4] + [step_line(s, 1.0 - 0.05 * s, val_loss=1.5) for s in range(5, 9)]
    write_steps(run_dir, final, checkpoint=8)
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "comparison.json").write_text(json.dumps(
        {"sets": {"synthetic": {"overall": {"difference": -0.25, "difference_ci": [-0.4, -0.1]}}}}))
    resumed = Tracker(cfg, run_dir)
    resumed.start({"prefect.flow_run_id": "two"})
    resumed.finish()

    assert resumed.run_id == tracker.run_id
    run = client.get_run(tracker.run_id)
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(m["step"], m["loss"]) for m in final]
    assert [m.step for m in client.get_metric_history(tracker.run_id, "val/loss")] == [5, 6, 7, 8]
    assert run.data.metrics["eval/synthetic/overall/difference_ci_high"] == -0.1
    assert run.data.tags["prefect.flow_run_id"] == "two"
    assert run.data.params["train.lr"] == "0.003"
    assert run.info.status == "FINISHED"
    assert json.loads(RunDir(run_dir).tracking.read_text())["steps_logged"] == 8
    tb = tensorboard_scalars(run_dir, "loss/train")
    assert [s for s, _ in tb] == [m["step"] for m in final]
    assert [v for _, v in tb] == pytest.approx([m["loss"] for m in final], rel=1e-6)

    # A sweep's member: a child of the sweep's run.
    parent = start_parent_run(cfg, "sweep-x")
    member_cfg = load_config(SMOKE, [f"run.output_dir={tmp_path}", "run.name=m", f"tracking.parent_run_id={parent}"])
    (tmp_path / "m").mkdir()
    member = Tracker(member_cfg, tmp_path / "m")
    member.start()
    assert client.get_run(member.run_id).data.tags["mlflow.parentRunId"] == parent


@pytest.mark.slow
def test_state_hooks_end_the_mlflow_run_in_the_flow_and_in_prefects_runner(prefect_server, tmp_path):
    """Called as Prefect 3.8.8 calls hooks (keywords flow, flow_run, state). In the flow's process the tracker
    it started ends the run: FAILED for a failure, KILLED for a crash (Ctrl-C, SIGTERM). A cancelled
    deployment run's hooks run in Prefect's runner, which has no tracker: the MLflow run tagged with the
    flow run's id is found in the store of the run's config and ended KILLED."""
    import uuid

    from mlflow import MlflowClient
    from prefect.states import Cancelling, Crashed, Failed

    from tasks.track import _STARTED, end_tracking

    cfg = load_config(SMOKE, [f"run.output_dir={tmp_path}", "tracking.tensorboard=false"])
    client = MlflowClient(tracking_uri=mlflow_uri(cfg))
    runs = {}
    for name, state in (("failed", Failed()), ("crashed", Crashed()), ("cancelled", Cancelling())):
        (tmp_path / name).mkdir()
        flow_run = SimpleNamespace(id=uuid.uuid4(), parameters={"config": cfg.model_dump(mode="json")})
        runs[name] = Tracker(cfg, tmp_path / name)
        runs[name].start({"prefect.flow_run_id": str(flow_run.id)})
        if name != "cancelled":
            _STARTED[str(flow_run.id)] = runs[name]
        end_tracking(flow=None, flow_run=flow_run, state=state)
    assert {name: client.get_run(t.run_id).info.status for name, t in runs.items()} == {
        "failed": "FAILED", "crashed": "KILLED", "cancelled": "KILLED"}
    # The UI opens the experiment on its runs, not on GenAI traces.
    assert client.get_experiment_by_name("leantune").tags["mlflow.experimentKind"] == "custom_model_development"


def test_an_unreachable_mlflow_server_is_reported_once_and_tensorboard_goes_on(tmp_path, caplog):
    url = f"http://127.0.0.1:{closed_port()}"
    cfg = load_config(SMOKE, [f"run.output_dir={tmp_path}", "run.name=r", f"tracking.mlflow_uri={url}"])
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    lines = [step_line(s, 3.0 / s) for s in range(1, 4)]
    write_steps(run_dir, lines, checkpoint=3)
    with caplog.at_level(logging.WARNING, logger="leantune.tracking"):
        tracker = Tracker(cfg, run_dir)
        tracker.start()
        tracker.log_steps()
        tracker.finish("FINISHED")
    warnings = [r.getMessage() for r in caplog.records if r.name == "leantune.tracking"]
    assert len(warnings) == 1 and url in warnings[0], warnings
    assert tracker.run_id is None
    tb = tensorboard_scalars(run_dir, "loss/train")
    assert [s for s, _ in tb] == [1, 2, 3]
    assert [v for _, v in tb] == pytest.approx([3.0 / s for s in range(1, 4)], rel=1e-6)


@pytest.mark.slow
@pytest.mark.flow
def test_the_flow_killed_and_resumed_is_one_mlflow_run_equal_to_its_files(tmp_path):
    """The tiny-model flow as a user runs it, killed (flow and training process, SIGKILL) after MLflow has
    some steps, then resumed: one MLflow run holding the config, every step of metrics.jsonl once, the
    evaluation and the artifacts; TensorBoard's loss series equal to metrics.jsonl."""
    import psutil
    from mlflow import MlflowClient

    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    settings = ["data.synthetic.num_records=300", "data.val_fraction=0.1", "tokenize.vocab_size=400",
                "tokenize.max_seq_len=128", "train.max_steps=150", "train.eval_every=50",
                "checkpoint.every_steps=5", "eval.max_items=16", f"run.output_dir={tmp_path}"]
    command = [sys.executable, str(ROOT / "flows" / "finetune.py"), "--config", str(SMOKE),
               *[f"--set={s}" for s in settings]]
    first = subprocess.Popen([*command, "--run-name", "t"], env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "t"
    deadline = time.monotonic() + 600
    try:
        while not RunDir(run_dir).tracking.is_file() or json.loads(RunDir(run_dir).tracking.read_text())[
                "steps_logged"] < 10:
            assert first.poll() is None and time.monotonic() < deadline, "no steps in MLflow before the kill"
            time.sleep(0.05)
    finally:
        # The training process runs in a session of its own (it would save a checkpoint when the flow dies):
        # killed too, as a machine that goes down kills both.
        training = [p for p in psutil.process_iter(["cmdline"])
                    if "leantune.training.loop" in (p.info["cmdline"] or []) and str(run_dir) in p.info["cmdline"]]
        os.killpg(first.pid, signal.SIGKILL)
        for process in training:
            process.kill()
        first.wait()
    assert not (run_dir / "training.json").exists(), "training finished before the kill; raise train.max_steps"

    resumed = subprocess.run([*command, "--resume", "t"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("leantune").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "t"
    assert run.data.params["train.max_steps"] == "150" and run.data.params["model.name_or_path"] == "scratch"
    assert run.data.tags["prefect.flow_run_id"]
    steps = loss_lines(run_dir)
    assert [m["step"] for m in steps] == list(range(1, 151))
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(m["step"], m["loss"]) for m in steps]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [50, 100, 150]

    overall = json.loads((run_dir / "eval" / "comparison.json").read_text())["sets"]["synthetic"]["overall"]
    metrics = run.data.metrics
    assert metrics["eval/synthetic/overall/tuned/rate"] == overall["tuned"]["rate"]
    assert metrics["eval/synthetic/overall/difference_ci_low"] == overall["difference_ci"][0]
    assert metrics["data/read"] == 300
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "report.md", "loss.png", "adapter"} <= artifacts
    assert "adapter/adapter_model.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert run.info.run_id in (run_dir / "report.md").read_text()

    tb = tensorboard_scalars(run_dir, "loss/train")
    assert [s for s, _ in tb] == [m["step"] for m in steps]
    assert [v for _, v in tb] == pytest.approx([m["loss"] for m in steps], rel=1e-6)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.slow
@pytest.mark.flow
def test_the_flow_finishes_with_the_mlflow_server_unreachable(prefect_server, tmp_path):
    from flows.finetune import finetune

    url = f"http://127.0.0.1:{closed_port()}"
    cfg = load_config(SMOKE, ["data.synthetic.num_records=300", "data.val_fraction=0.1", "tokenize.vocab_size=400",
                              "tokenize.max_seq_len=128", "train.max_steps=4", "checkpoint.every_steps=2",
                              "eval.enabled=false", f"tracking.mlflow_uri={url}", f"run.output_dir={tmp_path}",
                              "run.name=t"])
    records = _Records()
    logging.getLogger("leantune.tracking").addHandler(records)
    try:
        run_dir = finetune(cfg)
    finally:
        logging.getLogger("leantune.tracking").removeHandler(records)
    assert json.loads((run_dir / "training.json").read_text())["completed"] is True
    assert len(records.messages) == 1 and url in records.messages[0], records.messages
    assert "mlflow" not in json.loads(RunDir(run_dir).tracking.read_text())
    assert [s for s, _ in tensorboard_scalars(run_dir, "loss/train")] == [1, 2, 3, 4]


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs sysfs: a folder no one may create files in")
def test_a_read_only_tensorboard_folder_is_one_warning_not_a_writer_thread_traceback(tmp_path, caplog, capfd):
    cfg = load_config(SMOKE, [f"run.output_dir={tmp_path}", "run.name=r", "tracking.mlflow=false"])
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    # Read-only even for root (tests may run as root, whom a chmod does not stop): sysfs.
    RunDir(run_dir).tensorboard.symlink_to("/sys/kernel")
    write_steps(run_dir, [step_line(s, 3.0 / s) for s in range(1, 4)], checkpoint=3)
    with caplog.at_level(logging.WARNING, logger="leantune.tracking"):
        tracker = Tracker(cfg, run_dir)
        tracker.start()
        tracker.log_steps()
        tracker.finish("FINISHED")
    time.sleep(0.5)  # a writer thread's traceback would be printed by now
    warnings = [r.getMessage() for r in caplog.records if r.name == "leantune.tracking"]
    assert len(warnings) == 1 and "tensorboard left out" in warnings[0] and "Permission denied" in warnings[0]
    assert tracker.problems == {"tensorboard": warnings[0].split("(", 1)[1].rsplit(")", 1)[0]}
    assert "Traceback" not in capfd.readouterr().err
    assert "tensorboard" not in json.loads(RunDir(run_dir).tracking.read_text())  # no logdir is claimed


@pytest.mark.flow
def test_a_refused_resume_leaves_the_runs_mlflow_run_alone(prefect_server, tmp_path):
    """A resume whose settings would alter the updates (from the UI's form, say) is refused before the run's
    MLflow run is reopened: it is not marked RUNNING, then FAILED, for a resume that never ran."""
    from flows.finetune import finetune
    from leantune.config import dump_config
    from leantune.errors import UserError
    from leantune.resume import resume_fingerprint

    cfg = load_config(SMOKE, [f"run.output_dir={tmp_path}", "run.name=r"])
    step = tmp_path / "r" / "checkpoints" / "step-3"
    step.mkdir(parents=True)
    (tmp_path / "r" / "config.yaml").write_text(dump_config(cfg))
    (step / "manifest.json").write_text(json.dumps({"resume_config": resume_fingerprint(cfg)}))
    with pytest.raises(UserError, match="lora.r"):
        finetune(load_config(SMOKE, [f"run.output_dir={tmp_path}", "run.name=r", "lora.r=8"]), resume=True)
    assert not (tmp_path / "r" / "tracking.json").exists() and not (tmp_path / "mlflow.db").exists()


def test_tensorboard_holds_the_curves_in_few_sections_the_figures_as_text_and_the_plots_as_images(tmp_path):
    """TensorBoard opens on the training curves: the one-point figures are text tables, the plots images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(SMOKE, [f"run.output_dir={tmp_path}", "run.name=r", "tracking.mlflow=false"])
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    lines = [step_line(s, 2.0 - 0.1 * s, energy_j=3.0, pref_accuracy=0.5) for s in (1, 2)]
    write_steps(run_dir, [*lines[:1], {**lines[1], "val_loss": 1.7}], checkpoint=2)
    RunDir(run_dir).data_dir.quality.parent.mkdir(parents=True)
    RunDir(run_dir).data_dir.quality.write_text(json.dumps({"totals": {"rows_read": 40, "kept": 38}}))
    for path in (run_dir / "loss.png", run_dir / "eval" / "sycophancy.png"):
        path.parent.mkdir(exist_ok=True)
        fig = plt.figure(figsize=(2, 1), dpi=50)
        fig.savefig(path)
        plt.close(fig)
    tracker = Tracker(cfg, run_dir)
    tracker.start()
    tracker.finish()

    events = EventAccumulator(str(RunDir(run_dir).tensorboard), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert set(tags["scalars"]) == {
        "loss/train", "train/lr", "train/grad_norm", "train/epoch", "loss/validation", "memory/peak_memory_mb",
        "power/energy_j", "preference/pref_accuracy", "speed/tokens", "speed/tokens_per_s",
        "speed/micro_batch_size"}
    # TensorBoard lists its sections in alphabetical order: the loss curves' comes first.
    assert min(tag.partition("/")[0] for tag in tags["scalars"] + tags["images"]) == "loss"
    assert [e.step for e in events.Scalars("loss/validation")] == [2]
    assert set(tags["tensors"]) == {"config/text_summary", "figures/data/text_summary"}
    table = events.Tensors("figures/data/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| data/rows_read | 40 |" in table and "| data/kept | 38 |" in table
    assert set(tags["images"]) == {"plots/loss", "plots/eval/sycophancy"}
    image = events.Images("plots/loss")[0]
    assert (image.width, image.height) == (100, 50) and image.step == 2


@pytest.mark.slow
def test_the_readmes_mlflow_ui_command_installs_in_a_fresh_venv_and_serves_the_runs(tmp_path):
    """The README's two MLflow UI lines, run as written but for the venv's folder, the store's path and the port:
    a fresh venv installs the pinned `mlflow` from the package index, and its UI serves a run leantune logged
    (read back through its REST API, as the runs view reads it) and its page. Needs the package index."""
    import re
    import urllib.request

    readme = (ROOT / "README.md").read_text()
    [install] = re.findall(r"^python3 -m venv ~/\.mlflow-ui && .*$", readme, re.M)
    [serve] = re.findall(r"^~/\.mlflow-ui/bin/mlflow ui --backend-store-uri sqlite:///\$PWD/runs/mlflow\.db", readme,
                         re.M)
    cfg = load_config(SMOKE, [f"run.output_dir={tmp_path / 'runs'}", "run.name=r"])
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    write_steps(run_dir, [step_line(s, 2.0 - 0.1 * s) for s in range(1, 4)], checkpoint=3)
    tracker = Tracker(cfg, run_dir)
    tracker.start()
    tracker.finish()

    venv = tmp_path / "mlflow-ui"
    # Without a pip.conf's constraints of this machine's: the fresh venv as a user's.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))}
    subprocess.run(install.replace("~/.mlflow-ui", str(venv)), shell=True, check=True, env=env, cwd=tmp_path,
                   capture_output=True, timeout=900)
    port = closed_port()
    server = subprocess.Popen(f"{serve.replace('~/.mlflow-ui', str(venv))} --port {port}", shell=True, env=env,
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                request = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", method="POST",
                                                 data=json.dumps({"experiment_ids": ["1"]}).encode(),
                                                 headers={"Content-Type": "application/json"})
                runs = json.loads(urllib.request.urlopen(request, timeout=10).read())["runs"]
                break
            except OSError:
                assert server.poll() is None, "mlflow ui exited"
                assert time.monotonic() < deadline, "mlflow ui did not answer within 180 s"
                time.sleep(1)
        [run] = runs
        assert run["info"]["run_id"] == tracker.run_id and run["info"]["status"] == "FINISHED"
        assert {m["key"]: m["value"] for m in run["data"]["metrics"]}["train/loss"] == pytest.approx(1.7)
        page = urllib.request.urlopen(base, timeout=10).read().decode()
        assert "<html" in page.lower()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
