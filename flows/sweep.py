"""leantune's sweep flow: many fine-tunes across a pool of GPU machines, one comparison table.

    python flows/sweep.py --grid lora.r=8,16 --grid train.lr=1e-4,2e-4 --set train.max_steps=200
    python flows/sweep.py --config configs/qwen2.5-0.5b-lora.yaml --config configs/phi-3-mini-qlora.yaml
    python flows/sweep.py --help                                  # or leantune-sweep --help: the same command

Every member (config file x grid combination) is routed to the smallest GPU class of the pool
catalogue (deployments/pools.yaml) whose memory holds its estimate, submitted as a run of that
class's deployment finetune/<pool>, and waited for; the table has one row per member, failed ones
included, with figures from its run directory (training.json, eval/comparison.json), written to
<run.output_dir>/<sweep>/comparison.csv (a relative run.output_dir is under the checkout, whatever the
working directory) and published as the "sweep-comparison" table artifact.
Needs a Prefect server (PREFECT_API_URL), `python deployments/pools.py`, and workers on the pools.
Members' run.output_dir must be readable where the sweep runs (the same machine, or a shared
filesystem) for their figures to reach the table; their states always do.
"""

from __future__ import annotations

import sys
import time

if __name__ == "__main__":
    # The same command as leantune-sweep (flows/commands.py): checked before Prefect or torch is imported.
    try:
        from flows.commands import sweep as command
    except ModuleNotFoundError as e:  # flows/ and tasks/ are installed with leantune (pip install -e .)
        print(f"leantune: {e.name.partition('.')[0]} is not installed: run `pip install -e .` in the checkout (README: Set up)",
              file=sys.stderr)
        sys.exit(2)

    sys.exit(command())

from tasks.logs import set_up_flow_process  # first: before Prefect is imported

set_up_flow_process()

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.deployments import run_deployment

from leantune.cli import DEFAULT_CONFIG, DEFAULT_POOLS, SweepRequest, anchored_members, sweep_request
from leantune.errors import UserError
from leantune.routing import PoolClass, load_pool_classes, route
from leantune.sweep import (
    Member,
    add_scaling_efficiency,
    complete_rows,
    expand_members,
    member_row,
    table_path,
    write_csv,
)
from leantune.tracking import as_children, finish_parent_run, start_parent_run

ARTIFACT_KEY = "sweep-comparison"


@flow(name="sweep")
def sweep(configs: list[str] | None = None, grid: dict[str, list] | None = None, overrides: list[str] | None = None,
          name: str | None = None, pools: list[PoolClass] | None = None, deployment: str = "finetune/{pool}",
          poll_seconds: float = 5.0, timeout_seconds: float | None = None) -> list[dict]:
    """Fine-tune every config file x every combination of `grid` on the pools; return the comparison table.

    configs: member config files (default: configs/default.yaml).
    grid: dotted config keys and their values, e.g. {"lora.r": [8, 16], "train.lr": [1e-4, 2e-4]}.
    overrides: --set style strings applied to every member, e.g. ["train.max_steps=200"].
    name: the sweep's name; members are runs <name>-00, <name>-01, ... (default: sweep-<time>).
    pools: the GPU machine classes (default: deployments/pools.yaml); deployment: each member's
    deployment, {pool} replaced by the routed pool. timeout_seconds: stop waiting after this long
    (unfinished members are listed with their current state).
    """
    log = get_run_logger()
    sweep_name = name or time.strftime("sweep-%Y%m%d-%H%M%S")
    configs, grid, overrides = configs or [str(DEFAULT_CONFIG)], grid or {}, overrides or []
    given = expand_members(configs, grid, overrides, sweep_name)
    members = anchored_members(given)  # where this sweep finds them: its checkout
    catalogue = pools or load_pool_classes(DEFAULT_POOLS)
    log.info(f"sweep {sweep_name}: {len(members)} member(s) over pools "
             f"{', '.join(f'{p.name} ({p.memory_gb:g} GB)' for p in catalogue)}")

    # One MLflow run for the sweep, each member's run its child (leantune/tracking.py; members on other machines
    # need a shared tracking.mlflow_uri for that).
    parent_run = start_parent_run(members[0].config, sweep_name, {"leantune.sweep": sweep_name})
    # Submitted as given: a worker puts a relative run.output_dir under its own checkout, as for any run (here
    # the same folder in this checkout; on Kubernetes the runs volume at the image's checkout).
    submitted = [submit(member, catalogue, deployment, sweep_name) for member in as_children(given, parent_run)]
    finished = wait_for([s["flow_run"] for s in submitted if s["flow_run"] is not None], poll_seconds,
                        timeout_seconds)
    rows = []
    for member, s in zip(members, submitted, strict=True):
        run = finished.get(s["flow_run"])
        state = run.state.name if run is not None and run.state else "NOT SUBMITTED"
        error = s["error"] or (run.state.message if run is not None and run.state and not run.state.is_completed()
                               else None)
        rows.append(member_row(member, pool=s["pool"], estimate_bytes=s["estimate_bytes"], state=state,
                               flow_run=run.name if run is not None else None, error=error))
    add_scaling_efficiency(members, rows)
    rows = complete_rows(rows)

    csv_path = write_csv(rows, table_path(members, sweep_name))
    create_table_artifact(rows, key=ARTIFACT_KEY,
                          description=f"Sweep {sweep_name}: one row per member (state, pool, training and "
                          f"sycophancy figures); CSV: {csv_path}")
    finish_parent_run(members[0].config, parent_run, [csv_path])
    done = sum(r["state"] == "Completed" for r in rows)
    log.info(f"sweep {sweep_name}: {done} of {len(rows)} member(s) completed; table in {csv_path}")
    return rows


