"""The training loop: token shards in, a trained adapter (or model) out. Reads top to bottom.

Anchors: nanoGPT's train.py and torchtune's single-device LoRA recipe. No Trainer and no
callbacks, because the micro-batch must be able to change inside a run.

Batch vocabulary: `train.global_batch_size` sequences make one optimizer step, always the same
sequences whatever the split; they run as micro-batches of `micro_batch_size` sequences (chosen by
`MicroBatchController`, adaptive.py), accumulating gradients. The loss of a step is the sum of the
per-token cross-entropy over every micro-batch divided by the number of target tokens in the WHOLE
global batch, so the update does not depend on the split (tests/training/test_loop.py checks 1x8, 2x4, 8x1).
With train.objective dpo or simpo a sequence is a preference pair (prompt, chosen, rejected), the batch
sizes count pairs, and the loss is the sum of the pair losses divided by the pairs of the global batch
(training/preference.py; `run.pref`); metrics.jsonl adds pref_accuracy, reward_margin, logp_chosen and
logp_rejected, val_loss is the mean pair loss, and tokens count the prompt once per row (twice a pair).

Step numbers: step N is the N-th optimizer step (from 1); its metrics line says "step": N, and
`checkpoints/step-N/` holds the state after it. The data cursor (epoch, offset) points into a
deterministic per-epoch order of sequence indices (`epoch_order`); a step takes the next
global_batch_size indices, running on into the next epoch when one ends.

Out of memory in a micro-batch: gradients of the partial step are discarded, memory freed, the
micro-batch halved and the WHOLE step redone from its first micro-batch with the RNG state it
started with, so no sample is skipped or seen twice.

`_train` below is the whole run in order; each named function under it is one part of a step or of
the run's set-up and end. `TrainState` is what a checkpoint saves of the loop; `_Run` holds what the
run built. Tests script out-of-memory errors, free memory and a fake monitor through
leantune/testing.py, which swaps the module's own `_forward_backward`, `_probe`, `_free_share` and
`_new_monitor` for a `with` block; `train` has no test parameters.

The resource monitor (monitor.enabled) samples in a thread beside the loop; at each step boundary
the loop applies what its policy decided since the last one (leantune/monitor/policy.py): memory
near the limit halves the micro-batch before an out-of-memory error; temperature, throttling or
host memory ask the checkpoint manager for a checkpoint. Its latest free-memory reading is what the
controller grows on. power.limit_watts is applied for the run and restored when it ends, failed
runs included. A NaN or infinite loss stops the attempt (`failures.NonFiniteLoss`) before a
checkpoint could save it.

Outputs in the run directory:
  metrics.jsonl   one line per optimizer step (every train.log_every steps): step, epoch
                  (fractional, epochs completed), loss, lr, grad_norm, tokens (non-padding),
                  tokens_per_s (all ranks), micro_batch_size and accumulation_steps (per rank),
                  world_size, peak_memory_mb (rank 0's; CUDA: peak allocated during the step; CPU: the
                  process's peak RSS so far), elapsed_s,
                  energy_j (the energy of every GPU of the run during the step, from the monitors;
                  absent without NVML)
                  and val_loss on evaluation steps; plus one line per micro-batch change
                  {"event": "micro_batch", "step", "old", "new", "reason"}, one per decision of the
                  resource monitor {"event": "monitor", "step", "action", "reason", "reading"}, and
                  on a resume with another train.lr {"event": "lr_rescale", "step", "old", "new",
                  "factor"} (per parameter group; checkpoint.py)
  monitor.csv     the resource samples (leantune/monitor/sampler.py)
  checkpoints/    see checkpoint.py; saved when due, on a new best validation loss, and at the end
  adapter/        PEFT format (save_pretrained) plus the tokenizer; full fine-tune: the whole model
  merged/         with train.export_merged: the adapter merged into the base, plus the tokenizer
  training.json   the summary `train` returns (with world_size, tokens_per_s, rank_peak_memory_mb)

Run it directly (the kill/resume tests do), or under torchrun for data parallel (launch.py):
    python -m leantune.training.loop RUN_DIR [--resume]
    python -m torch.distributed.run --standalone --nproc-per-node=N -m leantune.training.loop RUN_DIR
Exit codes, the failure file (attempt_error.json) a failed run leaves and the JSON log lines the flow
reads are leantune/failures.py's protocol: 0 finished, 2 a UserError (message on stderr), 28 the disk
is full, 75 stopped by SIGTERM/SIGINT after saving a checkpoint (resume to continue), 1 any other error.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from leantune.config import RunConfig, load_config
from leantune.errors import DataError, NoSpaceLeft, UserError, no_space_left
from leantune.failures import (
    EXIT_NO_SPACE,
    EXIT_STOPPED,
    EXIT_USER_ERROR,
    JSON_LOG_ENV,
    JsonLogFormatter,
    OutOfMemory,
    classify,
    is_out_of_memory,
    write_failure,
)
from leantune.metrics import MetricsWriter
from leantune.moe import ExpertLoad, RouterTap, moe_geometry, token_segments
from leantune.monitor.sampler import Monitor
from leantune.progress import quiet_third_party
from leantune.rundir import SPLIT_INDEX, RunDir
from leantune.runlock import RunDirBusy, hold_run_dir
from leantune.shards import TokenShards
from leantune.training.adaptive import MicroBatchController
from leantune.training.determinism import nondeterministic_op_error
from leantune.training.distributed import DistContext, process_group
from leantune.training.loss import compile_decoder, target_cross_entropy
from leantune.training.packed import model_inputs
from leantune.training.preference import STATS, PreferenceObjective, preference_metrics

# Named, not __name__: run as `python -m leantune.training.loop` this module is __main__, and the
# flow shows the child's log lines under their logger name.
log = logging.getLogger("leantune.training.loop")

def train(cfg: RunConfig, run_dir: Path, *, resume: bool = False) -> dict:
    """Train on run_dir/tokens as `cfg` says; return the summary (also written to training.json).

    resume: continue from the newest intact checkpoint (also automatic when checkpoints exist).

    Under torchrun (WORLD_SIZE above 1) every process calls this (see distributed.py): each trains on
    its share of every global batch, only rank 0 writes metrics.jsonl, checkpoints, the adapter and
    training.json, each machine's local rank 0 samples all of its GPUs into monitor.csv (machine N of
    several: monitor-node<N>.csv), and every rank returns the summary.
    """
    from leantune.modeling import resolve_device
    from leantune.training.determinism import deterministic_kernels

    device = resolve_device(cfg)
    # Before CUDA is initialised: cuBLAS reads its workspace setting when it starts.
    with deterministic_kernels(cfg.train.deterministic, device.type), process_group(cfg, device) as dist:
        return _train(cfg, Path(run_dir), dist, resume=resume)


@dataclass
class TrainState:
    """Where the run is and what it has seen: saved in every checkpoint (state.json), restored on resume."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the data cursor: the next sequence is epoch_order(epoch)[offset]
    offset: int = 0
    tokens_seen: int = 0  # non-padding tokens of the steps done, all ranks
    elapsed_s: float = 0.0  # time spent in optimizer steps, resumes included
    loss: float | None = None
    val_loss: float | None = None
    best_val_loss: float | None = None
    best_step: int | None = None
    peak_memory_mb: float = 0.0
    micro_batch_changes: int = 0
    energy_j: float | None = None  # the GPUs' energy over the steps done (from the monitor)
    expert_counts: list | None = None  # MoE: the expert load not yet written to metrics.jsonl (ExpertLoad.state)


