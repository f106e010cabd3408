"""Training throughput and memory: leantune's loop vs the transformers Trainer + PEFT, and LoRA vs full.

Same model on every side: the scratch Llama of `--hidden/--layers` (about 12M parameters with the
defaults), built by leantune.modeling from the same config and seed, LoRA r=16 on every linear
layer, fp32 on the CPU. Same data: variable-length multi-turn conversations (25 to 256 tokens after
truncation), tokenized once by leantune without packing (what both loops read as
variable-length records) and once with packing (leantune only). Same global batch (16 sequences as
4 micro-batches of 4), AdamW, clipping, warm-up and loss normalised over the global batch's target
tokens (the Trainer's num_items_in_batch does the same).

Sides:
  trainer          Trainer + PEFT, its default random sampler, padding to the longest in a micro-batch
  trainer-grouped  the same with train_sampling_strategy="group_by_length"
  ours             leantune's loop on the unpacked records (global batches sorted by length)
  ours-grouped     the same with train.group_by_length=true (whole global batches grouped by length)
  ours-packed      leantune's loop on packed sequences (block-diagonal attention, no padding)
Memory only (leantune's loop, packed): LoRA with gradient checkpointing against full fp32 fine-tuning.

Throughput is non-padding tokens per second from the end of the first optimizer step (warm-up) to
the end of the last, wall clock, every per-step overhead included. Each measurement runs in a fresh
child process (peak RSS = the child's own VmHWM), threads pinned the same for all; sides alternate
in blocks (A B C D A B C D ...) so that drift on a shared machine hits all alike; medians are reported.

    .venv/bin/python bench/train_throughput.py                   # about 5 minutes on 2 cores
    .venv/bin/python bench/train_throughput.py --steps 10 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THROUGHPUT_SIDES = ("trainer", "trainer-grouped", "ours", "ours-grouped", "ours-packed")
MEMORY_SIDES = ("lora-gc", "full")

SUBJECTS = ["the capital of France", "two plus two", "the boiling point of water", "the speed of light",
            "photosynthesis", "the French revolution", "prime numbers", "the moon landing", "gravity"]
CLAIMS = ["is much simpler than people say", "was discovered in 1850", "equals five", "is a myth"]
FILLER = ("the measurements show that this depends on several factors and it is worth checking a reliable "
          "source because the details matter here and a careful answer explains each step clearly").split()


def records(n: int, seed: int) -> list[dict]:
    """Conversations of 1-3 turns with answers of 5-100 words: lengths spread over ~25-500 tokens."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        messages = []
        for _ in range(rng.choice([1, 1, 2, 3])):
            subject = rng.choice(SUBJECTS)
            messages.append({"role": "user", "content": f"I think {subject} {rng.choice(CLAIMS)}. Am I right?"})
            # Log-uniform answer lengths: many short answers, a long tail, as in chat data.
            words = int(5 * 20 ** rng.random())
            messages.append({"role": "assistant", "content": " ".join(rng.choices(FILLER, k=words))})
        out.append({"id": f"bench-{i}", "messages": messages, "source": "bench"})
    return out


def overrides(args, data_path: Path, packing: bool, side: str = "ours") -> list[str]:
    s = [
        "data.sources=[{kind: file, path: " + str(data_path) + ", name: bench}]", "data.val_fraction=0",
        "tokenize.vocab_size=2048", "tokenize.max_seq_len=256", f"tokenize.packing={str(packing).lower()}",
        f"model.scratch.hidden_size={args.hidden}", f"model.scratch.num_layers={args.layers}",
        f"model.scratch.num_heads={args.hidden // 64}", f"model.scratch.num_kv_heads={args.hidden // 192}",
        f"model.scratch.intermediate_size={args.hidden * 8 // 3}", "lora.r=16", "lora.alpha=32", "lora.dropout=0.0",
        "train.device=cpu", "model.dtype=fp32", "train.global_batch_size=16", "train.micro_batch_size=4",
        # Peak memory is reached by the second step (optimizer state exists after the first).
        f"train.max_steps={args.steps if side in THROUGHPUT_SIDES else 3}",
        "train.warmup_steps=2", "train.lr=1e-3", "train.eval_every=100000", "checkpoint.every_steps=100000", "adaptive.enabled=false", "adaptive.probe_longest_first=false",
    ]
    if side == "ours-grouped":
        s.append("train.group_by_length=true")
    if side == "lora-gc":
        s.append("model.gradient_checkpointing=true")
    if side == "full":
        s.append("model.method=full")
    return s


