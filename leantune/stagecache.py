"""Stage cache: the same config on the same inputs skips prepare, validate and tokenize.

Each stage has a key that covers everything its outputs depend on, chained so that a stage's key
includes the key of the stage before it:

- prepare: the content (sha256) of every input file (a directory: every file in it, by relative
  path), the `data` section but the split (source paths, hub id/config/split, the synthetic
  generator's settings, dedupe, chunk_size), validation.max_reject_fraction (prepare's reject
  threshold) and the leantune code;
- validate: the prepare key, data.val_fraction and data.split_seed (the train/val split), the
  `validation` section and the content of the expectation suites;
- tokenize: the validate key, the `tokenize` section, the model fields that choose the tokenizer
  (name_or_path, revision, trust_remote_code) and the files of a local tokenizer directory. No train
  setting: the shards do not depend on the batch sizes or the seed (the padding of training's
  micro-batches is estimated on the training side, leantune/shards.py), so a new micro-batch reuses them.

Keys never use timestamps. A hub source is keyed by its id, config and split only: the hub may
publish new data under the same id, which the key cannot see; set run.cache=false to re-read it.
A model or tokenizer hub id is keyed the same way (with model.revision, pin it for exact reuse).

The cache lives in `<run.output_dir>/.cache/<stage>/<key>/`: `files/` holds the stage's outputs
by their path in the run directory, `stats.json` the dict the stage returned, and `manifest.json`,
written last, the size and sha256 of every other file of the entry (as a checkpoint's manifest does).
A hit copies exactly the files the manifest lists into the new run directory, hashing each as it
copies, and returns the stats, so the run directory is the same as an uncached run's. An entry that
does not verify (no or unreadable manifest, a file missing, of another size or another hash) is a
miss: it is removed with a warning, the stage runs, and its outputs are stored afresh. Each stage
writes only its own files (STAGE_OUTPUTS), never an earlier stage's. Files are copied, not
hard-linked, so that nothing done to a run's files can alter the cached copy. An entry is written to
a temporary directory and renamed, so a reader never sees half an entry; a store that fails (the
disk full, the cache folder deleted meanwhile) is a warning, never the run's failure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from leantune.config import RunConfig
from leantune.rundir import RunDir

log = logging.getLogger(__name__)

# Bump when the layout of a cache entry changes.
CACHE_FORMAT = 2
MANIFEST = "manifest.json"  # written last: the entry's files, sizes and sha256
STATS = "stats.json"
FILES = "files"
PACKAGE_DIR = Path(__file__).resolve().parent

# What each stage writes, relative to the run directory (a directory means everything in it).
_DATA, _TOKENS = RunDir(Path()).data_dir, RunDir(Path()).tokens
STAGE_OUTPUTS: dict[str, list[Path]] = {
    "prepare": [_DATA.records, _DATA.rejects, _DATA.duplicates, _DATA.prepare],
    "validate": [_DATA.train, _DATA.val, _DATA.quarantine, _DATA.validation, _DATA.quality],
    "tokenize": [_TOKENS],
}
# Files of a local tokenizer directory that define the tokenizer (not the model's weights).
TOKENIZER_FILE_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "chat_template")
TOKENIZER_FILE_SUFFIXES = (".model", ".tiktoken")


def _sha256(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


@lru_cache(maxsize=4096)
def _file_digest_memo(path: str, size: int, mtime_ns: int) -> str:
    # The memo only spares re-reading a file within one process (the three stage keys all hash the
    # inputs); the digest itself is of the content, so a touched but unchanged file still hits.
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file's content."""
    st = path.stat()
    return _file_digest_memo(str(path.resolve()), st.st_size, st.st_mtime_ns)