@dataclass
class _Run:
    """What a training run holds from its start to its end; the functions below read and update it."""

    cfg: RunConfig
    run_dir: Path
    dist: DistContext
    device: object
    train_shards: TokenShards
    val_shards: TokenShards | None
    num_steps: int
    model: object
    trainable: list
    optimizer: object
    scheduler: object
    scaler: object  # fp16 loss scaling (a disabled GradScaler otherwise)
    autocast: object
    mask_dtype: object  # the 4D block-diagonal mask of packed batches is added to attention scores of this dtype
    attention: str  # the model's attention implementation: how packed micro-batches are laid out (packed.py)
    moe: RouterTap | None  # Mixture of Experts: the routers' load-balancing loss and expert counts
    aux_coef: float
    controller: MicroBatchController
    ckpt: object  # CheckpointManager
    state: TrainState = field(default_factory=TrainState)
    forward_model: object = None  # the model, wrapped in DDP with several ranks (after the probe)
    metrics: MetricsWriter | None = None
    expert_load: ExpertLoad | None = None
    monitor: Monitor | None = None
    feedback: object = None  # monitor.policy.Feedback: the monitor's decisions, drained at each step boundary
    saved_step: int | None = None  # the newest checkpoint's step
    rank_peaks_mb: list[float] = field(default_factory=list)
    pref: PreferenceObjective | None = None  # train.objective dpo or simpo: the loss of pairs (preference.py)

    def record(self, change) -> None:
        """A micro-batch change: a metrics.jsonl line, and counted."""
        self.metrics.write(change.event())
        self.state.micro_batch_changes += 1


def _train(cfg: RunConfig, run_dir: Path, dist: DistContext, *, resume: bool) -> dict:
    from leantune.monitor.policy import Feedback
    from leantune.monitor.power import power_limits

    started = time.monotonic()
    run, tokenizer = _build(cfg, run_dir, dist)
    # Resume from the newest intact checkpoint when asked, or when the run already has some.
    resumed_from = _resume(run, resume or RunDir(run_dir).checkpoints.is_dir())
    run.metrics = MetricsWriter(run_dir, keep_until_step=run.state.step, enabled=dist.is_main)
    if run.moe is not None:
        run.expert_load = ExpertLoad(len(run.moe.routers), run.moe.geometry.num_experts, run.state.expert_counts)
    if run.ckpt.lr_rescale is not None:  # resumed with another train.lr: the schedule continues rescaled
        run.metrics.write({"event": "lr_rescale", "step": run.state.step, **run.ckpt.lr_rescale})
    # The longest sequences first, so that a too-large micro-batch fails in seconds, not hours in.
    if cfg.adaptive.probe_longest_first:
        _probe_until_it_fits(run)
    # The model forward runs on: DDP around it with several ranks (it broadcasts rank 0's weights now);
    # FSDP's root, built with the model.
    run.forward_model = dist.wrap(run.model)
    order_of = _EpochOrders(run.train_shards, cfg.train.global_batch_size, cfg.train.seed, cfg.train.group_by_length)

    # The resource monitor (monitor.csv) and its feedback, and the power limit: both undone in `finally`.
    # Several processes: each machine's local rank 0 samples (and caps) all of that machine's GPUs; rank 0's
    # monitor decides for all (its shrink reaches the others through _settle).
    run.feedback = Feedback(cfg.monitor, run.ckpt.request)
    resources = contextlib.ExitStack()
    if cfg.monitor.enabled and dist.local_rank == 0:
        run.monitor = _new_monitor(cfg, run_dir, dist)
        if dist.is_main:
            run.monitor.on_sample = run.feedback
        resources.enter_context(run.monitor)
    power = resources.enter_context(power_limits(
        cfg.power.limit_watts if dist.local_rank == 0 else None, run.monitor and run.monitor.nvml,
        run.monitor.gpu_handles if run.monitor is not None else [],
        lambda gpu: RunDir(run_dir).power_record(gpu, dist.node_rank)))

    progress = _progress_bar(run.num_steps, run.state.step)
    run.ckpt.install_signal_handlers()
    run.saved_step = resumed_from
    run.rank_peaks_mb = [0.0] * dist.world_size
    stopped = False
    try:
        while run.state.step < run.num_steps:
            step = run.state.step + 1
            line, val_loss = _train_step(run, step, order_of)
            progress.update(1)
            progress.set_postfix(loss=f"{line['loss']:.4f}", lr=f"{line['lr']:.2e}", mb=line["micro_batch_size"],
                                 **({"acc": f"{line['pref_accuracy']:.2f}"} if run.pref else {}), refresh=False)
            _apply_feedback(run, step)
            # One exchange per step (data parallel), so that every rank decides alike from here on.
            free, due, stop = _agree_after_step(run, line["peak_memory_mb"])
            # Growth is decided on this step's free memory and takes effect from the next step.
            if (change := run.controller.after_step(step, free)) is not None:
                run.record(change)
            _checkpoint_if_due(run, step, val_loss, due)
            if stop:
                stopped = True
                log.warning("stopped after step %d (checkpoint %s); resume to continue", step,
                            f"step-{run.saved_step}" if run.saved_step is not None else "none")
                break
    finally:
        run.ckpt.restore_signal_handlers()
        progress.close()
        run.metrics.close()
        resources.close()  # the monitor's last sample, then the power limit restored

    # FSDP: every rank takes part in gathering the weights that rank 0 writes.
    gathered = dist.gather_weights(run.model) if not stopped else None
    adapter_dir, merged_dir = _write_outputs(run, tokenizer, gathered) if not stopped and dist.is_main else (None, None)
    summary = _summary(run, completed=not stopped, resumed_from=resumed_from, power=power, started=started,
                       adapter_dir=adapter_dir, merged_dir=merged_dir)
    if dist.is_main:
        RunDir(run_dir).training.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ------------------------------------------------------------------------------------------ set-up


