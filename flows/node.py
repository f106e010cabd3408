"""One machine of a multi-node run: its torchrun agent, started by the run's train stage through a deployment.

The finetune flow's train stage, with train.distributed.nnodes N above 1 and train.distributed.node_deployment
(e.g. train-node/node, deployments/prefect.yaml), runs this flow once per other machine at every attempt,
with the run directory (the same path on every machine: a shared filesystem) and node_rank 1 to N-1. Each
flow run starts its machine's torchrun agent for that run (leantune/training/launch.py node_command), which
joins the rendezvous of the train stage's own torchrun (node 0) and ends with the attempt. A worker of the
deployment's pool on each other machine takes them (`python deployments/worker.py --pool gpu-nodes
--limit 1`); docs/deploy.md has the steps.
"""

from __future__ import annotations

from pathlib import Path

from tasks.logs import set_up_flow_process  # first: before Prefect is imported

set_up_flow_process()

from prefect import flow

from tasks.stage import end_stop
from tasks.train import train_node_agent


@flow(name="train-node", on_crashed=[end_stop], on_cancellation=[end_stop])  # end_stop: tasks/stage.py
def train_node(run_dir: str, node_rank: int) -> None:
    """Run node `node_rank`'s torchrun agent for the run in `run_dir` (its config.yaml) until the attempt ends."""
    train_node_agent(Path(run_dir), node_rank)
