"""A Prefect process worker that stops within seconds on Ctrl-C or SIGTERM, a running training checkpointed.

    python deployments/worker.py --pool gpu-pool              # instead of `prefect worker start --pool gpu-pool`
    python deployments/worker.py --pool gpu-24gb --limit 1

Prefect 3.8.8's `prefect worker start` turns SIGTERM into SIGINT to itself and stops, but its flow-run
processes run in their own session and get no signal: a running training goes on as an orphan with no
checkpoint (tests/flows/test_worker_sigterm.py failed that way with it; the issue saw the worker itself take
over 55 s). This worker is Prefect's ProcessWorker with the signal handling of deployments/serve.py:
on Ctrl-C or SIGTERM its flow-run processes get SIGTERM first (the run ends in a final state, a
training saves a checkpoint so `--resume` continues it), then the worker shuts down.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from leantune.training.launch import stop_flow_runs_then_interrupt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python deployments/worker.py", description=__doc__.splitlines()[0])
    parser.add_argument("--pool", required=True, help="the process work pool to take flow runs from")
    parser.add_argument("--name", help="the worker's name (default: Prefect's generated one)")
    parser.add_argument("--limit", type=int, help="at most this many flow runs at a time (default: no limit)")
    parser.add_argument("--work-queue", dest="work_queues", action="append",
                        help="take runs from this queue of the pool only (repeatable; default: all queues)")
    return parser.parse_args(argv)


async def run_worker(args: argparse.Namespace) -> None:
    from prefect.settings import PREFECT_WORKER_HEARTBEAT_SECONDS, PREFECT_WORKER_PREFETCH_SECONDS
    from prefect.workers.process import ProcessWorker

    worker = ProcessWorker(work_pool_name=args.pool, name=args.name, work_queues=args.work_queues,
                           limit=args.limit, prefetch_seconds=PREFECT_WORKER_PREFETCH_SECONDS.value(),
                           heartbeat_interval_seconds=int(PREFECT_WORKER_HEARTBEAT_SECONDS.value()))
    print(f"worker {worker.name!r} takes flow runs from work pool {args.pool!r}; stop it with Ctrl-C or SIGTERM",
          flush=True)
    await worker.start(printer=print)


def stop(signum: int, _frame) -> None:
    print(f"worker.py: {signal.Signals(signum).name}: stopping its flow runs (a training saves a checkpoint "
          "first), then the worker", flush=True)
    stop_flow_runs_then_interrupt()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Installed before asyncio.run, which then leaves SIGINT to this handler as well.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        asyncio.run(run_worker(args))
    except KeyboardInterrupt:
        print("worker.py: stopped", flush=True)


if __name__ == "__main__":
    main()