def _build(cfg: RunConfig, run_dir: Path, dist: DistContext) -> tuple[_Run, object]:
    """The data, model, optimizer, schedule and micro-batch controller of a run; and the tokenizer."""
    import torch
    from transformers import AutoTokenizer

    from leantune.modeling import build_model, describe_model, resolve_precision
    from leantune.training.checkpoint import CheckpointManager, run_fingerprints
    from leantune.training.fsdp import build_to_shard, loads_on_rank0
    from leantune.training.optim import build_optimizer, build_scheduler, total_steps

    t = cfg.train
    # Memory-mapped shards; validation is optional (data.val_fraction may be 0).
    layout = RunDir(run_dir)
    train_shards = _open_shards(layout.train_tokens)
    val_shards = TokenShards(layout.val_tokens) if layout.token_dir.index("val").is_file() else None
    if val_shards is not None and len(val_shards) == 0:
        val_shards = None
    tokenizer = AutoTokenizer.from_pretrained(layout.tokenizer)
    num_steps = total_steps(cfg, len(train_shards))

    device = dist.device  # cuda:LOCAL_RANK under torchrun on GPUs
    precision = resolve_precision(cfg, device)
    # Fresh runs draw weights, LoRA init and dropout from train.seed; a resume restores the RNGs.
    _seed_everything(t.seed)
    # FSDP: only rank 0 reads the weights, into host memory; every rank's model is on the meta device until
    # it is sharded and receives its shards from them (fsdp.py).
    from_rank0 = dist.sharded and loads_on_rank0(cfg)
    model, source = (build_to_shard(cfg, tokenizer, device, dist.rank) if from_rank0
                     else (build_model(cfg, tokenizer, device), None))
    log.info("model: %s", describe_model(model))
    if t.compile != "off":
        compile_decoder(model, t.compile)
    moe, aux_coef = _router_tap(cfg, model)
    pref = (PreferenceObjective.for_run(cfg, train_shards, moe, precision, model.config._attn_implementation, device)
            if t.objective != "sft" else None)
    if dist.rank > 0:
        # Every rank built the same weights from train.seed; each draws its own dropout, as it has its own data.
        torch.manual_seed(int(np.random.SeedSequence([t.seed, dist.rank]).generate_state(1)[0]))
    # FSDP: the weights sharded over the ranks before the optimizer takes them (fsdp.py); None otherwise.
    sharded_root = dist.shard(model, precision, full=cfg.model.method == "full", from_rank0=from_rank0,
                              source=source)
    del source  # rank 0's host copy of the weights: its memory back before training
    if t.objective == "dpo" and cfg.model.method == "full":  # the reference log-probs: of this model, before any step
        for shards in (s for s in (train_shards, val_shards) if s is not None):
            pref.store_reference(sharded_root or model, shards, dist)  # FSDP: through its root, every rank
        if sharded_root is not None:
            # FSDP2 leaves the root's parameters gathered after a forward (for the backward that usually follows):
            # sharded again, so that the optimizer below takes the shards, not the gathered copies.
            sharded_root.reshard()
    optimizer = build_optimizer(cfg, model)
    run = _Run(
        cfg=cfg, run_dir=run_dir, dist=dist, device=device, train_shards=train_shards, val_shards=val_shards,
        num_steps=num_steps, model=model, trainable=[p for p in model.parameters() if p.requires_grad],
        optimizer=optimizer, scheduler=build_scheduler(cfg, optimizer, num_steps),
        # fp16 has too little range for small gradients: scale the loss up, unscale before clipping.
        scaler=torch.amp.GradScaler(device.type, enabled=precision == torch.float16),
        autocast=torch.autocast(device.type, dtype=precision, enabled=precision != torch.float32),
        mask_dtype=precision, attention=model.config._attn_implementation, pref=pref,
        moe=moe, aux_coef=aux_coef, controller=MicroBatchController.from_config(cfg, dist.world_size),
        ckpt=CheckpointManager(cfg, run_dir, run_fingerprints(cfg, run_dir)), forward_model=sharded_root)
    return run, tokenizer


