"""The training loop: split invariance, metrics, validation and best checkpoint, PEFT output, stop/resume, CLI."""

import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from run_helpers import SMOKE, adapter, assert_same_weights, new_run
from transformers import AutoModelForCausalLM, AutoTokenizer

from leantune.modeling import build_base_model, build_model
from leantune.shards import TokenShards, collate
from leantune.testing import loop_hooks
from leantune.tokenization import tokenize
from leantune.training.checkpoint import CheckpointManager, run_fingerprints
from leantune.training.loop import epoch_order, main, next_global_batch, train
from leantune.training.optim import build_optimizer, build_scheduler, lr_multiplier

CPU = torch.device("cpu")
FAST = ["train.eval_every=1000", "checkpoint.every_steps=1000"]


def metric_lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def steps_of(run_dir):
    return [m for m in metric_lines(run_dir) if "event" not in m]


@pytest.mark.parametrize("packing", [True, False])
def test_the_update_does_not_depend_on_the_micro_batch_split(tokenized_run, tmp_path, packing):
    weights, losses = {}, {}
    for micro in (1, 2, 8):
        cfg, run_dir = new_run(tokenized_run, tmp_path, *FAST, "train.max_steps=3", f"train.micro_batch_size={micro}",
                               f"tokenize.packing={str(packing).lower()}", name=f"mb{micro}")
        if not packing:
            tokenize(cfg, run_dir / "data", run_dir / "tokens")
        train(cfg, run_dir)
        weights[micro], losses[micro] = adapter(run_dir), [m["loss"] for m in steps_of(run_dir)]
        assert {m["accumulation_steps"] for m in steps_of(run_dir)} == {8 // micro}
    # LoRA B starts at zero: the weights moved, so equality below is not trivial.
    assert max(float(v.abs().max()) for k, v in weights[8].items() if "lora_B" in k) > 1e-3
    for micro in (2, 8):
        assert_same_weights(weights[micro], weights[1])
        np.testing.assert_allclose(losses[micro], losses[1], rtol=1e-5)


def test_metrics_validation_and_best_checkpoint(tokenized_run, tmp_path):
    cfg, run_dir = new_run(tokenized_run, tmp_path, "train.max_steps=5", "train.eval_every=2",
                           "checkpoint.every_steps=1000", "checkpoint.keep_last=1")
    summary = train(cfg, run_dir)
    lines = steps_of(run_dir)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5]
    shards = TokenShards(run_dir / "tokens" / "train")
    batches, cursor = [], (0, 0)
    for _ in range(5):
        indices, *cursor = next_global_batch(lambda e: epoch_order(shards, e, 8, cfg.train.seed), *cursor, 8)
        batches.append(indices)
    for m, batch in zip(lines, batches, strict=True):
        assert m["tokens"] == int(shards.lengths[batch].sum())  # non-padding tokens of the global batch
        assert m["lr"] == pytest.approx(1e-2 * lr_multiplier(m["step"] - 1, 2, 5, "cosine"))
        assert (m["micro_batch_size"], m["accumulation_steps"]) == (4, 2)
        assert m["tokens_per_s"] > 0 and m["grad_norm"] > 0 and m["peak_memory_mb"] > 0
    assert lines[-1]["epoch"] == pytest.approx(40 / len(shards))
    assert [m["step"] for m in lines if "val_loss" in m] == [2, 4, 5]

    # The first step's loss is the mean over every target token of the global batch: recompute it
    # from the model's own per-sequence mean losses, weighted by their target counts.
    tok = AutoTokenizer.from_pretrained(run_dir / "tokens" / "tokenizer")
    model = build_model(cfg, tok, CPU)
    total = weighted = 0.0
    with torch.no_grad():
        for i in batches[0]:
            batch = collate([shards[i]], shards.pad_id)
            n = int((batch["labels"][0, 1:] != -100).sum())
            weighted += float(model(**batch).loss) * n
            total += n
    assert lines[0]["loss"] == pytest.approx(weighted / total, rel=1e-5)

    # Best validation loss: tracked in the summary and kept on disk as the best checkpoint.
    val = {m["step"]: m["val_loss"] for m in lines if "val_loss" in m}
    best_step = min(val, key=val.get)
    assert (summary["best_step"], summary["best_val_loss"]) == (best_step, val[best_step])
    best = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    assert (best["step"], best["metric"]) == (best_step, val[best_step])
    assert (run_dir / "checkpoints" / f"step-{best_step}").is_dir()
    assert (run_dir / "checkpoints" / "step-5").is_dir()  # the final state
    assert json.loads((run_dir / "training.json").read_text()) == summary
    assert summary["steps"] == 5 and summary["completed"] and summary["tokens"] == sum(m["tokens"] for m in lines)


