"""leantune's fused LoRA and SwiGLU layers against peft's and transformers' own forwards, on SmolLM2.

    .venv/bin/python bench/fused_layers.py [--rounds 5] [--threads 2] [--out bench/fused_layers.json]

One model, SmolLM2-135M-Instruct with LoRA r 16, alpha 32, dropout 0.05 on every linear layer
(bench/vs_trainers.py's settings), and one micro-batch: the two longest sequences of
bench/vs_trainers.py's data (2 x 191 positions), padded and fed without a mask as training does.
Three sides, the same weights:
  fused             the layers as build_model makes them (leantune/fused.py)
  peft              the same modules with peft's and transformers' own forwards put back
  fused-no-dropout  fused, every adapter's dropout off: what the dropout's masks cost the fused layers
Per side: the bytes autograd keeps for backward (saved tensors other than the model's parameters,
each storage counted once) and the seconds of one forward + backward of the chunked loss, the sides
interleaved in every round (a rotated order), `--threads` torch threads; the median ratios are printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def saved_bytes(model, inputs, labels) -> int:
    import torch

    from leantune.training.loss import target_cross_entropy

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        target_cross_entropy(model, inputs, labels)
    return sum(storages.values())


def step_seconds(model, inputs, labels) -> float:
    from leantune.training.loss import target_cross_entropy

    start = time.perf_counter()
    target_cross_entropy(model, inputs, labels).backward()
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "fused_layers.json")
    args = p.parse_args()

    import torch
    import vs_trainers
    from transformers import AutoTokenizer

    from leantune.config import load_config
    from leantune.fused import _lora_forward_method, _swiglu_forward_method
    from leantune.modeling import build_model
    from leantune.shards import TokenShards
    from leantune.training.packed import model_inputs

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="leantune-fused-") as tmp:
        run = vs_trainers.prepare(Path(tmp), 4)
        cfg = load_config(run / "config.yaml")
        tokenizer = AutoTokenizer.from_pretrained(run / "tokens" / "tokenizer")
        model = build_model(cfg, tokenizer, torch.device("cpu"))
        shards = TokenShards(run / "tokens" / "train")
        longest = sorted(range(len(shards)), key=lambda i: -shards.lengths[i])[:2]
        inputs, labels = model_inputs([shards[i] for i in longest], shards.pad_id, torch.float32, "sdpa",
                                      torch.device("cpu"))
    fused = [m for m in model.modules()
             if getattr(m.forward, "__func__", None) in (_lora_forward_method, _swiglu_forward_method)]
    methods = {id(m): m.forward for m in fused}
    dropouts = {id(m): m.lora_dropout["default"] for m in fused if hasattr(m, "lora_dropout")}

    def use(side: str) -> None:
        for m in fused:
            if side.startswith("fused"):
                m.forward = methods[id(m)]
            else:
                vars(m).pop("forward", None)  # the class's own forward (peft's, transformers')
            if id(m) in dropouts:
                m.lora_dropout["default"] = torch.nn.Identity() if side == "fused-no-dropout" else dropouts[id(m)]

    sides = ["fused", "peft", "fused-no-dropout"]
    memory, seconds = {}, {side: [] for side in sides}
    for side in sides:
        use(side)
        memory[side] = saved_bytes(model, inputs, labels)
        model.zero_grad(set_to_none=True)
        step_seconds(model, inputs, labels)  # warm-up
    for rnd in range(args.rounds):
        for side in sides[rnd % 3:] + sides[:rnd % 3]:
            use(side)
            model.zero_grad(set_to_none=True)
            seconds[side].append(step_seconds(model, inputs, labels))
    ratios = [p / f for p, f in zip(seconds["peft"], seconds["fused"], strict=True)]
    dropout_cost = [f / n for f, n in zip(seconds["fused"], seconds["fused-no-dropout"], strict=True)]
    result = {"layers": len(fused), "positions": int(inputs["input_ids"].numel()), "threads": args.threads,
              "saved_mib": {k: v / 2**20 for k, v in memory.items()}, "seconds": seconds,
              "median_seconds": {k: statistics.median(v) for k, v in seconds.items()},
              "median_speedup": statistics.median(ratios), "median_dropout_cost": statistics.median(dropout_cost)}
    print(f"{len(fused)} fused modules, one micro-batch of {result['positions']} positions, {args.threads} threads, "
          f"{args.rounds} interleaved rounds")
    print(f"kept for backward: fused {result['saved_mib']['fused']:.0f} MiB, peft {result['saved_mib']['peft']:.0f} MiB "
          f"({memory['fused'] / memory['peft']:.2f}x)")
    print(f"forward + backward: fused {result['median_seconds']['fused']:.3f} s, peft "
          f"{result['median_seconds']['peft']:.3f} s (median ratio {result['median_speedup']:.2f}x, "
          f"per round {', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"fused with the adapters' dropout off: {result['median_seconds']['fused-no-dropout']:.3f} s, "
          f"{memory['fused-no-dropout'] / 2**20:.0f} MiB kept; the dropout makes a fused step "
          f"{result['median_dropout_cost']:.2f}x longer (per round {', '.join(f'{r:.2f}' for r in dropout_cost)})")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
