"""Kubernetes manifests of a multi-node run (train.distributed.nnodes N above 1): an Indexed Job and its
headless Service.

    python -m leantune.kubejob --config configs/llama-3.1-70b-qlora-fsdp.yaml --set train.distributed.nnodes=2 \\
        --set train.distributed.nproc_per_node=4 --name llama70b --image registry.example.com/leantune > llama70b.yaml
    kubectl apply -n leantune -f llama70b.yaml

The Job runs N pods at once (completionMode Indexed, parallelism = completions = N), each with the
config's train.distributed.nproc_per_node GPUs, named <name>-0 ... <name>-N-1; the headless Service
<name> gives each a DNS name, <name>-<i>.<name>, from before it is ready (publishNotReadyAddresses), so
the rendezvous endpoint <name>-0.<name>:29400 is known when the manifests are written. Pod 0 runs the
finetune flow (every stage; its train stage starts torchrun as node 0, whose c10d rendezvous is served
there; a restarted pod 0 resumes the run); pod i runs the node's torchrun agent (launch.node_command,
--node-rank=$JOB_COMPLETION_INDEX), whose processes train the run directory the flow prepares on the
shared volume (runs/, a ReadWriteMany claim, as the work pools' template mounts it). An agent waits for
node 0 at most train.distributed.join_timeout_s (set it above the data stages' time); a failed agent is
restarted (restartPolicy OnFailure), so it joins the flow's next attempt after an out-of-memory one.

Checked by rendering and by validating against Kubernetes' JSON schema offline (tests/test_kubejob.py);
not run on a cluster.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

from leantune.config import RunConfig, load_config
from leantune.errors import UserError
from leantune.rundir import RunDir
from leantune.training.launch import node_command

RDZV_PORT = 29400
WORKDIR = "/opt/leantune"  # where the image (deployments/kubernetes/Dockerfile) holds the repository
BACKOFF_LIMIT = 10  # pod restarts in all: an agent that timed out or outlived a failed attempt starts again


def _pod_script(cfg: RunConfig, config_file: str, overrides: list[str], job: str) -> str:
    """The shell command every pod runs: the flow on pod 0 (a new run, or its resume after a restart), the
    node's torchrun agent on the others."""
    run_dir = Path(cfg.run.output_dir) / job
    flow = ["python", "flows/finetune.py", "--config", config_file, "--run-name", job,
            *(a for o in overrides for a in ("--set", o))]
    agent = shlex.join(node_command(cfg, run_dir, "NODE_RANK", python="python")).replace(
        "--node-rank=NODE_RANK", '--node-rank="$JOB_COMPLETION_INDEX"')
    return "\n".join([
        'if [ "$JOB_COMPLETION_INDEX" = 0 ]; then',
        f"  if [ -f {shlex.quote(str(RunDir(run_dir).config))} ]; then exec python flows/finetune.py "
        f"--resume {shlex.quote(job)}; fi",
        f"  exec {shlex.join(flow)}",
        "fi",
        f"exec {agent}",
    ])


def multinode_manifests(config_file: str, overrides: list[str], job: str, image: str, *,
                        namespace: str = "leantune", runs_claim: str = "leantune-runs",
                        gpu_class: str | None = None) -> list[dict]:
    """[the headless Service, the Indexed Job] of config_file (a path inside the image, relative to its
    repository) with `overrides`, as the Job `job`; see the module docstring. Raises UserError for a name
    Kubernetes refuses or a config of one machine."""
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,50}[a-z0-9])?", job):
        raise UserError(f"--name {job!r}: a Kubernetes job name is lower-case letters, digits and '-', starts with "
                        "a letter, ends with a letter or digit, at most 52 characters (pods add -<index>)")
    overrides = [*overrides, f"train.distributed.rdzv_endpoint={job}-0.{job}:{RDZV_PORT}",
                 f"train.distributed.rdzv_id={job}"]
    cfg = load_config(Path(config_file), overrides)
    d = cfg.train.distributed
    if d.nnodes == 1:
        raise UserError("train.distributed.nnodes is 1: one machine needs no Indexed Job; run it through the work "
                        "pools (deployments/kubernetes.yaml), or set train.distributed.nnodes to the machines")
    labels = {"app.kubernetes.io/name": "leantune", "leantune/job": job}
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": job, "namespace": namespace, "labels": dict(labels)},
        "spec": {"clusterIP": "None", "selector": {"leantune/job": job}, "publishNotReadyAddresses": True,
                 "ports": [{"name": "rendezvous", "port": RDZV_PORT, "targetPort": RDZV_PORT}]},
    }
    container = {
        "name": "leantune", "image": image, "workingDir": WORKDIR,
        "command": ["/bin/sh", "-c", _pod_script(cfg, config_file, overrides, job)],
        "ports": [{"name": "rendezvous", "containerPort": RDZV_PORT}],
        "resources": {"limits": {"nvidia.com/gpu": d.nproc_per_node}},
        "volumeMounts": [{"name": "runs", "mountPath": str(Path(WORKDIR) / cfg.run.output_dir)},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    pod_spec = {
        "subdomain": job, "restartPolicy": "OnFailure", "containers": [container],
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "volumes": [{"name": "runs", "persistentVolumeClaim": {"claimName": runs_claim}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }
    if gpu_class:
        pod_spec["nodeSelector"] = {"leantune/gpu-class": gpu_class}
    job_manifest = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": job, "namespace": namespace, "labels": dict(labels)},
        "spec": {"completionMode": "Indexed", "completions": d.nnodes, "parallelism": d.nnodes,
                 "backoffLimit": BACKOFF_LIMIT,
                 "template": {"metadata": {"labels": labels}, "spec": pod_spec}},
    }
    return [service, job_manifest]


def main(argv: list[str] | None = None) -> int:
    import yaml

    p = argparse.ArgumentParser(prog="python -m leantune.kubejob",
                                description="Print the Kubernetes manifests (headless Service, Indexed Job) of a "
                                "multi-node run; apply them with kubectl apply -f.")
    p.add_argument("--config", required=True, help="the run's config, as a path inside the image's repository")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable), e.g. train.distributed.nnodes=2")
    p.add_argument("--name", required=True, help="the Job's name, also the run's name and rendezvous id")
    p.add_argument("--image", required=True, help="leantune's image (deployments/kubernetes/Dockerfile)")
    p.add_argument("--namespace", default="leantune")
    p.add_argument("--runs-claim", default="leantune-runs", help="ReadWriteMany PersistentVolumeClaim for runs/")
    p.add_argument("--gpu-class", help="node label leantune/gpu-class of the machines to run on")
    args = p.parse_args(argv)
    try:
        docs = multinode_manifests(args.config, args.overrides, args.name, args.image, namespace=args.namespace,
                                   runs_claim=args.runs_claim, gpu_class=args.gpu_class)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
