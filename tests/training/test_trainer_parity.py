"""leantune's training loop against transformers.Trainer + peft: from the same initial weights, on the same
global batches, the same losses (bench/loss_gap.md: what the loss gap of bench/vs_trainers.py came from)."""

import json

import numpy as np
import torch
from peft import get_peft_model_state_dict
from run_helpers import adapter, assert_same_weights, new_run
from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

from leantune.modeling import build_model
from leantune.shards import TokenShards
from leantune.tokenization import tokenize
from leantune.training.loop import _seed_everything, epoch_order, next_global_batch, train

STEPS = 4
# Every setting the two must apply alike is on: micro-batches of unequal target counts (the normalisation),
# a cosine decay over the 4 steps (the lr each step gets), weight decay, and a clipping norm (0.3) under
# every step's gradient norm (0.36 to 0.48 here).
SETTINGS = ["tokenize.packing=false", f"train.max_steps={STEPS}", "train.global_batch_size=4",
            "train.micro_batch_size=2", "train.lr=1e-2", "train.warmup_steps=0", "train.schedule=cosine",
            "train.weight_decay=0.1", "train.max_grad_norm=0.3", "lora.dropout=0.0", "lora.r=8", "lora.alpha=16",
            "train.eval_every=1000", "checkpoint.every_steps=1000", "monitor.enabled=false"]


def vary_answer_lengths(data_dir):
    """Every answer repeated 1 to 4 times: the synthetic answers are all 6 tokens long, and micro-batches of
    equal target counts would make a per-micro-batch mean the same as the global batch's per-token mean."""
    path = data_dir / "train.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for i, record in enumerate(records):
        answer = record["messages"][-1]
        answer["content"] = " ".join([answer["content"]] * (1 + i % 4))
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def trainer_run(cfg, run_dir, out_dir):
    """transformers.Trainer on leantune's initial model with peft's own forwards (not fused.py's), fed
    leantune's global batches in leantune's order; returns the loss and the gradient norm (before clipping)
    of each step, and the adapter weights."""
    t = cfg.train
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokens" / "tokenizer")
    _seed_everything(t.seed)  # as the loop does before it builds the model: the same base and LoRA init
    model = build_model(cfg, tokenizer, torch.device("cpu"))
    for module in model.modules():  # fused.py's forwards are instance attributes: back to peft's and transformers'
        vars(module).pop("forward", None)
    shards = TokenShards(run_dir / "tokens" / "train")
    cursor, order = (0, 0), []
    for _ in range(STEPS):
        indices, *cursor = next_global_batch(lambda e: epoch_order(shards, e, t.global_batch_size, t.seed),
                                             *cursor, t.global_batch_size)
        order += indices
    data = [{"input_ids": shards[i]["input_ids"].tolist(), "labels": shards[i]["labels"].tolist()} for i in order]
    logged = []

    class Log(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in (logs or {}):
                logged.append((logs["loss"], logs["grad_norm"]))

    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.global_batch_size // t.micro_batch_size, max_steps=STEPS, learning_rate=t.lr,
        lr_scheduler_type=t.schedule, warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, optim="adamw_torch", logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, dataloader_num_workers=0, seed=t.seed, disable_tqdm=True, train_sampling_strategy="sequential")
    Trainer(model=model, args=args, train_dataset=data, callbacks=[Log()],
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)).train()
    return [x[0] for x in logged], [x[1] for x in logged], get_peft_model_state_dict(model)


def test_equal_weights_and_batches_give_trainers_losses(tokenized_run, tmp_path):
    cfg, run_dir = new_run(tokenized_run, tmp_path, *SETTINGS)
    vary_answer_lengths(run_dir / "data")
    tokenize(cfg, run_dir / "data", run_dir / "tokens")
    train(cfg, run_dir)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ours = [m["loss"] for m in lines if "event" not in m]
    our_norms = [m["grad_norm"] for m in lines if "event" not in m]
    theirs, their_norms, trainer_weights = trainer_run(cfg, run_dir, tmp_path / "trainer")

    assert len(ours) == len(theirs) == STEPS
    # The weights moved enough for the losses to tell a different update apart.
    assert ours[0] - ours[-1] > 0.05
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
    # Adam's steps hardly depend on the gradient's scale and only a little on how micro-batches are weighted;
    # the gradient norm does, so a different loss normalisation shows here at once. Above the clipping norm
    # at every step, so clipping is applied at every step.
    np.testing.assert_allclose(our_norms, their_norms, rtol=1e-4)
    assert min(our_norms) > cfg.train.max_grad_norm
    # Adam divides each update by the root of its squared gradients, so float-level differences in a small
    # gradient grow in the weights: 1.8e-4 for one lora_B on this project's machine on 2026-12-08, where the
    # code that stayed under 1e-4 in CI the day before gives it too (another CPU's kernels, or versions).
    assert_same_weights(adapter(run_dir), trainer_weights, rel=1e-3)