def tree_digest(path: Path, include: Callable[[Path], bool] = lambda p: True) -> str:
    """sha256 over the relative paths and contents of a file, or of every file under a directory."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    if not path.is_dir():
        return "missing"
    files = sorted((p for p in path.rglob("*") if p.is_file() and include(p)),
                   key=lambda p: p.relative_to(path).as_posix())
    return _sha256(*(f"{p.relative_to(path).as_posix()}:{file_digest(p)}" for p in files))


def code_digest() -> str:
    """sha256 of the leantune sources: new code invalidates the cache (the suites are in validate_key)."""
    files = sorted(PACKAGE_DIR.rglob("*.py"))
    return _sha256(*(f"{p.relative_to(PACKAGE_DIR.parent).as_posix()}:{file_digest(p)}" for p in files))


# The data settings only validate reads (the split); prepare's key leaves them out.
SPLIT_FIELDS = {"val_fraction", "split_seed"}


def prepare_key(cfg: RunConfig) -> str:
    # Synthetic and hub sources are fully described by the data section; file sources by content.
    contents = [tree_digest(Path(src.path)) for src in cfg.data.sources if src.kind == "file"]
    settings = json.dumps({"data": cfg.data.model_dump(mode="json", exclude=SPLIT_FIELDS),
                           "max_reject_fraction": cfg.validation.max_reject_fraction,
                           # Preference objectives read rows as pairs (data/preference.py).
                           "pairs": cfg.train.objective != "sft"}, sort_keys=True)
    return _sha256(f"format={CACHE_FORMAT}", "prepare", code_digest(), settings, *contents)


def validate_key(cfg: RunConfig) -> str:
    from leantune.validation import suites_dir

    split = json.dumps(cfg.data.model_dump(mode="json", include=SPLIT_FIELDS), sort_keys=True)
    return _sha256("validate", prepare_key(cfg), split, cfg.section_hash("validation"), tree_digest(suites_dir(cfg)))


def _is_tokenizer_file(path: Path) -> bool:
    return path.name.startswith(TOKENIZER_FILE_PREFIXES) or path.name.endswith(TOKENIZER_FILE_SUFFIXES)


def tokenize_key(cfg: RunConfig) -> str:
    m = cfg.model
    source = cfg.tokenize.tokenizer or m.name_or_path
    local = tree_digest(Path(source), _is_tokenizer_file) if Path(source).is_dir() else "not-local"
    return _sha256("tokenize", validate_key(cfg), cfg.section_hash("tokenize"),
                   json.dumps([m.name_or_path, m.revision, m.trust_remote_code, local]))


STAGE_KEYS: dict[str, Callable[[RunConfig], str]] = {
    "prepare": prepare_key, "validate": validate_key, "tokenize": tokenize_key,
}


def cache_dir(cfg: RunConfig) -> Path:
    return Path(cfg.run.output_dir) / ".cache"


def _stats_to_json(stage: str, stats: dict) -> str:
    if stage == "tokenize":
        # The per-record lengths are an array already saved as tokens/train/lengths.npy, and the
        # tokenizer's directory names this run; both are rebuilt for the run that restores them.
        stats = {k: v for k, v in stats.items() if k != "lengths"}
        stats["tokenizer"] = {k: v for k, v in stats["tokenizer"].items() if k != "dir"}
    return json.dumps(stats, indent=2, ensure_ascii=False)


def _stats_from_json(stage: str, text: str, run_dir: Path) -> dict:
    stats = json.loads(text)
    if stage == "tokenize":
        import numpy as np

        stats["lengths"] = np.load(RunDir(run_dir).token_dir.record_lengths("train"))
        stats["tokenizer"]["dir"] = str(RunDir(run_dir).tokenizer)
    return stats


def _copy_hashed(src: Path, dst: Path | None) -> dict:
    """Copy one file to `dst` (None: only read it), hashing what it reads; return its manifest entry."""
    digest, size = hashlib.sha256(), 0
    if dst is not None:
        dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as f, open(dst if dst is not None else os.devnull, "wb") as out:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            out.write(block)
            size += len(block)
    return {"size": size, "sha256": digest.hexdigest()}


def _output_files(stage: str, root: Path) -> list[Path]:
    """The stage's output files under `root` (a run directory), relative to it, in a stable order."""
    found = []
    for rel in STAGE_OUTPUTS[stage]:
        path = root / rel
        if path.is_dir():
            found += sorted(p.relative_to(root) for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            found.append(rel)
    return found


def _remove_outputs(stage: str, run_dir: Path) -> None:
    for rel in STAGE_OUTPUTS[stage]:
        path = run_dir / rel
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _entry_problem(entry: Path) -> tuple[dict | None, str | None]:
    """(manifest, None) for an entry whose files are all there with their sizes, else (None, what is wrong)."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except FileNotFoundError:
        return None, f"{MANIFEST} is missing (an incomplete entry)"
    except (OSError, ValueError) as e:
        return None, f"{MANIFEST} is unreadable ({e})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(files, dict) or manifest.get("format") != CACHE_FORMAT or STATS not in files
            or not all(isinstance(f, dict) and {"size", "sha256"} <= f.keys() for f in files.values())
            or not all(n == STATS or n.startswith(f"{FILES}/") and ".." not in Path(n).parts for n in files)):
        return None, f"{MANIFEST} is not a stage-cache manifest of format {CACHE_FORMAT}"
    for name, expected in files.items():
        path = entry / name
        if not path.is_file():
            return None, f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return None, f"{name} has {path.stat().st_size} bytes, the manifest says {expected['size']}"
    return manifest, None


def _drop(entry: Path, stage: str, problem: str) -> None:
    log.warning("stage cache: the %s entry %s is damaged (%s); it is removed and the stage runs", stage,
                entry, problem)
    shutil.rmtree(entry, ignore_errors=True)


def restore(cfg: RunConfig, stage: str, key: str, run_dir: Path) -> dict | None:
    """On a hit, copy the cached outputs of `stage` into `run_dir` and return its stats; else None.

    An entry that does not verify against its manifest is removed, and None returned (a miss)."""
    entry = cache_dir(cfg) / stage / key
    if not entry.exists():
        return None
    run_dir = Path(run_dir)
    manifest, problem = _entry_problem(entry)
    try:
        if problem is None and _copy_hashed(entry / STATS, None) != manifest["files"][STATS]:
            problem = f"{STATS} does not match its sha256 (corrupted)"
        if problem is None:
            _remove_outputs(stage, run_dir)
            for name, expected in manifest["files"].items():
                if name != STATS and _copy_hashed(entry / name, run_dir / Path(name).relative_to(FILES)) != expected:
                    problem = f"{name} does not match its sha256 (corrupted)"
                    _remove_outputs(stage, run_dir)  # the stage writes them afresh
                    break
    except OSError as e:  # the entry removed meanwhile by another run, or the run directory unwritable
        log.warning("stage cache: could not restore the %s entry %s (%s: %s); the stage runs", stage, entry,
                    type(e).__name__, e)
        _remove_outputs(stage, run_dir)
        return None
    if problem is not None:
        _drop(entry, stage, problem)
        return None
    return _stats_from_json(stage, (entry / STATS).read_text(), run_dir)


def store(cfg: RunConfig, stage: str, key: str, run_dir: Path, stats: dict) -> Path | None:
    """Save the outputs of `stage` in `run_dir` and its stats under the key; return the entry, or None
    when it could not be written (a warning: the run goes on without it)."""
    stage_dir = cache_dir(cfg) / stage
    entry = stage_dir / key
    tmp = None
    try:
        stage_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=stage_dir))
        # mkdtemp makes the directory private (0700); the entry is read by later runs of other users too.
        tmp.chmod(0o755)
        files = {(FILES / rel).as_posix(): _copy_hashed(Path(run_dir) / rel, tmp / FILES / rel)
                 for rel in _output_files(stage, Path(run_dir))}
        (tmp / STATS).write_text(_stats_to_json(stage, stats))
        files[STATS] = _copy_hashed(tmp / STATS, None)
        # The manifest is written last: its presence marks a complete entry.
        (tmp / MANIFEST).write_text(json.dumps({"format": CACHE_FORMAT, "stage": stage, "files": files}, indent=1))
        if problem := _entry_problem(tmp)[1]:  # e.g. the cache folder deleted (and its parents remade) meanwhile
            raise FileNotFoundError(f"the entry being written lost a file: {problem}")
        os.rename(tmp, entry)
        return entry
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        # Another run stored the same key first (rename onto a non-empty directory fails): its entry
        # holds the same outputs. Anything else (a full disk, the cache deleted meanwhile) is a warning.
        if _entry_problem(entry)[1] is None:
            return entry
        log.warning("stage cache: could not store the %s outputs in %s (%s: %s); the run goes on without "
                    "caching them", stage, entry, type(e).__name__, e)
        return None


def run_cached(cfg: RunConfig, stage: str, run_dir: Path, compute: Callable[[], dict]) -> tuple[dict, str | None]:
    """Run `compute` (the stage, writing into `run_dir`) unless its cache entry exists.

    Returns (stats, key of the hit or None when the stage ran). With run.cache off the stage
    always runs and nothing is stored.
    """
    if not cfg.run.cache:
        return compute(), None
    key = STAGE_KEYS[stage](cfg)
    stats = restore(cfg, stage, key, run_dir)
    if stats is not None:
        return stats, key
    stats = compute()
    store(cfg, stage, key, run_dir, stats)
    return stats, None
