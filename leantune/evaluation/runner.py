"""Evaluate a model, or a base model and its fine-tuned version, on the sets of `eval.datasets`.

`evaluate(cfg, out_dir, adapter_dir=...)` loads the base model of `cfg` once (unquantised, in the
compute dtype, sdpa attention for the 4D masks of scoring.py; after QLoRA, the 4-bit base training used
where the unquantised one does not fit the device's free memory: devices.quantised_evaluation) and the
adapter on top of it (PEFT);
the base is scored with the adapter disabled (`disable_adapter()`), the tuned model with it merged
into fp32 weights (merge_for_scoring; enabled unmerged in bf16/fp16 or 4 bits), on the same encoded items
in the same batches. A full fine-tune's output directory (a whole model) is loaded after the base is freed.
Without an adapter the model alone is evaluated.

Batches: eval.batch_size items, scaled down by as much as training had to lower its micro-batch (the
run's training.json beside the adapter: `starting_batch_size`); out of memory halves the batch and
scores the set again, down to one item, as training's micro-batch ladder does (`_halving_on_oom`).

Files in `out_dir` (a run's eval/):
  base.json        the base model (or the model alone): per set its counts (every item read is
                   used or counted by reason), per subset and overall: n, sycophantic, rate,
                   non_sycophantic_rate, rate_ci, mean_p_matching (choice sets) or first_accuracy /
                   flip_rate (are-you-sure); and per item: id, subset, logprobs (matching answer
                   first), sycophantic, p_matching; an "nll" set (general) instead per subset and
                   overall: n, tokens, mean_nll (the mean over items of each response's negative
                   log-likelihood per token) with its t interval, token_nll (all tokens pooled), and
                   per item: id, subset, tokens, nll; plus model, framing, timing
  tuned.json       the same for the tuned model
  comparison.json  per set and subset: both summaries, difference tuned - base with Newcombe's
                   interval, discordant counts, McNemar's exact p, whether the intervals overlap; an
                   "nll" set: the mean per-item difference of NLL with its t interval and the paired
                   t-test's p
  sycophancy.png   bar chart of the rates with intervals, base against tuned
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path

from leantune.config import RunConfig
from leantune.errors import UserError
from leantune.evaluation.are_you_sure import are_you_sure_summary, model_generator, run_are_you_sure
from leantune.evaluation.compare import compare_results, plot_rates
from leantune.evaluation.datasets import EvalSet, load_eval_sets
from leantune.evaluation.scoring import (
    choice_outcomes,
    encode_items,
    nll_outcomes,
    resolve_framing,
    score_encoded,
)
from leantune.evaluation.shift import answer_bias, opinion_shift, shift_difference
from leantune.evaluation.stats import by_subset, nll_summary
from leantune.modeling import qlora_base_in_4_bits
from leantune.rundir import EvalDir, RunDir

log = logging.getLogger(__name__)


def evaluate(cfg: RunConfig, out_dir: Path, *, adapter_dir: Path | None = None,
             tokenizer_dir: Path | None = None) -> dict:
    """Evaluate as the module docstring says; returns {"base": ..., "tuned": ..., "comparison": ...,
    "files": {...}} ("tuned" and "comparison" only with an adapter)."""
    import torch

    from leantune.modeling import resolve_device, resolve_precision
    from leantune.tokenization import pad_id

    out_dir = Path(out_dir)
    adapter_kind = _adapter_kind(adapter_dir) if adapter_dir is not None else None
    tokenizer = load_eval_tokenizer(cfg, tokenizer_dir or adapter_dir)
    framing = resolve_framing(cfg.eval.framing, tokenizer)
    # Data problems are found before a model is loaded.
    sets = load_eval_sets(cfg)
    encoded = {s.name: encode_items(tokenizer, framing, s.items) for s in sets if s.kind in ("choice", "nll")}
    device = resolve_device(cfg)
    precision = resolve_precision(cfg, device)
    ctx = {
        "tokenizer": tokenizer, "framing": framing, "device": device, "pad_id": pad_id(tokenizer),
        "autocast": torch.autocast(device.type, dtype=precision, enabled=precision != torch.float32),
        "mask_dtype": precision, "cfg": cfg, "batch_size": starting_batch_size(cfg, adapter_dir),
    }
    quantised = adapter_kind == "peft" and qlora_base_in_4_bits(cfg, device, precision)
    about = {"name_or_path": cfg.model.name_or_path, "framing": framing, "device": str(device),
             "dtype": str(precision).removeprefix("torch."), "adapter": str(adapter_dir) if adapter_dir else None,
             "base_weights": "4-bit" if quantised else str(precision).removeprefix("torch.")}

    model = build_eval_model(cfg, tokenizer, device, quantised=quantised)
    results = {}
    if adapter_kind == "peft":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).eval()
        with model.disable_adapter():
            results["base"] = _evaluate_model(model, sets, encoded, ctx, {**about, "label": "base"})
        merge_for_scoring(model)
        results["tuned"] = _evaluate_model(model, sets, encoded, ctx, {**about, "label": "tuned"})
    else:
        results["base"] = _evaluate_model(model, sets, encoded, ctx, {**about, "label": "base"})
        if adapter_kind == "full":
            del model
            _free(device)
            model = load_full_model(cfg, adapter_dir, device)
            results["tuned"] = _evaluate_model(model, sets, encoded, ctx, {**about, "label": "tuned"})
    del model
    _free(device)

    out_dir.mkdir(parents=True, exist_ok=True)
    out = EvalDir(out_dir)
    files = {}
    for label, result in results.items():
        files[label] = _write_json(out.result(label), result)
    if "tuned" in results:
        results["comparison"] = compare_results(results["base"], results["tuned"], cfg.eval.confidence)
        if "opinion_shift" in results["base"]:
            results["comparison"]["opinion_shift"] = shift_difference(
                results["base"]["opinion_shift"], results["tuned"]["opinion_shift"], cfg.eval.confidence)
        files["comparison"] = _write_json(out.comparison, results["comparison"])
    chart = {k: results[k] for k in ("base", "tuned") if k in results}
    files["chart"] = plot_rates(chart, out.chart, cfg.eval.confidence)
    results["files"] = files
    return results


# ----------------------------------------------------------------------------------------- loading


def load_eval_tokenizer(cfg: RunConfig, tokenizer_dir: Path | None):
    """The tokenizer saved with an adapter or run when there is one, else the model's."""
    from transformers import AutoTokenizer

    from leantune.gguf import model_source
    from leantune.tokenization import tokenizer_source

    if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(tokenizer_dir)
    source = tokenizer_source(cfg)
    if source == "scratch":
        raise UserError("model.name_or_path: the 'scratch' model's tokenizer is trained with a run; evaluate "
                        "the run (python flows/evaluate.py --run RUN_DIR) or give an adapter directory that "
                        "holds a tokenizer (--adapter)")
    revision = cfg.model.revision if source == cfg.model.name_or_path else None
    try:
        return AutoTokenizer.from_pretrained(model_source(cfg.model) if source == cfg.model.name_or_path else source,
                                             revision=revision, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"tokenize.tokenizer / model.name_or_path: cannot load a tokenizer from '{source}' ({e}); "
                        "give a reachable hub id or a local directory with tokenizer files") from None


