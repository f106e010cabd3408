"""Data-parallel scaling: training tokens/s with 1 and with N processes (torchrun, gloo on the CPU,
nccl on GPUs), and the scaling efficiency tokens/s(N) / (N x tokens/s(1)).

Same run on both sides: the scratch Llama of `--hidden/--layers`, LoRA r=16 on every linear layer,
fp32, packed synthetic conversations, global batch 16 in micro-batches of 4 (one process: 4
micro-batches; N processes: 16/N sequences each). Both sides are started by torchrun, so both pay the
same start-up; throughput is non-padding tokens per second from the end of the first optimizer step
(warm-up) to the end of the last, read on rank 0, every per-step overhead (the gradient all-reduce
included) inside. Each process gets `--threads` intra-op threads; sides alternate in blocks
(1 N N 1 1 N ...) so that drift on a shared machine hits both alike; medians are reported.

    .venv/bin/python bench/ddp_scaling.py                      # CPU, 2 processes, about 5 minutes on 2 cores
    .venv/bin/python bench/ddp_scaling.py --device cuda --nproc 2 --hidden 1024 --layers 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def overrides(args) -> list[str]:
    return [
        f"data.synthetic.num_records={args.records}", "data.val_fraction=0", "tokenize.vocab_size=2048",
        "tokenize.max_seq_len=256", "tokenize.packing=true",
        f"model.scratch.hidden_size={args.hidden}", f"model.scratch.num_layers={args.layers}",
        f"model.scratch.num_heads={args.hidden // 64}", f"model.scratch.num_kv_heads={max(1, args.hidden // 128)}",
        f"model.scratch.intermediate_size={args.hidden * 8 // 3}", "lora.r=16", "lora.alpha=32", "lora.dropout=0.0",
        f"train.device={args.device}", "model.dtype=fp32", "train.global_batch_size=16", "train.micro_batch_size=4",
        f"train.max_steps={args.steps}", "train.warmup_steps=2", "train.eval_every=100000",
        "checkpoint.every_steps=100000", "checkpoint.every_minutes=100000", "adaptive.enabled=false",
        "adaptive.probe_longest_first=false", "monitor.enabled=false",
    ]


def prepare_run(args, where: Path) -> Path:
    """A run directory after the data stages, copied for every measurement."""
    from leantune.config import load_config
    from leantune.data.prepare import prepare
    from leantune.rundir import RunDir, write_config
    from leantune.tokenization import tokenize
    from leantune.validation import validate_records

    run_dir = where / "pristine"
    run_dir.mkdir(parents=True)
    cfg = load_config(overrides=[*overrides(args), f"run.output_dir={where}", "run.name=pristine"])
    write_config(run_dir, cfg)
    layout = RunDir(run_dir)
    prepare(cfg, layout.data)
    validate_records(cfg, layout.data)
    tokenize(cfg, layout.data, layout.tokens)
    return run_dir


def child(run_dir: Path, threads: int) -> None:
    """One rank of a measurement (under torchrun): train, and on rank 0 write bench.json."""
    import torch

    torch.set_num_threads(threads)
    from leantune.config import load_config
    from leantune.metrics import read_metrics
    from leantune.testing import loop_hooks
    from leantune.training.loop import train

    step_ends: dict[int, float] = {}

    def clock(step):  # called once per step, after its metrics line: every overhead is inside
        step_ends[step] = time.perf_counter()
        return None

    with loop_hooks(headroom=clock):
        summary = train(load_config(run_dir / "config.yaml"), run_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        tokens = {m["step"]: m["tokens"] for m in read_metrics(run_dir, "step")}
        first, last = min(step_ends), max(step_ends)
        counted = sum(tokens[s] for s in range(first + 1, last + 1))
        (run_dir / "bench.json").write_text(json.dumps({
            "tokens_per_s": counted / (step_ends[last] - step_ends[first]),
            "world_size": summary["world_size"], "peak_memory_mb": summary["rank_peak_memory_mb"]}))


def runs(results: list[dict]) -> str:
    return ", ".join(f"{r['tokens_per_s']:.0f}" for r in results)


def measure(pristine: Path, where: Path, nproc: int, threads: int, index: int) -> dict:
    run_dir = where / f"n{nproc}-{index}"
    shutil.copytree(pristine, run_dir)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", __file__, "--child", str(run_dir), "--threads", str(threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = json.loads((run_dir / "bench.json").read_text())
    shutil.rmtree(run_dir)
    assert result["world_size"] == nproc
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel side")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--records", type=int, default=600)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="measurements per side")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        child(args.child, args.threads)
        return

    where = Path(tempfile.mkdtemp(prefix="leantune-ddp-bench-"))
    try:
        pristine = prepare_run(args, where)
        results: dict[int, list[dict]] = {1: [], args.nproc: []}
        for block in range(args.repeats):
            # 1 N, then N 1, ...: neither side always runs first.
            for nproc in (1, args.nproc) if block % 2 == 0 else (args.nproc, 1):
                results[nproc].append(measure(pristine, where, nproc, args.threads, block))
                print(f"block {block}: {nproc} process(es): {results[nproc][-1]['tokens_per_s']:.0f} tokens/s",
                      file=sys.stderr)
    finally:
        shutil.rmtree(where, ignore_errors=True)

    one = statistics.median(r["tokens_per_s"] for r in results[1])
    many = statistics.median(r["tokens_per_s"] for r in results[args.nproc])
    efficiency = many / (args.nproc * one)
    print(f"device {args.device}, {args.threads} thread(s) per process, scratch Llama hidden {args.hidden} x "
          f"{args.layers} layers, LoRA r=16, global batch 16, {args.steps} steps, median of {args.repeats}")
    print(f"{'processes':>9}  {'tokens/s':>9}  {'runs':>30}")
    for n, value in ((1, one), (args.nproc, many)):
        print(f"{n:>9}  {value:>9.0f}  {runs(results[n]):>30}")
    print(f"scaling efficiency tokens/s({args.nproc}) / ({args.nproc} x tokens/s(1)) = {efficiency:.2f}")
    print(json.dumps({"tokens_per_s": {"1": one, str(args.nproc): many}, "efficiency": efficiency}))


if __name__ == "__main__":
    main()
