"""Sweeps: members from configs x grid, the comparison table, and two members run by a real process worker."""

import asyncio
import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TOKENIZED_RUN_OVERRIDES

from leantune.config import ConfigError
from leantune.sweep import (
    add_scaling_efficiency,
    complete_rows,
    expand_members,
    grid_overrides,
    member_row,
    write_csv,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DEFAULT = REPO / "configs" / "smoke.yaml"
TEST_POOL = "leantune-test-cpu"


def test_the_grid_expands_to_every_combination_with_numbers_kept_numbers():
    combos = grid_overrides({"lora.r": [8, 16], "train.lr": [1e-4, 2e-4]})
    assert combos == [["lora.r=8", "train.lr=0.0001"], ["lora.r=8", "train.lr=0.0002"],
                      ["lora.r=16", "train.lr=0.0001"], ["lora.r=16", "train.lr=0.0002"]]
    assert grid_overrides({}) == [[]]


def test_members_are_configs_times_grid_named_after_the_sweep(tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text("lora:\n  alpha: 64\n")
    members = expand_members([DEFAULT, other], {"lora.r": [8, 16]}, [f"run.output_dir={tmp_path}"], "s1")
    assert [(m.name, m.config_path.name, m.config.lora.r, m.config.lora.alpha) for m in members] == [
        ("s1-00", "smoke.yaml", 8, 32), ("s1-01", "smoke.yaml", 16, 32),
        ("s1-02", "other.yaml", 8, 64), ("s1-03", "other.yaml", 16, 64)]
    assert members[1].label == "lora.r=16" and members[1].run_dir == tmp_path / "s1-01"


def test_a_bad_grid_key_or_empty_values_fail_before_anything_runs():
    with pytest.raises(ConfigError, match="lora.rank"):
        expand_members([DEFAULT], {"lora.rank": [8]}, [], "s")
    with pytest.raises(ConfigError, match="train.lr: the grid needs a non-empty list"):
        expand_members([DEFAULT], {"train.lr": []}, [], "s")


def test_failed_and_unsubmitted_members_stay_in_the_table(tmp_path):
    members = expand_members([DEFAULT], {"lora.r": [8, 16]}, [f"run.output_dir={tmp_path}"], "s")
    run_dir = members[0].run_dir
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "training.json").write_text(json.dumps({"steps": 3, "final_loss": 2.345678, "final_val_loss": 2.5,
                                                       "best_val_loss": 2.4, "tokens": 3000, "train_seconds": 1.5,
                                                       "peak_memory_mb": 123.45}))
    overall = {"n": 10, "base": {"rate": 0.6}, "tuned": {"rate": 0.3}, "difference": -0.3, "mcnemar_p": 0.25}
    (run_dir / "eval" / "comparison.json").write_text(json.dumps({"sets": {"synthetic": {"overall": overall}}}))
    rows = complete_rows([
        member_row(members[0], pool="gpu-8gb", estimate_bytes=2**30, state="Completed", flow_run="a"),
        member_row(members[1], pool=None, estimate_bytes=None, state="NOT SUBMITTED", flow_run=None,
                   error="routing: no pool has the memory"),
    ])
    assert rows[0]["final_loss"] == 2.3457 and rows[0]["tokens_per_s"] == 2000.0 and rows[0]["estimate_gib"] == 1.0
    assert rows[0]["synthetic base rate"] == 0.6 and rows[0]["synthetic difference"] == -0.3
    assert rows[1]["state"] == "NOT SUBMITTED" and rows[1]["final_loss"] is None
    assert rows[1]["synthetic base rate"] is None and list(rows[1]) == list(rows[0])
    with write_csv(rows, tmp_path / "t.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["state"] for r in table] == ["Completed", "NOT SUBMITTED"]
    assert table[1]["error"] == "routing: no pool has the memory" and table[1]["final_loss"] == ""


def test_the_command_line_grid_and_its_errors(capsys):
    from flows.sweep import main
    from leantune.cli import parse_grid

    grid = parse_grid(["lora.r=8,16", "train.lr=1e-4, 2e-4"])
    assert grid == {"lora.r": ["8", "16"], "train.lr": ["1e-4", "2e-4"]}
    members = expand_members([DEFAULT], grid, [], "c")
    assert [(m.config.lora.r, m.config.train.lr) for m in members] == [(8, 1e-4), (8, 2e-4), (16, 1e-4), (16, 2e-4)]
    assert members[3].label == "lora.r=16 train.lr=2e-4"
    # Checked before anything is submitted, with or without a server.
    assert main(["--grid", "lora.rank=8,16"]) == 2
    assert "lora.rank" in capsys.readouterr().err
    assert main(["--grid", "lora.r"]) == 2
    assert "expected KEY=V1,V2" in capsys.readouterr().err


def test_the_command_line_asks_for_a_server_when_there_is_none(capsys, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.sweep import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["--grid", "lora.r=8,16"]) == 2
    assert "needs a Prefect server" in capsys.readouterr().err


def load_pools_script():
    spec = importlib.util.spec_from_file_location("leantune_pools", REPO / "deployments" / "pools.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wait_until_online(worker: subprocess.Popen, pool: str, timeout: float) -> bool:
    """True once the worker process has reported to the server; False when it exits or never reports."""
    from prefect.client.orchestration import get_client

    async def online() -> bool:
        async with get_client() as client:
            return any(w.status.value == "ONLINE" for w in await client.read_workers_for_work_pool(pool))

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and worker.poll() is None:
        if asyncio.run(online()):
            return True
        time.sleep(1)
    return False


@pytest.mark.flow
def test_a_sweep_runs_two_members_on_a_process_worker_and_gathers_them(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterTags,
    )
    from prefect.settings import PREFECT_API_URL

    from flows.sweep import ARTIFACT_KEY, sweep
    from leantune.routing import PoolClass

    # One CPU "machine class" with one slot: the two members must run one after the other.
    pools = [PoolClass(name=TEST_POOL, memory_gb=8, gpus=1, description="the test machine")]
    assert load_pools_script().register(pools) == [f"finetune/{TEST_POOL}"]

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_WORKER_QUERY_SECONDS": "1"}
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", TEST_POOL, "--limit", "1"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    overrides = [*TOKENIZED_RUN_OVERRIDES, "data.synthetic.num_records=60", "train.max_steps=2",
                 "monitor.enabled=false", "eval.datasets=[synthetic]", "eval.synthetic_items=8",
                 f"run.output_dir={tmp_path / 'runs'}"]
    try:
        if not wait_until_online(worker, TEST_POOL, timeout=120):
            worker.kill()
            pytest.skip(f"the process worker did not start here: {worker.communicate()[0][-2000:]}")
        rows = sweep(configs=[str(DEFAULT)], grid={"lora.r": [2, 4]}, overrides=overrides, name="t", pools=pools,
                     poll_seconds=1, timeout_seconds=480)
    finally:
        worker.send_signal(signal.SIGINT)
        try:
            output = worker.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            worker.kill()
            output = worker.communicate()[0]

    assert [(r["member"], r["overrides"], r["pool"], r["state"]) for r in rows] == [
        ("t-00", "lora.r=2", TEST_POOL, "Completed"), ("t-01", "lora.r=4", TEST_POOL, "Completed")], output[-5000:]
    for r in rows:
        assert r["steps"] == 2 and r["final_loss"] > 0 and r["tokens_per_s"] > 0 and 0 < r["estimate_gib"] < 0.05
        assert r["synthetic items"] == 8
        assert 0 <= r["synthetic base rate"] <= 1 and 0 <= r["synthetic tuned rate"] <= 1
        assert r["synthetic difference"] == pytest.approx(r["synthetic tuned rate"] - r["synthetic base rate"],
                                                          abs=1e-3)
        assert Path(r["run_dir"], "adapter", "adapter_config.json").is_file()
    # The members differ in lora.r, so their adapters (and losses) differ.
    ranks = [json.loads(Path(r["run_dir"], "adapter", "adapter_config.json").read_text())["r"] for r in rows]
    assert ranks == [2, 4]

    with (tmp_path / "runs" / "t" / "comparison.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [float(t["final_loss"]) for t in table] == [r["final_loss"] for r in rows]

    async def read():
        async with get_client() as client:
            artifacts = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
                any_=[ARTIFACT_KEY])))
            runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["sweep:t"])))
            return artifacts, runs

    artifacts, runs = asyncio.run(read())
    assert len(artifacts) == 1 and len(json.loads(artifacts[0].data)) == 2
    # The pool's concurrency limit of 1: the second member started after the first ended.
    first, second = sorted(runs, key=lambda run: run.start_time)
    assert second.start_time >= first.end_time

    # MLflow (the default store under run.output_dir): one run for the sweep, the members its children.
    from mlflow import MlflowClient

    tracking = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    found = tracking.search_runs([tracking.get_experiment_by_name("leantune").experiment_id])
    [parent] = [r for r in found if r.info.run_name == "t"]
    children = {r.info.run_name: r.data.tags.get("mlflow.parentRunId") for r in found if r is not parent}
    assert children == {"t-00": parent.info.run_id, "t-01": parent.info.run_id}
    assert parent.info.status == "FINISHED"
    assert "comparison.csv" in {a.path for a in tracking.list_artifacts(parent.info.run_id)}


def test_a_process_count_grid_gets_its_scaling_efficiency(tmp_path):
    members = expand_members([DEFAULT], {"lora.r": [8, 16], "train.distributed.nproc_per_node": [1, 2]},
                             [f"run.output_dir={tmp_path}"], "s")
    # (lora.r, processes, tokens/s); r=16 with one process failed, so its 2-process member has no reference.
    measured = {0: (1, 1000.0), 1: (2, 1600.0), 3: (2, 1500.0)}
    for i, (n, tokens_per_s) in measured.items():
        members[i].run_dir.mkdir(parents=True)
        (members[i].run_dir / "training.json").write_text(json.dumps(
            {"steps": 3, "tokens": tokens_per_s * 2, "train_seconds": 2.0, "world_size": n}))
    rows = [member_row(m, pool="gpu-24gb", estimate_bytes=2**30, state="Completed", flow_run=None) for m in members]
    add_scaling_efficiency(members, rows)
    rows = complete_rows(rows)
    assert [r["processes"] for r in rows] == [1, 2, None, 2]
    assert [r["scaling_efficiency"] for r in rows] == [None, 0.8, None, None]  # 1600 / (2 x 1000)