def _resume(run: _Run, look: bool) -> int | None:
    """Load the newest intact checkpoint into the run when `look`; return its step (None: a fresh start)."""
    # Rank 0 picks the checkpoint (latest() also removes what interrupted writes left); every rank loads it.
    latest = run.dist.broadcast(run.ckpt.latest() if look and run.dist.is_main else None)
    if look and latest is None:
        log.warning("resume: no intact checkpoint in %s; training from the start", RunDir(run.run_dir).checkpoints)
    if latest is None:
        return None
    saved = run.ckpt.load(latest, run.model, run.optimizer, run.scheduler,
                          run.scaler if run.scaler.is_enabled() else None, rank=run.dist.rank,
                          sharded=run.dist.sharded)
    run.controller.load_state_dict(saved.pop("adaptive"))
    run.state = replace(run.state, **saved)
    return run.state.step


def _new_monitor(cfg: RunConfig, run_dir: Path, dist: DistContext) -> Monitor:
    """The resource monitor of this machine's GPUs (its own first), sampling into run_dir/monitor.csv
    (monitor-node<N>.csv for machine N of several)."""
    device = dist.device
    indices = [(device.index or 0) + i for i in range(dist.local_world_size)] if device.type == "cuda" else None
    return Monitor(cfg.monitor, RunDir(run_dir).node_monitor(dist.node_rank), device_type=device.type,
                   device_index=device.index, device_indices=indices)


class _EpochOrders:
    """order_of(epoch): the order of an epoch (`epoch_order`), computed once; one epoch kept at a time
    (an epoch's order is as long as the data)."""

    def __init__(self, shards: TokenShards, global_batch_size: int, seed: int, group_by_length: bool):
        self.shards, self.global_batch_size, self.seed = shards, global_batch_size, seed
        self.group_by_length = group_by_length
        self._cache: dict[int, np.ndarray] = {}

    def __call__(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            self._cache.clear()
            self._cache[epoch] = epoch_order(self.shards, epoch, self.global_batch_size, self.seed,
                                             self.group_by_length)
        return self._cache[epoch]


# ---------------------------------------------------------------------------- one optimizer step


def _train_step(run: _Run, step: int, order_of: _EpochOrders) -> tuple[dict, float | None]:
    """Optimizer step `step`: the next global batch, forward and backward (redone smaller after out of
    memory), the update, validation when due; updates run.state and writes its metrics.jsonl line.
    Returns the line and the validation loss (None when not evaluated)."""
    import torch

    from leantune.failures import NonFiniteLoss

    t, state, dist = run.cfg.train, run.state, run.dist
    step_start = time.monotonic()
    energy_start = run.monitor.energy_j() if run.monitor is not None else None
    indices, epoch, offset = next_global_batch(order_of, state.epoch, state.offset, t.global_batch_size)
    items = [run.train_shards[int(i)] for i in indices]
    # The loss of the step is normalised by every target token of the global batch (pairs: every pair).
    targets = len(items) if run.pref else sum(int((it["labels"][1:] != -100).sum()) for it in items)
    # Pairs: the prompt runs twice, in front of each answer.
    tokens = sum(len(it["input_ids"]) + (int(it["doc_lengths"][0]) if run.pref else 0) for it in items)
    # Data parallel: this rank's disjoint share of the global batch (a single process: all of it).
    share = items[dist.share(len(items))]
    lr = run.scheduler.get_last_lr()[0]

    ce_sum, moe_sums, mb = _forward_backward_fitting(run, step, share, targets, tokens)
    # Every rank finished its share: sum the gradients (and the loss) of all shares.
    dist.sum_gradients(run.trainable, ce_sum, *moe_sums)
    run.scaler.unscale_(run.optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.trainable, t.max_grad_norm or math.inf))
    if t.optimizer_in_backward:  # the weights stepped in backward, and their gradients are gone (paramwise.py)
        grad_norm = run.optimizer.take_grad_norm()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    loss = float(ce_sum[0] if run.pref else ce_sum) / targets  # .item() waits for the device: the timing is real
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"the training loss is {loss} at step {step} (lr {lr:.3g}); the last checkpoint "
                            "holds the weights before it; lower train.lr, or use model.dtype=bf16 over fp16")

    step_seconds = time.monotonic() - step_start
    peak_mb = _peak_memory_mb(run.device)
    state.step, state.epoch, state.offset, state.loss = step, epoch, offset, loss
    state.tokens_seen += tokens
    state.elapsed_s += step_seconds
    state.peak_memory_mb = max(state.peak_memory_mb, peak_mb)
    line = {"step": step, "epoch": round((epoch * len(run.train_shards) + offset) / len(run.train_shards), 6),
            "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
            "tokens_per_s": tokens / step_seconds, "micro_batch_size": mb,
            "accumulation_steps": len(share) // mb, "world_size": dist.world_size,
            "peak_memory_mb": peak_mb, "elapsed_s": round(state.elapsed_s, 3)}
    if run.pref is not None:
        line.update(preference_metrics(ce_sum, targets))
    energy_end = run.monitor.energy_j() if run.monitor is not None else None
    energy = _all_nodes_energy(run, energy_start, energy_end)
    if energy is not None:
        line["energy_j"] = round(energy, 3)
        state.energy_j = (state.energy_j or 0.0) + line["energy_j"]

    # Validation every train.eval_every steps and after the last one.
    val_loss = None
    if run.val_shards is not None and (step % t.eval_every == 0 or step == run.num_steps):
        # FSDP: pairs through its root, as every forward.
        val_loss = (run.pref.evaluate(dist.root or run.model, run.val_shards, run.controller.micro_batch_size,
                                      run.autocast, dist)
                    if run.pref else evaluate(run.forward_model, run.val_shards, run.controller.micro_batch_size,
                                              run.device, run.autocast, run.mask_dtype, run.attention, dist))
        line["val_loss"] = state.val_loss = val_loss
    if run.moe is not None:
        line["router_aux_loss"] = float(moe_sums[0]) / tokens
        run.expert_load.add(moe_sums[1].cpu().numpy())
    if step % t.log_every == 0 or step == run.num_steps:
        if run.moe is not None:  # the expert load of the steps since the last line
            line.update(run.expert_load.take())
        run.metrics.write(line)
    if run.moe is not None:
        state.expert_counts = run.expert_load.state()
    return line, val_loss