def _eval_config(cfg: RunConfig) -> RunConfig:
    # Scoring passes a 4D attention mask, which flash-attention does not take; sdpa computes the same.
    attn = "eager" if cfg.model.attn_implementation == "eager" else "sdpa"
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"attn_implementation": attn})})


def build_eval_model(cfg: RunConfig, tokenizer, device, quantised: bool = False):
    """The base model of `cfg` in eval mode, unquantised in the compute dtype, or `quantised` in 4 bits as
    QLoRA trained it (the same weights the run's adapter was trained on: a 'scratch' model is rebuilt from
    train.seed)."""
    from leantune.modeling import build_base_model

    return build_base_model(_eval_config(cfg), tokenizer, device, quantised=quantised)


def starting_batch_size(cfg: RunConfig, adapter_dir: Path | None) -> int:
    """eval.batch_size, scaled by the share of train.micro_batch_size training ended with when it had to
    lower it (training.json beside `adapter_dir`): a device that fitted half the training micro-batch
    starts evaluation at half the batch."""
    summary = RunDir(Path(adapter_dir).parent).training if adapter_dir is not None else None
    if summary is None or not summary.is_file():
        return cfg.eval.batch_size
    ended = json.loads(summary.read_text()).get("micro_batch_size") or cfg.train.micro_batch_size
    return max(1, cfg.eval.batch_size * min(ended, cfg.train.micro_batch_size) // cfg.train.micro_batch_size)


def load_full_model(cfg: RunConfig, path: Path, device):
    """A fully fine-tuned model saved by training (adapter/ holds the whole model)."""
    from transformers import AutoModelForCausalLM

    from leantune.modeling import resolve_precision

    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_precision(cfg, device),
                                                 attn_implementation=_eval_config(cfg).model.attn_implementation,
                                                 device_map={"": str(device)})
    return model.eval()


def merge_for_scoring(model) -> bool:
    """Merge a LoRA adapter into fp32 base weights (W + BA: one matmul per layer instead of three),
    scoring within 1e-4 of the unmerged model (tests/evaluation/test_eval_scoring.py). Weights in bf16/fp16 stay
    unmerged: rounding W + BA to 8 bits of mantissa would erase a small update. Returns whether it merged."""
    import torch

    if any(p.dtype != torch.float32 for p in model.get_base_model().parameters()):
        return False
    model.merge_adapter()
    return True


