"""Preference objectives over pairs (train.objective dpo or simpo): per-sequence log-probabilities from
the target-only chunked head, DPO's and SimPO's losses, and their metrics.

A training sequence of a pair shard is one pair (leantune/data/preference.py): prompt, chosen answer,
rejected answer. `pair_rows` turns a micro-batch of m pairs into 2m rows, the m prompt+chosen rows
then the m prompt+rejected rows, which run as one padded batch (one forward for both answers). The
batch sizes count pairs, so a pair is never split across micro-batches and the adaptive micro-batch
halves in pairs.

log pi(y|x) of a row is the sum over its answer's target tokens of log softmax(head(h_t))[y_t+1]
(`sequence_logps`). As in loss.py the decoder runs alone and the head only over the target rows, in
chunks of at most CHUNK_LOGITS logits; a chunk's log-probabilities are wrapped in non-reentrant
activation checkpointing, so no chunk's logits are kept for backward: backward recomputes them one
chunk at a time (one more head matmul; loss.py's gradient-in-forward needs a loss that is a plain sum
of token terms, and these losses are not). The head's dropout draws are restored for the recompute.

DPO (Rafailov et al. 2023), sigmoid loss per pair:
    margin = dpo_beta x ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r)));  loss = -logsigmoid(margin)
The reference is the same model with its LoRA adapter disabled (peft's `disable_adapter`), run under
no_grad before the policy's forward: no second copy of the weights. Full fine-tuning has no adapter to
turn off: there the reference log-probabilities of every pair are computed once, before the first step,
and stored beside the token shards (`store_reference`). With train.rpo_alpha, RPO's term
rpo_alpha x (-log pi(c) / answer tokens of c) is added per pair.
SimPO (Meng et al. 2024), no reference:
    margin = simpo_beta x (log pi(c) / |c| - log pi(r) / |r|);  loss = -logsigmoid(margin - simpo_gamma)
|c| and |r| are the answers' target tokens.

The step's objective is the sum of the per-pair losses over the global batch divided by its number of
pairs: every micro-batch adds its pairs' losses / pairs of the global batch, so the update is the same
for any split (tests/training/test_preference.py checks 1x8, 2x4, 8x1). The loop sums `STATS` over the step's
micro-batches (and the ranks) and metrics.jsonl reports them as `preference_metrics` names them.
"""

from __future__ import annotations

import functools

import numpy as np

from leantune.training.loss import CHUNK_LOGITS, is_target_loss_module, target_rows

# Per micro-batch sums, added up over a step: loss, pairs ranked right (margin > 0), margin, and the
# policy's log-probabilities of the chosen and of the rejected answers.
STATS = ("loss", "correct", "margin", "logp_chosen", "logp_rejected")


def pair_rows(items: list[dict]) -> list[dict]:
    """The rows of pair sequences (documents: prompt, chosen, rejected): every prompt+chosen row, then
    every prompt+rejected row, each one document with positions from 0."""
    chosen, rejected = [], []
    for it in items:
        p, c, _ = (int(n) for n in it["doc_lengths"])
        for out, keep in ((chosen, np.r_[0:p + c]), (rejected, np.r_[0:p, p + c:len(it["input_ids"])])):
            out.append({"input_ids": it["input_ids"][keep], "labels": it["labels"][keep],
                        "position_ids": np.arange(len(keep)), "doc_lengths": np.array([len(keep)])})
    return chosen + rejected


def target_counts(rows: list[dict]) -> list[int]:
    """Target tokens of each row (a row's first token is never one)."""
    return [int((r["labels"][1:] != -100).sum()) for r in rows]


