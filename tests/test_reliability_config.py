"""Config holes found under attack (issue 14): infinite or NaN numbers, unknown evaluation sets, duplicate
YAML keys, empty or misspelt LoRA targets; each is refused before any data stage, naming the key."""

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
