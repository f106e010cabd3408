"""The config model: every YAML in configs/ validates; errors name the key and the fix, all at once."""

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from leantune.config import ConfigError, RunConfig, dump_config, load_config, validate_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


def test_there_are_configs():
    assert any(p.name == "default.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    # The file's own values survive loading (nothing silently replaced by a default).
    raw = yaml.safe_load(path.read_text())
    dumped = cfg.model_dump(mode="json")
    for section, values in raw.items():
        for key, value in values.items():
            if not isinstance(value, dict | list):
                assert dumped[section][key] == value, f"{path.name}: {section}.{key}"


def test_overrides_parse_values_as_yaml():
    cfg = load_config(overrides=[
        "train.lr=1e-4", "tokenize.max_seq_len=512", "lora.target_modules=[q_proj, v_proj]",
        "power.limit_watts=null", "tokenize.packing=false", "data.sources.0.max_rows=10",
    ])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.tokenize.max_seq_len == 512
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.power.limit_watts is None
    assert cfg.tokenize.packing is False
    assert cfg.data.sources[0].max_rows == 10


def test_override_on_top_of_a_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.01\n  global_batch_size: 8\n")
    cfg = load_config(path, ["train.micro_batch_size=8"])
    assert (cfg.train.lr, cfg.train.global_batch_size, cfg.train.micro_batch_size) == (0.01, 8, 8)
    assert cfg.model.name_or_path == "scratch"  # untouched sections keep their defaults


def test_all_problems_reported_at_once_with_keys_and_fixes():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[
            "train.lrr=1",                   # unknown key -> closest valid key
            "model.method=qlra",             # bad choice -> the valid choices
            "tokenize.max_seq_len=abc",      # wrong type
            "train.micro_batch_size=3",      # cross-field: must divide the global batch
            "data.sources.0.kind=file",      # cross-field: file needs a path
            "data.sources.0.weight=2",       # out of range
            "nokey",                         # malformed override
        ])
    problems = info.value.problems
    text = "\n".join(problems)
    assert len(problems) == 7, text
    assert "train.lrr: unknown key; did you mean 'train.lr'?" in problems
    assert any(p.startswith("model.method:") and "'lora', 'qlora' or 'full'" in p for p in problems)
    assert any(p.startswith("tokenize.max_seq_len:") and "'abc'" in p for p in problems)
    assert any(p.startswith("train.micro_batch_size: 3 does not divide") and "such as 2" in p for p in problems)
    assert any(p.startswith("data.sources.0.path: required") for p in problems)
    assert any(p.startswith("data.sources.0.weight:") and "less than or equal to 1" in p for p in problems)
    assert any(p.startswith("--set 'nokey'") for p in problems)


def test_unknown_section_lists_valid_sections(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trian:\n  lr: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == ["trian: unknown key; did you mean 'train'?"]


def test_unknown_nested_key_in_a_list_item(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  sources:\n    - kind: file\n      pth: x.jsonl\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "data.sources.0.pth: unknown key; did you mean 'data.sources.0.path'?" in info.value.problems


def test_missing_file_and_bad_yaml(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    monkeypatch.chdir(tmp_path)  # a relative path says where it was looked for
    with pytest.raises(ConfigError) as info:
        load_config("configs/nope.yaml")
    assert info.value.problems == [f"--config: file configs/nope.yaml not found (resolved from {tmp_path})"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_duplicate_source_names_rejected():
    with pytest.raises(ConfigError, match="both named 'a'"):
        validate_config({"data": {"sources": [
            {"kind": "file", "path": "x.jsonl", "name": "a"},
            {"kind": "file", "path": "y.jsonl", "name": "a"}]}})


def test_dump_round_trips(tmp_path):
    cfg = load_config(overrides=["train.lr=3e-4", "run.name=x"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_section_hash_depends_only_on_its_sections():
    a = load_config()
    b = load_config(overrides=["train.lr=1e-5"])
    c = load_config(overrides=["tokenize.max_seq_len=128"])
    assert a.section_hash("data", "tokenize") == b.section_hash("data", "tokenize")
    assert a.section_hash("data", "tokenize") != c.section_hash("data", "tokenize")


def test_every_field_is_documented():
    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            ann = field.annotation
            yield f"{prefix}{name}", field.description
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                yield from walk(ann, f"{prefix}{name}.")
            elif name == "sources":
                yield from walk(ann.__args__[0], f"{prefix}{name}.N.")
    undocumented = [k for k, d in walk(RunConfig) if not d]
    assert undocumented == []
