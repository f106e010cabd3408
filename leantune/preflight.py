"""Checks a run passes before its data stages, beyond what the config alone can tell: the data files
exist, the files that eval.datasets names exist, the held-out short-answer questions fill
eval.synthetic_items, a local model.name_or_path exists, model.dtype suits the device training runs on,
every name in lora.target_modules matches a layer LoRA can adapt (a linear layer, not a container such as
`mlp`), and QLoRA is not asked of a Mixture-of-Experts model (the model's skeleton, built on the meta device
from its config). A problem found only after hours of data preparation and training is a problem
found too late."""

from __future__ import annotations

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

    problems = data_path_problems(cfg)
    if problem := local_model_problem(cfg.model.name_or_path):
        problems.append(problem)
    try:
        resolve_precision(cfg, resolve_device(cfg))  # e.g. fp16 on the CPU, bf16 on a GPU without it
    except UserError as e:
        problems.append(str(e))
    if cfg.eval.enabled:
        sets = cfg.eval.sets()
        problems += [problem for spec in sets if (problem := spec.missing_file())]
        if {"synthetic", "synthetic-challenge"} & {spec.kind for spec in sets} and (problem := short_answer_shortfall(
                cfg.data.synthetic, synthetic_item_count(cfg), cfg.eval.synthetic_split)):
            problems.append(problem)
    if problem := lora_target_problem(cfg):
        problems.append(problem)
    problems += moe_problems(cfg)
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
