"""Which work pool a run goes to: the smallest GPU machine class whose memory holds the run's estimate.

A pool catalogue (deployments/pools.yaml) lists one Prefect work pool per GPU machine class with the
memory of one of its GPUs. `route` estimates the peak memory of a training step of the config as
given (leantune/probe.py: the method, micro-batch, sequence length and checkpointing it names; the
probe at the start of training may still lower them) and picks the smallest class whose memory,
times monitor.memory_high_fraction (the share the monitor lets training use), holds it.

Several GPUs (train.distributed.nproc_per_node N above 1): only classes whose machines have N GPUs
(`gpus_per_machine`) qualify, and the estimate is per GPU (a replica with ddp, a shard with fsdp).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, Field, ValidationError

from leantune.config import ConfigError, RunConfig
from leantune.errors import UserError
from leantune.probe import GIB, MemoryEstimate, ModelShape, estimate_for_config, model_shape


class PoolClass(BaseModel):
    """One GPU machine class: a Prefect work pool whose workers each drive one GPU of this size."""

    name: str = Field(description="The Prefect work pool of this machine class, e.g. gpu-24gb.")
    memory_gb: float = Field(gt=0, description="Memory of one GPU of the class as sold (a 24 GB card holds 24 GiB).")
    gpus: int = Field(1, ge=1, description="GPUs in the class, one worker each: the pool's concurrency limit.")
    gpus_per_machine: int = Field(
        1, ge=1, description="GPUs one machine of the class has: a run with train.distributed.nproc_per_node N "
        "goes only to a class with N or more (its worker then drives the machine's GPUs).")
    description: str = Field("", description="What machines the class stands for.")


class NoPoolFits(UserError):
    """No machine class of the catalogue has the memory a run needs."""


@dataclass(frozen=True)
class Route:
    """The pool a run goes to and why: its estimate against the pool's budget."""

    pool: str
    estimate: MemoryEstimate
    budget_bytes: int
    gpus: int = 1  # train.distributed.nproc_per_node: the estimate and budget are per GPU

    def describe(self) -> str:
        per = f" per GPU on {self.gpus} GPUs" if self.gpus > 1 else ""
        return (f"{self.pool}: estimated {self.estimate.total / GIB:.2f} GiB of a {self.budget_bytes / GIB:.2f} GiB "
                f"budget{per}")


def load_pool_classes(path: str | Path) -> list[PoolClass]:
    """The `pools:` list of a catalogue file, validated; errors name the entry and the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError([f"{path}: cannot be read ({e.strerror}); give an existing file"], "pool catalogue") from None
    entries = raw.get("pools") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(["pools: needs a non-empty list of name / memory_gb / gpus entries"], f"pool catalogue {path}")
    pools, problems = [], []
    for i, entry in enumerate(entries):
        try:
            pools.append(PoolClass.model_validate(entry))
        except ValidationError as e:
            problems += [f"pools.{i}.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
    names = [e.get("name") for e in entries if isinstance(e, dict) and e.get("name") is not None]
    problems += [f"pools: two classes are both named '{n}'; pool names must be distinct"
                 for n in sorted({n for n in names if names.count(n) > 1})]
    if problems:
        raise ConfigError(problems, f"pool catalogue {path}")
    return pools


def training_device_type(cfg: RunConfig) -> str:
    """The device the run trains on in a pool: CUDA unless train.device pins the CPU."""
    return "cpu" if cfg.train.device == "cpu" else "cuda"


def route(cfg: RunConfig, pools: list[PoolClass], shape: ModelShape | None = None) -> Route:
    """The smallest pool whose budget (memory_gb x monitor.memory_high_fraction) holds the estimate of `cfg`.

    `shape` defaults to model.name_or_path's shape (its config.json, locally or from the hub)."""
    if not pools:
        raise ConfigError(["pools: empty; list at least one machine class"], "pool catalogue")
    shape = shape or model_shape(cfg)
    if shape is None:
        raise UserError(
            f"routing: the shape of model.name_or_path '{cfg.model.name_or_path}' cannot be read here (no network "
            "and not in the hub cache), so its memory cannot be estimated; download its config.json where the "
            "sweep runs (huggingface-cli download <model> config.json) or name the member's pool yourself"
        )
    estimate = estimate_for_config(cfg, shape, training_device_type(cfg))
    fraction = cfg.monitor.memory_high_fraction
    gpus = cfg.train.distributed.nproc_per_node
    ordered = sorted((p for p in pools if p.gpus_per_machine >= gpus), key=lambda p: p.memory_gb)
    if not ordered:
        raise NoPoolFits(f"routing: train.distributed.nproc_per_node is {gpus} and no pool's machines have that many "
                         "GPUs (gpus_per_machine); lower it or add such a machine class to the pool catalogue")
    for pool in ordered:
        budget = int(pool.memory_gb * GIB * fraction)
        if estimate.total <= budget:
            return Route(pool=pool.name, estimate=estimate, budget_bytes=budget, gpus=gpus)
    largest = ordered[-1]
    raise NoPoolFits(
        f"routing: no pool has the memory for {cfg.model.name_or_path} ({cfg.model.method}): estimated "
        f"{estimate.describe()}, the largest pool {largest.name} allows {largest.memory_gb * fraction:.1f} GiB "
        f"({largest.memory_gb:g} GiB x monitor.memory_high_fraction {fraction}). Lower train.micro_batch_size or "
        "tokenize.max_seq_len, set model.gradient_checkpointing=true or model.method=qlora, or add a larger "
        "machine class to the pool catalogue"
    )
