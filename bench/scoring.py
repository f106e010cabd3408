"""Evaluation scoring on SmolLM2-135M-Instruct: today's scorer against the one it replaced, in one run.

    .venv/bin/python bench/scoring.py [--items 12] [--rounds 3] [--threads 2] [--out bench/scoring.json]

The reference is leantune/evaluation/scoring.py as of commit 4649599 (its prompt shared by the
answers of an item, logits only at answer positions), loaded from git into a temporary module; the
candidate is the working tree's (plus the shared-prefix key/value cache) and, for the tuned model,
runner.merge_for_scoring (LoRA merged into the fp32 weights) where the reference scores the PEFT
model unmerged, as the evaluation did. The items: the first --items of each choice set of
configs/default.yaml's evaluation (synthetic, synthetic-plain, anthropic-sample), encoded once,
batch size eval.batch_size. The tuned model is the base with a random LoRA (r 8, every linear
layer, B not zero, so it changes the scores). Every round times the four (scorer, model) pairs in a
fresh shuffled order, `--threads` torch threads (OMP/MKL pinned too); per round the ratio of items/s,
candidate over reference, for the base, the tuned and the whole base + tuned evaluation; medians and
min/max over rounds, the largest score difference between the two scorers, the load average beside
each figure. JSON to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REFERENCE_COMMIT = "4649599"


def reference_module():
    """scoring.py as of REFERENCE_COMMIT, imported as a module of its own."""
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{REFERENCE_COMMIT}:leantune/evaluation/scoring.py"],
                          check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="leantune-scoring-")) / "scoring_reference.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("scoring_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def positions(encoded, batch_size: int, shared_prefix: bool) -> int:
    """Token positions a scorer runs through the model for `encoded` (padding included), batched as it
    batches; with `shared_prefix`, the prefix common to all prompts and each batch's own common prefix are
    computed once, as the candidate's key/value cache does."""
    from leantune.evaluation.scoring import common_prefix

    if shared_prefix:
        order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i].prompt_ids), encoded[i].prompt_ids))
        shared = common_prefix([e.prompt_ids for e in encoded])
    else:
        order, shared = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].prompt_ids)), 0
    total = shared
    for start in range(0, len(order), batch_size):
        batch = [encoded[i] for i in order[start:start + batch_size]]
        cached = max(shared, common_prefix([e.prompt_ids for e in batch])) if shared_prefix else 0
        total += cached - shared  # a batch's longer common prefix extends the cache once
        slots = max(len(e.option_ids) for e in batch)
        answers = sum(max(len(e.option_ids[k]) for e in batch if k < len(e.option_ids)) for k in range(slots))
        total += len(batch) * (max(len(e.prompt_ids) for e in batch) - cached + answers)
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=12, help="items per evaluation set")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "scoring.json")
    args = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)

    import torch
    from peft import LoraConfig, get_peft_model

    from leantune.config import load_config
    from leantune.evaluation import scoring
    from leantune.evaluation.datasets import load_eval_sets
    from leantune.evaluation.runner import build_eval_model, load_eval_tokenizer, merge_for_scoring
    from leantune.tokenization import pad_id

    torch.set_num_threads(args.threads)
    reference = reference_module()
    cfg = load_config(ROOT / "configs" / "default.yaml")
    tokenizer = load_eval_tokenizer(cfg, None)
    framing = scoring.resolve_framing(cfg.eval.framing, tokenizer)
    encoded = [e for s in load_eval_sets(cfg) if s.kind == "choice"
               for e in scoring.encode_items(tokenizer, framing, s.items[:args.items])]
    cpu = torch.device("cpu")
    base = build_eval_model(cfg, tokenizer, cpu)
    torch.manual_seed(0)
    tuned = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                           init_lora_weights=False)).eval()
    merged = copy.deepcopy(tuned)
    assert merge_for_scoring(merged)
    runs = {("reference", "base"): (reference.score_encoded, base), ("candidate", "base"): (scoring.score_encoded, base),
            ("reference", "tuned"): (reference.score_encoded, tuned),
            ("candidate", "tuned"): (scoring.score_encoded, merged)}

    def score(key):
        fn, model = runs[key]
        return fn(model, encoded, cfg.eval.batch_size, pad_id(tokenizer), cpu, contextlib.nullcontext(), torch.float32)

    seconds: dict[str, list[float]] = {f"{s} {m}": [] for s, m in runs}
    load: list[float] = []
    diff = 0.0
    for rnd in range(args.rounds):
        got = {}
        for key in random.Random(rnd).sample(list(runs), len(runs)):
            load.append(os.getloadavg()[0])
            start = time.perf_counter()
            got[key] = score(key)
            seconds[" ".join(key)].append(time.perf_counter() - start)
            print(f"round {rnd + 1} {' '.join(key):16s} {len(encoded) / seconds[' '.join(key)][-1]:.3f} items/s  "
                  f"load {load[-1]:.2f}", flush=True)
        for model in ("base", "tuned"):
            for a, b in zip(got[("reference", model)], got[("candidate", model)], strict=True):
                diff = max(diff, *(abs(x - y) for x, y in zip(a, b, strict=True)))

    def ratios(models):
        return [sum(seconds[f"reference {m}"][r] for m in models) / sum(seconds[f"candidate {m}"][r] for m in models)
                for r in range(args.rounds)]

    result = {"items": len(encoded), "rounds": args.rounds, "threads": args.threads,
              "batch_size": cfg.eval.batch_size, "reference_commit": REFERENCE_COMMIT,
              "shared_prefix_tokens": scoring.common_prefix([e.prompt_ids for e in encoded]),
              "items_per_s": {k: statistics.median(len(encoded) / s for s in v) for k, v in seconds.items()},
              "seconds": seconds, "load_average": load, "max_abs_score_difference": diff, "speedup": {}}
    # The bound on any exact scorer: every item's own tokens (prompt past the shared prefix, and answers) once.
    shared = scoring.common_prefix([e.prompt_ids for e in encoded])
    own = shared + sum(len(e.prompt_ids) - shared + sum(map(len, e.option_ids)) for e in encoded)
    result["positions"] = {"reference": positions(encoded, cfg.eval.batch_size, False),
                           "candidate": positions(encoded, cfg.eval.batch_size, True), "own_tokens": own}
    for name, models in (("base", ["base"]), ("tuned", ["tuned"]), ("base+tuned", ["base", "tuned"])):
        r = ratios(models)
        result["speedup"][name] = {"median": statistics.median(r), "min": min(r), "max": max(r)}
    print(f"\n{len(encoded)} items ({args.items} per set), {args.threads} threads, {args.rounds} rounds, "
          f"load average {statistics.median(load):.2f}; largest score difference {diff:.2e}")
    for name, r in result["speedup"].items():
        print(f"  {name:10s} candidate / reference items/s: median {r['median']:.2f}x "
              f"(min {r['min']:.2f}x, max {r['max']:.2f}x)")
    pos = result["positions"]
    print(f"  token positions through the model: reference {pos['reference']}, candidate {pos['candidate']}, "
          f"every item's own tokens {pos['own_tokens']}: no exact scorer runs fewer than the reference's / "
          f"{pos['reference'] / pos['own_tokens']:.2f}")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