def test_adapter_loads_with_peft_and_merged_export_matches(tokenized_run, tmp_path):
    from peft import PeftModel

    cfg, run_dir = new_run(tokenized_run, tmp_path, *FAST, "train.max_steps=3", "train.export_merged=true")
    summary = train(cfg, run_dir)
    assert summary["adapter"] == str(run_dir / "adapter") and summary["merged"] == str(run_dir / "merged")
    tok = AutoTokenizer.from_pretrained(run_dir / "adapter")  # the tokenizer travels with the adapter

    # The trained model, as the final checkpoint holds it.
    trained = build_model(cfg, tok, CPU)
    opt = build_optimizer(cfg, trained)
    ckpt = CheckpointManager(cfg, run_dir, run_fingerprints(cfg, run_dir))
    ckpt.load(ckpt.latest(), trained, opt, build_scheduler(cfg, opt, 3))
    trained.eval()

    shards = TokenShards(run_dir / "tokens" / "val")
    batch = collate([shards[i] for i in range(4)], shards.pad_id)
    del batch["labels"]
    with torch.no_grad():
        expected = trained(**batch).logits
        base = build_base_model(cfg, tok, CPU)
        plain = base(**batch).logits
        loaded = PeftModel.from_pretrained(base, run_dir / "adapter").eval()(**batch).logits
        merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged").eval()(**batch).logits
    torch.testing.assert_close(loaded, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-5)
    assert float((plain - expected).abs().max()) > 1e-3  # the adapter changes the model