def sequence_logps(model, inputs: dict, labels, counts: list[int], chunk_logits: int = CHUNK_LOGITS):
    """log pi of each row's targets, summed per row: a float32 tensor of len(counts).

    inputs and labels as for loss.target_cross_entropy (padded rows, or one row of concatenated
    documents under flash-attention); counts: the target tokens of each sequence, in order.
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    if is_target_loss_module(model):  # FSDP's root (fsdp.py): its hooks run around the decoder and the head
        return model(inputs, labels, functools.partial(sequence_logps, counts=counts, chunk_logits=chunk_logits))
    rows, row_targets, _, logits_of, chunk = target_rows(model, inputs, labels, chunk_logits)

    def token_logps(part, part_targets):
        return -F.cross_entropy(logits_of(part).float(), part_targets, reduction="none")

    grad = torch.is_grad_enabled()
    pieces = [checkpoint(token_logps, rows[s:s + chunk], row_targets[s:s + chunk], use_reentrant=False) if grad
              else token_logps(rows[s:s + chunk], row_targets[s:s + chunk]) for s in range(0, len(rows), chunk)]
    per_token = torch.cat(pieces) if pieces else rows.new_zeros(0, dtype=torch.float32)
    if len(per_token) != sum(counts):
        raise AssertionError(f"{len(per_token)} target tokens in the batch, {sum(counts)} counted in its rows")
    segments = torch.repeat_interleave(torch.arange(len(counts), device=per_token.device),
                                       torch.tensor(counts, device=per_token.device))
    return per_token.new_zeros(len(counts)).index_add(0, segments, per_token)


def adapter_disabled(model):
    """The model with its LoRA adapter off (the DPO reference), seen through DDP and FSDP's root (which the
    reference forward still runs through: it gathers the shards)."""
    model = model.model if is_target_loss_module(model) else getattr(model, "module", model)
    if not hasattr(model, "disable_adapter"):
        raise AssertionError("train.objective=dpo needs a peft model (its reference is the adapter turned off)")
    return model.disable_adapter()


class PreferenceObjective:
    """train.objective dpo or simpo for the training loop: the loss of a micro-batch of pairs and the
    validation loss of pair shards."""

    def __init__(self, train_cfg, pad_id: int, mask_dtype, attention: str, device, chunk_logits: int = CHUNK_LOGITS,
                 stored_reference: bool = False):
        self.t, self.pad_id, self.mask_dtype, self.attention, self.device = train_cfg, pad_id, mask_dtype, attention, device
        self.chunk_logits = chunk_logits
        self.stored_reference = stored_reference  # full fine-tuning: the items carry their reference log-probs

    @classmethod
    def for_run(cls, cfg, train_shards, moe, mask_dtype, attention: str, device) -> PreferenceObjective:
        """The objective of a run, once its pair shards and model are known to fit it."""
        from leantune.errors import UserError

        if not train_shards.meta.get("pairs"):
            raise UserError(f"train.objective: {cfg.train.objective} trains on preference pairs, but "
                            f"{train_shards.directory} holds conversations; run the data stages again with this config")
        if moe is not None:
            raise UserError(f"train.objective: {cfg.train.objective} is not supported for Mixture-of-Experts models "
                            "(their router loss counts packed tokens); use train.objective=sft or a dense model")
        return cls(cfg.train, train_shards.pad_id, mask_dtype, attention, device, stored_reference=cfg.model.method == "full")

    def loss(self, model, micro: list[dict], pairs: int):
        """(objective to backward: the micro-batch's summed pair losses / `pairs`, the pairs of the global
        batch; the detached STATS sums of the micro-batch)."""
        import torch
        import torch.nn.functional as F

        from leantune.training.packed import model_inputs

        rows = pair_rows(micro)
        counts = target_counts(rows)
        inputs, labels = model_inputs(rows, self.pad_id, self.mask_dtype, self.attention, self.device)
        m, t = len(micro), self.t
        if t.objective == "dpo" and self.stored_reference:  # full fine-tuning: computed before training
            ref = torch.tensor(np.stack([it["reference_logps"] for it in micro]).T.reshape(-1), device=self.device)
        elif t.objective == "dpo":
            # The reference first, under no_grad: its activations are gone before the policy's are made.
            with torch.no_grad(), adapter_disabled(model):
                ref = sequence_logps(model, inputs, labels, counts, self.chunk_logits)
        logp = sequence_logps(model, inputs, labels, counts, self.chunk_logits)
        n = torch.tensor(counts, device=logp.device, dtype=logp.dtype)
        if t.objective == "dpo":
            margin = t.dpo_beta * ((logp[:m] - ref[:m]) - (logp[m:] - ref[m:]))
            losses = -F.logsigmoid(margin)
        else:
            margin = t.simpo_beta * (logp[:m] / n[:m] - logp[m:] / n[m:])
            losses = -F.logsigmoid(margin - t.simpo_gamma)
        if t.rpo_alpha:
            losses = losses + t.rpo_alpha * (-logp[:m] / n[:m])
        stats = torch.stack([losses.sum(), (margin > 0).sum().to(losses.dtype), margin.sum(), logp[:m].sum(),
                             logp[m:].sum()]).detach()
        return losses.sum() / pairs, stats

    def store_reference(self, model, shards, dist) -> None:
        """Full fine-tuning's DPO reference: the log-probabilities of every pair of `shards` under `model` as it is
        now (before any step), written beside the shards once (shards.REFERENCE_LOGPS: 8 bytes a pair; one
        forward of every pair without gradients, about a third of an epoch's compute) and served with their
        items from then on (a resume reads the file). Data parallel: rank 0 writes it while the others wait; FSDP
        (`model` its root): every rank runs every forward with rank 0, whose results it writes."""
        import torch

        from leantune.shards import REFERENCE_LOGPS
        from leantune.training.packed import model_inputs

        path = shards.directory / REFERENCE_LOGPS
        if (dist.is_main or dist.sharded) and not path.is_file():
            logps = np.zeros((len(shards), 2), dtype=np.float32)
            autocast = torch.autocast(self.device.type, dtype=self.mask_dtype, enabled=self.mask_dtype != torch.float32)
            model.eval()
            with torch.no_grad(), autocast:
                for start in range(0, len(shards), self.t.micro_batch_size):
                    items = [shards[i] for i in range(start, min(start + self.t.micro_batch_size, len(shards)))]
                    rows = pair_rows(items)
                    inputs, labels = model_inputs(rows, self.pad_id, self.mask_dtype, self.attention, self.device)
                    logp = sequence_logps(model, inputs, labels, target_counts(rows), self.chunk_logits)
                    logps[start:start + len(items)] = logp.reshape(2, -1).T.cpu().numpy()
            model.train()
            if dist.is_main:
                partial = path.with_name(".tmp-" + path.name)  # whole or not at all
                np.save(partial, logps)
                partial.replace(path)
        dist.broadcast(None)  # the others wait for rank 0's file
        shards.reference = np.load(path)

    def evaluate(self, model, shards, batch_size: int, autocast, dist=None) -> float:
        """Mean pair loss over every pair of `shards` (the validation split), without dropout;
        dist (data parallel): each rank takes every world_size-th pair and the sums are added up."""
        import torch

        model.eval()
        order = np.argsort(shards.lengths, kind="stable")
        if dist is not None:
            order = order[dist.rank::dist.world_size]
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                with autocast:
                    total += float(self.loss(model, [shards[int(i)] for i in order[start:start + batch_size]], 1)[1][0])
            # FSDP: a rank with fewer batches runs its first pair again as often as it is short, uncounted.
            for _ in range(dist.missing_forwards(len(shards), batch_size) if dist is not None else 0):
                with autocast:
                    self.loss(model, [shards[int(order[0] if len(order) else 0)]], 1)
        model.train()
        count = len(order)
        if dist is not None:
            total, count = dist.sum_all([total, count])
        return total / max(count, 1)


def preference_metrics(stats, pairs: int) -> dict:
    """A step's metrics.jsonl entries from its STATS sums over `pairs` pairs: preference accuracy (share of
    pairs whose margin is positive), the mean reward margin, the mean log-probabilities of the answers."""
    values = dict(zip(STATS, stats.tolist(), strict=True))
    return {"pref_accuracy": values["correct"] / pairs, "reward_margin": values["margin"] / pairs,
            "logp_chosen": values["logp_chosen"] / pairs, "logp_rejected": values["logp_rejected"] / pairs}

