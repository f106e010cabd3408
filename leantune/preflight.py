"""Checks a run passes before its data stages, beyond what the config alone can tell: the files that
eval.datasets names exist, the held-out short-answer questions fill eval.synthetic_items, and every
name in lora.target_modules matches a layer of the model (its skeleton, built on the meta device from
the model's config). A problem found only after hours of data preparation and training is a problem
found too late."""

from __future__ import annotations

from pathlib import Path

from leantune.config import EVAL_BUILTIN_SETS, RunConfig
from leantune.errors import UserError
from leantune.evaluation.datasets import SYNTHETIC_CHALLENGE, short_answer_shortfall, synthetic_item_count


def check_before_data(cfg: RunConfig) -> None:
    """Raise one UserError listing every problem (`problems_before_data`), or return."""
    if problems := problems_before_data(cfg):
        raise UserError("\n".join(problems) if len(problems) > 1 else problems[0])


def problems_before_data(cfg: RunConfig) -> list[str]:
    from leantune.modeling import lora_target_problem, moe_problems

    problems = []
    if cfg.eval.enabled:
        for spec in cfg.eval.datasets:
            if spec in (*EVAL_BUILTIN_SETS, SYNTHETIC_CHALLENGE) or spec.startswith("anthropic-hub:"):
                continue
            path = Path(spec.removeprefix("are-you-sure:"))
            if not path.is_file():
                problems.append(f"eval.datasets: '{spec}': {path} is not a file (resolved from {Path.cwd()}); "
                                "give an existing jsonl file")
        if {"synthetic", SYNTHETIC_CHALLENGE} & set(cfg.eval.datasets) and (problem := short_answer_shortfall(
                cfg.data.synthetic, synthetic_item_count(cfg))):
            problems.append(problem)
    if problem := lora_target_problem(cfg):
        problems.append(problem)
    problems += moe_problems(cfg)
    return problems
