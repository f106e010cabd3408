"""The evaluate flow and its command line: a finetune run (adapter on/off on one model), a model +
adapter, a model alone, a fully fine-tuned model, and user errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_helpers import SMOKE

from flows.evaluate import main
from leantune.config import dump_config, load_config
from leantune.evaluation.datasets import load_eval_sets
from leantune.evaluation.runner import build_eval_model, evaluate
from leantune.evaluation.scoring import encode_items, score_encoded
from leantune.training.loop import train

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
EVAL = ["eval.max_items=12", "eval.synthetic_items=24", "eval.batch_size=5"]


@pytest.fixture(scope="module")
def trained_run(tokenized_run, tmp_path_factory) -> Path:
    """The conftest run after 3 training steps at a high learning rate, so the adapter changes the scores."""
    run_dir = tmp_path_factory.mktemp("evalrun") / "run"
    shutil.copytree(tokenized_run, run_dir)
    cfg = load_config(run_dir / "config.yaml", ["train.max_steps=3", "train.lr=5e-2", "train.warmup_steps=0",
                                                "train.eval_every=1000", "checkpoint.every_steps=1000", *EVAL])
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    train(cfg, run_dir)
    return run_dir


def read(path):
    return json.loads(Path(path).read_text())


def logprobs(result, name):
    return [o["logprobs"] for o in result["sets"][name]["items"]]


@pytest.mark.flow
def test_flow_on_a_run_scores_base_and_tuned_on_the_same_items(prefect_server, trained_run, capsys):
    assert main(["--run", str(trained_run)]) == 0
    assert "evaluation finished" in capsys.readouterr().out
    out = trained_run / "eval"
    base, tuned, comparison = read(out / "base.json"), read(out / "tuned.json"), read(out / "comparison.json")
    assert (out / "sycophancy.png").stat().st_size > 10_000
    for name in ("synthetic", "anthropic-sample"):
        b, t = base["sets"][name], tuned["sets"][name]
        assert b["counts"]["used"] == b["overall"]["n"] == 12
        assert [o["id"] for o in b["items"]] == [o["id"] for o in t["items"]]
        assert logprobs(base, name) != logprobs(tuned, name)  # the adapter was on for tuned only
        c = comparison["sets"][name]["overall"]
        assert c["n"] == 12 and c["difference"] == pytest.approx(t["overall"]["rate"] - b["overall"]["rate"])
        assert set(comparison["sets"][name]) == {"overall", *b["subsets"]}
    assert base["model"]["label"] == "base" and base["model"]["framing"] == "chat_template"

    # With the adapter disabled the scores are those of a freshly built base model.
    cfg = load_config(trained_run / "config.yaml")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained_run / "adapter")
    model = build_eval_model(cfg, tokenizer, CPU)
    items = next(s for s in load_eval_sets(cfg) if s.name == "anthropic-sample").items
    fresh = score_encoded(model, encode_items(tokenizer, "chat_template", items), 4, tokenizer.pad_token_id, CPU,
                          torch.autocast("cpu", enabled=False), torch.float32)
    assert [pytest.approx(x, abs=1e-4) for x in fresh] == logprobs(base, "anthropic-sample")


@pytest.mark.flow
def test_model_plus_adapter_and_model_alone(prefect_server, trained_run, tmp_path):
    assert main(["--config", str(trained_run / "config.yaml"), "--adapter", str(trained_run / "adapter"),
                 "--out", str(tmp_path / "adapter")]) == 0
    with_adapter = read(tmp_path / "adapter" / "base.json")
    assert (tmp_path / "adapter" / "comparison.json").is_file()

    # Any model from a directory, alone: the scratch base saved as a local model.
    cfg = load_config(trained_run / "config.yaml")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained_run / "adapter")
    build_eval_model(cfg, tokenizer, CPU).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    assert main(["--config", str(trained_run / "config.yaml"), "--set", f"model.name_or_path={tmp_path / 'model'}",
                 "--out", str(tmp_path / "alone")]) == 0
    alone = read(tmp_path / "alone" / "base.json")
    assert not (tmp_path / "alone" / "tuned.json").exists()
    for name in ("synthetic", "anthropic-sample"):
        assert logprobs(alone, name) == [pytest.approx(x, abs=1e-4) for x in logprobs(with_adapter, name)]


def test_a_fully_fine_tuned_model_is_compared_with_its_base(trained_run, tmp_path):
    from transformers import AutoTokenizer

    cfg = load_config(trained_run / "config.yaml")
    tokenizer = AutoTokenizer.from_pretrained(trained_run / "adapter")
    tuned = build_eval_model(cfg, tokenizer, CPU)
    with torch.no_grad():
        tuned.lm_head.weight.mul_(3.0)
    tuned.save_pretrained(tmp_path / "full")
    tokenizer.save_pretrained(tmp_path / "full")
    results = evaluate(cfg, tmp_path / "out", adapter_dir=tmp_path / "full")
    assert set(results["files"]) == {"base", "tuned", "comparison", "chart"}
    b, t = logprobs(results["base"], "synthetic"), logprobs(results["tuned"], "synthetic")
    assert all(x[0] != y[0] for x, y in zip(b, t, strict=True))


@pytest.mark.flow
def test_cli_user_errors_exit_2_with_a_message(prefect_server, trained_run, tmp_path, capsys):
    assert main(["--run", str(tmp_path / "missing")]) == 2
    assert "has no config.yaml" in capsys.readouterr().err
    assert main(["--run", str(trained_run), "--adapter", str(trained_run / "adapter")]) == 2
    assert "leave out --adapter" in capsys.readouterr().err
    assert main(["--run", str(trained_run), "--set", "eval.datasets=[missing.jsonl]", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'missing.jsonl': missing.jsonl is not a file" in err and "Traceback" not in err
    assert main(["--set", "eval.max_items=0"]) == 2
    assert "eval.max_items" in capsys.readouterr().err
    # The scratch model (configs/smoke.yaml) has no tokenizer of its own outside a run.
    assert main(["--config", str(SMOKE), "--out", str(tmp_path / "x")]) == 2
    assert "evaluate the run" in capsys.readouterr().err


def test_help_runs_as_a_script():
    done = subprocess.run([sys.executable, "flows/evaluate.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0
    assert "--adapter" in done.stdout and "--run" in done.stdout


@pytest.mark.flow
def test_finetune_flow_ends_with_the_evaluation_stage(prefect_server, tmp_path):
    from flows.finetune import finetune

    cfg = load_config(overrides=["data.synthetic.num_records=120", "tokenize.vocab_size=400",
                                 "tokenize.max_seq_len=128", "train.max_steps=2", "train.device=cpu",
                                 "train.eval_every=1000", "checkpoint.every_steps=1000", *EVAL,
                                 f"run.output_dir={tmp_path}", "run.name=ft"])
    run_dir = finetune(cfg)
    comparison = read(run_dir / "eval" / "comparison.json")
    assert set(comparison["sets"]) == {"synthetic", "synthetic-plain", "anthropic-sample"}
    assert read(run_dir / "eval" / "tuned.json")["model"]["adapter"] == str(run_dir / "adapter")
    # eval.enabled=false skips the stage (a resume of a run stopped after training: no data stages, no new steps).
    shutil.rmtree(run_dir / "eval")
    (run_dir / "report.md").unlink()  # a run with its report is finished: resuming it is refused
    finetune(cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"enabled": False})}), resume=True)
    assert (run_dir / "adapter").is_dir() and not (run_dir / "eval").exists()


def test_a_run_is_evaluated_with_its_own_model_whatever_the_forms_default(tmp_path):
    """The UI's form starts from configs/default.yaml: a run trained on another model is evaluated with its
    own config.yaml (the adapter fits only its base), with the eval settings the form gives."""
    from flows.evaluate import run_config
    from leantune.config import dump_config

    own = load_config(SMOKE, [f"run.output_dir={tmp_path}", "run.name=r"])
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text(dump_config(own))
    from leantune.cli import DEFAULT_CONFIG

    form = load_config(DEFAULT_CONFIG, ["eval.max_items=7"])
    assert form.model.name_or_path != own.model.name_or_path
    used = run_config(form, str(tmp_path / "r"))
    assert (used.model, used.lora, used.tokenize, used.eval) == (own.model, own.lora, own.tokenize, form.eval)
    command_line = load_config(tmp_path / "r" / "config.yaml", ["eval.max_items=5"])  # --run RUN --set ...
    assert run_config(command_line, str(tmp_path / "r")) is command_line


def test_evaluating_a_run_again_says_in_one_line_that_its_eval_is_replaced(tmp_path):
    from flows.evaluate import overwrite_notice

    out = tmp_path / "eval"
    assert overwrite_notice(out) is None
    out.mkdir()
    assert overwrite_notice(out) is None
    for name in ("comparison.json", "base.json"):
        (out / name).write_text("{}")
    assert overwrite_notice(out) == (f"evaluate: {out} holds an earlier evaluation (base.json, comparison.json); it "
                                     "is replaced (copy it first to keep it, or give --out / out_dir)")
