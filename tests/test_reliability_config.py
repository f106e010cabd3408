"""Config holes found under attack (issue 14): infinite or NaN numbers, unknown evaluation sets, duplicate
YAML keys, empty or misspelt LoRA targets; each is refused before any data stage, naming the key."""

from pathlib import Path

import pytest

from leantune.config import ConfigError, load_config
from leantune.modeling import lora_target_problem
from leantune.preflight import problems_before_data


@pytest.mark.parametrize("override, expected", [
    ("train.lr=.inf", "train.lr: Input should be a finite number"),
    ("train.lr=.nan", "train.lr: Input should be a finite number"),
    ("lora.dropout=.nan", "lora.dropout: Input should be a finite number"),
    ("eval.datasets=[nosuchset]", "eval.datasets: 'nosuchset' is not a set; use 'synthetic'"),
    ("eval.datasets=[synthetc]", "eval.datasets: 'synthetc' is not a set (did you mean 'synthetic'?)"),
    ("eval.datasets=[anthropic-hub:nope]", "eval.datasets: 'anthropic-hub:nope' is not a sycophancy subset"),
    ("lora.target_modules=[]", "lora.target_modules: empty, so LoRA would train nothing"),
])
def test_values_the_config_refuses(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert expected in str(e.value)


def test_what_fsdp_does_not_take_yet_is_refused_by_name():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["train.distributed.strategy=fsdp", "train.distributed.nproc_per_node=2",
                               "train.objective=dpo", "tokenize.packing=false", "model.method=full",
                               "lora.target_modules=all-linear", "train.full_precision=bf16-kahan", "model.dtype=bf16"])
    # DPO under FSDP is taken (tests/training/test_preference.py); bf16 weights with per-weight optimizers are not.
    assert [p.split(":")[0] for p in e.value.problems] == ["train.full_precision"]


def test_eval_datasets_problems_are_reported_together_before_any_set_loads():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["eval.datasets=[synthetic, nosuchset, a/x.jsonl, b/x.jsonl, synthetic]"])
    assert e.value.problems == [
        "eval.datasets: 'nosuchset' is not a set; use 'synthetic', 'anthropic-sample', 'are-you-sure:synthetic', 'general', "
        "'anthropic-hub:<nlp_survey|philpapers2020|political_typology_quiz>', 'are-you-sure:<path to jsonl>' or the "
        "path of an Anthropic-format .jsonl file",
        "eval.datasets: more than one set is called synthetic, x; list each set once (sets from files are named by "
        "the file name)",
    ]
    with pytest.raises(ConfigError, match="eval.datasets: empty; name at least one set"):
        load_config(overrides=["eval.datasets=[]"])
    assert load_config(overrides=["eval.datasets=[]", "eval.enabled=false"]).eval.datasets == []


def test_an_eval_set_is_parsed_in_one_place():
    from leantune.config import parse_eval_set

    assert [(s.kind, s.name, s.path, s.subset) for s in load_config(overrides=[
        "eval.datasets=[synthetic, anthropic-sample, are-you-sure:synthetic, anthropic-hub:nlp_survey, "
        "are-you-sure:d/ays.jsonl, d/sycophancy_on_x.jsonl]"]).eval.sets()] == [
        ("synthetic", "synthetic", None, None), ("anthropic-sample", "anthropic-sample", None, None),
        ("synthetic-challenge", "are-you-sure:synthetic", None, None),
        ("anthropic-hub", "anthropic-hub:nlp_survey", None, "nlp_survey"),
        ("are-you-sure", "are-you-sure:ays", Path("d/ays.jsonl"), None),
        ("anthropic-file", "sycophancy_on_x", Path("d/sycophancy_on_x.jsonl"), None)]
    with pytest.raises(ValueError, match="did you mean 'anthropic-sample'"):
        parse_eval_set("anthropic-sampel")


def test_valid_eval_specs_pass_the_config():
    cfg = load_config(overrides=["eval.datasets=[synthetic, anthropic-sample, anthropic-hub:nlp_survey, "
                                 "are-you-sure:x.jsonl, my_set.jsonl]"])
    assert len(cfg.eval.datasets) == 5


