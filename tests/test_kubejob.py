"""The Kubernetes manifests of a multi-node run (leantune/kubejob.py), rendered for 2 machines x 4 GPUs and
validated offline against Kubernetes' own JSON schema (the kubernetes-validate package ships the schemas of
every Kubernetes release; strict: no field the API does not have)."""

import shlex
import subprocess
import sys

import pytest
import yaml

from leantune.errors import UserError
from leantune.kubejob import multinode_manifests

K8S_VERSION = "1.32.0"
CONFIG = "configs/llama-3.1-70b-qlora-fsdp.yaml"
FOUR_GPUS_TWO_NODES = ["train.distributed.nproc_per_node=4", "train.distributed.nnodes=2"]


def validate(doc):
    import kubernetes_validate

    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.fixture(scope="module")
def rendered():
    """The command line's output for 2 nodes x 4 GPUs, parsed back."""
    out = subprocess.run([sys.executable, "-m", "leantune.kubejob", "--config", CONFIG,
                          *(a for o in FOUR_GPUS_TWO_NODES for a in ("--set", o)), "--name", "llama70b", "--image", "registry.example.com/leantune:1",
                          "--gpu-class", "gpu-24gb"], capture_output=True, text=True, check=True).stdout
    return list(yaml.safe_load_all(out))


def test_two_nodes_of_four_gpus_render_a_valid_indexed_job_and_headless_service(rendered):
    service, job = rendered
    for doc in rendered:
        validate(doc)
    assert (service["kind"], service["spec"]["clusterIP"], service["spec"]["publishNotReadyAddresses"]) == (
        "Service", "None", True)
    assert service["spec"]["ports"][0]["port"] == 29400
    spec = job["spec"]
    assert (job["kind"], spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Job", "Indexed", 2, 2)
    pod = spec["template"]["spec"]
    # The Service selects the Job's pods, and gives pod i the name llama70b-i.llama70b.
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    assert pod["subdomain"] == service["metadata"]["name"] == "llama70b"
    (container,) = pod["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 4}
    assert pod["nodeSelector"] == {"leantune/gpu-class": "gpu-24gb"}
    assert container["volumeMounts"][0] == {"name": "runs", "mountPath": "/opt/leantune/runs"}

    script = container["command"][2]
    first, agent = script.split("\nfi\n")
    # Pod 0: the flow (a new run, or its resume after a restart), its node-0 torchrun pointed at itself.
    assert "exec python flows/finetune.py --resume llama70b" in first
    assert first.splitlines()[-1].split() == [
        "exec", "python", "flows/finetune.py", "--config", CONFIG, "--run-name", "llama70b",
        "--set", "train.distributed.nproc_per_node=4", "--set", "train.distributed.nnodes=2",
        "--set", "train.distributed.rdzv_endpoint=llama70b-0.llama70b:29400",
        "--set", "train.distributed.rdzv_id=llama70b"]
    # The other pods: the node's torchrun agent, its rank the completion index.
    assert shlex.split(agent) == [
        "exec", "python", "-m", "torch.distributed.run", "--nproc-per-node=4", "--nnodes=2",
        "--node-rank=$JOB_COMPLETION_INDEX", "--max-restarts=0", "--rdzv-backend=c10d",
        "--rdzv-endpoint=llama70b-0.llama70b:29400", "--rdzv-id=llama70b", "--rdzv-conf=join_timeout=600",
        "-m", "leantune.training.loop", "runs/llama70b"]
    assert '--node-rank="$JOB_COMPLETION_INDEX"' in agent  # quoted for the shell, which expands it


def test_the_schema_check_refuses_what_kubernetes_would(rendered):
    """The validation can fail: a misplaced field (parallelism inside the pod spec, as the work pools' template
    once had it) and a wrong type are refused."""
    import kubernetes_validate

    job = yaml.safe_load(yaml.safe_dump(rendered[1]))
    job["spec"]["template"]["spec"]["parallelism"] = 2
    with pytest.raises(kubernetes_validate.ValidationError, match="parallelism"):
        validate(job)
    job = yaml.safe_load(yaml.safe_dump(rendered[1]))
    job["spec"]["completions"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(job)


def test_a_name_kubernetes_refuses_and_a_one_machine_config_are_user_errors():
    with pytest.raises(UserError, match="--name 'Llama_70B'"):
        multinode_manifests(CONFIG, FOUR_GPUS_TWO_NODES, "Llama_70B", "img")
    with pytest.raises(UserError, match="train.distributed.nnodes is 1"):
        multinode_manifests(CONFIG, [], "llama70b", "img")
