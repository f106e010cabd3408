"""Deployments: prefect.yaml names real flows; a UI-style run of the ad-hoc deployment completes."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import TOKENIZED_RUN_OVERRIDES
from run_helpers import apply_served_deployments

from leantune.config import load_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"


def test_prefect_yaml_names_existing_flows_and_the_gpu_pool():
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load(PREFECT_YAML.read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert set(by_name) == {"nightly", "adhoc", "evaluate", "node"}
    flow_names = {}
    for name, d in by_name.items():
        path, func = d["entrypoint"].split(":")
        assert (REPO / path).is_file(), d["entrypoint"]
        flow_names[name] = load_flow_from_entrypoint(str(REPO / d["entrypoint"])).name
        # The node flow runs on the other machines of a multi-node run: a pool of its own.
        assert d["work_pool"]["name"] == ("gpu-nodes" if name == "node" else "gpu-pool")
    assert flow_names == {"nightly": "finetune", "adhoc": "finetune", "evaluate": "evaluate", "node": "train-node"}
    # serve.py --node serves the same train-node/node (train.distributed.node_deployment).
    import importlib.util

    spec = importlib.util.spec_from_file_location("leantune_serve", REPO / "deployments" / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    node = serve.node_deployment()
    assert (node.flow_name, node.name) == ("train-node", "node")
    assert [s["cron"] for s in by_name["nightly"]["schedules"]] == ["0 2 * * *"]
    assert "schedules" not in by_name["adhoc"]


def tiny_config(output_dir: Path) -> dict:
    cfg = load_config(overrides=[*TOKENIZED_RUN_OVERRIDES, "data.synthetic.num_records=60", "eval.enabled=false",
                                 "train.max_steps=2", "monitor.enabled=false", f"run.output_dir={output_dir}",
                                 "run.name=from-ui"])
    return cfg.model_dump(mode="json")


@pytest.mark.flow
def test_served_adhoc_deployment_runs_a_ui_style_flow_run_to_completion(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    apply_served_deployments()
    # As the UI's "Run" button does: a flow run of the deployment with the form's parameters,
    # scheduled now, for whatever serves the deployment to pick up.
    flow_run = run_deployment("finetune/adhoc", parameters={"config": tiny_config(tmp_path / "runs")}, timeout=0)

    async def read(flow_run_id):
        async with get_client() as client:
            schedules = {name: len((await client.read_deployment_by_name(name)).schedules)
                         for name in ("finetune/nightly", "finetune/adhoc", "evaluate/evaluate")}
            return schedules, await client.read_flow_run(flow_run_id)

    schedules, run = asyncio.run(read(flow_run.id))
    assert schedules == {"finetune/nightly": 1, "finetune/adhoc": 0, "evaluate/evaluate": 0}
    assert run.state.is_scheduled()

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    server = subprocess.Popen([sys.executable, "deployments/serve.py"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 540
        while time.monotonic() < deadline and not run.state.is_final():
            time.sleep(2)
            run = asyncio.run(read(flow_run.id))[1]
    finally:
        server.send_signal(signal.SIGINT)
        try:
            output = server.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            server.kill()
            output = server.communicate()[0]
    assert run.state.is_completed(), f"{run.state}\n{output[-5000:]}"
    run_dir = tmp_path / "runs" / "from-ui"
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2


# ------------------------------------------------------------------ GPU machine classes (scale-out)

KUBERNETES_YAML = REPO / "deployments" / "kubernetes.yaml"
JOB_TEMPLATE = REPO / "deployments" / "kubernetes" / "gpu-job-template.json"


def test_kubernetes_variant_has_a_deployment_per_catalogue_class_on_its_own_pool():
    from prefect.flows import load_flow_from_entrypoint

    from leantune.routing import load_pool_classes

    spec = yaml.safe_load(KUBERNETES_YAML.read_text())
    classes = [p.name for p in load_pool_classes(REPO / "deployments" / "pools.yaml")]
    assert [d["name"] for d in spec["deployments"]] == classes
    for d in spec["deployments"]:
        assert d["work_pool"]["name"] == d["name"]
        assert d["work_pool"]["job_variables"] == {"image": "{{ build-image.image }}", "gpu_class": d["name"]}
        assert load_flow_from_entrypoint(str(REPO / d["entrypoint"])).name == "finetune"
    # The image the deployments run is the one the build step makes from the Dockerfile that exists.
    build = spec["build"][0]["prefect_docker.deployments.steps.build_docker_image"]
    assert build["id"] == "build-image" and (REPO / build["dockerfile"]).is_file()


def test_kubernetes_job_template_renders_one_gpu_pod_on_a_node_of_the_class():
    import json

    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.templating import apply_values

    template = json.loads(JOB_TEMPLATE.read_text())
    # The server's own check: every placeholder of the job is a declared variable.
    WorkPoolCreate(name="gpu-24gb", type="kubernetes", base_job_template=template, concurrency_limit=2)
    broken = {**template, "job_configuration": {**template["job_configuration"], "extra": "{{ undeclared }}"}}
    with pytest.raises(ValueError, match="undeclared"):
        WorkPoolCreate(name="gpu-24gb", type="kubernetes", base_job_template=broken)

    variables = template["variables"]
    values = {k: v["default"] for k, v in variables["properties"].items() if "default" in v}
    values.update(image="registry.example.com/leantune:1", gpu_class="gpu-24gb", name="run", env={}, labels={})
    manifest = apply_values(template["job_configuration"], values)["job_manifest"]
    pod = manifest["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"leantune/gpu-class": "gpu-24gb"}
    (container,) = pod["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert container["image"] == "registry.example.com/leantune:1"
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "leantune-runs"
    assert set(variables["required"]) == {"image", "gpu_class"}


@pytest.mark.flow
def test_serve_refuses_the_names_of_deployments_made_by_prefect_deploy(prefect_server, capsys):
    """`prefect deploy` (deployments/prefect.yaml) made finetune/nightly on a work pool: serve.py re-registering
    the name would leave it with no code location (its next run: FileNotFoundError '.../None'). It refuses,
    naming the deployment, its pool and the two ways on."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    serve = apply_served_deployments()
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="serve-test-pool", type="process"), overwrite=True)
    [nightly] = [d for d in serve.deployments() if d.name == "nightly"]
    nightly.apply(work_pool_name="serve-test-pool")
    try:
        with pytest.raises(SystemExit) as exit_status:
            serve.main([])
    finally:  # served again, as the other tests of this server expect (applying alone would keep the pool)
        with get_client(sync_client=True) as client:
            client.delete_deployment(client.read_deployment_by_name("finetune/nightly").id)
        apply_served_deployments()
    assert exit_status.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith("serve.py: finetune/nightly (work pool serve-test-pool) on this Prefect server came "
                              "from `prefect deploy`"), message
    assert "deployments/worker.py" in message and "prefect deployment delete $d" in message
    assert serve.made_by_prefect_deploy(["finetune/nightly", "finetune/adhoc"]) == []