def vm_hwm_mb() -> float:
    # VmHWM is the peak RSS of this process's own address space; getrusage's ru_maxrss is not (Linux
    # keeps the parent's peak across fork + exec).
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) / 1024


# ------------------------------------------------------------------------------------------ children


def child(side: str, run_dir: Path, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import peft  # noqa: F401
    import transformers  # noqa: F401  (imported before the baseline reading, like leantune's loop does)

    from leantune.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    baseline = vm_hwm_mb()
    step_ends: dict[int, float] = {}
    if side.startswith("trainer"):
        tokens_per_step = trainer_child(cfg, run_dir, side, step_ends)
    else:
        from leantune.metrics import read_metrics
        from leantune.testing import loop_hooks
        from leantune.training.loop import train

        def clock(step):  # called once per step, after its metrics line: every overhead is inside
            step_ends[step] = time.perf_counter()
            return None

        with loop_hooks(headroom=clock):
            train(cfg, run_dir)
        tokens_per_step = [m["tokens"] for m in read_metrics(run_dir, "step")]
    last = max(step_ends)
    seconds = step_ends[last] - step_ends[1]
    tokens = sum(tokens_per_step[1:last])
    return {"side": side, "steps": last, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "peak_rss_mb": vm_hwm_mb(), "baseline_rss_mb": baseline}


def trainer_child(cfg, run_dir: Path, side: str, step_ends: dict[int, float]) -> list[int]:
    import datasets
    import torch
    from transformers import (
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from leantune.modeling import build_model
    from leantune.shards import TokenShards

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokens" / "tokenizer")
    shards = TokenShards(run_dir / "tokens" / "train")
    rows = [shards[i] for i in range(len(shards))]
    dataset = datasets.Dataset.from_dict({"input_ids": [r["input_ids"].tolist() for r in rows],
                                          "labels": [r["labels"].tolist() for r in rows],
                                          "length": [len(r["input_ids"]) for r in rows]})
    model = build_model(cfg, tokenizer, torch.device("cpu"))
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    micro_tokens: list[int] = []

    def counting_collate(features):
        batch = collate([{k: f[k] for k in ("input_ids", "labels")} for f in features])
        micro_tokens.append(int(batch["attention_mask"].sum()))  # non-padding tokens
        return batch

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_ends[state.global_step] = time.perf_counter()

    t = cfg.train
    args = TrainingArguments(
        output_dir=str(run_dir / "trainer"), use_cpu=True, max_steps=t.max_steps,
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.global_batch_size // t.micro_batch_size,
        learning_rate=t.lr, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps,
        lr_scheduler_type="cosine", max_grad_norm=t.max_grad_norm, optim="adamw_torch", seed=t.seed,
        train_sampling_strategy="group_by_length" if side == "trainer-grouped" else "random",
        save_strategy="no", eval_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False,
    )
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=counting_collate,
            callbacks=[StepClock()]).train()
    per_step = t.global_batch_size // t.micro_batch_size
    return [sum(micro_tokens[i:i + per_step]) for i in range(0, len(micro_tokens), per_step)]


# -------------------------------------------------------------------------------------------- parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per throughput measurement")
    parser.add_argument("--repeats", type=int, default=3, help="blocks; each runs every throughput side once")
    # One thread: on a shared machine OpenMP's spinning threads make multi-threaded timings erratic.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in every child")
    parser.add_argument("--hidden", type=int, default=384, help="scratch model width (multiple of 192)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--records", type=int, default=600)
    parser.add_argument("--child", choices=[*THROUGHPUT_SIDES, *MEMORY_SIDES], help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.run_dir, args.threads)))
        return

    from leantune.config import load_config
    from leantune.data.prepare import prepare
    from leantune.modeling import build_model, describe_model
    from leantune.rundir import write_config
    from leantune.shards import TokenShards, padding_estimate
    from leantune.tokenization import tokenize
    from leantune.validation import validate_records

    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "RAYON_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    with tempfile.TemporaryDirectory(prefix="leantune-train-bench-") as tmp:
        tmp = Path(tmp)
        data_path = tmp / "records.jsonl"
        data_path.write_text("".join(json.dumps(r) + "\n" for r in records(args.records, 0)))
        prepared: dict[bool, Path] = {}
        for packing in (False, True):
            cfg = load_config(overrides=overrides(args, data_path, packing))
            run_dir = prepared[packing] = tmp / ("packed" if packing else "unpacked")
            run_dir.mkdir()
            prepare(cfg, run_dir / "data")
            validate_records(cfg, run_dir / "data")
            stats = tokenize(cfg, run_dir / "data", run_dir / "tokens")
            t = stats["train"]
            padding = padding_estimate(TokenShards(run_dir / "tokens" / "train"), cfg.train)
            print(f"{'packed  ' if packing else 'unpacked'}: {t['counts']['sequences']} sequences, "
                  f"{t['tokens']['total']} tokens, padding {padding:.1%} "
                  f"(at micro-batch 4, in leantune's order)", flush=True)
        import torch
        from transformers import AutoTokenizer

        model = build_model(load_config(overrides=overrides(args, data_path, True)),
                            AutoTokenizer.from_pretrained(prepared[True] / "tokens" / "tokenizer"), torch.device("cpu"))
        facts = describe_model(model)
        del model
        print(f"model: {facts['total_params'] / 1e6:.1f}M parameters, {facts['trainable_params'] / 1e6:.2f}M "
              f"trainable (LoRA); {args.steps} steps of 16 sequences; {args.threads} thread(s)\n", flush=True)

        results: dict[str, list[dict]] = {side: [] for side in (*THROUGHPUT_SIDES, *MEMORY_SIDES)}
        for block in range(args.repeats):
            # Memory is one number per side; measured in the first block only, to keep the run short.
            sides = THROUGHPUT_SIDES + (MEMORY_SIDES if block == 0 else ())
            for side in sides:
                packing = side not in ("trainer", "trainer-grouped", "ours", "ours-grouped")
                run_dir = tmp / f"run-{block}-{side}"
                shutil.copytree(prepared[packing], run_dir)
                cfg = load_config(overrides=overrides(args, data_path, packing, side))
                write_config(run_dir, cfg)
                out = subprocess.run([sys.executable, __file__, "--child", side, "--run-dir", str(run_dir),
                                      "--threads", threads], env=env, capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{side} failed:\n{out.stderr[-4000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                results[side].append(r)
                shutil.rmtree(run_dir)
                print(f"block {block} {side:15s} {r['tokens_per_s']:8.0f} tokens/s ({r['tokens']} tokens in "
                      f"{r['seconds']:.1f} s)  peak RSS {r['peak_rss_mb']:6.0f} MB "
                      f"(after imports {r['baseline_rss_mb']:.0f})", flush=True)

    def median(side, key):
        return statistics.median(r[key] for r in results[side])

    speed = {side: median(side, "tokens_per_s") for side in THROUGHPUT_SIDES}
    print(f"\nmedians over {args.repeats} blocks, non-padding tokens/s:")
    for side in THROUGHPUT_SIDES:
        print(f"  {side:15s} {speed[side]:8.0f}")
    print("tokens/s ratios, median of the per-block ratios (each block's sides ran back to back):")
    for a, b in (("ours", "trainer"), ("ours", "trainer-grouped"), ("ours-grouped", "trainer-grouped"),
                 ("ours-grouped", "ours"), ("ours-packed", "trainer"),
                 ("ours-packed", "trainer-grouped"), ("ours-packed", "ours")):
        ratios = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(results[a], results[b], strict=True)]
        print(f"  {a + ' / ' + b:32s} {statistics.median(ratios):.2f}  (blocks: "
              f"{', '.join(f'{r:.2f}' for r in ratios)})")
    print("memory:")
    print(f"  peak RSS ours / trainer          {median('ours', 'peak_rss_mb') / median('trainer', 'peak_rss_mb'):.2f}")

    def growth(side):  # peak minus the RSS after imports: what training itself added
        return median(side, "peak_rss_mb") - median(side, "baseline_rss_mb")

    print(f"  RSS growth ours / trainer        {growth('ours') / growth('trainer'):.2f} "
          f"({growth('ours'):.0f} vs {growth('trainer'):.0f} MB)")
    print(f"  peak RSS LoRA+GC / full fp32     {median('lora-gc', 'peak_rss_mb') / median('full', 'peak_rss_mb'):.2f} "
          f"({median('lora-gc', 'peak_rss_mb'):.0f} vs {median('full', 'peak_rss_mb'):.0f} MB)")
    print(f"  RSS growth LoRA+GC / full fp32   {growth('lora-gc') / growth('full'):.2f} "
          f"({growth('lora-gc'):.0f} vs {growth('full'):.0f} MB)")


if __name__ == "__main__":
    main()