def submit(member: Member, pools: list[PoolClass], deployment: str, sweep_name: str) -> dict:
    """Route the member to a pool and create its deployment run (not waited for here).

    A member no pool can hold is not submitted; its row says why, and the others go ahead."""
    log = get_run_logger()
    try:
        chosen = route(member.config, pools)
    except UserError as e:
        log.warning(f"{member.name} ({member.label}): not submitted: {e}")
        return {"pool": None, "estimate_bytes": None, "flow_run": None, "error": str(e)}
    log.info(f"{member.name} ({member.label}) -> {chosen.describe()}")
    flow_run = run_deployment(
        deployment.format(pool=chosen.pool), timeout=0, flow_run_name=member.name,
        parameters={"config": member.config.model_dump(mode="json"), "config_name": member.name},
        tags=["leantune", "sweep", f"sweep:{sweep_name}", chosen.pool],
    )
    return {"pool": chosen.pool, "estimate_bytes": chosen.estimate.total, "flow_run": flow_run.id, "error": None}


def wait_for(flow_run_ids: list, poll_seconds: float, timeout_seconds: float | None) -> dict:
    """The flow runs by id, once every one is in a final state (or the timeout passed)."""
    from prefect.client.orchestration import get_client

    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
    with get_client(sync_client=True) as client:
        while True:
            runs = {run_id: client.read_flow_run(run_id) for run_id in flow_run_ids}
            pending = [r for r in runs.values() if not (r.state and r.state.is_final())]
            if not pending or (deadline is not None and time.monotonic() > deadline):
                return runs
            time.sleep(poll_seconds)


def main(argv: list[str] | None = None, request: SweepRequest | None = None) -> int:
    """The command: its command line (leantune/cli.py, unless `request` is that already), a server, the flow."""
    from prefect.settings import PREFECT_API_URL

    try:
        request = request or sweep_request(argv)
    except UserError as e:
        print(f"leantune: {e}", file=sys.stderr)
        return 2
    if not PREFECT_API_URL.value():
        print("leantune: a sweep runs its members on work pools, which needs a Prefect server: start one "
              "(prefect server start), set PREFECT_API_URL, and register the pools (python deployments/pools.py)",
              file=sys.stderr)
        return 2
    state = sweep(configs=request.configs, grid=request.grid, overrides=request.overrides, name=request.name,
                  pools=request.pools, timeout_seconds=request.timeout_seconds, return_state=True)
    if not state.is_completed():
        print(f"leantune: the sweep failed: {state.message}", file=sys.stderr)
        return 1
    rows = state.result()
    failed = [r["member"] for r in rows if r["state"] != "Completed"]
    print(f"leantune: sweep {request.name} finished, {len(rows) - len(failed)} of {len(rows)} member(s) completed"
          + (f" (not completed: {', '.join(failed)})" if failed else "") + f"; table in {request.table}")
    return 0 if not failed else 1