def test_signal_stops_cleanly_and_resume_continues_bitwise(tokenized_run, tmp_path):
    cfg, straight = new_run(tokenized_run, tmp_path, *FAST, "train.max_steps=4", name="straight")
    train(cfg, straight)

    cfg, run_dir = new_run(tokenized_run, tmp_path, *FAST, "train.max_steps=4", name="stopped")

    def sigterm_after_step_2(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return None

    handler = signal.getsignal(signal.SIGTERM)
    with loop_hooks(headroom=sigterm_after_step_2):
        stopped = train(cfg, run_dir)
    assert not stopped["completed"] and stopped["steps"] == 2 and stopped["adapter"] is None
    assert not (run_dir / "adapter").exists()
    assert json.loads((run_dir / "checkpoints" / "step-2" / "manifest.json").read_text())["reason"] == "signal"
    assert signal.getsignal(signal.SIGTERM) is handler  # restored

    # A later call continues from the checkpoint by itself (resume is automatic when checkpoints exist).
    resumed = train(cfg, run_dir)
    assert resumed["completed"] and resumed["resumed_from_step"] == 2 and resumed["steps"] == 4
    a, b = adapter(run_dir), adapter(straight)
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert [m["step"] for m in steps_of(run_dir)] == [1, 2, 3, 4]
    assert [m["loss"] for m in steps_of(run_dir)] == [m["loss"] for m in steps_of(straight)]


def test_cli_trains_a_run_directory_and_reports_user_errors(tokenized_run, tmp_path, capsys):
    _, run_dir = new_run(tokenized_run, tmp_path, *FAST, "train.max_steps=2")
    assert main([str(run_dir)]) == 0
    assert "training finished after step 2" in capsys.readouterr().out
    summary = json.loads((run_dir / "training.json").read_text())
    assert summary["steps"] == 2 and (run_dir / "adapter" / "adapter_config.json").is_file()

    shutil.rmtree(run_dir / "tokens" / "train")
    assert main([str(run_dir), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "tokens/train: no token shards; run the tokenize stage" in err and "Traceback" not in err


def test_data_order_covers_each_epoch_once_and_runs_on_into_the_next(tokenized_run):
    shards = TokenShards(tokenized_run / "tokens" / "train")
    n = len(shards)
    first, second = epoch_order(shards, 0, 8, 0), epoch_order(shards, 1, 8, 0)
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(n))
    assert first.tolist() != second.tolist() and epoch_order(shards, 0, 8, 1).tolist() != first.tolist()
    assert epoch_order(shards, 0, 8, 0).tolist() == first.tolist()

    def order_of(epoch):
        return epoch_order(shards, epoch, 8, 0)

    seen, cursor = [], (0, 0)
    for _ in range(n // 8 + 1):
        indices, *cursor = next_global_batch(order_of, *cursor, 8)
        assert len(indices) == 8
        seen += indices
    assert seen[:n] == first.tolist() and seen[n:] == second[:len(seen) - n].tolist()
    assert cursor == [1, len(seen) - n]


class Unpacked:  # the two things epoch_order reads from TokenShards
    meta = {"packing": False}
    lengths = np.random.default_rng(0).integers(10, 500, size=1003)

    def __len__(self):
        return len(self.lengths)

    def training_batches(self, global_batch_size, seed, group_by_length):
        return TokenShards.training_batches(self, global_batch_size, seed, group_by_length)


def padded(batches, micro_batch_size=4):
    return sum(b[s:s + micro_batch_size].max() * len(b[s:s + micro_batch_size])
               for b in batches for s in range(0, len(b), micro_batch_size))


def test_unpacked_order_draws_global_batches_at_random_and_sorts_within_them():
    shards = Unpacked()
    order = epoch_order(shards, 0, 16, 0)
    assert sorted(order.tolist()) == list(range(1003))
    batches = [shards.lengths[order[i:i + 16]] for i in range(0, 1003, 16)]
    assert len(batches[-1]) == 1003 % 16  # the short batch comes last
    assert all((np.diff(b) <= 0).all() for b in batches)  # longest first within each global batch
    # Each global batch is a uniform draw, not a length band: it spans most of the range of lengths,
    # and the batches' mean lengths vary as little as random draws of 16 do.
    assert np.median([np.ptp(b) for b in batches[:-1]]) > 0.7 * np.ptp(shards.lengths)
    assert np.std([b.mean() for b in batches[:-1]]) < 1.5 * np.std(shards.lengths) / 4
    # Sorted within: micro-batches of 4 need far less padding than the same batches in drawn order.
    rng = np.random.default_rng(1)
    assert padded(batches) < 0.85 * padded([rng.permutation(b) for b in batches])


def test_group_by_length_groups_whole_global_batches():
    shards = Unpacked()
    order = epoch_order(shards, 0, 16, 0, group_by_length=True)
    assert sorted(order.tolist()) == list(range(1003))
    batches = [shards.lengths[order[i:i + 16]] for i in range(0, 1003, 16)]
    assert len(batches[-1]) == 1003 % 16  # the short batch comes last
    spread = np.mean([np.ptp(b) for b in batches[:-1]])
    assert spread < 0.2 * np.ptp(shards.lengths)  # grouped: each batch spans a narrow band of lengths
    mixed = [shards.lengths[o] for o in np.split(epoch_order(shards, 0, 16, 0), range(16, 1003, 16))]
    assert padded(batches) < 0.9 * padded(mixed)  # grouping pads less than sorting within (0.86x here)


FLOW_RUN = ["data.synthetic.num_records=120", "data.val_fraction=0.1", "tokenize.vocab_size=400",
            "tokenize.max_seq_len=128", "model.scratch.hidden_size=32", "model.scratch.intermediate_size=64",
            "train.global_batch_size=8", "train.micro_batch_size=4", "train.max_steps=2"]


@pytest.mark.slow
@pytest.mark.flow
def test_flow_trains_publishes_a_summary_and_resumes(prefect_server, tmp_path, capsys):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    from flows.finetune import main as flow_main

    sets = ["--config", str(SMOKE), *(arg for setting in [*FLOW_RUN, f"run.output_dir={tmp_path}"]
                                      for arg in ("--set", setting))]
    assert flow_main([*sets, "--run-name", "r"]) == 0
    run_dir = tmp_path / "r"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    first = json.loads((run_dir / "training.json").read_text())
    assert first["steps"] == 2 and first["resumed_from_step"] is None
    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["training-summary"])),
            sort=ArtifactSort.CREATED_DESC, limit=1)
    assert "| optimizer steps | 2 |" in artifact.data
    assert f"| final training loss | {first['final_loss']:.4f} |" in artifact.data

    # --resume continues the run in place: no data stage runs again, training starts from its checkpoint.
    # (As if stopped after its last checkpoint: no training summary, no report yet.)
    tokens_written = (run_dir / "tokens" / "train" / "index.json").stat().st_mtime_ns
    (run_dir / "training.json").unlink()
    (run_dir / "report.md").unlink()
    capsys.readouterr()
    assert flow_main(["--resume", "r", "--set", f"run.output_dir={tmp_path}"]) == 0
    assert f"outputs in {run_dir}" in capsys.readouterr().out
    assert (run_dir / "tokens" / "train" / "index.json").stat().st_mtime_ns == tokens_written
    again = json.loads((run_dir / "training.json").read_text())
    assert again["resumed_from_step"] == 2 and again["steps"] == 2
    completed_rows = (run_dir / "attempts.jsonl").read_text().count('"completed"')
    # Attempt numbers go on across resumes (attempts/attempt-N/ of two commands never collide).
    assert [json.loads(line)["attempt"] for line in (run_dir / "attempts.jsonl").read_text().splitlines()] == [1, 2]

    # A run stopped after training (no report) resumes with what is left: no training, no new attempt row.
    (run_dir / "report.md").unlink()
    assert flow_main(["--resume", "r", "--set", f"run.output_dir={tmp_path}"]) == 0
    assert (run_dir / "report.md").is_file()
    assert json.loads((run_dir / "training.json").read_text()) == again
    assert (run_dir / "attempts.jsonl").read_text().count('"completed"') == completed_rows
    # A finished run is not run again: the script says so.
    capsys.readouterr()
    assert flow_main(["--resume", "r", "--set", f"run.output_dir={tmp_path}"]) == 0
    assert "run r has already finished" in capsys.readouterr().out

    assert flow_main(["--resume", "nope", "--set", f"run.output_dir={tmp_path}"]) == 2
    assert "nope has no config.yaml" in capsys.readouterr().err


def test_adapter_and_checkpoint_hold_lora_tensors_only_with_lora_on_the_embeddings(tokenized_run, tmp_path):
    # configs/default.yaml targets embed_tokens and lm_head too; peft would then add the whole base matrices.
    from safetensors.torch import load_file

    from leantune.training.loop import train

    cfg, run_dir = new_run(tokenized_run, tmp_path, *FAST, "train.max_steps=1", "monitor.enabled=false",
                           "lora.target_modules=[q_proj,v_proj,embed_tokens,lm_head]")
    train(cfg, run_dir)
    saved = adapter(run_dir)
    assert any("embed_tokens.lora_embedding_A" in k for k in saved) and any("lm_head.lora_A" in k for k in saved)
    assert all("lora_" in k for k in saved), [k for k in saved if "lora_" not in k]
    checkpoint = load_file(run_dir / "checkpoints" / "step-1" / "adapter.safetensors")
    assert len(checkpoint) == len(saved) and all("lora_" in k for k in checkpoint)