def _all_nodes_energy(run: _Run, start: float | None, end: float | None) -> float | None:
    """The step's GPU energy from this machine's monitor (start/end: its energy_j() around the step), summed
    over the machines of a multi-node run (every rank takes part; a machine without a reading makes it None)."""
    mine = None if start is None or end is None else end - start
    if run.dist.nodes == 1 or not run.cfg.monitor.enabled:
        return mine
    # Only each machine's local rank 0 has a monitor; NaN from one that has no reading.
    own = (math.nan if mine is None else mine) if run.dist.local_rank == 0 else 0.0
    total = run.dist.sum_all([own])[0]
    return total if math.isfinite(total) else None


def _forward_backward_fitting(run: _Run, step: int, share: list[dict], targets: int, tokens: int):
    """Forward and backward over this rank's share, micro-batch by micro-batch, until it fits: out of
    memory drops the partial gradients, halves the micro-batch and redoes the WHOLE step from its first
    micro-batch with the RNG state it started with, so no sample is skipped or seen twice.
    Returns the summed cross-entropy, the MoE sums ([] when dense) and the micro-batch it ran with."""
    import torch

    # A redo after out-of-memory must draw the same random numbers (dropout) as a first try.
    rng_at_start = _torch_rng_state(run.device)
    while True:
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
        oom = False
        mb = run.controller.micro_batch_size
        # Pairs: the sums of preference.STATS instead.
        ce_sum = torch.zeros(len(STATS) if run.pref else (), device=run.device)
        # MoE: the step's router loss (sum of n_s aux_s) and expert counts, summed like ce_sum.
        moe_sums = [torch.zeros((), device=run.device), 0] if run.moe is not None else []
        try:
            # No gradient all-reduce inside backward (distributed.py says why): gradients stay local.
            with run.dist.no_sync(run.forward_model):
                for k in range(run.controller.accumulation_steps):
                    run.dist.before_micro_batch(k, run.controller.accumulation_steps)
                    micro_ce, moe_part = _forward_backward(run, share, k, targets, tokens)
                    ce_sum += micro_ce
                    if moe_part is not None:
                        moe_sums = [moe_sums[0] + moe_part[0], moe_sums[1] + moe_part[1]]
        except Exception as e:
            if run.moe is not None:
                run.moe.discard()
            # Weights already stepped in backward (train.optimizer_in_backward) cannot be redone in the process.
            stepped = run.cfg.train.optimizer_in_backward and run.optimizer.stepped
            if not (run.controller.enabled and is_out_of_memory(e)) or stepped:
                raise
            oom = True
        # Outside the except block, so the traceback (holding activations) is already released.
        if _settle(run, step, oom):
            return ce_sum, moe_sums, mb
        _set_torch_rng_state(run.device, rng_at_start)


def _forward_backward(run: _Run, share: list[dict], k: int, targets: int, tokens: int):
    """Forward and backward of micro-batch k of `share`, its loss scaled to the global batch's targets.
    Returns its cross-entropy sum (detached) and, MoE, (router loss, expert counts) or None."""
    mb = run.controller.micro_batch_size
    if run.cfg.train.optimizer_in_backward:  # the step runs in the last micro-batch's backward
        run.optimizer.arm("step" if k == run.controller.accumulation_steps - 1 else "keep")
    micro = share[k * mb:(k + 1) * mb]
    if run.pref is not None:  # pairs: the summed pair losses / pairs of the global batch, and their STATS
        with run.autocast:
            objective, stats = run.pref.loss(run.forward_model, micro, targets)
        run.scaler.scale(objective).backward()
        return stats, None
    # A Mixture-of-Experts counts its router load per row: its rows stay whole.
    inputs, labels = model_inputs(micro, run.train_shards.pad_id, run.mask_dtype, run.attention, run.device,
                                  split_documents=run.moe is None)
    if run.moe is not None:
        run.moe.start()
    with run.autocast:  # the head only at target positions, in chunks (loss.py)
        micro_ce = target_cross_entropy(run.forward_model, inputs, labels)
    objective = micro_ce / targets
    moe_part = None
    if run.moe is not None:
        width = None if run.attention == "flash_attention_2" else inputs["input_ids"].shape[1]
        aux, counts = run.moe.finish(token_segments([len(it["input_ids"]) for it in micro], width), len(micro))
        objective = objective + run.aux_coef * aux / tokens
        moe_part = (aux.detach(), counts)
    run.scaler.scale(objective).backward()
    return micro_ce.detach(), moe_part


def _settle(run: _Run, step: int, oom: bool, probe: bool = False) -> bool:
    """After an attempt at a step (or the probe): True when it succeeded on every rank. Otherwise the
    partial gradients are dropped and the micro-batch halved (data parallel: the smallest of all ranks
    wins), and the attempt is to be redone."""
    fatal = None
    if oom:
        _free_memory(run.model, run.device)
        try:
            run.record(run.controller.on_oom(step, probe=probe))
        except OutOfMemory as e:  # one sequence does not fit: the other ranks must hear of it before it is raised
            fatal = e
    if run.dist.enabled:
        # Every rank reaches this all-reduce whatever happened in its forward and backward: 0 out of
        # memory at a micro-batch of 1, 1 out of memory, 2 done.
        worst, smallest = run.dist.min_all([0 if fatal else 1 if oom else 2, run.controller.micro_batch_size])
        if fatal is None and worst == 0:
            raise OutOfMemory("out of memory in another training process with a micro-batch of 1 sequence; "
                            "its error (in the log of rank 0 or that rank) says what to change")
        if fatal is None and (change := run.controller.adopt(step, int(smallest))) is not None:
            run.record(change)
        if worst < 2 and not oom:
            _free_memory(run.model, run.device)  # this rank's gradients of an attempt another rank could not finish
        oom = worst < 2
    if fatal is not None:
        raise fatal
    return not oom


