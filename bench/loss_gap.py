"""Controlled runs: leantune's training loop against transformers.Trainer + peft, one difference at a time.

    .venv/bin/python bench/loss_gap.py [--model tiny|smollm2] [--steps 8] [--variants a,b,...]
                                       [--compare-init] [--set key=value] [--out runs.json]

A variant is a name of VARIANTS below, optionally followed by config overrides of its own:
`leantune-dropout@train.seed=3` (train.seed sets the init and the order, and the Trainer's seed).

Both start from the same model object's weights (leantune's `build_model`: base and LoRA init from
train.seed) and see the same global batches in the same order (leantune's `epoch_order`, fed to the
Trainer through a sequential sampler), so with dropout 0 they should follow the same trajectory.
Each variant changes one thing from that baseline. Per run: the loss and lr of every step, and the
final loss (mean cross-entropy per target token over the training sequences, eval mode).
Findings: bench/loss_gap.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TINY = ["data.synthetic.num_records=60", "data.val_fraction=0.0", "tokenize.vocab_size=1000",
        "model.name_or_path=scratch", "model.scratch.hidden_size=32", "model.scratch.intermediate_size=64",
        "model.scratch.num_layers=2", "model.scratch.num_heads=4", "model.scratch.num_kv_heads=2", "train.lr=1e-2"]
COMMON = ["model.method=lora", "model.dtype=fp32", "train.device=cpu", "lora.r=16", "lora.alpha=32",
          "lora.dropout=0.0", "lora.target_modules=all-linear", "train.warmup_steps=0", "train.schedule=constant",
          "train.global_batch_size=4", "train.micro_batch_size=2", "tokenize.packing=false",
          "tokenize.max_seq_len=256", "monitor.enabled=false", "adaptive.probe_longest_first=false",
          "train.eval_every=100000", "checkpoint.every_steps=100000"]


def prepare(work: Path, model: str, steps: int, extra: list[str]) -> Path:
    """The pristine run directory: tiny, the scratch model on synthetic records; smollm2, the data of
    bench/vs_trainers.py (steps x 4 sequences of mixed lengths) and SmolLM2-135M-Instruct."""
    from leantune.config import dump_config, load_config
    from leantune.data.prepare import prepare as prepare_data
    from leantune.tokenization import tokenize
    from leantune.validation import validate_records

    run = work / "pristine"
    if model == "smollm2":
        from vs_trainers import prepare as prepare_bench

        prepare_bench(work, steps)
        cfg = load_config(run / "config.yaml", overrides=[*COMMON, *extra])
        (run / "config.yaml").write_text(dump_config(cfg))
        return run
    cfg = load_config(overrides=[*COMMON, *TINY, *extra, f"train.max_steps={steps}", f"run.output_dir={work}",
                                 "run.name=pristine"])
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(cfg))
    prepare_data(cfg, run / "data")
    validate_records(cfg, run / "data")
    tokenize(cfg, run / "data", run / "tokens")
    return run


def final_loss(model, run: Path) -> float:
    """vs_trainers' final loss (mean cross-entropy per target token over the run's training sequences), the
    model's training mode kept."""
    from vs_trainers import mean_loss

    was_training = model.training
    loss = mean_loss(model, run / "tokens" / "train")
    model.train(was_training)
    return loss


