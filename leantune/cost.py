"""What a fine-tuning run costs on one GPU: estimated before, measured after.

    python -m leantune.cost --model 8B --tokens 20M --method qlora          # every GPU in the catalogue
    python -m leantune.cost --model Qwen/Qwen2.5-0.5B-Instruct --gpu "RTX 4060" --tokens 5M
    python -m leantune.cost --config configs/llama-3.1-8b-full.yaml --tokens 20M  # the config's model
    python -m leantune.cost --devices     # what leantune picks on each common GPU, and why

The GPU catalogue is leantune/gpus.yaml (peak tensor throughput, memory, board power, hourly
price); edit it or pass --catalogue.

The formula (a FLOP count, as in Kaplan et al. 2020 and the PaLM paper's model-FLOPs utilisation,
for one GPU):
  N parameters a token multiplies, L layers, a attention width, T sequence length, D training tokens (x epochs);
  for a Mixture-of-Experts N is the active count (the top-k experts of each layer, the shared expert, the
  router and attention; probe.ModelShape.active_params), while memory counts every expert, since all stay
  resident. One GPU holds every expert, so there is no all-to-all exchange of expert parallelism to add.
  forward FLOPs per token    F = 2N + 2 L a T   (each weight multiplies once per token; causal
                                                 attention's QK^T and AV cost 2 T a each per layer,
                                                 halved by the mask; 0 when only N is known)
  model FLOPs per token      M = 3F for a full fine-tune (backward: input and weight gradients)
                                 2F for LoRA/QLoRA (the frozen base needs input gradients only; the
                                 adapters' weight gradients, under 1% of N, are left out)
  hardware FLOPs per token   H = M, + F with gradient checkpointing (a second forward)
  time                       t = D H / (peak x u), peak the bf16 (fp16) tensor peak of the GPU
                                 (fp32 runs use a tenth of it: no tensor cores for fp32 inputs),
                                 u the assumed utilisation
  energy                     E = t x board power x POWER_FRACTION
  cost                       rent = t x price per hour; electricity = E x power.price_per_kwh
  after a run                achieved FLOP/s = D M / t_measured, on any device (the CPU too);
                             on a catalogued GPU also MFU = D M / (t_measured x peak): the
                             utilisation actually achieved, and each estimate's relative error
                             against the measurement (run_dir/cost.json, `run_cost_report`;
                             D = the tokens trained)

Assumed utilisation (`DEFAULT_UTILISATION`): 0.40 for full fine-tunes and 0.35 for LoRA, typical
of well-fed single-GPU training in bf16, and 0.25 for QLoRA, whose 4-bit weights are dequantised
before every matmul; a measured run's MFU is the number to put in --utilisation next time.
Memory: with the model's shape known, leantune's memory estimator (probe.py) says whether the
run fits the GPU.

Several GPUs (a --config with train.distributed.nproc_per_node x nnodes = W above 1): the rows are
"W x GPU"; the time is the one-GPU time over W (the same utilisation on each, communication not
counted), so energy and rent are those of one GPU's time; memory is per GPU: one replica each with
ddp, a 1/W share plus the gathered layers with fsdp (probe.py); with train.distributed.cpu_offload the
gathered layers on the GPU and the shards in host memory, whose size the row states. With fsdp the row
also states the host memory rank 0 reads the whole model into to load it (training/fsdp.py).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from leantune.config import compute_dtype
from leantune.errors import UserError
from leantune.rundir import RunDir

CATALOGUE = Path(__file__).with_name("gpus.yaml")
DEFAULT_UTILISATION = {"full": 0.40, "lora": 0.35, "qlora": 0.25}
POWER_FRACTION = 0.85  # average draw under training load, as a share of the board power (assumed)
FP32_SHARE_OF_TENSOR_PEAK = 0.1  # fp32 inputs bypass the tensor cores' bf16/fp16 paths


class Gpu(BaseModel):
    """One GPU of the catalogue; leantune/gpus.yaml documents each field."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    aliases: tuple[str, ...]
    bf16_tflops: float = Field(gt=0)
    fp16_tflops: float = Field(gt=0)
    memory_gb: float = Field(gt=0)
    board_power_w: float = Field(gt=0)
    price_per_hour: float = Field(ge=0)
    source: str

    def peak_flops(self, precision: str) -> float:
        """FLOP/s at the tensor peak for compute precision 'bf16', 'fp16' or 'fp32'."""
        if precision == "fp16":
            return self.fp16_tflops * 1e12
        if precision == "fp32":
            return self.bf16_tflops * 1e12 * FP32_SHARE_OF_TENSOR_PEAK
        return self.bf16_tflops * 1e12


