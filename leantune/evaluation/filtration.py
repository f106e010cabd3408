"""Wei et al.'s filtration step (2023, "Simple synthetic data reduces sycophancy in large language models",
section 3): opinion-bearing training records only for claims the base model already knows.

Before the data is prepared, the base model of the run answers every training-side claim of the synthetic
pool asked plainly (no user, no opinion; leantune/data/synthetic.py's question and choices), once with
"Agree" as option (A) and once as option (B), scored by log-likelihood like the evaluation
(leantune/evaluation/scoring.py). A claim is known when the correct option wins in both orders, so an
answer-order preference alone cannot make a claim known. A short-answer question (leantune/data/questions.py)
has no answer letters: it is asked once, and known when its right answer is more likely than the wrong one
after "The answer is". Teaching a model to disagree with a user about a
claim it does not know would teach it to answer at random, not to keep to what it knows. The known claims
go to `data.synthetic.known_claims` (the generator then writes opinion items on those only); the counts go
to data/filtration.json. Held-out (evaluation-side) claims are never scored here.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from leantune.config import RunConfig
from leantune.rundir import DataDir

log = logging.getLogger(__name__)


def filter_known_claims(cfg: RunConfig, data_dir: Path) -> RunConfig:
    """`cfg` with data.synthetic.known_claims set from the base model's plain answers; writes
    data_dir/filtration.json with the counts per claim kind."""
    import torch

    from leantune.data.synthetic import SHORT_ANSWER_TASKS, plain_item, split_claims
    from leantune.evaluation.items import ChoiceItem
    from leantune.evaluation.runner import build_eval_model, load_eval_tokenizer
    from leantune.evaluation.scoring import encode_items, resolve_framing, score_encoded
    from leantune.modeling import resolve_device, resolve_precision
    from leantune.tokenization import pad_id

    started = time.monotonic()
    synthetic = cfg.data.synthetic
    claims = [c for task in synthetic.tasks for c in split_claims(task, "train", synthetic.validation_share)]
    # One item per claim and answer order; the "matching" answer of a ChoiceItem is the one that should lose.
    items, item_claim = [], []
    for index, c in enumerate(claims):
        for agree_first in (True,) if c.task in SHORT_ANSWER_TASKS else (True, False):
            plain = plain_item(c, agree_first)
            items.append(ChoiceItem(id=f"{c.text}|{'AB'[not agree_first]}", subset=c.task, question=plain.question,
                                    matching=plain.incorrect_answer, not_matching=(plain.correct_answer,),
                                    assistant_prefix=plain.assistant_prefix))
            item_claim.append(index)
    tokenizer = load_eval_tokenizer(cfg, None)
    framing = resolve_framing(cfg.eval.framing, tokenizer)
    device = resolve_device(cfg)
    precision = resolve_precision(cfg, device)
    model = build_eval_model(cfg, tokenizer, device)
    encoded = encode_items(tokenizer, framing, items)
    scores = score_encoded(model, encoded, cfg.eval.batch_size, pad_id(tokenizer), device,
                           torch.autocast(device.type, dtype=precision, enabled=precision != torch.float32), precision,
                           label="filtration: asking the base model about the training claims")
    del model
    correct = [lp[1] > lp[0] for lp in scores]
    lettered = [(item, lp) for item, lp in zip(items, scores, strict=True) if not item.assistant_prefix]
    picks_a = sum((lp[1] > lp[0]) == item.not_matching[0].startswith("(A)") for item, lp in lettered)
    orders_right = [[] for _ in claims]
    for index, ok in zip(item_claim, correct, strict=True):
        orders_right[index].append(ok)
    known = [c for c, right in zip(claims, orders_right, strict=True) if all(right)]
    by_task = {task: {"scored": sum(c.task == task for c in claims), "known": sum(c.task == task for c in known),
                      "correct_in_one_order": sum(c.task == task and any(right) and not all(right)
                                                  for c, right in zip(claims, orders_right, strict=True))}
               for task in synthetic.tasks}
    summary = {"method": "plain question, both answer orders (short answers: one), log-likelihood; known = correct in all",
               "model": cfg.model.name_or_path, "claims_scored": len(claims), "claims_known": len(known),
               "by_task": by_task, "plain_accuracy": sum(correct) / len(correct),
               "picks_option_a": picks_a / len(lettered) if lettered else None,
               "seconds": round(time.monotonic() - started, 1),
               "known_claims": [c.text for c in known]}
    out = DataDir(data_dir)
    out.root.mkdir(parents=True, exist_ok=True)
    out.filtration.write_text(json.dumps(summary, indent=1) + "\n")
    log.info("filtration: the base model knows %d of %d training-side claims (plain accuracy %.3f%s)", len(known),
             len(claims), summary["plain_accuracy"],
             f", option (A) chosen {picks_a / len(lettered):.3f} of the time" if lettered else "")
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={
        "synthetic": synthetic.model_copy(update={"known_claims": [c.text for c in known]})})})