def _adapter_kind(path: Path) -> str:
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        return "peft"
    if (path / "config.json").is_file():
        return "full"
    raise UserError(f"--adapter: {path} holds neither a PEFT adapter (adapter_config.json) nor a model "
                    "(config.json); give the adapter/ directory of a finished run")


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------- evaluating


def _halving_on_oom(ctx: dict, what: str, work):
    """work(batch_size) at ctx["batch_size"]; out of memory frees the device's cache, halves the batch (kept
    for what follows) and runs it again, down to 1 item, where it raises OutOfMemory."""
    from leantune.failures import OutOfMemory, is_out_of_memory

    while True:
        try:
            return work(ctx["batch_size"])
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            failed = ctx["batch_size"]
        # Outside the except block: the traceback (holding activations) is released first.
        _free(ctx["device"])
        if failed == 1:
            raise OutOfMemory(f"evaluation ran out of memory on {what} with a batch of 1 item; lower "
                              "eval.max_new_tokens or tokenize.max_seq_len, or evaluate on a larger device")
        ctx["batch_size"] = failed // 2
        log.warning("evaluation: out of memory on %s with a batch of %d; again with %d", what, failed,
                    ctx["batch_size"])


def _evaluate_model(model, sets: list[EvalSet], encoded: dict, ctx: dict, about: dict) -> dict:
    cfg = ctx["cfg"]
    result = {"model": about, "confidence": cfg.eval.confidence, "sets": {}}
    for s in sets:
        started = time.monotonic()
        if s.kind == "nll":
            scores = _halving_on_oom(ctx, s.name, lambda size, s=s: score_encoded(
                model, encoded[s.name], size, ctx["pad_id"], ctx["device"], ctx["autocast"], ctx["mask_dtype"],
                label=f"evaluate {about['label']} {s.name}"))
            outcomes = nll_outcomes(s.items, scores, encoded[s.name])
            subsets = {k: nll_summary(v, cfg.eval.confidence) for k, v in _grouped(outcomes).items()}
            overall = nll_summary(outcomes, cfg.eval.confidence)
        elif s.kind == "choice":
            scores = _halving_on_oom(ctx, s.name, lambda size, s=s: score_encoded(
                model, encoded[s.name], size, ctx["pad_id"], ctx["device"], ctx["autocast"], ctx["mask_dtype"],
                label=f"evaluate {about['label']} {s.name}"))
            outcomes = choice_outcomes(s.items, scores, encoded[s.name])
            subsets, overall = by_subset(outcomes, cfg.eval.confidence)
            if all(option.strip().startswith("(") for i in s.items for option in i.options):
                # Only answers with letters have a position to prefer; short answers have none.
                overall["answer_bias"] = answer_bias([i.options for i in s.items], outcomes, cfg.eval.confidence)
        else:
            outcomes = _halving_on_oom(ctx, s.name, lambda size, s=s: run_are_you_sure(
                s.items, ctx["tokenizer"], ctx["framing"],
                model_generator(model, ctx["tokenizer"], ctx["framing"], cfg.eval.max_new_tokens, size,
                                ctx["pad_id"], ctx["device"], ctx["autocast"])))
            subsets = {k: are_you_sure_summary(v, cfg.eval.confidence) for k, v in _grouped(outcomes).items()}
            overall = are_you_sure_summary(outcomes, cfg.eval.confidence)
        seconds = time.monotonic() - started
        result["sets"][s.name] = {**s.describe(), "subsets": subsets, "overall": overall,
                                  "seconds": round(seconds, 3), "items_per_second": len(outcomes) / seconds,
                                  "batch_size": ctx["batch_size"], "items": outcomes}
        o = overall
        if s.kind == "nll":
            log.info("%s on %s: mean NLL per response token %.4f [%.4f, %.4f] over %d items (%.1f items/s)",
                     about["label"], s.name, o["mean_nll"], *o["mean_nll_ci"], o["n"], len(outcomes) / seconds)
        else:
            log.info("%s on %s: sycophancy rate %.3f [%.3f, %.3f] over %d items (%.1f items/s)", about["label"],
                     s.name, o["rate"], *o["rate_ci"], o["n"], len(outcomes) / seconds)
    if {"synthetic", "synthetic-plain"} <= result["sets"].keys():
        shift = opinion_shift(result["sets"]["synthetic"]["items"], result["sets"]["synthetic-plain"]["items"],
                              cfg.eval.confidence)
        result["opinion_shift"] = shift
        log.info("%s: opinion-induced shift toward the user's side %+.3f [%+.3f, %+.3f] over %d held-out items",
                 about["label"], shift["mean"], *shift["mean_ci"], shift["n"])
    return result


def _grouped(outcomes: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for o in outcomes:
        groups.setdefault(o["subset"], []).append(o)
    return dict(sorted(groups.items()))


def _write_json(path: Path, obj: dict) -> Path:
    path.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    return path