def test_a_key_given_twice_in_a_yaml_file_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1.0e-3\nmodel:\n  method: lora\ntrain:\n  seed: 3\n")
    with pytest.raises(ConfigError, match=r"key 'train' is given twice \(lines 1 and 5\)"):
        load_config(path)
    path.write_text("train:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match=r"key 'lr' is given twice \(lines 2 and 3\)"):
        load_config(path)
    path.write_text("base: &b {lr: 1.0e-3}\ntrain:\n  <<: *b\n  seed: 3\n")  # a merge key is not a duplicate
    with pytest.raises(ConfigError, match="base: unknown key"):
        load_config(path)


def test_a_lora_target_that_matches_no_layer_is_named_with_the_valid_ones():
    problem = lora_target_problem(load_config(overrides=["lora.target_modules=[q_proj, nonexistent_proj]"]))
    assert problem.startswith("lora.target_modules: 'nonexistent_proj' matches no layer of scratch; its linear "
                              "layers are named ['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', "
                              "'q_proj', 'up_proj', 'v_proj']")
    assert lora_target_problem(load_config(overrides=["lora.target_modules=[q_proj, v_proj, embed_tokens]"])) is None
    assert lora_target_problem(load_config(overrides=["lora.target_modules=[model.layers.0.self_attn.q_proj]"])) is None


def test_problems_before_data_name_missing_eval_files_and_bad_targets(tmp_path):
    cfg = load_config(overrides=[f"eval.datasets=[synthetic, {tmp_path}/gone.jsonl]", "lora.target_modules=[qproj]"])
    problems = problems_before_data(cfg)
    assert problems[0].startswith(f"eval.datasets: '{tmp_path}/gone.jsonl': {tmp_path}/gone.jsonl is not a file")
    assert problems[1].startswith("lora.target_modules: 'qproj' matches no layer")
    (tmp_path / "gone.jsonl").write_text("")
    assert problems_before_data(load_config(overrides=[f"eval.datasets=[{tmp_path}/gone.jsonl]"])) == []


def test_problems_before_data_name_a_missing_data_file(tmp_path):
    # The flow runs these checks first, so a run started from the UI is refused like one from the CLI.
    cfg = load_config(overrides=[f"data.sources=[{{kind: file, path: {tmp_path}/nope.jsonl}}]"])
    assert problems_before_data(cfg) == [
        f"data.sources.0.path: '{tmp_path}/nope.jsonl' does not exist (resolved from {Path.cwd()}); give an "
        "existing file or directory"]


def test_lora_targets_that_are_containers_not_linear_layers_are_refused():
    problem = lora_target_problem(load_config(overrides=["lora.target_modules=[q_proj, mlp, self_attn]"]))
    assert problem == ("lora.target_modules: 'mlp' (LlamaMLP), 'self_attn' (LlamaAttention) are containers of "
                       "layers in scratch, not a linear layer LoRA can adapt; name its linear layers instead: "
                       "['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj'] "
                       "(or use 'all-linear')")
    assert lora_target_problem(load_config(overrides=["lora.target_modules=[q_proj, embed_tokens, lm_head]"])) is None


def test_a_missing_local_model_and_fp16_on_the_cpu_are_refused_before_the_data_stages(tmp_path, monkeypatch):
    from leantune import preflight

    def unreachable(name, revision):
        raise ConnectionError("no network")

    monkeypatch.setattr(preflight, "hub_model_info", unreachable)  # hub ids below: a warning, no problem
    preflight.hub_model_check.cache_clear()
    cfg = load_config(overrides=[f"model.name_or_path={tmp_path}/no-model", "model.dtype=fp16", "train.device=cpu",
                                 "eval.enabled=false"])
    assert problems_before_data(cfg) == [
        f"model.name_or_path: '{tmp_path}/no-model' is not a directory (resolved from {Path.cwd()}); give an "
        "existing local model directory (with config.json), or a hub id such as Qwen/Qwen2.5-0.5B-Instruct",
        "model.dtype: fp16 is not supported on the CPU; use model.dtype=fp32 (or auto)"]
    # Hub ids (org/name), relative names that could be one, 'scratch' and fp32 on the CPU pass.
    for name in ("Qwen/Qwen2.5-0.5B", "gpt2", "scratch"):
        assert problems_before_data(load_config(overrides=[f"model.name_or_path={name}", "train.device=cpu",
                                                           "eval.enabled=false", "model.dtype=fp32"])) == []
    cfg = load_config(overrides=["model.name_or_path=./models/x", "train.device=cpu", "eval.enabled=false"])
    assert problems_before_data(cfg)[0].startswith("model.name_or_path: './models/x' is not a directory")


@pytest.mark.slow
@pytest.mark.flow
def test_each_early_check_stops_the_flow_before_the_data_stages_with_exit_2(prefect_server, tmp_path, capsys):
    from transformers import MixtralConfig

    from flows.finetune import main

    moe = tmp_path / "moe"
    MixtralConfig(vocab_size=300, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4).save_pretrained(moe)
    cases = {
        "targets": (["lora.target_modules=[mlp, self_attn]"], "lora.target_modules: 'mlp' (LlamaMLP), 'self_attn' "
                    "(LlamaAttention) are containers of layers in scratch, not a linear layer"),
        "dtype": (["model.dtype=fp16", "train.device=cpu"], "model.dtype: fp16 is not supported on the CPU"),
        "path": ([f"model.name_or_path={tmp_path}/missing"], f"model.name_or_path: '{tmp_path}/missing' is not a "
                 "directory"),
        "qlora-moe": ([f"model.name_or_path={moe}", "model.method=qlora", "lora.target_modules=all-linear",
                       "lora.dropout=0"], f"model.method: qlora cannot quantise the experts of '{moe}'"),
    }
    smoke = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    for name, (settings, expected) in cases.items():
        capsys.readouterr()
        argv = ["--config", str(smoke), "--run-name", name, "--set", f"run.output_dir={tmp_path / 'runs'}"]
        assert main([*argv, *(a for s in settings for a in ("--set", s))]) == 2, name
        said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("leantune:")]
        assert len(said) == 1 and said[0].startswith(f"leantune: {expected}"), (name, said)
        assert not (tmp_path / "runs" / name).exists()  # refused before the run directory and the data stages
