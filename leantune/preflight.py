"""Checks a run passes before its data stages, beyond what the config alone can tell: the data files
exist, the files that eval.datasets names exist, the held-out short-answer questions fill eval.synthetic_items, and every
name in lora.target_modules matches a layer of the model (its skeleton, built on the meta device from
the model's config). A problem found only after hours of data preparation and training is a problem
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
    from leantune.modeling import lora_target_problem, moe_problems

    problems = data_path_problems(cfg)
    if cfg.eval.enabled:
        sets = cfg.eval.sets()
        problems += [problem for spec in sets if (problem := spec.missing_file())]
        if {"synthetic", "synthetic-challenge"} & {spec.kind for spec in sets} and (problem := short_answer_shortfall(
                cfg.data.synthetic, synthetic_item_count(cfg))):
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
