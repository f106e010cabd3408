"""Throughput of sycophancy scoring: leantune's packed batches against the naive ways, in one run.

    .venv/bin/python bench/eval_throughput.py [--set model.scratch.hidden_size=256 ...] [--items 272]

On the same model and the same encoded items (the bundled Anthropic sample: long prompts, answers
of 3 tokens; the synthetic set: shorter prompts, answers of 4-5 tokens) it times
  packed     leantune (scoring.py): one row per item, the prompt computed once for all answers,
             logits only where answer tokens are predicted
  per-option batched: one row per (item, answer) = prompt + answer, right-padded, full logits
             (the prompt is computed once per answer)
  per-option single:  one unpadded forward per (item, answer)
and prints items/s, the speed-up of packed over each, and the largest score difference (all three
compute the same numbers). The model is the config's scratch model with a tokenizer trained on
synthetic records; --set changes its shape (or eval.batch_size, train.device).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def per_option_batched(model, encoded, batch_size, pad_id, device, autocast):
    import torch

    rows = [(i, k, e.prompt_ids, ids) for i, e in enumerate(encoded) for k, ids in enumerate(e.option_ids)]
    scores = [[0.0] * len(e.option_ids) for e in encoded]
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            width = max(len(p) + len(a) for _, _, p, a in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, (_, _, p, a) in enumerate(batch):
                ids[r, :len(p) + len(a)] = torch.tensor(p + a)
                mask[r, :len(p) + len(a)] = 1
            with autocast:
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            logprobs = torch.log_softmax(logits.float(), -1).cpu()
            for r, (i, k, p, a) in enumerate(batch):
                positions = torch.arange(len(p) - 1, len(p) + len(a) - 1)
                scores[i][k] = float(logprobs[r, positions, torch.tensor(a)].double().sum())
    return scores


def per_option_single(model, encoded, device, autocast):
    import torch

    scores = []
    with torch.inference_mode():
        for e in encoded:
            row = []
            for a in e.option_ids:
                with autocast:
                    logits = model(input_ids=torch.tensor([e.prompt_ids + a], device=device), use_cache=False).logits
                logprobs = torch.log_softmax(logits[0].float(), -1).cpu()
                row.append(float(logprobs[torch.arange(len(e.prompt_ids) - 1, len(e.prompt_ids) + len(a) - 1),
                                          torch.tensor(a)].double().sum()))
            scores.append(row)
    return scores


def timed(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--items", type=int, default=272, help="items per set (default: 272)")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats; the best is reported")
    args = p.parse_args()

    import torch

    from leantune.config import load_config
    from leantune.data.synthetic import generate
    from leantune.evaluation.datasets import BUNDLED_SAMPLE, anthropic_file, synthetic_set
    from leantune.evaluation.runner import build_eval_model
    from leantune.evaluation.scoring import encode_items, score_encoded
    from leantune.modeling import resolve_device, resolve_precision
    from leantune.tokenization import load_tokenizer, pad_id

    cfg = load_config(ROOT / "configs" / "smoke.yaml", args.overrides)
    device = resolve_device(cfg)
    precision = resolve_precision(cfg, device)
    autocast = (torch.autocast(device.type, dtype=precision) if precision != torch.float32
                else contextlib.nullcontext())
    with tempfile.TemporaryDirectory() as tmp:
        with open(Path(tmp) / "train.jsonl", "w") as f:
            for i, item in enumerate(generate(cfg.data.synthetic, "train")):
                f.write(json.dumps({"id": str(i), "messages": item.messages(), "source": "synthetic"}) + "\n")
        tokenizer = load_tokenizer(cfg, Path(tmp) / "train.jsonl", Path(tmp) / "tokenizer")
    model = build_eval_model(cfg, tokenizer, device)
    pad = pad_id(tokenizer)
    batch = cfg.eval.batch_size
    params = sum(p.numel() for p in model.parameters())
    print(f"model: scratch Llama, {params / 1e6:.2f} M parameters, {device}, {str(precision)[6:]}; "
          f"batch {batch} items (per-option batched: {batch} rows)")

    sets = {
        "anthropic-sample": anthropic_file(BUNDLED_SAMPLE, "anthropic-sample", 0.0).items[:args.items],
        "synthetic": synthetic_set(cfg.data.synthetic, args.items).items,
    }
    for name, items in sets.items():
        encoded = encode_items(tokenizer, "chat_template", items)
        prompt_tokens = sum(len(e.prompt_ids) for e in encoded) / len(encoded)
        answer_tokens = sum(len(a) for e in encoded for a in e.option_ids) / len(encoded)
        t_packed, packed = timed(lambda enc=encoded: score_encoded(model, enc, batch, pad, device, autocast,
                                                                   precision), args.repeats)
        t_batched, batched = timed(lambda enc=encoded: per_option_batched(model, enc, batch, pad, device, autocast),
                                   args.repeats)
        t_single, single = timed(lambda enc=encoded: per_option_single(model, enc, device, autocast), 1)
        diff = max(abs(a - b) for x, y, z in zip(packed, batched, single, strict=True)
                   for a, b in [*zip(x, y, strict=True), *zip(x, z, strict=True)])
        n = len(items)
        print(f"\n{name}: {n} items, {prompt_tokens:.0f} prompt tokens and {answer_tokens:.1f} answer tokens per item")
        print(f"  packed (leantune)      {n / t_packed:9.1f} items/s")
        print(f"  per-option, batched    {n / t_batched:9.1f} items/s   packed is {t_batched / t_packed:.2f}x faster")
        print(f"  per-option, one by one {n / t_single:9.1f} items/s   packed is {t_single / t_packed:.2f}x faster")
        print(f"  largest score difference between the three: {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
