"""Create leantune's GPU work pools and their finetune deployments on the server of PREFECT_API_URL.

    python deployments/pools.py                          # the classes of deployments/pools.yaml
    python deployments/pools.py --catalogue my-pools.yaml
    python deployments/worker.py --pool gpu-24gb --limit 1   # then, on each GPU machine, one worker per GPU

For each machine class of the catalogue: a process work pool of that name with a concurrency limit
of the class's GPU count (an existing pool keeps its job template; its limit and description are
updated), and a deployment finetune/<pool> of the finetune flow on it. The deployments run the
flow from this checkout's path, so each GPU machine needs the repository at the same path (as
deployments/prefect.yaml's runs do); flows/sweep.py sends each member to finetune/<pool> of the
pool that routing chose. deployments/kubernetes.yaml is the same set-up on a Kubernetes cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from leantune.config import ConfigError
from leantune.routing import PoolClass, load_pool_classes

REPO = Path(__file__).resolve().parents[1]
CATALOGUE = REPO / "deployments" / "pools.yaml"
FINETUNE_ENTRYPOINT = "flows/finetune.py:finetune"


def deployment_name(pool: str) -> str:
    """The finetune deployment of a pool, as run_deployment names it."""
    return f"finetune/{pool}"


async def ensure_pool(pool: PoolClass, pool_type: str = "process") -> None:
    """Create the work pool with its concurrency limit, or set the limit and description of an existing one."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    async with get_client() as client:
        try:
            await client.read_work_pool(pool.name)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template() if pool_type == "process" else {}
            await client.create_work_pool(WorkPoolCreate(
                name=pool.name, type=pool_type, base_job_template=template, concurrency_limit=pool.gpus,
                description=pool.description or None))
            return
        await client.update_work_pool(pool.name, WorkPoolUpdate(concurrency_limit=pool.gpus,
                                                                description=pool.description or None))


def register(pools: list[PoolClass]) -> list[str]:
    """Every pool and its finetune deployment; returns the deployments' names."""
    from prefect import Flow

    finetune = Flow.from_source(source=str(REPO), entrypoint=FINETUNE_ENTRYPOINT)
    names = []
    for pool in pools:
        asyncio.run(ensure_pool(pool))
        finetune.deploy(
            name=pool.name, work_pool_name=pool.name, build=False, push=False, print_next_steps=False,
            parameters={"config_name": pool.name}, tags=["leantune", pool.name],
            description=f"Fine-tune on a {pool.memory_gb:g} GB GPU ({pool.description or pool.name}); "
            "flows/sweep.py routes runs here by their memory estimate.",
        )
        names.append(deployment_name(pool.name))
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python deployments/pools.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalogue", type=Path, default=CATALOGUE,
                        help="pool catalogue YAML (default: deployments/pools.yaml)")
    args = parser.parse_args(argv)
    try:
        pools = load_pool_classes(args.catalogue)
    except ConfigError as e:
        print(f"leantune: {e}", file=sys.stderr)
        return 2
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        # Without it Prefect would register on a temporary server that no worker ever sees.
        print("leantune: set PREFECT_API_URL to the server the workers use, e.g. "
              "prefect config set PREFECT_API_URL=http://<server>:4200/api", file=sys.stderr)
        return 2
    for name in register(pools):
        print(f"registered {name}")
    print("Start one worker per GPU on each machine, from its checkout:  "
          "CUDA_VISIBLE_DEVICES=<i> python deployments/worker.py --pool <pool> --limit 1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
