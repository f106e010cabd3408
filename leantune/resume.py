"""The resume policy: which settings a run may change when it continues from a checkpoint, the config
fingerprint a checkpoint stores, and why a resume is refused. Torch-free, so the command line (leantune/cli.py)
and the flow can refuse a resume before anything heavy starts; the training process checks again when it
loads a checkpoint (leantune/training/checkpoint.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from leantune.config import RunConfig
from leantune.rundir import STEP_DIR, RunDir

# Dotted config keys (or whole sections) that may differ between a checkpoint and the run resuming
# it: they change how the run is executed, observed or reported, not which update each step makes.
# Everything else must match for the resumed run to continue the same sequence of updates.
RESUMABLE_CHANGES = (
    "train.micro_batch_size",  # adapts anyway; the loss is normalised over the whole global batch
    "train.eval_every",
    "train.log_every",
    "train.max_attempts",
    # A new peak lr rescales the restored schedule by new/old on load (training/checkpoint.py, `_rescale_lr`): the NaN retry
    # and `--resume --set train.lr=...` continue the run with a lower or higher lr from there on.
    "train.lr",
    "train.export_merged",  # what is written after the last step
    # Moving a run to another machine is legitimate, and 'auto' may resolve differently anyway.
    "train.device",
    "train.deterministic",  # which kernels compute the same sums: at most float rounding apart
    # Data parallel gives the single-process update, so a run may resume on more or fewer GPUs; only
    # dropout's random numbers (per-rank RNG states) then differ from an uninterrupted run.
    "train.distributed",
    "model.gradient_checkpointing",  # recomputation saves memory and gives the same gradients
    "data.chunk_size",  # streaming granularity; the data fingerprint guards the resulting tokens
    "validation.max_reject_fraction",  # only decides whether the data stage fails
    "validation.examples_per_failure",
    "adaptive",
    "checkpoint",
    "monitor",
    "power",
    "eval",
    "run",
    "tracking",  # where the run is logged, not what it computes
)


def flatten_config(value: Any, prefix: str, out: dict[str, Any]) -> None:
    # Lists of sections (data.sources) are split by index so a difference names the exact key;
    # lists of plain values (lora.target_modules) stay one value.
    if isinstance(value, dict):
        for key, sub in value.items():
            flatten_config(sub, f"{prefix}.{key}" if prefix else key, out)
    elif isinstance(value, list) and any(isinstance(v, dict) for v in value):
        for i, sub in enumerate(value):
            flatten_config(sub, f"{prefix}.{i}", out)
    else:
        out[prefix] = value


def _may_change(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES)


def resume_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """The config values an exact resume depends on, as {dotted key: value} (JSON values).

    Stored in every manifest; `load` compares it with the current config to name what changed.
    """
    flat: dict[str, Any] = {}
    flatten_config(cfg.model_dump(mode="json"), "", flat)
    return {k: v for k, v in sorted(flat.items()) if not _may_change(k)}


def resume_config_hash(cfg: RunConfig) -> str:
    """Short hash of `resume_fingerprint(cfg)`: the "config" fingerprint of a run."""
    blob = json.dumps(resume_fingerprint(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _show(value: Any) -> str:
    return json.dumps(value)


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per resume-relevant key that differs, e.g. 'train.seed changed from 0 to 1'."""
    lines = []
    for key in sorted(saved.keys() | current.keys()):
        if key not in current:
            lines.append(f"{key} was {_show(saved[key])} and is gone now")
        elif key not in saved:
            lines.append(f"{key} is new (value {_show(current[key])})")
        elif saved[key] != current[key]:
            lines.append(f"{key} changed from {_show(saved[key])} to {_show(current[key])}")
    return lines


def resume_config_problems(manifest: dict, cfg: RunConfig) -> list[str]:
    """One line per setting of `cfg` that differs from a checkpoint manifest's and would alter the updates."""
    # A key that has since become resumable (e.g. train.lr) is no longer compared.
    saved_config = {k: v for k, v in manifest["resume_config"].items() if not _may_change(k)}
    return [f"{line}: resume needs the same value; restore it or start a new run"
            for line in config_changes(saved_config, resume_fingerprint(cfg))]


def resume_refusal(cfg: RunConfig, run_dir: Path) -> str | None:
    """Why `cfg` cannot resume the newest readable checkpoint of `run_dir` (a setting that would alter the
    updates changed), or None. Reads manifests only: nothing is loaded, written or removed, so a resume
    can be refused before anything of the run is touched (the training process checks everything again)."""
    checkpoints = RunDir(run_dir).checkpoints
    found = sorted(((int(m.group(1)), p) for p in checkpoints.glob("step-*") if (m := STEP_DIR.match(p.name))),
                   reverse=True) if checkpoints.is_dir() else []
    for _, path in found:
        try:
            manifest = json.loads((path / "manifest.json").read_text())
            problems = resume_config_problems(manifest, cfg)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # an incomplete or corrupt checkpoint: the training process falls back past it
        if not problems:
            return None
        lines = "\n".join(f"  - {p}" for p in problems)
        return f"cannot resume from {path}: this run differs from the checkpoint's run:\n{lines}"
    return None
