"""Checks a run passes before its data stages, beyond what the config alone can tell: the data files
exist, the files that eval.datasets names exist, the held-out short-answer questions fill
eval.synthetic_items, a local model.name_or_path exists, model.dtype suits the device training runs on,
a hub model id is known to the local Hugging Face cache or to the hub (`hub_model_problem`),
every name in lora.target_modules matches a layer LoRA can adapt (a linear layer, not a container such as
`mlp`), QLoRA is not asked of a Mixture-of-Experts model (the model's skeleton, built on the meta device
from its config), and this machine's host memory (and under FSDP its GPU's) holds what loading the model and
train.distributed.cpu_offload need (probe.load_memory_problems). A problem found only after hours of data preparation and training is a problem
found too late."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from leantune.config import RunConfig
from leantune.errors import UserError
from leantune.evaluation.datasets import short_answer_shortfall, synthetic_item_count


def check_before_data(cfg: RunConfig) -> None:
    """Raise one UserError listing every problem (`problems_before_data`), or return."""
    if problems := problems_before_data(cfg):
        raise UserError("\n".join(problems) if len(problems) > 1 else problems[0])


def problems_before_data(cfg: RunConfig) -> list[str]:
    from leantune.modeling import lora_target_problem, moe_problems, resolve_device, resolve_precision
    from leantune.probe import load_memory_problems, model_shape

    problems = data_path_problems(cfg)
    hub_problem, readable = hub_model_check(cfg.model.name_or_path, cfg.model.revision)
    if problem := local_model_problem(cfg.model.name_or_path) or hub_problem:
        problems.append(problem)
    device = None
    try:
        device = resolve_device(cfg)
        resolve_precision(cfg, device)  # e.g. fp16 on the CPU, bf16 on a GPU without it
    except UserError as e:
        problems.append(str(e))
    if cfg.eval.enabled:
        sets = cfg.eval.sets()
        problems += [problem for spec in sets if (problem := spec.missing_file())]
        if {"synthetic", "synthetic-challenge"} & {spec.kind for spec in sets} and (problem := short_answer_shortfall(
                cfg.data.synthetic, synthetic_item_count(cfg), cfg.eval.synthetic_split)):
            problems.append(problem)
    if not readable:  # the model's config cannot be read (no such hub id, the hub unreachable): training checks
        return problems
    if problem := lora_target_problem(cfg):
        problems.append(problem)
    problems += moe_problems(cfg)
    if device is not None and (shape := model_shape(cfg)) is not None:
        problems += load_memory_problems(cfg, shape, device.type)
    return problems


def data_path_problems(cfg: RunConfig) -> list[str]:
    """Every kind=file source must exist (relative paths from the current directory). Checked by the CLI before
    Prefect starts and by the flow before its first stage, so a run started from the UI gets the same answer."""
    return [f"data.sources.{i}.path: '{src.path}' does not exist (resolved from {Path.cwd()}); give an existing "
            "file or directory" for i, src in enumerate(cfg.data.sources)
            if src.kind == "file" and src.path and not Path(src.path).exists()]


def local_model_problem(name: str) -> str | None:
    """Why model.name_or_path, written as a local path, cannot be loaded: it does not exist. A path is a name
    that starts with '/', '.' or '~', or has more than one '/' (a hub id is 'org/name'); 'scratch', hub ids
    and GGUF files (checked by the command line) pass."""
    from leantune.gguf import is_gguf_source
    from leantune.modeling import SCRATCH

    if name == SCRATCH or is_gguf_source(name):
        return None
    path = Path(name).expanduser()
    if not (name.startswith(("/", ".", "~")) or name.count("/") > 1) or path.is_dir():
        return None
    return (f"model.name_or_path: '{name}' is not a directory (resolved from {Path.cwd()}); give an existing "
            "local model directory (with config.json), or a hub id such as Qwen/Qwen2.5-0.5B-Instruct")


HUB_TIMEOUT_S = 5.0  # the hub's metadata call: an unreachable hub costs seconds, not the client's retries
log = logging.getLogger(__name__)


def hub_model_info(name: str, revision: str | None) -> None:
    """Ask the hub about a model (HfApi.model_info); raises what the hub client raises. Tests replace it."""
    from huggingface_hub import HfApi

    HfApi().model_info(name, revision=revision, timeout=HUB_TIMEOUT_S)


def hub_model_problem(name: str, revision: str | None = None) -> str | None:
    """Why model.name_or_path, a hub id (not 'scratch', a GGUF source or a local path), cannot be loaded, or None
    (`hub_model_check`)."""
    return hub_model_check(name, revision)[0]


@functools.lru_cache(maxsize=16)  # the command line and the flow check the same id: one hub call
def hub_model_check(name: str, revision: str | None) -> tuple[str | None, bool]:
    """(why model.name_or_path cannot be loaded or None, whether its config can be read now).

    Not a hub id ('scratch', a GGUF source, a local path): (None, True). A hub id is known when the local
    Hugging Face cache has its config.json, or the hub has it. A typo (the hub answers "not found") is a
    problem, as is an id missing from the cache with HF_HUB_OFFLINE set; a hub that cannot be reached (no
    network, a timeout) is a warning and no problem: the model is looked up again when loaded.
    """
    from leantune.gguf import is_gguf_source
    from leantune.modeling import SCRATCH

    if name == SCRATCH or is_gguf_source(name) or name.startswith(("/", ".", "~")) or name.count("/") > 1 \
            or Path(name).expanduser().is_dir():
        return None, True
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        return None, True
    if constants.is_offline_mode():
        return (f"model.name_or_path: '{name}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, "
                "so it cannot be downloaded; unset HF_HUB_OFFLINE, or give a local model directory"), False
    try:
        hub_model_info(name, revision)
    except GatedRepoError:
        return None, True  # it exists; loading it needs access (`hf auth login`)
    except RevisionNotFoundError:
        return f"model.revision: '{revision}' is not a revision of '{name}' on the Hugging Face hub; check it", False
    except RepositoryNotFoundError:
        return (f"model.name_or_path: '{name}' is neither a local directory nor a model on the Hugging Face hub "
                "(the hub answered: not found; a private model needs `hf auth login`); check the spelling, e.g. "
                "Qwen/Qwen2.5-0.5B-Instruct"), False
    except Exception as error:  # noqa: BLE001 - the network, not the name: the run goes on
        log.warning("model.name_or_path: the Hugging Face hub could not be asked about '%s' (%s: %s); going on, "
                    "the model is loaded after the data stages", name, type(error).__name__, error)
        return None, False
    return None, True
