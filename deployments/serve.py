"""Serve leantune's deployments from this process: no work pool or worker needed.

    python deployments/serve.py      # from the repository root; keep it running

Registers the same three deployments as deployments/prefect.yaml (nightly fine-tune at 02:00 UTC,
ad-hoc fine-tune for the UI, evaluation) on the Prefect server of PREFECT_API_URL and runs their
flow runs as subprocesses of this machine until stopped with Ctrl-C.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# `python deployments/serve.py` puts deployments/ on the path, not the repository root the flows import from.
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402
from prefect import serve  # noqa: E402
from prefect.schedules import Cron  # noqa: E402

from flows.evaluate import evaluate_flow  # noqa: E402
from flows.finetune import DEFAULT_CONFIG, finetune  # noqa: E402
from leantune.config import load_config  # noqa: E402

PREFECT_YAML = REPO / "deployments" / "prefect.yaml"


def nightly_schedules() -> list:
    """The nightly deployment's schedules as prefect.yaml defines them (cron and timezone): one definition."""
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    [nightly] = [d for d in spec["deployments"] if d["name"] == "nightly"]
    return [Cron(s["cron"], timezone=s["timezone"]) for s in nightly["schedules"]]


def deployments() -> list:
    """The RunnerDeployments to serve (or to `.apply()` to a server)."""
    default = load_config(DEFAULT_CONFIG).model_dump(mode="json")
    return [
        finetune.to_deployment(
            name="nightly", schedules=nightly_schedules(), parameters={"config": default, "config_name": "nightly"},
            description="Nightly fine-tune with configs/default.yaml (as it was when served), at 02:00 UTC.",
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


if __name__ == "__main__":
    serve(*deployments())