def _probe_until_it_fits(run: _Run) -> None:
    """Forward and backward on the longest sequences at the micro-batch size, halving it until it fits."""
    longest = np.argsort(-run.train_shards.lengths, kind="stable")
    while True:
        oom = False
        try:
            _probe(run, longest[:run.controller.micro_batch_size])
        except Exception as e:
            if not (run.controller.enabled and is_out_of_memory(e)):
                raise
            oom = True
        if _settle(run, run.state.step, oom, probe=True):
            return


# ------------------------------------------------------------------------------- step boundary


def _apply_feedback(run: _Run, step: int) -> None:
    """The monitor's decisions since the last step, each a metrics.jsonl line: a shrink takes effect from
    the next step; a checkpoint request is already with the checkpoint manager."""
    for decision in run.feedback.drain():
        run.metrics.write(decision.event(step))
        if decision.action == "shrink" and (change := run.controller.shrink(step)) is not None:
            run.record(change)
            _free_memory(run.model, run.device)  # give the cache back, so the monitor sees the drop


def _free_share(run: _Run) -> float | None:
    """The share of memory free after this step, which the controller grows on: the monitor's latest
    reading, else the device's own count."""
    reading = run.monitor.latest if run.monitor is not None else None
    free = reading.free_fraction if reading is not None else None
    return free if free is not None else _free_memory_share(run.device)


def _agree_after_step(run: _Run, peak_mb: float) -> tuple[float | None, str | None, bool]:
    """(free memory share, checkpoint reason, stop) as every rank decides them after a step.

    Data parallel: grow on the smallest free share, checkpoint when any rank has one due, stop when any
    rank was signalled (a signal reaches the ranks at different steps); each rank's peak memory is kept.
    """
    free = _free_share(run)
    stop = run.ckpt.stop_requested
    due = run.ckpt.due(run.state.step)
    readings = run.dist.gather_all([-1.0 if free is None else free, due is not None, stop, peak_mb])
    free = None if any(r[0] < 0 for r in readings) else min(r[0] for r in readings)
    if due is None and any(r[1] for r in readings):
        due = "other_rank"
    run.rank_peaks_mb = [max(old, r[3]) for old, r in zip(run.rank_peaks_mb, readings, strict=True)]
    run.state.peak_memory_mb = max(run.state.peak_memory_mb, *run.rank_peaks_mb)
    return free, due, any(r[2] for r in readings)


def _checkpoint_if_due(run: _Run, step: int, val_loss: float | None, due: str | None) -> None:
    """Checkpoint when due, on a new best validation loss (so the best weights exist on disk), and after
    the last step."""
    from leantune.training.checkpoint import rng_state

    state = run.state
    improved = val_loss is not None and (state.best_val_loss is None or val_loss < state.best_val_loss)
    if improved:
        state.best_val_loss, state.best_step = val_loss, step
    reason = due or ("best" if improved else None) or ("final" if step == run.num_steps else None)
    if reason is None:
        return
    # Every rank's RNG state goes into the checkpoint (rank 0 writes it), so each resumes exactly.
    rngs = run.dist.gather_to_main(rng_state())
    if run.dist.is_main or run.dist.sharded:  # FSDP: every rank writes its shards
        run.ckpt.save(step, run.model, run.optimizer, run.scheduler,
                      {**asdict(state), "adaptive": run.controller.state_dict()}, metric=val_loss,
                      scaler=run.scaler if run.scaler.is_enabled() else None, reason=reason,
                      rank_rngs=rngs[1:] if rngs else None, dist=run.dist)
    else:
        run.ckpt.mark_saved(step)
    run.saved_step = step


# --------------------------------------------------------------------------------------- the end


def _write_outputs(run: _Run, tokenizer, gathered: dict | None) -> tuple[Path, Path | None]:
    """The adapter in PEFT format (full fine-tune: the model) and, with train.export_merged, the merged model.
    gathered: FSDP's trained weights gathered on this rank (fsdp.py)."""
    from leantune.modeling import sort_adapter_config

    adapter_dir = RunDir(run.run_dir).adapter
    model = run.model
    sort_adapter_config(model)  # adapter_config.json the same in every process
    # The base's embedding matrices are not part of the adapter (see checkpoint._save_weights).
    model.save_pretrained(adapter_dir, **({"save_embedding_layers": False} if hasattr(model, "peft_config") else {}),
                          **({"state_dict": gathered} if gathered is not None else {}))
    tokenizer.save_pretrained(adapter_dir)
    if not run.cfg.train.export_merged:
        return adapter_dir, None
    # The trained weights are on disk now: free them before a base is built to merge into.
    del model
    run.model = run.forward_model = run.optimizer = run.scheduler = run.trainable = None
    gc.collect()
    return adapter_dir, _export_merged(run.cfg, tokenizer, run.device, adapter_dir, RunDir(run.run_dir).merged)


