"""deployments/serve.py stopped with SIGTERM while a flow run trains: it ends in seconds, the training
saves a checkpoint and is not left running."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TOKENIZED_RUN_OVERRIDES
from run_helpers import (
    ENDLESS_TRAINING,
    apply_served_deployments,
    assert_stopped_with_a_checkpoint,
    sigterm_while_training,
)

from leantune.config import load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.flow
def test_sigterm_ends_serve_in_seconds_with_the_training_checkpointed(prefect_server, tmp_path):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    apply_served_deployments()
    config = load_config(overrides=[*TOKENIZED_RUN_OVERRIDES, *ENDLESS_TRAINING, f"run.output_dir={tmp_path}",
                                    "run.name=stopped"])
    flow_run = run_deployment("finetune/adhoc", parameters={"config": config.model_dump(mode="json")}, timeout=0)

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    server = subprocess.Popen([sys.executable, "deployments/serve.py"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    took, output, training = sigterm_while_training(server, tmp_path / "stopped")
    print(f"serve.py stopped {took:.1f} s after SIGTERM")
    # Prefect's own handling left the training running with no checkpoint (and was seen taking 55 s).
    # The stop takes about 10 s on a busy 2-core machine (28 s measured under a load of 10): a generous
    # bound tells "stops" from "hangs" without timing the machine.
    assert took < 60, f"serve.py took {took:.0f} s to stop\n{output[-3000:]}"
    assert_stopped_with_a_checkpoint(flow_run.id, training, tmp_path / "stopped", output)
