"""Checkpoints with exact resume: when to save, what a checkpoint holds, retention, verified loading.

`CheckpointManager` decides when to save (`due`: every `checkpoint.every_steps` optimizer steps,
every `checkpoint.every_minutes` minutes of a monotonic clock, after SIGTERM/SIGINT, or on
`request(reason)` from the resource monitor), writes checkpoints, keeps the last
`checkpoint.keep_last` plus the best one, finds the newest intact one (`latest`) and restores it
(`load`) after checking that the run it continues is the same run. A different train.lr is allowed:
the restored schedule is rescaled by new/old (`_rescale_lr`, recorded in `lr_rescale`).

On-disk format of `checkpoints/step-N/` (N = optimizer steps completed):
  adapter.safetensors   LoRA/QLoRA: the adapter tensors (peft's get_peft_model_state_dict), or
  model.safetensors     full fine-tune: the whole state_dict (tied weights stored once)
  sharded/              FSDP (train.distributed.strategy fsdp): instead of the weights file and
                        optimizer.pt, the trained weights and the optimizer state as
                        torch.distributed.checkpoint writes them, each rank its own files (fsdp.py);
                        they load onto any number of ranks
  optimizer.pt          optimizer.state_dict()      } torch.save; read back with
  scheduler.pt          scheduler.state_dict()      } torch.load(weights_only=True): tensors,
  scaler.pt             GradScaler state (fp16 only) } numbers, strings, lists, dicts only
  rng.pt                RNG states: python `random`, numpy's global RNG, torch CPU, every CUDA device
  rng-rank-R.pt         data parallel: the same for rank R >= 1 (rng.pt is rank 0's); each rank draws
                        its own dropout, so each restores its own state
  state.json            the loop's state (data cursor, micro-batch, step and token counters, ...)
  manifest.json         format + version, step, creation time, save reason, metric, the run's
                        fingerprints, the resume-relevant config (`resume_fingerprint`), and the
                        sha256 and size of every other file (those in sharded/ too)
`checkpoints/best.json` names the checkpoint with the lowest metric: {"checkpoint", "step", "metric"}.

A checkpoint is written to `checkpoints/.tmp-step-N/` (every file fsynced), then renamed to
`step-N`, so a crash leaves either the complete checkpoint or a `.tmp-*` directory that the next
`latest()` removes. Python pickles are never loaded: RNG states are stored as tensors and numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from leantune.config import RunConfig
from leantune.errors import UserError
from leantune.resume import resume_config_hash, resume_config_problems, resume_fingerprint
from leantune.rundir import STEP_DIR, RunDir

log = logging.getLogger(__name__)

FORMAT = "leantune-checkpoint"
FORMAT_VERSION = 1
TMP_PREFIX = ".tmp-"
REQUIRED_FILES = ("optimizer.pt", "scheduler.pt", "rng.pt", "state.json")
WEIGHT_FILES = {"adapter": "adapter.safetensors", "model": "model.safetensors", "sharded": "sharded/.metadata"}
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# ---------------------------------------------------------------------------------- fingerprints


def run_fingerprints(cfg: RunConfig, run_dir: Path) -> dict[str, str]:
    """The fingerprints a CheckpointManager of this run checks on resume.

    "config": `resume_config_hash`; "data": the train split's tokenize config hash plus a hash of
    every file of `tokens/train/` (the exact sequences training reads); "tokenizer": the
    tokenizer hash recorded by the tokenize stage. The validation split is left out: it decides
    which checkpoint is best, not what the updates are.
    """
    train_dir = RunDir(run_dir).train_tokens
    index = json.loads(RunDir(run_dir).train_index.read_text())
    files = hashlib.sha256()
    for path in sorted(p for p in train_dir.iterdir() if p.is_file()):
        files.update(path.name.encode())
        files.update(_sha256(path).encode())
    return {
        "config": resume_config_hash(cfg),
        "data": f"{index['config_hash']}-{files.hexdigest()[:16]}",
        "tokenizer": index["tokenizer"]["hash"],
    }


# ---------------------------------------------------------------------------------- file helpers


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once the directory holding the entry is synced.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _torch_save(obj: Any, path: Path) -> None:
    import torch

    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _torch_load(path: Path) -> Any:
    import torch

    # weights_only: a checkpoint can never run code, whoever wrote it.
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------ RNG states


def rng_state() -> dict:
    """Every RNG the loop may draw from, as tensors and numbers that weights_only loading accepts."""
    import numpy as np
    import torch

    version, mt_state, gauss_next = random.getstate()
    algorithm, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"algorithm": algorithm, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured; CUDA states only when the same number of devices is visible."""
    import numpy as np
    import torch

    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["algorithm"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(cuda) == visible:
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    else:
        log.warning("checkpoint has CUDA RNG states for %d device(s) but %d are visible; CUDA random "
                    "numbers (dropout on the GPU) will differ from an uninterrupted run", len(cuda), visible)


# ---------------------------------------------------------------------------------------- weights


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def _save_weights(model, tmp: Path) -> str:
    """Write the trained weights into `tmp`; return the weights kind ("adapter" or "model")."""
    from safetensors.torch import save_file, save_model

    if _is_peft(model):
        from peft import get_peft_model_state_dict

        # LoRA on embed_tokens/lm_head would make peft add the whole (unchanged) base matrices: leantune
        # never resizes the vocabulary, so the LoRA tensors are the trained state.
        tensors = {k: v.detach().cpu().contiguous()
                   for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}
        save_file(tensors, tmp / WEIGHT_FILES["adapter"])
        return "adapter"
    # save_model stores tied weights (embedding = LM head) once, which save_file refuses.
    save_model(model, str(tmp / WEIGHT_FILES["model"]))
    return "model"


def _load_weights(model, path: Path, kind: str) -> None:
    from safetensors.torch import load_file, load_model

    if kind != ("adapter" if _is_peft(model) else "model"):
        raise UserError(
            f"checkpoint {path} holds {'LoRA adapter' if kind == 'adapter' else 'full model'} weights but the "
            "model being trained is not set up that way; resume with the model.method the run was started with"
        )
    file = path / WEIGHT_FILES[kind]
    if kind == "model":
        load_model(model, file, strict=True, device=str(next(model.parameters()).device))
        return
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    saved = load_file(file)
    expected = set(get_peft_model_state_dict(model, save_embedding_layers=False))
    if set(saved) != expected:
        raise UserError(
            f"checkpoint {path}: its adapter tensors do not match the model's LoRA layers "
            f"({len(set(saved) - expected)} unexpected, {len(expected - set(saved))} missing); resume with the "
            "lora settings and model the run was started with"
        )
    set_peft_model_state_dict(model, saved)


# ---------------------------------------------------------------------------------- learning rate


def _rescale_lr(optimizer, scheduler, configured_lrs: list[float], step: int) -> dict | None:
    """Put the configured peak lrs into a restored optimizer and schedule; None when they are the checkpoint's.

    The schedule is a multiplier of the peak lr (optim.lr_multiplier), so scaling the peak (the
    scheduler's base_lrs and each group's initial_lr) and the current lr by new/old continues the
    same schedule at the new height: the next step's lr is the old schedule's times new/old.
    """
    saved_lrs = list(scheduler.base_lrs)
    if saved_lrs == configured_lrs:
        return None
    factors = [new / old for new, old in zip(configured_lrs, saved_lrs, strict=True)]
    for group, new, factor in zip(optimizer.param_groups, configured_lrs, factors, strict=True):
        group["initial_lr"] = new
        group["lr"] = group["lr"] * factor
    scheduler.base_lrs = list(configured_lrs)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    log.warning("resume at step %d with train.lr %s instead of the checkpoint's %s: the learning-rate schedule "
                "is rescaled by %s", step, json.dumps(configured_lrs[0]), json.dumps(saved_lrs[0]), json.dumps(factors[0]))
    return {"old": saved_lrs, "new": configured_lrs, "factor": factors}


# ------------------------------------------------------------------------------------ the manager


class CheckpointManager:
    """Saves, prunes, finds and restores the checkpoints of one run directory.

    `fingerprints` identify the run (see `run_fingerprints`); a checkpoint whose fingerprints or
    resume-relevant config differ from the current run is refused by `load`. `clock` is the
    monotonic clock behind `checkpoint.every_minutes` (tests inject a fake one).
    """

    def __init__(self, cfg: RunConfig, run_dir: Path, fingerprints: dict[str, str], *,
                 clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.dir = RunDir(run_dir).checkpoints
        self.fingerprints = dict(fingerprints)
        self._clock = clock
        self._last_save_time = clock()
        self._last_saved_step: int | None = None
        # request() may come from the monitor thread while the loop calls due() and save().
        self._lock = threading.Lock()
        self._requests: list[str] = []
        # Set from a signal handler, which runs between bytecodes of the main thread: a plain
        # attribute write, never the lock (the interrupted code may be holding it).
        self._signalled: str | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._saving = False  # a checkpoint is being written: a repeated SIGINT waits for it (`_on_signal`)
        self._verified: set[Path] = set()
        # What the last `load` did to the learning rate: {"old", "new", "factor"} (lists per group), or None.
        self.lr_rescale: dict | None = None

    # ------------------------------------------------------------------------------ triggers

    def request(self, reason: str) -> None:
        """Ask for a checkpoint at the next step boundary (thread-safe)."""
        with self._lock:
            self._requests.append(reason)

    @property
    def stop_requested(self) -> bool:
        """True after SIGTERM/SIGINT: the loop saves at the next step boundary, then stops cleanly."""
        return self._signalled is not None

    def due(self, step: int) -> str | None:
        """Why a checkpoint should be saved after optimizer step `step`, or None.

        Reasons: "signal", "requested:<reason>", "every_steps", "every_minutes". A step that is
        already saved is never due again.
        """
        if step == self._last_saved_step:
            return None
        if self._signalled is not None:
            return "signal"
        with self._lock:
            if self._requests:
                return f"requested:{self._requests[0]}"
        c = self.cfg.checkpoint
        if step > 0 and step % c.every_steps == 0:
            return "every_steps"
        if self._clock() - self._last_save_time >= c.every_minutes * 60:
            return "every_minutes"
        return None

    # ------------------------------------------------------------------------------- signals

    def install_signal_handlers(self) -> None:
        """On SIGTERM/SIGINT set `stop_requested` (when checkpoint.on_signal); a second SIGINT acts as before
        unless a checkpoint is being written; a second SIGTERM changes nothing (`_on_signal`).

        Handlers can only be installed from the main thread; elsewhere (e.g. a Prefect task in a
        worker thread) signals keep their default action and this says so.
        """
        if not self.cfg.checkpoint.on_signal:
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: SIGTERM/SIGINT will not trigger a checkpoint in this run")
            return
        for sig in HANDLED_SIGNALS:
            previous = signal.signal(sig, self._on_signal)
            # None: a handler installed outside Python, which cannot be reinstalled; the default stands in.
            self._previous_handlers[sig] = signal.SIG_DFL if previous is None else previous

    def restore_signal_handlers(self) -> None:
        """Put back the handlers that were there before `install_signal_handlers`."""
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self._signalled is None:
            self._signalled = name
            log.warning("%s received: saving a checkpoint at the end of this step, then stopping "
                        "(send it again to stop at once)", name)
            return
        if self._saving or signum == signal.SIGTERM:
            # A second SIGTERM is not a person's: a service manager signalling every process of the run, the
            # flow's stop after it, or the flow dying (launch.own_session) when Prefect kills it after its
            # grace period while a long step runs. It must not cost the checkpoint, nor may any signal cut
            # the checkpoint being written.
            log.warning("%s received again: stopping after the checkpoint, as asked", name)
            return
        # A second Ctrl-C between checkpoints (the loop run by hand) stops a run that hangs before its next
        # step boundary: the signal goes to the handler that was there before.
        signal.signal(signum, self._previous_handlers[signum])
        signal.raise_signal(signum)

    # ---------------------------------------------------------------------------------- save

    def save(self, step: int, model, optimizer, scheduler, state: dict, metric: float | None = None, *,
             scaler=None, reason: str | None = None, rank_rngs: list[dict] | None = None, dist=None) -> Path:
        """`_write` with a repeated SIGINT held off until the checkpoint is whole (`_on_signal`)."""
        self._saving = True
        try:
            return self._write(step, model, optimizer, scheduler, state, metric, scaler=scaler, reason=reason,
                               rank_rngs=rank_rngs, dist=dist)
        finally:
            self._saving = False

    def _write(self, step: int, model, optimizer, scheduler, state: dict, metric: float | None = None, *,
               scaler=None, reason: str | None = None, rank_rngs: list[dict] | None = None, dist=None) -> Path:
        """Write checkpoints/step-`step`/ atomically, update best.json, apply retention; return its path.

        `state` is the loop's JSON-able state; `metric` (lower is better, e.g. validation loss)
        competes for best; `scaler` is the fp16 GradScaler; `reason` (what `due` returned) goes
        into the manifest. Data parallel: rank 0 saves, `rank_rngs` are the `rng_state()`s of ranks
        1, 2, ... and the other ranks call `mark_saved`. FSDP (`dist.sharded`): every rank calls it and
        writes its shards into sharded/ (fsdp.py); rank 0 writes the rest.
        """
        name = f"step-{step}"
        tmp = self.dir / f"{TMP_PREFIX}{name}"
        sharded = dist is not None and dist.sharded
        if not sharded or dist.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        if sharded:
            from leantune.training.fsdp import SHARDED_DIR, save_sharded

            dist.broadcast(None)  # the other ranks write into tmp once rank 0 has made it afresh
            save_sharded(model, optimizer, tmp / SHARDED_DIR)  # returns when every rank's files are written
            if not dist.is_main:
                self.mark_saved(step)
                return self.dir / name
            weights = "sharded"
        else:
            weights = _save_weights(model, tmp)
            _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
        _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            _torch_save(scaler.state_dict(), tmp / "scaler.pt")
        _torch_save(rng_state(), tmp / "rng.pt")
        for rank, rng in enumerate(rank_rngs or [], start=1):
            _torch_save(rng, tmp / f"rng-rank-{rank}.pt")
        _write_json(tmp / "state.json", state)

        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            _fsync_file(path)
            files[path.relative_to(tmp).as_posix()] = {"sha256": _sha256(path), "size": path.stat().st_size}
        now = time.time()
        _write_json(tmp / "manifest.json", {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": step,
            "created": datetime.fromtimestamp(now, timezone.utc).isoformat(),
            "created_unix": now,
            "reason": reason,
            "metric": metric,
            "world_size": 1 + len(rank_rngs or []),
            "weights": weights,
            "fingerprints": self.fingerprints,
            "resume_config": resume_fingerprint(self.cfg),
            "files": files,
        })
        for folder in [p for p in tmp.rglob("*") if p.is_dir()]:
            _fsync_dir(folder)
        _fsync_dir(tmp)

        final = self.dir / name
        if final.exists():
            # A resume that fell back past a corrupt checkpoint writes the same step again.
            old = self.dir / f"{TMP_PREFIX}old-{name}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.dir)

        if metric is not None:
            best = self.best()
            if best is None or metric < best["metric"] or best["checkpoint"] == name:
                best_tmp = self.dir / f"{TMP_PREFIX}best.json"
                _write_json(best_tmp, {"checkpoint": name, "step": step, "metric": metric})
                os.replace(best_tmp, self.dir / "best.json")
        self._prune(keep=final)

        self.mark_saved(step)
        log.info("checkpoint %s saved (%s)", final, reason or "manual")
        return final

    def mark_saved(self, step: int) -> None:
        """Note that step `step` is saved (by this manager, or data parallel: by rank 0's), so the
        triggers (every_minutes, requests) start over."""
        self._last_saved_step = step
        self._last_save_time = self._clock()
        with self._lock:
            self._requests.clear()

    def best(self) -> dict | None:
        """best.json: {"checkpoint", "step", "metric"} of the lowest-metric checkpoint, or None.

        A best.json that is not such an object (empty, cut short, edited) is corrupt like any other
        checkpoint file: it is reported and counts as absent, and the next save with a metric rewrites it.
        """
        path = self.dir / "best.json"
        if not path.is_file():
            return None
        try:
            best = json.loads(path.read_text())
            if isinstance(best, dict) and isinstance(best.get("checkpoint"), str) and \
                    isinstance(best.get("metric"), int | float):
                return best
            problem = "not an object with checkpoint and metric"
        except (OSError, ValueError) as e:
            problem = f"unreadable: {e}"
        log.warning("checkpoint: %s is corrupt (%s); ignoring it, the next evaluated checkpoint rewrites it",
                    path, problem)
        return None

    def _steps(self) -> list[tuple[int, Path]]:
        """(step, path) of every step-N directory, newest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
        return sorted(found, reverse=True)

    def _prune(self, keep: Path) -> None:
        """Delete all but the newest checkpoint.keep_last, the best one and `keep` (just written)."""
        best = self.best()
        kept = {p for _, p in self._steps()[: self.cfg.checkpoint.keep_last]} | {keep}
        if best is not None:
            kept.add(self.dir / best["checkpoint"])
        for _, path in self._steps():
            if path not in kept:
                # Renamed first so a crash mid-delete leaves a .tmp-* leftover, not a damaged step-N.
                doomed = self.dir / f"{TMP_PREFIX}del-{path.name}"
                os.replace(path, doomed)
                shutil.rmtree(doomed)
                self._verified.discard(path)

    # ----------------------------------------------------------------------------- find, load

    def problem(self, path: Path) -> str | None:
        """What is wrong with the checkpoint at `path` (manifest, files, sizes, hashes), or None.

        A checkpoint found intact is not hashed again by this manager (latest() then load()).
        """
        path = Path(path)
        if path in self._verified:
            return None
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except FileNotFoundError:
            return "manifest.json is missing"
        except (OSError, ValueError) as e:
            return f"manifest.json is unreadable ({e})"
        if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
            return "manifest.json is not a leantune checkpoint manifest"
        files = manifest["files"]
        # FSDP's optimizer state is in sharded/ with its weights.
        needed = [*(f for f in REQUIRED_FILES if not (manifest.get("weights") == "sharded" and f == "optimizer.pt")),
                  WEIGHT_FILES.get(manifest.get("weights"), "weights")]
        absent = [name for name in needed if name not in files]
        if absent:
            return f"the manifest lists no {', '.join(absent)}"
        for name, expected in files.items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            size = file.stat().st_size
            if size != expected["size"]:
                return f"{name} has {size} bytes, the manifest says {expected['size']} (truncated?)"
            if _sha256(file) != expected["sha256"]:
                return f"{name} does not match its sha256 in the manifest (corrupted)"
        self._verified.add(path)
        return None

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies, or None; corrupt ones are skipped with a warning.

        Leftover `.tmp-*` directories (a save or delete that was interrupted) are removed.
        """
        if not self.dir.is_dir():
            return None
        for leftover in self.dir.glob(f"{TMP_PREFIX}*"):
            log.info("removing %s, left by an interrupted checkpoint write", leftover)
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
        for _, path in self._steps():
            problem = self.problem(path)
            if problem is None:
                return path
            log.warning("checkpoint %s is unusable: %s; falling back to an older checkpoint", path, problem)
        return None

    def load(self, path: Path, model, optimizer, scheduler, scaler=None, *, rank: int = 0,
             sharded: bool = False) -> dict:
        """Restore weights, optimizer, scheduler, (scaler) and RNG states from `path`; return the loop state.

        Data parallel: every rank loads the same checkpoint; rank R restores the RNG state saved for it.
        sharded: this run's model is sharded (FSDP), so only a sharded checkpoint loads into it.

        Refuses (UserError) a checkpoint that does not verify, comes from a newer leantune, or
        belongs to a run whose resume-relevant config, data or tokenizer differ from this one.
        """
        path = Path(path)
        problem = self.problem(path)
        if problem is not None:
            raise UserError(f"checkpoint {path} is unusable: {problem}; delete it to resume from an older one")
        manifest = json.loads((path / "manifest.json").read_text())
        if manifest["format_version"] > FORMAT_VERSION:
            raise UserError(f"checkpoint {path} has format version {manifest['format_version']}, newer than "
                            f"this leantune reads ({FORMAT_VERSION}); upgrade leantune to resume it")
        self._check_same_run(path, manifest)

        # The peak lrs this run's config asks for, before the checkpoint's replace them.
        configured_lrs = list(scheduler.base_lrs)
        if manifest["weights"] == "sharded":
            from leantune.training.fsdp import SHARDED_DIR, load_sharded

            load_sharded(model, optimizer, path / SHARDED_DIR)
        else:
            if sharded:
                raise UserError(f"checkpoint {path} was saved by one process or with train.distributed.strategy "
                                "ddp, and this run shards the model (fsdp); resume it with the strategy it was "
                                "saved with, or start a new run")
            _load_weights(model, path, manifest["weights"])
            optimizer.load_state_dict(_torch_load(path / "optimizer.pt"))
        scheduler.load_state_dict(_torch_load(path / "scheduler.pt"))
        self.lr_rescale = _rescale_lr(optimizer, scheduler, configured_lrs, manifest["step"])
        has_scaler = (path / "scaler.pt").is_file()
        if scaler is not None and has_scaler:
            scaler.load_state_dict(_torch_load(path / "scaler.pt"))
        elif scaler is not None or has_scaler:
            log.warning("checkpoint %s was written %s fp16 loss scaling and this run %s it (the precision "
                        "changed): the loss scale starts afresh", path, "with" if has_scaler else "without",
                        "does not use" if has_scaler else "uses")
        # Last, so that nothing between here and the next step draws from the restored RNGs.
        rng = path / ("rng.pt" if rank == 0 else f"rng-rank-{rank}.pt")
        if rng.is_file():
            set_rng_state(_torch_load(rng))
        else:
            log.warning("checkpoint %s was saved by %d process(es) and has no RNG state for rank %d: its random "
                        "numbers (dropout) start from train.seed and differ from an uninterrupted run", path,
                        manifest.get("world_size", 1), rank)

        self._last_saved_step = manifest["step"]
        self._last_save_time = self._clock()
        log.info("resumed from %s (step %d)", path, manifest["step"])
        return json.loads((path / "state.json").read_text())

    def _check_same_run(self, path: Path, manifest: dict) -> None:
        problems = resume_config_problems(manifest, self.cfg)
        saved = manifest["fingerprints"]
        what = {
            "data": "the training tokens (tokens/train) differ from those the checkpoint was trained on: resume "
                    "needs the same data; restore the data and tokenize outputs or start a new run",
            "tokenizer": "the tokenizer differs from the checkpoint's: resume needs the same tokenizer; restore "
                         "it or start a new run",
        }
        for key in sorted(saved.keys() | self.fingerprints.keys()):
            if saved.get(key) == self.fingerprints.get(key):
                continue
            # The config is compared key by key above (its hash also moves when RESUMABLE_CHANGES grows).
            if key == "config":
                continue
            problems.append(what.get(key, f"the run's '{key}' fingerprint changed from {saved.get(key)} to "
                                          f"{self.fingerprints.get(key)}: resume needs the same run; start a new run"))
        if problems:
            lines = "\n".join(f"  - {p}" for p in problems)
            raise UserError(f"cannot resume from {path}: this run differs from the checkpoint's run:\n{lines}")
