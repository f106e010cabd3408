"""Serve leantune's deployments from this process: no work pool or worker needed.

    python deployments/serve.py      # from the repository root; keep it running
    python deployments/serve.py --node   # on each other machine of multi-node runs

Registers the same three deployments as deployments/prefect.yaml (nightly fine-tune at 02:00 UTC,
ad-hoc fine-tune for the UI, evaluation) on the Prefect server of PREFECT_API_URL and runs their
flow runs as subprocesses of this machine until stopped with Ctrl-C or SIGTERM; a running training
saves a checkpoint first (`GracefulRunner`), so `--resume` continues it.

--node serves only train-node/node (flows/node.py), one flow run at a time: the deployment a multi-node
run's train stage starts once per other machine (train.distributed.node_deployment: train-node/node).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import yaml
from prefect.runner import Runner
from prefect.schedules import Cron

from flows.evaluate import evaluate_flow
from flows.finetune import DEFAULT_CONFIG, finetune
from flows.node import train_node
from leantune.config import load_config
from leantune.training.launch import stop_flow_runs_then_interrupt

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"


def nightly_schedules() -> list:
    """The nightly deployment's schedules as prefect.yaml defines them (cron and timezone): one definition."""
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    [nightly] = [d for d in spec["deployments"] if d["name"] == "nightly"]
    return [Cron(s["cron"], timezone=s["timezone"]) for s in nightly["schedules"]]


def node_deployment():
    """train-node/node: one other machine of a multi-node run (flows/node.py)."""
    return train_node.to_deployment(
        name="node", tags=["leantune", "node"],
        description="One other machine of a multi-node run, started by its train stage "
        "(train.distributed.node_deployment train-node/node); runs that machine's torchrun agent.")


def deployments() -> list:
    """The RunnerDeployments to serve (or to `.apply()` to a server)."""
    default = load_config(DEFAULT_CONFIG).model_dump(mode="json")
    schedules = nightly_schedules()
    # The UI shows a cron schedule without its timezone: the description states both.
    when = "; ".join(f"cron '{s.cron}' in timezone {s.timezone}" for s in schedules)
    return [
        finetune.to_deployment(
            name="nightly", schedules=schedules, parameters={"config": default, "config_name": "nightly"},
            description=f"Nightly fine-tune with configs/default.yaml (as it was when served), at {when}.",
            tags=["leantune", "nightly"], concurrency_limit=1,
        ),
        finetune.to_deployment(
            name="adhoc", parameters={"config_name": "adhoc"}, tags=["leantune"],
            description="Fine-tune on demand from the UI or `prefect deployment run finetune/adhoc`; "
            "edit the config in the form.",
        ),
        evaluate_flow.to_deployment(
            name="evaluate", tags=["leantune"],
            description="Sycophancy evaluation of a model, or of a finetune run's base against its adapter (run_dir).",
        ),
    ]


class GracefulRunner(Runner):
    """Prefect's Runner, stopped by SIGTERM the way Ctrl-C stops it.

    Prefect 3.8.8's `Runner.handle_sigterm` calls the async `stop()` from the signal handler (the
    coroutine is never awaited) and exits at once: the flow-run processes are killed without a signal
    they can act on, so a running training goes on as an orphan with no checkpoint and its flow run
    stays Running. Here SIGTERM is passed on to the flow-run processes first: Prefect's engine turns it
    into a crash of the run, on the way out of which the train task stops its training process with
    SIGTERM (a checkpoint, then exit); they get up to STOP_GRACE_S to end, then the runner shuts down
    as on Ctrl-C.
    """

    def handle_sigterm(self, *args) -> None:
        self._logger.info("SIGTERM: stopping the flow run processes (a training saves a checkpoint first), "
                          "then shutting down")
        stop_flow_runs_then_interrupt()


def made_by_prefect_deploy(names: list[str]) -> list[str]:
    """Those of the deployments `names` ("flow/name") that the server has from `prefect deploy` (deployments/
    prefect.yaml: they run on a work pool), each with its pool. Serving the same names would re-register
    them with no code location, and their next run would fail with FileNotFoundError '.../None'."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    found = []
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                deployment = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            if deployment.work_pool_name:
                found.append(f"{name} (work pool {deployment.work_pool_name})")
    return found


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python deployments/serve.py", description=__doc__.split("\n")[0])
    p.add_argument("--node", action="store_true", help="serve only train-node/node, one run at a time (each other "
                   "machine of multi-node runs)")
    node = p.parse_args(argv).node
    served = [node_deployment()] if node else deployments()
    if taken := made_by_prefect_deploy([f"{d.flow_name}/{d.name}" for d in served]):
        names = " ".join(name.split(" ")[0] for name in taken)
        print(f"serve.py: {', '.join(taken)} on this Prefect server came from `prefect deploy`; serving the same "
              "names here would break them. Either run their work pool's worker (deployments/worker.py, see the "
              f"README) instead of serve.py, or delete them first: for d in {names}; do .venv/bin/prefect "
              "deployment delete $d; done", file=sys.stderr)
        sys.exit(2)
    # A machine of a multi-node run takes one node at a time: its GPUs are the node's.
    runner = GracefulRunner(pause_on_shutdown=True, **({"limit": 1} if node else {}))
    for deployment in served:
        runner.add_deployment(deployment)
    print(f"serving {', '.join(f'{d.flow_name}/{d.name}' for d in served)}; stop with Ctrl-C or SIGTERM", flush=True)
    try:
        asyncio.run(runner.start())
    except KeyboardInterrupt:
        print("serve.py: stopped", flush=True)


if __name__ == "__main__":
    main()