def load_catalogue(path: Path | None = None) -> dict[str, Gpu]:
    """The GPU catalogue (default leantune/gpus.yaml); UserError naming the GPU and field that is wrong."""
    path = Path(path or CATALOGUE)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"GPU catalogue {path}: cannot read it ({e}); fix the file or pass another --catalogue") from None
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"GPU catalogue {path}: expected a mapping of GPU names to their figures")
    gpus, problems = {}, []
    for name, entry in raw.items():
        try:
            gpus[str(name)] = Gpu.model_validate({**(entry if isinstance(entry, dict) else {}), "name": str(name)})
        except ValidationError as e:
            problems += [f"'{name}' {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
    if problems:
        raise UserError(f"GPU catalogue {path}: " + "; ".join(problems) + "; fix the file (leantune/gpus.yaml "
                        "documents every field) or pass another --catalogue")
    return gpus


def _key(name: str) -> str:
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    return key.replace("nvidia", "").replace("geforce", "")


def find_gpu(catalogue: dict[str, Gpu], name: str) -> Gpu | None:
    """The catalogue entry whose name or an alias matches `name` (e.g. NVML's 'NVIDIA H100 80GB HBM3')."""
    wanted = _key(name)
    for gpu in catalogue.values():
        if wanted in {_key(gpu.name), *(_key(a) for a in gpu.aliases)}:
            return gpu
    return None


@dataclass(frozen=True)
class Workload:
    """What is trained: parameters (and, when known, layers and attention width), tokens, method."""

    params: int
    tokens: int  # training tokens over all epochs
    seq_len: int
    method: str  # "full", "lora" or "qlora"
    gradient_checkpointing: bool = False
    layers: int | None = None
    attention_width: int | None = None

    @property
    def forward_flops_per_token(self) -> float:
        """2N (N: the active parameters of an MoE) plus causal attention."""
        attention = 2 * self.layers * self.attention_width * self.seq_len if self.layers and self.attention_width else 0
        return 2 * self.params + attention

    @property
    def model_flops_per_token(self) -> float:
        return (3 if self.method == "full" else 2) * self.forward_flops_per_token

    @property
    def hardware_flops_per_token(self) -> float:
        return self.model_flops_per_token + (self.forward_flops_per_token if self.gradient_checkpointing else 0)


@dataclass(frozen=True)
class CostFigures:
    """Time, energy and money of a workload on a GPU (estimated, or measured with `mfu`)."""

    gpu: str
    seconds: float
    energy_j: float | None
    rent_usd: float
    electricity_usd: float | None
    utilisation: float  # assumed (estimate) or achieved model-FLOPs utilisation (measured)

    def to_dict(self) -> dict:
        return asdict(self)


def estimate(workload: Workload, gpu: Gpu, *, utilisation: float | None = None, precision: str = "bf16",
             price_per_kwh: float = 0.30) -> CostFigures:
    """The formula of the module docstring, before a run."""
    u = utilisation if utilisation is not None else DEFAULT_UTILISATION[workload.method]
    seconds = workload.tokens * workload.hardware_flops_per_token / (gpu.peak_flops(precision) * u)
    energy = seconds * gpu.board_power_w * POWER_FRACTION
    return CostFigures(gpu=gpu.name, seconds=seconds, energy_j=energy, rent_usd=seconds / 3600 * gpu.price_per_hour,
                       electricity_usd=energy / 3.6e6 * price_per_kwh, utilisation=u)


def measured(workload: Workload, gpu: Gpu, *, seconds: float, energy_j: float | None, precision: str = "bf16",
             price_per_kwh: float = 0.30) -> CostFigures:
    """The same figures from a finished run: its training time, its energy (monitor), the MFU it achieved."""
    mfu = workload.tokens * workload.model_flops_per_token / (seconds * gpu.peak_flops(precision))
    return CostFigures(gpu=gpu.name, seconds=seconds, energy_j=energy_j,
                       rent_usd=seconds / 3600 * gpu.price_per_hour,
                       electricity_usd=None if energy_j is None else energy_j / 3.6e6 * price_per_kwh,
                       utilisation=mfu)


def estimate_error(estimated: CostFigures, actual: CostFigures) -> dict:
    """Relative error of each estimated figure against the measured one ((estimate - actual) / actual)."""
    errors = {"seconds": estimated.seconds / actual.seconds - 1}
    if estimated.energy_j is not None and actual.energy_j:
        errors["energy_j"] = estimated.energy_j / actual.energy_j - 1
    return errors


def run_costs(cfg, summary: dict, gpu: Gpu, shape=None) -> dict:
    """Estimate, measurement and error for a finished run: `summary` is training.json (tokens,
    train_seconds, energy_j); `shape` the model's (probe.ModelShape)."""
    from leantune.probe import model_shape

    shape = shape or model_shape(cfg)
    if shape is None:
        raise UserError(f"cost: the shape of {cfg.model.name_or_path} cannot be read here; no FLOP count")
    work = workload_from_config(cfg, summary["tokens"], shape)
    precision = compute_dtype(cfg.model.dtype, "cuda")
    price = cfg.power.price_per_kwh
    est = estimate(work, gpu, precision=precision, price_per_kwh=price)
    got = measured(work, gpu, seconds=summary["train_seconds"], energy_j=summary.get("energy_j"),
                   precision=precision, price_per_kwh=price)
    return {**achieved(work, summary), "gpu": gpu.name, "estimate": est.to_dict(), "measured": got.to_dict(),
            "error": estimate_error(est, got)}


def achieved(workload: Workload, summary: dict) -> dict:
    """The compute a finished run achieved on any device: model FLOPs (D M) over its training time."""
    flops = workload.tokens * workload.model_flops_per_token
    return {"device": summary.get("device"), "tokens": workload.tokens, "seconds": summary["train_seconds"],
            "model_flops": flops, "achieved_flops_per_s": flops / summary["train_seconds"]}


def run_cost_report(cfg, run_dir: Path, summary: dict) -> dict | None:
    """run_dir/cost.json of a finished run: the model FLOP/s it achieved (`achieved`) on any device, and
    for a run on a catalogued GPU (power.gpu, else the one the monitor saw) also `run_costs`: the
    estimate, the measured cost and MFU, the error. Elsewhere (the CPU, a GPU the catalogue lacks: no
    known peak) "gpu", "estimate", "measured" and "error" are None. None, and no file, for a model
    whose shape is unknown."""
    from leantune.probe import model_shape

    name = cfg.power.gpu or summary.get("gpu_name")
    gpu = find_gpu(load_catalogue(), name) if name and summary.get("device") == "cuda" else None
    index = RunDir(run_dir).train_index
    vocab = json.loads(index.read_text())["tokenizer"]["vocab_size"] if index.is_file() else None
    shape = model_shape(cfg, vocab)
    if shape is None or not summary.get("train_seconds"):
        return None
    if gpu is not None:
        report = run_costs(cfg, summary, gpu, shape)
    else:
        report = {**achieved(workload_from_config(cfg, summary["tokens"], shape), summary), "gpu": None,
                  "estimate": None, "measured": None, "error": None}
    RunDir(run_dir).cost.write_text(json.dumps(report, indent=2) + "\n")
    return report


def workload_from_config(cfg, tokens: int, shape) -> Workload:
    """The workload of a RunConfig training `tokens` tokens (over all epochs) on a model of `shape`."""
    return Workload(params=shape.active_params, tokens=tokens, seq_len=cfg.tokenize.max_seq_len,
                    method=cfg.model.method, gradient_checkpointing=cfg.model.gradient_checkpointing,
                    layers=shape.num_layers, attention_width=shape.num_heads * shape.head_dim)


# ------------------------------------------------------------------------------------------- CLI

COUNT = re.compile(r"^(\d+(?:\.\d+)?)\s*([kKmMbBtT]?)$")
SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def parse_count(text: str) -> int | None:
    """'8B' -> 8_000_000_000, '20M' -> 20_000_000, '1500' -> 1500; None when it is not a count."""
    match = COUNT.match(text.strip())
    if not match:
        return None
    return int(float(match.group(1)) * SUFFIX[match.group(2).lower()])


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m leantune.cost",
                                description="Estimate the time, energy and cost of a fine-tuning run on one GPU "
                                "(the formula is in leantune/cost.py's docstring).")
    p.add_argument("--devices", action="store_true",
                   help="print what leantune picks on common GPUs (dtype, attention, optimizer, 8B QLoRA "
                   "evaluation) and why, from its own decision functions (leantune/devices.py), and exit")
    p.add_argument("--model",
                   help="a parameter count (8B, 500M), a local model directory or a cached hub id (its config.json "
                   "gives layers and widths too, and the memory check), or 'scratch' (with --config); default: "
                   "the --config's model.name_or_path")
    p.add_argument("--active", help="with a parameter count for --model: the parameters active per token of a "
                   "Mixture-of-Experts, e.g. --model 46.7B --active 12.9B (a model directory gives them itself)")
    p.add_argument("--tokens", help="training tokens per epoch, e.g. 20M")
    p.add_argument("--gpu", action="append", help="a GPU of the catalogue (repeatable); default: all of them")
    p.add_argument("--config", type=Path, help="a run config: method, sequence length, micro-batch, LoRA, dtype "
                   "come from it (the options below override)")
    p.add_argument("--method", choices=("full", "lora", "qlora"))
    p.add_argument("--seq-len", type=int, help="sequence length (default: the config's tokenize.max_seq_len)")
    p.add_argument("--epochs", type=float, default=None, help="passes over the tokens (default: train.epochs)")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None)
    p.add_argument("--utilisation", type=float,
                   help=f"assumed share of the tensor peak; default by method {DEFAULT_UTILISATION}")
    p.add_argument("--price-per-kwh", type=float, help="electricity price (default: power.price_per_kwh)")
    p.add_argument("--catalogue", type=Path, help=f"GPU catalogue YAML (default {CATALOGUE})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    if args.devices:
        from leantune.devices import device_table

        print(device_table())
        return 0
    if args.tokens is None:
        p.error("--tokens is required (or --devices)")
    try:
        rows = _answer(args)
    except UserError as e:
        print(f"leantune.cost: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("GPU", "fits memory (per GPU)" if rows and rows[0]["gpus"] > 1 else "fits memory", "time", "energy kWh", "rent USD", "electricity USD", "utilisation")
    table = [header] + [(f"{r['gpus']} x {r['gpu']}" if r["gpus"] > 1 else r["gpu"], r["fits"], _duration(r["seconds"]), f"{r['energy_j'] / 3.6e6:.2f}",
                         f"{r['rent_usd']:.2f}", f"{r['electricity_usd']:.2f}", f"{r['utilisation']:.2f}")
                        for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)))
    return 0


