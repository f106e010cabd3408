"""Helpers shared by the tests: a fresh copy of the `tokenized_run` fixture, adapter weights, the newest Prefect
artifact of a key."""

import shutil
from pathlib import Path

from safetensors.torch import load_file

from leantune.config import dump_config, load_config

# The tiny scratch model's config: what command-line flow tests run (configs/default.yaml is the real model).
SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


def new_run(tokenized_run, tmp_path, *overrides, name="run"):
    """Copy the pristine tokenized run to tmp_path/name with `overrides` applied to its config.yaml."""
    run_dir = tmp_path / name
    shutil.copytree(tokenized_run, run_dir)
    cfg = load_config(run_dir / "config.yaml", overrides=list(overrides))
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return cfg, run_dir


def adapter(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def assert_same_weights(a, b, rel=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        err = float((a[key] - b[key]).norm() / b[key].norm())
        assert err <= rel, f"{key}: relative difference {err:.2e}"


def apply_served_deployments():
    """Register deployments/serve.py's deployments on the current Prefect server; return the serve module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("leantune_serve", Path(__file__).resolve().parents[1]
                                                  / "deployments" / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    for d in serve.deployments():
        d.apply()
    return serve


# A training far longer than the stop tests wait for: the only checkpoint is the one SIGTERM asks for.
ENDLESS_TRAINING = ["data.synthetic.num_records=60", "eval.enabled=false", "train.max_steps=100000",
                    "checkpoint.every_steps=100000", "monitor.enabled=false"]


def sigterm_while_training(process, run_dir: Path, timeout: float = 540):
    """Once the flow run's training in run_dir has logged a step, SIGTERM `process` (serve.py or a worker)
    and wait for it to exit. Returns (seconds from SIGTERM to exit, its output, the training process)."""
    import signal
    import subprocess
    import time

    import psutil

    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None and not (
                (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").stat().st_size):
            time.sleep(1)
        assert (run_dir / "metrics.jsonl").is_file(), f"training did not start\n{process.communicate()[0][-3000:]}"
        training = [p for p in psutil.process_iter(["cmdline"])
                    if "leantune.training.loop" in (p.info["cmdline"] or []) and str(run_dir) in p.info["cmdline"]]
        assert len(training) == 1
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        output = process.communicate(timeout=120)[0]
        return time.monotonic() - started, output, training[0]
    except (AssertionError, subprocess.TimeoutExpired):
        process.kill()
        process.communicate()
        raise


def assert_stopped_with_a_checkpoint(flow_run_id, training, run_dir: Path, output: str) -> None:
    """The training process ended after saving a checkpoint, and the flow run is in a final state with no
    task left open (a Running node stretches the run graph to now)."""
    from prefect.client.orchestration import get_client

    assert not training.is_running(), "the training process was left running"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")), output[-3000:]
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state
        graph = client.request("GET", "/flow_runs/{id}/graph-v2", path_params={"id": flow_run_id}).json()
    print(f"flow run ended {state.name}: {state.message}")
    assert state.is_final(), state
    assert graph["end_time"] is not None
    assert [node["label"] for _, node in graph["nodes"] if node["end_time"] is None] == []


def latest_artifact(key: str):
    """The newest artifact with `key` on the test session's Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                           sort=ArtifactSort.CREATED_DESC, limit=1)
    return artifact
