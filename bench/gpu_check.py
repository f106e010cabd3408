"""The first GPU run's checks: one script, about 10 minutes, one PASS/FAIL/SKIP line per check.

    .venv/bin/python bench/gpu_check.py [--dry-run] [--budget-gb 16] [--model scratch|DIR] [--minutes 10]

Checks, in order (all offline: synthetic data and leantune's scratch model unless --model names a
local model directory):
  nvml-power-energy   NVML reads the training GPU's power, power limit and energy counter across a
                      few seconds of matmuls (read only: no limit is set)
  pytest-gpu          `pytest -m gpu`: tests/training/test_gpu.py's CUDA training paths (bf16, fp16 with loss
                      scaling, full, QLoRA, the CUDA memory readings, split invariance in fp32)
  fused-vs-peft-bf16  a 0.2B scratch model in bf16 with LoRA on every linear layer: leantune's fused
                      layers against peft's forwards, the same micro-batches interleaved; the loss must
                      agree within bf16 rounding; prints peak memory and tokens/s of each
  kill-resume-cuda    a training subprocess on CUDA killed (SIGKILL) at step 5 of 12 and resumed: its
                      adapter must be bitwise equal to an uninterrupted run's (train.deterministic)
  qlora-eval-budget   QLoRA training then the evaluation stage in this process with
                      torch.cuda.set_per_process_memory_fraction set to --budget-gb (a 16 GB card); the
                      evaluation must finish inside the budget; prints which base it scored on
Exit status: 0 when every check that ran passed (and always with --dry-run or without CUDA: the plan is
printed and the script says it needs CUDA), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30
# The data stages of tests/conftest.py's run: 200 synthetic records packed into 256 tokens, a scratch
# tokenizer of 1000 ids.
DATA = ["data.synthetic.num_records=200", "data.val_fraction=0.1", "data.chunk_size=100", "tokenize.vocab_size=1000",
        "tokenize.max_seq_len=256", "tokenize.packing=true", "train.global_batch_size=8", "train.micro_batch_size=4",
        "train.warmup_steps=2", "train.lr=1e-2", "train.device=cuda"]
TINY = ["model.scratch.hidden_size=32", "model.scratch.intermediate_size=64", "model.scratch.num_layers=2",
        "model.scratch.num_heads=4", "model.scratch.num_kv_heads=2", "lora.r=4", "lora.alpha=8"]
# About 0.2B parameters: big enough for the GPU's kernels to matter, quick to build.
MEDIUM = ["model.scratch.hidden_size=1024", "model.scratch.intermediate_size=2816", "model.scratch.num_layers=12",
          "model.scratch.num_heads=16", "model.scratch.num_kv_heads=4", "lora.r=16", "lora.alpha=32",
          "lora.target_modules=all-linear"]

PLAN = [
    ("nvml-power-energy", "NVML power, power limit and energy counter across a few seconds of load (read only)"),
    ("pytest-gpu", "pytest -m gpu (tests/training/test_gpu.py)"),
    ("fused-vs-peft-bf16", "fused LoRA/SwiGLU layers against peft's forwards in bf16: loss agrees; peak memory, "
                           "tokens/s"),
    ("kill-resume-cuda", "SIGKILL at step 5 of 12 on CUDA, resume: adapter bitwise equal to an uninterrupted run's"),
    ("qlora-eval-budget", "QLoRA training then the evaluation stage inside set_per_process_memory_fraction "
                          "(--budget-gb)"),
]


def tokenized_run(where: Path, *overrides: str) -> Path:
    """A run directory after the data stages (config.yaml, data/, tokens/) with `overrides`."""
    from leantune.config import dump_config, load_config
    from leantune.data.prepare import prepare
    from leantune.tokenization import tokenize
    from leantune.validation import validate_records, validate_tokens

    run_dir = where / "run"
    cfg = load_config(overrides=[*DATA, *overrides, f"run.output_dir={where}", "run.name=run"])
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    prepare(cfg, run_dir / "data")
    validate_records(cfg, run_dir / "data")
    tokenize(cfg, run_dir / "data", run_dir / "tokens")
    validate_tokens(cfg, run_dir / "tokens")
    return run_dir


def copy_run(run_dir: Path, to: Path, *overrides: str) -> tuple[object, Path]:
    from leantune.config import dump_config, load_config

    shutil.copytree(run_dir, to)
    cfg = load_config(to / "config.yaml", overrides=list(overrides))
    (to / "config.yaml").write_text(dump_config(cfg))
    return cfg, to


# ------------------------------------------------------------------------------------------ checks


def check_nvml(args, work: Path) -> tuple[bool, str]:
    import torch

    from leantune.config import MonitorConfig
    from leantune.monitor.sampler import Monitor

    torch.zeros(1, device="cuda")  # the monitor finds the training GPU through torch's CUDA context
    monitor = Monitor(MonitorConfig(backend="nvml"), None, device_type="cuda", device_index=0)
    if monitor.nvml is None:
        return False, "NVML unavailable (see the warning above)"
    first = monitor.sample_once()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    end = time.monotonic() + 3
    while time.monotonic() < end:
        a @ a
    torch.cuda.synchronize()
    last = monitor.sample_once()
    energy = monitor.energy_j()
    monitor.stop()
    gpu = last.gpus[0]
    ok = gpu.power_w is not None and gpu.power_limit_w is not None and (energy or 0) > 0
    return ok, (f"{gpu.name}: {gpu.power_w} W of a {gpu.power_limit_w} W limit, {energy} J over "
                f"{last.elapsed_s - first.elapsed_s:.1f} s ({gpu.energy_source}), {gpu.temperature_c} C")


def check_pytest(args, work: Path) -> tuple[bool, str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
    return proc.returncode == 0, lines[-1] if lines else f"exit status {proc.returncode}"


def check_fused(args, work: Path, steps: int = 10) -> tuple[bool, str]:
    import torch
    from transformers import AutoTokenizer

    from leantune.config import load_config
    from leantune.modeling import build_model
    from leantune.shards import TokenShards
    from leantune.training.fused import _lora_forward_method, _swiglu_forward_method
    from leantune.training.loss import target_cross_entropy
    from leantune.training.packed import model_inputs

    run = tokenized_run(work / "fused", *MEDIUM, "model.dtype=bf16", "lora.dropout=0.05")
    cfg = load_config(run / "config.yaml")
    device = torch.device("cuda")
    model = build_model(cfg, AutoTokenizer.from_pretrained(run / "tokens" / "tokenizer"), device)
    shards = TokenShards(run / "tokens" / "train")
    batch = [shards[i] for i in range(8)]
    inputs, labels = model_inputs(batch, shards.pad_id, torch.bfloat16, model.config._attn_implementation, device)
    tokens = int(inputs["input_ids"].numel())
    fused = [m for m in model.modules()
             if getattr(m.forward, "__func__", None) in (_lora_forward_method, _swiglu_forward_method)]
    methods = {id(m): m.forward for m in fused}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)

    def use(side: str) -> None:
        for m in fused:
            if side == "fused":
                m.forward = methods[id(m)]
            else:
                vars(m).pop("forward", None)  # peft's and transformers' own forwards

    def one_step() -> float:
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = target_cross_entropy(model, inputs, labels)
        loss.backward()
        return float(loss)

    seconds = {"fused": 0.0, "peft": 0.0}
    peak = {}
    losses = {}
    for side in ("fused", "peft"):
        use(side)
        torch.manual_seed(0)
        one_step()  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(1)
        losses[side] = one_step()
        peak[side] = torch.cuda.max_memory_allocated() / GIB
    for i in range(steps):
        for side in (("fused", "peft") if i % 2 == 0 else ("peft", "fused")):
            use(side)
            torch.cuda.synchronize()
            start = time.perf_counter()
            one_step()
            torch.cuda.synchronize()
            seconds[side] += time.perf_counter() - start
    rate = {side: steps * tokens / s for side, s in seconds.items()}
    agree = abs(losses["fused"] - losses["peft"]) <= 1e-2 * abs(losses["peft"])
    return agree, (f"{len(fused)} fused modules, {tokens} tokens a step: loss {losses['fused']:.4f} vs "
                   f"{losses['peft']:.4f}; peak {peak['fused']:.2f} vs {peak['peft']:.2f} GiB "
                   f"({peak['fused'] / peak['peft']:.2f}x); {rate['fused']:.0f} vs {rate['peft']:.0f} tokens/s "
                   f"({rate['fused'] / rate['peft']:.2f}x)")


def _train_process(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "leantune.training.loop", str(run_dir), *extra], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _steps_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines()
             if line.strip() and "event" not in line]
    return max(steps, default=0)


def check_kill_resume(args, work: Path, kill_at: int = 5) -> tuple[bool, str]:
    from safetensors.torch import load_file

    base = tokenized_run(work / "resume", *TINY)
    common = ["train.max_steps=12", "checkpoint.every_steps=1", "lora.dropout=0.1", "train.eval_every=1000",
              "monitor.enabled=false", "train.deterministic=true"]
    _, straight = copy_run(base, work / "straight", *common)
    _, killed = copy_run(base, work / "killed", *common)
    out, _ = _train_process(straight).communicate(timeout=240)
    proc = _train_process(killed)
    deadline = time.monotonic() + 240
    while _steps_done(killed) < kill_at and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is not None:
        return False, f"the run ended before step {kill_at}: {proc.communicate()[0][-1000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at = _steps_done(killed)
    resumed = _train_process(killed, "--resume")
    resumed_out, _ = resumed.communicate(timeout=240)
    if resumed.returncode != 0:
        return False, f"resume failed ({resumed.returncode}): {resumed_out[-1000:]}"
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "adapter" / "adapter_model.safetensors")
    different = [k for k in a if not (a[k] == b[k]).all() or a[k].dtype != b[k].dtype]
    return not different and a.keys() == b.keys(), (
        f"killed after step {at}, resumed: {len(a) - len(different)}/{len(a)} adapter tensors bitwise equal"
        + (f"; differ: {different[:3]}" if different else ""))


def check_qlora_budget(args, work: Path) -> tuple[bool, str]:
    import torch

    from leantune.config import load_config
    from leantune.evaluation.runner import evaluate
    from leantune.training.loop import train

    model = MEDIUM if args.model == "scratch" else [f"model.name_or_path={args.model}", "lora.r=16", "lora.alpha=32"]
    run = tokenized_run(work / "qlora", *model, "model.method=qlora", "train.max_steps=3", "train.eval_every=1000",
                        "checkpoint.every_steps=1000", "eval.max_items=16", "eval.synthetic_items=32",
                        "eval.datasets=[synthetic]")
    cfg = load_config(run / "config.yaml")
    total = torch.cuda.get_device_properties(0).total_memory
    budget = min(args.budget_gb * GIB, total)
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(budget / total)
    try:
        torch.cuda.reset_peak_memory_stats()
        summary = train(cfg, run)
        results = evaluate(cfg, run / "eval", adapter_dir=run / "adapter")
        peak = torch.cuda.max_memory_allocated()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    base = results["base"]["model"].get("base_weights")
    ok = summary["completed"] and "comparison" in results and peak <= budget
    return ok, (f"{args.model}: trained {summary['steps']} steps, evaluated base and tuned on the {base} base; peak "
                f"{peak / GIB:.2f} GiB of a {budget / GIB:.1f} GiB budget")


CHECKS = {"nvml-power-energy": check_nvml, "pytest-gpu": check_pytest, "fused-vs-peft-bf16": check_fused,
          "kill-resume-cuda": check_kill_resume, "qlora-eval-budget": check_qlora_budget}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--budget-gb", type=float, default=16.0, help="qlora-eval-budget: the card to pretend (GiB)")
    p.add_argument("--model", default="scratch", help="qlora-eval-budget: 'scratch' or a local model directory")
    p.add_argument("--minutes", type=float, default=10.0, help="checks not started by then are skipped")
    args = p.parse_args(argv)

    import torch

    print(f"gpu_check plan ({len(PLAN)} checks, at most {args.minutes:g} minutes):")
    for name, what in PLAN:
        print(f"  {name}: {what}")
    if not torch.cuda.is_available():
        print(f"gpu_check: needs CUDA; torch {torch.__version__} sees no CUDA device here, so nothing was run")
        return 0
    if args.dry_run:
        print(f"gpu_check: --dry-run on {torch.cuda.get_device_name(0)}; nothing was run")
        return 0
    deadline = time.monotonic() + args.minutes * 60
    passed = failed = 0
    with tempfile.TemporaryDirectory(prefix="leantune-gpu-check-") as tmp:
        for name, _ in PLAN:
            if time.monotonic() > deadline:
                print(f"SKIP {name}: out of time ({args.minutes:g} minutes)", flush=True)
                continue
            started = time.monotonic()
            try:
                ok, detail = CHECKS[name](args, Path(tmp) / name)
            except Exception as e:  # a check that crashes is a failed check; the others still run
                ok, detail = False, f"{type(e).__name__}: {e}"
            passed, failed = passed + ok, failed + (not ok)
            print(f"{'PASS' if ok else 'FAIL'} {name}: {detail} ({time.monotonic() - started:.0f} s)", flush=True)
    print(f"gpu_check: {passed} passed, {failed} failed, {len(PLAN) - passed - failed} skipped on "
          f"{torch.cuda.get_device_name(0)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
