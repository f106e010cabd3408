"""deployments/serve.py stopped with SIGTERM while a flow run trains: it ends in seconds, the training
saves a checkpoint and is not left running."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TOKENIZED_RUN_OVERRIDES
from run_helpers import apply_served_deployments

from leantune.config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.flow
def test_sigterm_ends_serve_in_seconds_with_the_training_checkpointed(prefect_server, tmp_path):
    import psutil
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    apply_served_deployments()
    # Far more steps than the test waits for; the only checkpoint is the one SIGTERM asks for.
    config = load_config(overrides=[*TOKENIZED_RUN_OVERRIDES, "data.synthetic.num_records=60", "eval.enabled=false",
                                    "train.max_steps=100000", "checkpoint.every_steps=100000",
                                    "monitor.enabled=false", f"run.output_dir={tmp_path}", "run.name=stopped"])
    flow_run = run_deployment("finetune/adhoc", parameters={"config": config.model_dump(mode="json")}, timeout=0)
    run_dir = tmp_path / "stopped"

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    server = subprocess.Popen([sys.executable, "deployments/serve.py"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 540
        while time.monotonic() < deadline and server.poll() is None and not (
                (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").stat().st_size):
            time.sleep(1)
        assert (run_dir / "metrics.jsonl").is_file(), "training did not start"
        training = [p for p in psutil.process_iter(["cmdline"])
                    if "leantune.training.loop" in (p.info["cmdline"] or []) and str(run_dir) in p.info["cmdline"]]
        assert len(training) == 1
        server.send_signal(signal.SIGTERM)
        started = time.monotonic()
        output = server.communicate(timeout=120)[0]
        took = time.monotonic() - started
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    # Prefect's own handling left the training running with no checkpoint (and was seen taking 55 s).
    # The stop takes about 10 s on a busy 2-core machine (28 s measured under a load of 10): a generous
    # bound tells "stops" from "hangs" without timing the machine.
    assert took < 60, f"serve.py took {took:.0f} s to stop\n{output[-3000:]}"
    assert not training[0].is_running(), "the training process was left running"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")), output[-3000:]
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run.id).state
        # The run graph ends where the run ended: no task left open (a Running node stretches it to now).
        graph = client.request("GET", "/flow_runs/{id}/graph-v2", path_params={"id": flow_run.id}).json()
    assert state.is_final(), state
    assert graph["end_time"] is not None
    assert [node["label"] for _, node in graph["nodes"] if node["end_time"] is None] == []