def _summary(run: _Run, *, completed: bool, resumed_from: int | None, power, started: float,
             adapter_dir: Path | None, merged_dir: Path | None) -> dict:
    """What `train` returns and training.json holds."""
    state, monitor = run.state, run.monitor
    return {
        "completed": completed,
        "steps": state.step,
        "total_steps": run.num_steps,
        "resumed_from_step": resumed_from,
        "tokens": state.tokens_seen,
        "final_loss": state.loss,
        "final_val_loss": state.val_loss,
        "best_val_loss": state.best_val_loss,
        "best_step": state.best_step,
        "micro_batch_size": run.controller.micro_batch_size,
        "micro_batch_changes": state.micro_batch_changes,
        "peak_memory_mb": state.peak_memory_mb,
        # Data parallel: the processes and each one's peak memory (in this process's part of the run).
        "world_size": run.dist.world_size,
        "rank_peak_memory_mb": run.rank_peaks_mb,
        "train_seconds": round(state.elapsed_s, 3),
        # Over the optimizer steps of the whole run (resumes included), all ranks together.
        "tokens_per_s": state.tokens_seen / state.elapsed_s if state.elapsed_s else None,
        # Energy of the GPUs over the optimizer steps of the whole run (resumes included), from the monitor.
        "energy_j": state.energy_j,
        "energy_per_step_j": state.energy_j / state.step if state.energy_j is not None else None,
        "energy_per_1k_tokens_j": 1000 * state.energy_j / state.tokens_seen if state.energy_j is not None else None,
        "monitor_backend": monitor.latest.backend if monitor is not None else None,
        "device": run.device.type,
        "gpu_name": monitor.gpu_names[0] if monitor is not None and monitor.gpu_names else None,
        "power_limit": power[0].to_dict() if power[0] is not None else None,  # the first GPU's
        "power_limits": [p.to_dict() for p in power if p is not None],  # every GPU capped on this machine
        "seconds": round(time.monotonic() - started, 3),
        "adapter": str(adapter_dir) if adapter_dir else None,
        "merged": str(merged_dir) if merged_dir else None,
    }


# ------------------------------------------------------------------------------------------ data


def _router_tap(cfg: RunConfig, model):
    """A RouterTap on a Mixture-of-Experts model and the router loss coefficient; (None, 0.0) when dense."""
    geometry = moe_geometry(model.config)
    if geometry is None:
        return None, 0.0
    coef = cfg.train.router_aux_loss_coef
    if coef is None:
        coef = float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0)
    tap = RouterTap(model, geometry)
    log.info("mixture of experts: %d routers, %d experts, top-%d; router loss coefficient %g", len(tap.routers),
             geometry.num_experts, geometry.top_k, coef)
    return tap, coef


def _open_shards(directory: Path) -> TokenShards:
    if not (directory / SPLIT_INDEX).is_file():
        raise UserError(f"{directory}: no token shards; run the tokenize stage (flows/finetune.py) first")
    shards = TokenShards(directory)
    if len(shards) == 0:
        raise DataError(f"{directory}: no training sequences; check the data sources and the tokenize "
                        "counts in its index.json (records dropped as overlong or with nothing to train on)")
    return shards


def epoch_order(shards: TokenShards, epoch: int, global_batch_size: int, seed: int,
                group_by_length: bool = False) -> np.ndarray:
    """The order in which epoch `epoch` visits the training sequences.

    Depends on train.seed, the epoch, the global batch and train.group_by_length only, never on the
    micro-batch. Packed sequences are all about max_seq_len long, so a plain shuffle costs little
    padding; unpacked ones come in global batches sorted longest first, so that their micro-batches
    (consecutive slices) have similar lengths (`training_batches`).
    """
    epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    if shards.meta["packing"]:
        return np.random.default_rng(epoch_seed).permutation(len(shards))
    return np.concatenate(shards.training_batches(global_batch_size, epoch_seed, group_by_length)).astype(np.int64)


def next_global_batch(order_of: Callable[[int], np.ndarray], epoch: int, offset: int,
                      size: int) -> tuple[list[int], int, int]:
    """The next `size` sequence indices from cursor (epoch, offset), and the cursor after them."""
    indices: list[int] = []
    while len(indices) < size:
        order = order_of(epoch)
        taken = order[offset:offset + size - len(indices)].tolist()
        indices += taken
        offset += len(taken)
        if offset == len(order):
            epoch, offset = epoch + 1, 0
    return indices, epoch, offset


# ----------------------------------------------------------------------------------- eval, probe


def evaluate(model, shards: TokenShards, batch_size: int, device, autocast, mask_dtype, attention: str,
             dist: DistContext | None = None) -> float:
    """Mean per-token cross-entropy over every target token of `shards` (the validation split).

    dist (data parallel): each rank evaluates every world_size-th sequence, and the sums are added up.
    """
    import torch

    model.eval()  # no dropout
    # Similar lengths together: less padding, and the order does not matter for a sum.
    order = np.argsort(shards.lengths, kind="stable")
    if dist is not None:
        order = order[dist.rank::dist.world_size]
    ce = torch.zeros((), device=device, dtype=torch.float64)
    targets = 0
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            items = [shards[int(i)] for i in order[start:start + batch_size]]
            targets += sum(int((it["labels"][1:] != -100).sum()) for it in items)
            inputs, labels = model_inputs(items, shards.pad_id, mask_dtype, attention, device)
            with autocast:
                ce += target_cross_entropy(model, inputs, labels).double()
        # FSDP: a rank with fewer batches runs its first sequence again as often as it is short, uncounted.
        for _ in range(dist.missing_forwards(len(shards), batch_size) if dist is not None else 0):
            inputs, labels = model_inputs([shards[int(order[0] if len(order) else 0)]], shards.pad_id, mask_dtype,
                                          attention, device)
            with autocast:
                target_cross_entropy(model, inputs, labels)
    model.train()
    if dist is not None:
        ce_total, targets_total = dist.sum_all([float(ce), targets])
        return ce_total / max(targets_total, 1)
    return float(ce) / max(targets, 1)