def _answer(args) -> list[dict]:
    from leantune.config import load_config, method_values, with_values
    from leantune.probe import GIB, compute_bytes, estimate_for_config, model_shape, stored_bytes

    cfg = load_config(args.config)
    model = args.model or (cfg.model.name_or_path if args.config else None)
    if model is None:
        raise UserError("--model: required without --config; give a parameter count such as 8B, a model directory "
                        "or a hub id")
    changes = {}
    count = parse_count(model)
    if count is None:
        changes["model.name_or_path"] = model
    if args.method is not None:  # leaving full fine-tuning also resets the settings only it takes
        changes.update(method_values(cfg, args.method))
    for key, value in (("tokenize.max_seq_len", args.seq_len), ("train.epochs", args.epochs),
                       ("model.gradient_checkpointing", args.gradient_checkpointing)):
        if value is not None:
            changes[key] = value
    cfg = with_values(cfg, changes)
    tokens = parse_count(args.tokens)
    if tokens is None:
        raise UserError(f"--tokens: {args.tokens!r} is not a count; write e.g. 20M or 1500000")
    shape = None if count is not None else model_shape(cfg)
    if count is None and shape is None:
        raise UserError(f"--model: cannot read the config of {model!r} here (no network to the hub?); give "
                        "a local directory, or its parameter count such as 8B")
    active = count
    if args.active:
        active = parse_count(args.active)
        if count is None:
            raise UserError("--active: only with a parameter count for --model; a model's config gives its own")
        if active is None or active > count:
            raise UserError(f"--active: {args.active!r} is not a count up to --model's {model}; write e.g. 12.9B")
    work = workload_from_config(cfg, int(tokens * cfg.train.epochs), shape) if shape else Workload(
        params=active, tokens=int(tokens * cfg.train.epochs), seq_len=cfg.tokenize.max_seq_len,
        method=cfg.model.method, gradient_checkpointing=cfg.model.gradient_checkpointing)
    catalogue = load_catalogue(args.catalogue)
    if args.gpu:
        gpus = []
        for name in args.gpu:
            gpu = find_gpu(catalogue, name)
            if gpu is None:
                raise UserError(f"--gpu: {name!r} is not in the catalogue; known: {', '.join(catalogue)} "
                                f"(add it to {args.catalogue or CATALOGUE})")
            gpus.append(gpu)
    else:
        gpus = list(catalogue.values())
    estimated = estimate_for_config(cfg, shape, "cuda") if shape else None
    memory = estimated.total if estimated else None
    # train.distributed.cpu_offload: each process's shards in host memory.
    host = f"; {estimated.offloaded_host / GIB:.1f} GiB host memory per GPU" if estimated and estimated.offloaded_host else ""
    d = cfg.train.distributed
    if estimated and d.strategy == "fsdp" and d.nproc_per_node * d.nnodes > 1:
        # Rank 0 reads the whole model into host memory, and every rank's shards are filled from there (fsdp.py).
        whole = stored_bytes(shape, cfg.model.method, compute_bytes(cfg, "cuda"), cfg.model.double_quant)
        host += f"; {whole / GIB:.1f} GiB on rank 0's host while loading"
    price = args.price_per_kwh if args.price_per_kwh is not None else cfg.power.price_per_kwh
    rows = []
    world = cfg.train.distributed.nproc_per_node * cfg.train.distributed.nnodes
    for gpu in gpus:
        figures = estimate(work, gpu, utilisation=args.utilisation, precision=compute_dtype(cfg.model.dtype, "cuda"),
                           price_per_kwh=price)
        # W GPUs share the work: 1/W of the time each, so the energy and rent of the one-GPU time.
        figures = replace(figures, seconds=figures.seconds / world)
        # Cards sold as "N GB" hold N GiB; the run must stay under monitor.memory_high_fraction of it.
        budget = gpu.memory_gb * GIB * cfg.monitor.memory_high_fraction
        sharing = f", {cfg.train.distributed.strategy}" if world > 1 else ""
        fits = "-" if memory is None else f"{'yes' if memory <= budget else 'no'} ({memory / GIB:.1f} GiB{sharing}{host})"
        rows.append({**figures.to_dict(), "gpus": world, "fits": fits, "memory_estimate_bytes": memory})
    return rows


if __name__ == "__main__":
    sys.exit(main())
