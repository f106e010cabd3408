"""Mixture-of-Experts in training: the router's load-balancing loss and expert-load counts.

transformers 5.x Mixtral, OLMoE, Qwen2-MoE and Qwen3-MoE route through a `*TopKRouter` module per
layer that returns (router_logits, routing weights, top-k expert indices). `RouterTap` hooks those
modules and sees, for every token of a micro-batch, the router's logits (with their gradient) and
the experts it chose.

Load-balancing loss (Switch Transformer, eqs. 4-6, as transformers' `load_balancing_loss_func`
computes it for one sequence): for a sequence s of n_s tokens, over the L MoE layers pooled,
  f_i = (top-k assignments of s's tokens to expert i) / (L n_s)
  P_i = (sum of the router probability of expert i over s's tokens) / (L n_s)
  aux_s = E sum_i f_i P_i                          (1 when routing is uniform and top-1; k when top-k)
transformers pools the whole batch into one f and P, which is not a sum over sequences: a micro-batch
split would change it. leantune's is per sequence and token-weighted over the global batch,
  aux = sum_s n_s aux_s / N,   N = the non-padding tokens of the global batch,
so each micro-batch adds its sequences' share and the update is the same whatever the split (the same
contract as the cross-entropy, which is normalised by the target tokens of the global batch). For a
batch of one sequence it equals transformers' value (tests/training/test_moe.py). The optimised loss is
cross-entropy + train.router_aux_loss_coef x aux; metrics.jsonl keeps `loss` the cross-entropy and
reports `router_aux_loss` (aux) beside it. Padding tokens are routed by the model but count nowhere.

Expert load: per layer, the share of the top-k assignments of the real tokens each expert received,
summed over the steps of a logging interval (`ExpertLoad`); imbalance = max share / mean share (1 is
perfectly even, E means one expert took everything).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MoeGeometry:
    num_experts: int
    top_k: int


def moe_geometry(hf_config) -> MoeGeometry | None:
    """Experts per layer and top-k of a transformers config; None for a dense model."""
    c = getattr(hf_config, "text_config", None) or hf_config
    experts = getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None)
    top_k = getattr(c, "num_experts_per_tok", None)
    if not experts or not top_k:
        return None
    return MoeGeometry(int(experts), int(top_k))


def router_modules(model) -> list:
    """The per-layer top-k routers of a transformers MoE model, in layer order."""
    return [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]


def token_segments(lengths: list[int], width: int | None):
    """Sequence index of every router row of a micro-batch; -1 for padding.

    width: the padded row width (collate's right padding); None: the items are concatenated into one
    row (flash-attention's layout).
    """
    import torch

    seq = torch.arange(len(lengths))
    if width is None:
        return torch.repeat_interleave(seq, torch.tensor(lengths))
    positions = torch.arange(width)[None, :]
    return torch.where(positions < torch.tensor(lengths)[:, None], seq[:, None], -1).flatten()


class RouterTap:
    """Forward hooks on the routers: the load-balancing loss and the expert counts of each micro-batch.

    Only between `start(segments)` and `finish()` does it record, so the recomputation of gradient
    checkpointing in backward, evaluation and the start-up probe are not counted.
    """

    def __init__(self, model, geometry: MoeGeometry):
        self.geometry = geometry
        self.routers = router_modules(model)
        self._records: list | None = None
        self._handles = [r.register_forward_hook(self._hook) for r in self.routers]

    def _hook(self, module, args, output) -> None:
        if self._records is not None:
            logits, _, indices = output
            self._records.append((logits, indices))

    def start(self) -> None:
        self._records = []

    def finish(self, segments, num_sequences: int):
        """(sum over the micro-batch's sequences of n_s aux_s, with gradient; the (L, E) expert counts of its
        real tokens, a float tensor on the device)."""
        import torch

        records, self._records = self._records, None
        if not records:
            raise RuntimeError("the MoE routers recorded nothing in this forward pass")
        e = self.geometry.num_experts
        device = records[0][0].device
        segments = segments.to(device)
        real = segments >= 0
        seq = segments[real]
        n = torch.bincount(seq, minlength=num_sequences).float()  # tokens per sequence
        assigned = torch.zeros(num_sequences, e, device=device)
        prob = torch.zeros(num_sequences, e, device=device)
        counts = []
        for logits, indices in records:
            probs = torch.softmax(logits[real].float(), dim=-1)
            chosen = indices[real]
            one_hot = torch.zeros_like(probs).scatter_add_(1, chosen, torch.ones_like(chosen, dtype=probs.dtype))
            assigned = assigned.index_add(0, seq, one_hot)
            prob = prob.index_add(0, seq, probs)
            counts.append(one_hot.sum(0).detach())
        layers = len(records)
        # n_s aux_s = E / (L^2 n_s) sum_i assigned_si prob_si   (f and P share the denominator L n_s)
        weighted = e * (assigned * prob).sum(1) / (layers**2 * n.clamp(min=1))
        return weighted.sum(), torch.stack(counts)

    def discard(self) -> None:
        """Drop what a failed (out-of-memory) forward recorded, and the activations it holds."""
        self._records = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class ExpertLoad:
    """Expert counts of the steps since the last metrics line, in the checkpointed training state."""

    def __init__(self, num_layers: int, num_experts: int, saved: list | None = None):
        self.counts = np.array(saved, dtype=np.int64) if saved else np.zeros((num_layers, num_experts), np.int64)

    def add(self, counts) -> None:
        self.counts += np.rint(np.asarray(counts, dtype=np.float64)).astype(np.int64)

    def state(self) -> list:
        return self.counts.tolist()

    def take(self) -> dict:
        """The interval's figures for metrics.jsonl, and a fresh interval."""
        figures = expert_load_figures(self.counts)
        self.counts = np.zeros_like(self.counts)
        return figures


def expert_load_figures(counts: np.ndarray) -> dict:
    """expert_load: per layer, each expert's share of the routed assignments; expert_imbalance: per layer,
    max share / mean share; expert_imbalance_max: the worst layer's; expert_assignments: the top-k
    assignments per layer behind the shares (tokens x k), so that intervals can be added up."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    mean = 1.0 / counts.shape[1]
    imbalance = shares.max(axis=1) / mean
    return {"expert_load": np.round(shares, 6).tolist(), "expert_imbalance": np.round(imbalance, 4).tolist(),
            "expert_imbalance_max": round(float(imbalance.max()), 4), "expert_assignments": int(totals.max())}


def run_expert_load(lines: list[dict]) -> np.ndarray | None:
    """Per layer and expert, the share of the routed assignments over every metrics line that has them."""
    intervals = [np.asarray(m["expert_load"]) * m["expert_assignments"] for m in lines if "expert_load" in m]
    if not intervals:
        return None
    counts = np.sum(intervals, axis=0)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