def init_difference(pristine: Path) -> float:
    """Largest difference between the initial model of leantune's loop (base and LoRA, train.seed 0) and
    the one bench/vs_trainers.py builds for the Trainer runners (from_pretrained + get_peft_model at torch
    seed 0)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from leantune.config import load_config
    from leantune.gguf import model_source
    from leantune.modeling import build_model
    from leantune.training.loop import _seed_everything

    cfg = load_config(pristine / "config.yaml", overrides=["train.seed=0"])
    tokenizer = AutoTokenizer.from_pretrained(pristine / "tokens" / "tokenizer")
    _seed_everything(0)
    ours = build_model(cfg, tokenizer, torch.device("cpu")).state_dict()
    torch.manual_seed(0)
    theirs = AutoModelForCausalLM.from_pretrained(model_source(cfg.model), dtype=torch.float32,
                                                  attn_implementation="sdpa")
    theirs = get_peft_model(theirs, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                               target_modules="all-linear", task_type="CAUSAL_LM")).state_dict()
    if ours.keys() != theirs.keys():
        raise SystemExit("the two models have different parameters")
    return max(float((ours[k] - theirs[k]).abs().max()) for k in ours)


def leantune_run(pristine: Path, name: str, overrides: list[str]) -> dict:
    from peft import PeftModel
    from transformers import AutoTokenizer

    from leantune.config import dump_config, load_config
    from leantune.modeling import build_base_model
    from leantune.training.loop import train

    run = pristine.parent / name
    shutil.copytree(pristine, run)
    cfg = load_config(run / "config.yaml", overrides=overrides)
    (run / "config.yaml").write_text(dump_config(cfg))
    train(cfg, run)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    lines = [x for x in lines if "event" not in x]
    import torch

    tokenizer = AutoTokenizer.from_pretrained(run / "tokens" / "tokenizer")
    model = PeftModel.from_pretrained(build_base_model(cfg, tokenizer, torch.device("cpu")), run / "adapter")
    return {"loss": [x["loss"] for x in lines], "lr": [x["lr"] for x in lines], "final_loss": final_loss(model, pristine)}


def unfuse(model) -> None:
    """peft's and transformers' own forwards again (fused.py sets an instance attribute `forward`)."""
    for module in model.modules():
        if "forward" in vars(module):
            del module.forward


def trainer_run(pristine: Path, name: str, overrides: list[str], *, fused: bool = False,
                order: str = "leantune") -> dict:
    """Trainer on leantune's initial model (peft's forwards unless fused), fed leantune's global batches in
    leantune's order through a sequential sampler (order 'leantune'; 'unsorted': each global batch in index
    order, not longest first) or the Trainer's RandomSampler ('random')."""
    import torch
    from datasets import Dataset
    from transformers import (
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from leantune.config import load_config
    from leantune.modeling import build_model
    from leantune.shards import TokenShards
    from leantune.training.loop import _seed_everything, epoch_order, next_global_batch
    from leantune.training.optim import total_steps

    cfg = load_config(pristine / "config.yaml", overrides=overrides)
    t = cfg.train
    tokenizer = AutoTokenizer.from_pretrained(pristine / "tokens" / "tokenizer")
    _seed_everything(t.seed)
    model = build_model(cfg, tokenizer, torch.device("cpu"))
    if not fused:
        unfuse(model)
    shards = TokenShards(pristine / "tokens" / "train")
    steps = total_steps(cfg, len(shards))
    if order in ("leantune", "unsorted"):
        cursor, indices = (0, 0), []
        for _ in range(steps):
            got, *cursor = next_global_batch(lambda e: epoch_order(shards, e, t.global_batch_size, t.seed,
                                                                   t.group_by_length), *cursor, t.global_batch_size)
            # 'unsorted': the same global batches, each in index order instead of longest first.
            indices += sorted(got) if order == "unsorted" else got
        sampling = "sequential"
    else:
        indices, sampling = list(range(len(shards))), "random"
    data = Dataset.from_list([{"input_ids": shards[i]["input_ids"].tolist(), "labels": shards[i]["labels"].tolist()}
                              for i in indices])
    losses, lrs = [], []

    class Log(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])
                lrs.append(logs.get("learning_rate"))

    args = TrainingArguments(
        output_dir=str(pristine.parent / name), per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.global_batch_size // t.micro_batch_size, max_steps=steps, learning_rate=t.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        optim="adamw_torch", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, seed=t.seed, disable_tqdm=True, train_sampling_strategy=sampling)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[Log()])
    trainer.train()
    unfuse(model)
    return {"loss": losses, "lr": lrs, "final_loss": final_loss(model, pristine)}


VARIANTS = {
    # name: (runner, overrides, trainer keyword arguments)
    "leantune": ("leantune", [], {}),
    "trainer": ("trainer", [], {}),
    "trainer-fused": ("trainer", [], {"fused": True}),
    "trainer-random-order": ("trainer", [], {"order": "random"}),
    "trainer-unsorted-in-batch": ("trainer", [], {"order": "unsorted"}),
    "leantune-dropout": ("leantune", ["lora.dropout=0.05"], {}),
    "trainer-dropout": ("trainer", ["lora.dropout=0.05"], {}),
    "leantune-group-by-length": ("leantune", ["train.group_by_length=true"], {}),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--set", action="append", default=[], help="a config override for every run")
    p.add_argument("--compare-init", action="store_true",
                   help="smollm2: also compare leantune's initial model with bench/vs_trainers.py's Trainer model")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory(prefix="leantune-gap-") as tmp:
        pristine = prepare(Path(tmp), args.model, args.steps, args.set)
        if args.compare_init:
            results["init_max_abs_difference"] = init_difference(pristine)
            print(f"initial weights, leantune vs vs_trainers' Trainer model: max |difference| "
                  f"{results['init_max_abs_difference']:.3g}", flush=True)
        for name in args.variants.split(","):
            # A variant's name, then @key=value config overrides of its own: trainer@train.seed=1
            base, *more = name.split("@")
            runner, overrides, kwargs = VARIANTS[base]
            overrides = [*overrides, *more]
            r = (leantune_run(pristine, name, overrides) if runner == "leantune"
                 else trainer_run(pristine, name, overrides, **kwargs))
            results[name] = r
            print(f"{name:26s} final {r['final_loss']:.6f}  steps " + " ".join(f"{x:.5f}" for x in r["loss"])
                  + f"  lr {sorted(set(r['lr']))}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