def _probe(run: _Run, indices: np.ndarray) -> None:
    """One forward and backward on `indices` (the longest sequences) without an optimizer step.

    Gradients are discarded and the RNG state restored, so the run's results do not change.
    """
    rng = _torch_rng_state(run.device)
    if run.cfg.train.optimizer_in_backward:  # its gradients go as backward makes them, like a step's
        run.optimizer.arm("drop")
    try:
        items = [run.train_shards[int(i)] for i in indices]
        with run.autocast:
            if run.pref is not None:
                loss = run.pref.loss(run.forward_model or run.model, items, len(items))[0]  # FSDP: its root
            else:
                inputs, labels = model_inputs(items, run.train_shards.pad_id, run.mask_dtype, run.attention, run.device,
                                              split_documents=run.moe is None)
                # FSDP: through its root (built with the model)
                loss = target_cross_entropy(run.forward_model or run.model, inputs, labels)
        loss.backward()
    finally:
        # Also after an out-of-memory error, so a probe that is retried smaller starts the same.
        run.model.zero_grad(set_to_none=True)
        _set_torch_rng_state(run.device, rng)


# --------------------------------------------------------------------------------- memory, RNG


def _free_memory(model, device) -> None:
    import torch

    model.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _free_memory_share(device) -> float:
    """Share of the device's memory still free at this step's peak (CUDA) or now (CPU: RAM)."""
    import torch

    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # Memory torch has reserved but not used at the step's peak is reusable, so it counts as free.
        reusable = torch.cuda.memory_reserved(device) - torch.cuda.max_memory_allocated(device)
        return (free + max(reusable, 0)) / total
    import psutil

    memory = psutil.virtual_memory()
    return memory.available / memory.total


def _peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    status = Path("/proc/self/status")
    if status.is_file():
        # VmHWM: the peak RSS of this process's own memory. getrusage's ru_maxrss is not: Linux keeps
        # the parent's peak across fork + exec, so a training subprocess would report its launcher's.
        with open(status) as f:
            return round(int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) / 2**10, 1)
    # Elsewhere ru_maxrss is the best there is: bytes on macOS.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1)


def _seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def _torch_rng_state(device) -> tuple:
    import torch

    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_torch_rng_state(device, state: tuple) -> None:
    import torch

    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


# --------------------------------------------------------------------------------------- outputs


def _progress_bar(total: int, initial: int):
    """A tqdm bar on an interactive terminal; disabled (a no-op) in logs and tests."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", file=sys.stderr, dynamic_ncols=True,
                disable=not sys.stderr.isatty())


def _export_merged(cfg: RunConfig, tokenizer, device, adapter_dir: Path, out_dir: Path) -> Path | None:
    """run_dir/merged: the saved adapter merged into a fresh unquantised base (merging into a
    4-bit QLoRA base would round the update to 4 bits). After QLoRA on a device whose free memory does not
    hold the unquantised base (modeling.qlora_base_in_4_bits), it is merged in host memory instead."""
    from peft import PeftModel

    from leantune.modeling import build_base_model, qlora_base_in_4_bits, resolve_precision

    if cfg.model.method == "full":
        log.warning("train.export_merged: nothing to merge with model.method=full; %s is the whole model",
                    adapter_dir)
        return None
    precision = resolve_precision(cfg, device)
    if qlora_base_in_4_bits(cfg, device, precision):
        device, cfg = _host_merge(cfg, precision)
    merged = PeftModel.from_pretrained(build_base_model(cfg, tokenizer, device), adapter_dir).merge_and_unload()
    merged.to(precision).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _host_merge(cfg: RunConfig, precision):
    """The CPU and the config to build the base there: in bf16 where training computed in half precision
    (the CPU refuses fp16; bf16 checkpoints load exactly), cast to the compute dtype before saving."""
    import torch

    log.info("train.export_merged: the unquantised base does not fit the GPU; merging in host memory")
    dtype = "fp32" if precision == torch.float32 else "bf16"
    return torch.device("cpu"), cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": dtype})})


# ------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m leantune.training.loop",
                                description="Train on a run directory prepared by the data stages "
                                "(its config.yaml, tokens/); see leantune/training/loop.py.")
    p.add_argument("run_dir", type=Path, help="runs/<name>/ with config.yaml and tokens/")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest intact checkpoint (automatic when checkpoints exist)")
    args = p.parse_args(argv)
    handler = logging.StreamHandler()
    # Started by the flow (launch.py): one JSON object per line, which it decodes (leantune/failures.py).
    handler.setFormatter(JsonLogFormatter() if os.environ.get(JSON_LOG_ENV) == "1"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    quiet_third_party()  # as in the flow's process: their notices once a run at most, not once per process
    cfg = None
    try:
        # One process trains in a run directory at a time (rank 0 holds the lock for all ranks).
        with hold_run_dir(args.run_dir) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext():
            cfg = load_config(RunDir(args.run_dir).config)
            summary = train(cfg, args.run_dir, resume=args.resume)
    except RunDirBusy as e:
        print(f"leantune: {e}", file=sys.stderr)  # the run belongs to its holder: nothing is written in it
        return EXIT_USER_ERROR
    except Exception as e:
        # A full disk is the user's to fix: one line saying so, not the chained tracebacks of each write.
        e = no_space_left(e, args.run_dir, args.run_dir.name) or e
        e = nondeterministic_op_error(e) or e  # train.deterministic met an op without a deterministic kernel
        # The flow that started this process reads why it failed from the run directory.
        if args.run_dir.is_dir():
            try:
                write_failure(args.run_dir, e, cfg)
            except OSError as unwritten:  # the disk is full: the exit status tells the flow instead
                log.error("could not write %s: %s", RunDir(args.run_dir).failure, unwritten)
        if isinstance(e, UserError):
            print(f"leantune: {e}", file=sys.stderr)
            return EXIT_NO_SPACE if isinstance(e, NoSpaceLeft) else EXIT_USER_ERROR
        if classify(e) in ("oom", "nan"):
            # Resource outcomes the flow answers with another attempt: the message says it all.
            log.error("%s: %s", type(e).__name__, e)
            return 1
        raise
    print(f"leantune: training {'finished' if summary['completed'] else 'stopped'} after step {summary['steps']}; "
          f"summary in {RunDir(args.run_dir).training}")
    return 0 if summary["completed"] else EXIT_STOPPED


if __name__ == "__main__":
    sys.exit(main())
