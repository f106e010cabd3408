"""The model: a hub id, a local directory, or the offline tiny "scratch" Llama; LoRA, QLoRA or full.

Precision contract with the training loop: `resolve_precision` gives the compute dtype. Trainable
weights are fp32 (full fine-tuning keeps fp32 master weights unless train.full_precision is
bf16-kahan or bf16-stochastic, which store them in bf16 and round each step's fp32 result back,
training/paramwise.py; PEFT keeps adapters in fp32);
frozen base weights of LoRA/QLoRA are stored in the compute dtype (or 4-bit) to save memory. The
loop runs forward under `torch.autocast(device.type, dtype=precision)` when the precision is not
fp32, with a GradScaler when it is fp16.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections import Counter
from typing import TYPE_CHECKING

from leantune.config import RunConfig
from leantune.errors import UserError
from leantune.gguf import already_loadable, model_source

if TYPE_CHECKING:
    import torch

SCRATCH = "scratch"
log = logging.getLogger(__name__)


def resolve_device(cfg: RunConfig) -> torch.device:
    """train.device as a torch.device: 'auto' prefers CUDA; 'cuda' without a CUDA device is refused."""
    import torch

    wanted = cfg.train.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"train.device: 'cuda' requested but torch sees no CUDA device (torch {torch.__version__}); "
            "set train.device=cpu or auto, or install a CUDA build of torch on a machine with a GPU"
        )
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(wanted)


def resolve_precision(cfg: RunConfig, device: torch.device) -> torch.dtype:
    """The compute dtype from model.dtype: 'auto' is bf16 on CUDA cards that compute it natively, else fp16
    (with a GradScaler), fp32 on CPU (devices.auto_dtype)."""
    import torch

    from leantune.devices import auto_dtype, describe

    card = describe(device)
    wanted = auto_dtype(card) if cfg.model.dtype == "auto" else cfg.model.dtype
    if wanted == "fp16" and card.kind != "cuda":
        # fp16 training needs loss scaling and fast fp16 kernels, which CPUs do not have.
        raise UserError("model.dtype: fp16 is not supported on the CPU; use model.dtype=fp32 (or auto)")
    if wanted == "bf16" and card.kind == "cuda" and not card.bf16_native:
        if not torch.cuda.is_bf16_supported(including_emulation=True):
            raise UserError(f"model.dtype: bf16 is not supported by this GPU ({card.name}); "
                            "use model.dtype=fp16 (or auto)")
        log.warning("model.dtype=bf16: %s (compute capability %s) only emulates bf16, several times slower than "
                    "fp16; model.dtype=auto picks fp16 with loss scaling", card.name, card.capability)
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[wanted]


def resolve_attention(cfg: RunConfig, device: torch.device, precision: torch.dtype) -> str:
    """model.attn_implementation: 'auto' is flash_attention_2 where it can run (flash_attn installed,
    Ampere or later, bf16/fp16: devices.choose_attention), else sdpa; the log says why."""
    import torch

    from leantune.devices import choose_attention, describe, flash_attention_problem

    card = describe(device)
    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(precision, "fp32")
    wanted = cfg.model.attn_implementation
    if wanted == "flash_attention_2" and (why := flash_attention_problem(card, dtype)):
        raise UserError(f"model.attn_implementation: flash_attention_2 is not usable here ({why}); "
                        "use model.attn_implementation=sdpa (or auto)")
    attention, why = choose_attention(card, dtype, wanted)
    if wanted == "auto" and card.kind == "cuda":
        log.info("attention: %s (%s)", attention, why)
    return attention


def build_model(cfg: RunConfig, tokenizer, device: torch.device, meta: bool = False, host: bool = False):
    """The model ready to train on `device`: loaded or built, quantised for QLoRA, with LoRA adapters.

    Only the weights the method trains require grad: LoRA/QLoRA adapters, or every weight for 'full'.
    meta: its modules on the meta device, no weight read or allocated (every rank of an FSDP run, whose shards
    are filled from rank 0's weights when the model is sharded: training/fsdp.py).
    host: the weights read into host memory whatever `device` is, in the dtypes chosen for `device`, QLoRA's
    quantised there by bitsandbytes' CPU kernels (rank 0 of an FSDP run, which sends every rank its shards from
    them, so that no GPU holds the whole model).
    """
    import torch

    from leantune.fused import fuse_swiglu

    precision = resolve_precision(cfg, device)
    # The host copy's attention never runs (only its weights are read): no GPU kernel is asked of host weights.
    attention = "sdpa" if host else resolve_attention(cfg, device, precision)
    placed = torch.device("cpu") if host else device
    method = cfg.model.method
    # Full fine-tuning keeps fp32 master weights (autocast supplies the compute precision), or bf16 ones
    # (train.full_precision); LoRA's frozen base only needs to be read, so it is stored in the compute dtype.
    bf16_weights = method == "full" and cfg.train.full_precision != "fp32"
    storage = torch.bfloat16 if bf16_weights else torch.float32 if method == "full" else precision
    if bf16_weights and precision != torch.bfloat16:
        raise UserError(f"train.full_precision: {cfg.train.full_precision} weights need bf16 compute, and model.dtype "
                        f"{cfg.model.dtype} is {precision} here; set model.dtype=bf16 or train.full_precision=fp32")
    if cfg.train.optimizer_in_backward and precision == torch.float16:
        raise UserError("train.optimizer_in_backward: fp16 loss scaling must check every gradient for overflow "
                        "before any step, and model.dtype auto is fp16 here; set train.optimizer_in_backward=false")

    if meta:
        model = _meta_model(cfg, tokenizer, attention, storage, precision)
    elif cfg.model.name_or_path == SCRATCH:
        model = _build_scratch(cfg, tokenizer, attention)
        if method == "qlora":
            # bitsandbytes quantises at load time; going through save + from_pretrained uses the
            # same supported path as a hub model and gives real Linear4bit layers.
            with tempfile.TemporaryDirectory(prefix="leantune-scratch-") as tmp, _no_progress_bars():
                # Not save_pretrained: under torchrun it writes on rank 0 only, and every rank loads.
                from safetensors.torch import save_model

                model.config.save_pretrained(tmp)
                save_model(model, f"{tmp}/model.safetensors", metadata={"format": "pt"})
                model = _load_pretrained(cfg, tmp, None, False, storage, attention, placed, precision)
        else:
            model = model.to(device=placed, dtype=storage)
    else:
        model = _load_pretrained(cfg, model_source(cfg.model), cfg.model.revision, cfg.model.trust_remote_code,
                                 storage, attention, placed, precision)
        _check_vocab(model, tokenizer, cfg.model.name_or_path)

    # The KV cache is for generation; in training it only costs memory (and conflicts with checkpointing).
    model.config.use_cache = False
    if method == "qlora":
        _quiet_peft_import()
        from peft import prepare_model_for_kbit_training

        # Freezes the base and upcasts norms/embeddings to fp32; checkpointing is enabled below, once,
        # for every method.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.model.gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    if method == "full":
        model.requires_grad_(True)
    else:
        model = _add_lora(cfg, model)
        if cfg.model.gradient_checkpointing:
            # Non-reentrant checkpointing does not need it, but a model whose own code forces the
            # reentrant variant gets no gradient through a frozen embedding without it.
            model.enable_input_require_grads()
    # SwiGLU MLPs keep gate(x) and up(x) for backward, not the silu and the product too (fused.py).
    fuse_swiglu(model)
    # from_pretrained returns eval mode, where transformers skips checkpointing and dropout.
    model.train()
    return model


def _quiet_peft_import() -> None:
    """Keep two harmless third-party messages out of every run's log.

    `import peft` imports bitsandbytes, whose CPU backend warns that the optional `kernels` package
    is missing (it only speeds up 4-bit matmuls on the CPU); and peft calls transformers'
    deprecated `is_gradient_checkpointing`, a FutureWarning meant for peft's authors.
    """
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)


def scratch_hf_config(cfg: RunConfig, vocab_size: int, special_ids: dict | None = None):
    """The transformers config of the tiny model of model.scratch: a Llama, or a Mixture-of-Experts decoder."""
    import transformers

    s = cfg.model.scratch
    common = dict(
        vocab_size=vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
        max_position_embeddings=cfg.tokenize.max_seq_len, **(special_ids or {}),
    )
    if s.architecture == "llama":
        return transformers.LlamaConfig(**common)
    experts = {"num_experts_per_tok": s.num_experts_per_tok}
    if s.architecture == "mixtral":
        return transformers.MixtralConfig(**common, **experts, num_local_experts=s.num_experts)
    if s.architecture == "olmoe":
        return transformers.OlmoeConfig(**common, **experts, num_experts=s.num_experts)
    # qwen2_moe: routed experts of moe_intermediate_size plus one gated shared expert, on every layer.
    return transformers.Qwen2MoeConfig(**common, **experts, num_experts=s.num_experts,
                                       moe_intermediate_size=s.intermediate_size,
                                       shared_expert_intermediate_size=s.intermediate_size, decoder_sparse_step=1)


def _build_scratch(cfg: RunConfig, tokenizer, attention: str):
    """The tiny model of model.scratch, vocabulary and special ids from the tokenizer, seeded by train.seed."""
    import torch
    from transformers import AutoModelForCausalLM

    config = scratch_hf_config(cfg, _token_rows(tokenizer), {
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id})
    config._attn_implementation = attention
    # A private RNG stream: the weights depend on train.seed only, and the caller's RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return AutoModelForCausalLM.from_config(config)


def _meta_model(cfg: RunConfig, tokenizer, attention: str, storage: torch.dtype, precision: torch.dtype):
    """The modules of the model (scratch, or model.name_or_path's config) on the meta device, in `storage`; for
    QLoRA with its linears 4-bit (`_quantized_skeleton`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        if cfg.model.name_or_path == SCRATCH:
            model = _build_scratch(cfg, tokenizer, attention).to(dtype=storage)
        else:
            m = cfg.model
            config = AutoConfig.from_pretrained(model_source(m), revision=m.revision,
                                                trust_remote_code=m.trust_remote_code)
            config._attn_implementation = attention
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=m.trust_remote_code).to(dtype=storage)
    if cfg.model.method == "qlora":
        _quantized_skeleton(model, _quantization_config(cfg, storage, precision))
    return model


@contextlib.contextmanager
def _no_progress_bars():
    """Silence transformers' save/load bars for the internal round trip of the scratch model."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def _quantization_config(cfg: RunConfig, storage: torch.dtype, precision: torch.dtype):
    """QLoRA's bitsandbytes settings: NF4 (model.quant_type), double quantisation, computing in `precision`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.model.quant_type,
        bnb_4bit_use_double_quant=cfg.model.double_quant,
        bnb_4bit_compute_dtype=precision,
        # FSDP shards the 4-bit weights with the other parameters of a layer, which must share their dtype.
        **({"bnb_4bit_quant_storage": storage} if cfg.train.distributed.strategy == "fsdp" else {}),
    )


def _quantized_skeleton(model, config) -> None:
    """Turn `model`, on the meta device, into what from_pretrained makes of it with `config` (QLoRA): bitsandbytes'
    Linear4bit layers (transformers' quantizer picks the same linears), each weight the packed 4-bit parameter
    quantising gives (the shape of bitsandbytes' quantize_4bit: two weights a byte, in the storage dtype), marked
    quantised. Their quantisation states (absmax, blocksize, shape) are rank 0's, received with the weights
    (training/fsdp.py)."""
    import bitsandbytes as bnb
    import torch
    from transformers.quantizers import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(config, pre_quantized=False)
    quantizer.preprocess_model(model, device_map={"": "meta"})
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w, n = module.weight, module.in_features * module.out_features
            packed = torch.empty(((n + 1) // (w.quant_storage.itemsize * 2), 1), dtype=w.quant_storage, device="meta")
            module.weight = bnb.nn.Params4bit(packed, requires_grad=False, blocksize=w.blocksize,
                                              compress_statistics=w.compress_statistics, quant_type=w.quant_type,
                                              quant_storage=w.quant_storage, module=module, bnb_quantized=True)
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer


def _load_pretrained(cfg: RunConfig, name: str, revision: str | None, trust_remote_code: bool,
                     storage: torch.dtype, attention: str, device: torch.device, precision: torch.dtype):
    from transformers import AutoModelForCausalLM

    quantization = None
    if cfg.model.method == "qlora":
        _refuse_qlora_of_moe(name, revision, trust_remote_code)
        quantization = _quantization_config(cfg, storage, precision)
    try:
        return AutoModelForCausalLM.from_pretrained(
            name,
            revision=revision,
            trust_remote_code=trust_remote_code,
            dtype=storage,
            attn_implementation=attention,
            quantization_config=quantization,
            # Weights go straight to the device (bitsandbytes quantises them on the way).
            device_map={"": str(device)},
        )
    except OSError as e:
        raise UserError(
            f"model.name_or_path: cannot load '{name}' (revision {revision or 'default'}): {e}; give a local "
            "directory with config.json and weights, a reachable hub id, or 'scratch' for the offline model"
        ) from None


def _refuse_qlora_of_moe(name: str, revision: str | None, trust_remote_code: bool) -> None:
    """QLoRA of a Mixture-of-Experts model is refused from its config.json, before any weight is read."""
    from transformers import AutoConfig

    from leantune.config import qlora_moe_problem
    from leantune.moe import moe_geometry

    try:
        config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except OSError:
        return  # from_pretrained below reports what is wrong with the name
    if moe_geometry(config) is not None:
        raise UserError(qlora_moe_problem(f"'{name}'"))


def _token_rows(tokenizer) -> int:
    """Embedding rows the tokenizer needs: one past its largest id (added tokens included)."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)


def _check_vocab(model, tokenizer, name: str) -> None:
    rows = model.get_input_embeddings().num_embeddings
    needed = _token_rows(tokenizer)
    if needed > rows:
        # Extra tokens would get untrained embedding rows that LoRA never updates.
        raise UserError(
            f"tokenize.tokenizer: the tokenizer needs {needed} token ids but '{name}' has only {rows} "
            "embedding rows; use the model's own tokenizer (leave tokenize.tokenizer unset)"
        )


def _enable_gradient_checkpointing(model) -> None:
    # Non-reentrant checkpointing works with frozen inputs and keyword arguments; transformers 5.x
    # renamed the method and keeps the old name as a deprecated alias.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _add_lora(cfg: RunConfig, model):
    import torch

    _quiet_peft_import()
    from peft import LoraConfig, get_peft_model

    from leantune.fused import fuse_lora

    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=_explicit_targets(model, cfg.lora.target_modules),
        # A tied embedding/output matrix (SmolLM2, Gemma) adapted on both sides gets one tied adapter, so
        # the embedding and the head stay the same matrix after training and merging.
        ensure_weight_tying=_adapts_tied_embeddings(cfg, model),
        # Mixture-of-Experts: the fused 3-D expert weights (peft's ParamWrapper, one adapter per expert).
        target_parameters=cfg.lora.target_parameters or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    if problem := lora_target_problem(cfg, model):
        raise UserError(problem)
    # LoRA A is drawn at random: seed it so a run's adapter init depends on train.seed only.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        experts = _expert_parameter_names(model)
        try:
            peft_model = get_peft_model(model, lora)
        except ValueError as e:
            if "not found in the base model" not in str(e):
                raise
            raise UserError(
                f"lora.target_modules: {cfg.lora.target_modules} match no layer of the model; its linear "
                f"layers are named {sorted(_linear_names(model))}; or use 'all-linear'"
            ) from None
    # One autograd Function per adapted linear layer: no dropped-out input copy per adapter (fused.py).
    fuse_lora(peft_model)
    wrapped = {m.parameter_name for m in peft_model.modules() if type(m).__name__ == "ParamWrapper"}
    if cfg.lora.target_parameters and not wrapped:
        # peft only warns when target_modules matched something.
        raise UserError(f"lora.target_parameters: {cfg.lora.target_parameters} match no parameter of the model; "
                        f"its 3-D expert parameters are {sorted(experts) or 'none (not a Mixture-of-Experts)'}")
    return peft_model


def _explicit_targets(model, targets: list[str] | str) -> list[str] | str:
    """A Mixture-of-Experts model's LoRA targets as the full names of the modules they name.

    peft 0.21 rewrites the targets of Mixtral- and OLMoE-type models as if they were transformers 4.x
    adapters: 'all-linear' or 'gate_proj'/'up_proj'/'down_proj' silently become LoRA on the fused experts
    (at twice the rank) and on the router weight. Full module names pass through unchanged, so
    lora.target_modules keeps meaning nn.Linear/nn.Embedding modules and lora.target_parameters the experts.
    """
    import torch

    from leantune.moe import moe_geometry

    if moe_geometry(model.config) is None:
        return targets
    head = model.get_output_embeddings()
    names = [name for name, m in model.named_modules()
             if (isinstance(m, torch.nn.Linear) and (targets != "all-linear" or m is not head)
                 or isinstance(m, torch.nn.Embedding) and targets != "all-linear")
             and (targets == "all-linear" or name.rsplit(".", 1)[-1] in targets)]
    # Nothing matched: the names as given, for peft's "not found" error (a UserError below).
    return names or targets


def _adapts_tied_embeddings(cfg: RunConfig, model) -> bool:
    targets = cfg.lora.target_modules
    return (bool(getattr(model.config, "tie_word_embeddings", False)) and isinstance(targets, list)
            and bool({"embed_tokens", "lm_head"} & set(targets)))


def _linear_names(model) -> set[str]:
    import torch

    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _expert_parameter_names(model) -> set[str]:
    """Dotted suffixes (module.parameter) of the model's 3-D parameters: fused experts."""
    return {".".join(name.split(".")[-3:]) for name, p in model.named_parameters() if p.dim() == 3}


def _real_numel(param) -> int:
    # A bitsandbytes 4-bit parameter packs two values per byte of its storage dtype.
    if param.__class__.__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


def describe_model(model) -> dict:
    """One-line facts for logs and reports: sizes, trainable share, dtype, method, attention, 4-bit."""
    total = trainable = 0
    dtypes: Counter = Counter()
    quant_types = set()
    for p in model.parameters():
        n = _real_numel(p)
        total += n
        trainable += n if p.requires_grad else 0
        if p.__class__.__name__ == "Params4bit":
            quant_types.add(p.quant_type)
        else:
            dtypes[str(p.dtype).removeprefix("torch.")] += n
    is_peft = hasattr(model, "peft_config")
    return {
        "total_params": total,
        "trainable_params": trainable,
        "trainable_share": trainable / total if total else 0.0,
        # The dtype holding most of the (not 4-bit) weights.
        "dtype": dtypes.most_common(1)[0][0] if dtypes else None,
        "method": ("qlora" if quant_types else "lora") if is_peft else "full",
        "attn_implementation": model.config._attn_implementation,
        "quantized_4bit": bool(quant_types),
        "quant_type": quant_types.pop() if len(quant_types) == 1 else None,
    }


def build_base_model(cfg: RunConfig, tokenizer, device, quantised: bool = False):
    """The base model of `cfg` without adapters, unquantised in the compute dtype (`quantised`: in 4 bits,
    as QLoRA trains it), in eval mode.

    What an adapter in run_dir/adapter is loaded onto with `PeftModel.from_pretrained`.
    """
    # LoRA's build stores the frozen base in the compute dtype, QLoRA's in 4 bits; the fresh adapter
    # it adds is removed again.
    as_lora = cfg.model_copy(update={"model": cfg.model.model_copy(update={
        "method": "qlora" if quantised else "lora", "gradient_checkpointing": False})})
    base = build_model(as_lora, tokenizer, device).unload()
    base.requires_grad_(False)
    return base.eval()


def lora_target_problem(cfg: RunConfig, model=None) -> str | None:
    """Why lora.target_modules cannot be applied as written, or None: each name must match at least one
    module (peft's rule: the module's full name, or its last dotted parts), else the run would quietly
    train fewer layers than asked. `model`: the model to check; without it, the model's skeleton is built
    on the meta device from its config alone (no weights are read: quick enough to run before the data
    stages). None as well for 'all-linear', for method 'full', or when the model's config cannot be read
    here (training checks again with the real model)."""
    targets = cfg.lora.target_modules
    if cfg.model.method == "full" or targets == "all-linear":
        return None
    if model is None:
        model = _meta_skeleton(cfg)
        if model is None:
            return None
    modules = [(name, m) for name, m in model.named_modules() if name]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n, _ in modules)]
    if missing:
        return (f"lora.target_modules: {', '.join(map(repr, missing))} match{'es' if len(missing) == 1 else ''} no "
                f"layer of {cfg.model.name_or_path}; its linear layers are named {sorted(_linear_names(model))} "
                "(or use 'all-linear')")
    # peft adapts layers only (linear, embedding, convolution); a container (a block's `mlp`, `self_attn`)
    # would fail in training, after the data stages.
    containers = {t: type(m).__name__ for t in targets for n, m in modules
                  if (n == t or n.endswith(f".{t}")) and not _adaptable(m)}
    if not containers:
        return None
    return (f"lora.target_modules: {', '.join(f'{t!r} ({kind})' for t, kind in containers.items())} "
            f"{'is a container' if len(containers) == 1 else 'are containers'} of layers in "
            f"{cfg.model.name_or_path}, not a linear layer LoRA can adapt; name its linear layers instead: "
            f"{sorted(_linear_names(model))} (or use 'all-linear')")


def sort_adapter_config(model) -> None:
    """Make peft's set-valued settings (target_modules, ...) sorted lists before the adapter is saved: peft keeps
    them as sets, which adapter_config.json lists in the order of Python's string hashing, different in each
    process, so two identical runs would write different adapter directories."""
    for config in getattr(model, "peft_config", {}).values():
        for key, value in vars(config).items():
            if isinstance(value, (set, frozenset)):
                setattr(config, key, sorted(value))


def _adaptable(module) -> bool:
    """Whether peft's LoRA can adapt `module` itself (a layer it has a LoRA variant of)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d,
                               torch.nn.Conv3d, torch.nn.MultiheadAttention, Conv1D))


def moe_problems(cfg: RunConfig, model=None) -> list[str]:
    """What PEFT/transformers cannot do with this Mixture-of-Experts model as configured: QLoRA of its fused
    experts, lora.target_parameters that name none of its parameters. From the meta-device skeleton (built only
    when QLoRA or target_parameters are asked for); [] when the model's config cannot be read here."""
    from leantune.config import qlora_moe_problem
    from leantune.moe import moe_geometry

    if not (cfg.model.method == "qlora" or cfg.lora.target_parameters and cfg.model.method == "lora"):
        return []
    model = model if model is not None else _meta_skeleton(cfg)
    if model is None:
        return []
    problems = []
    if cfg.model.method == "qlora" and moe_geometry(model.config) is not None:
        problems.append(qlora_moe_problem(f"'{cfg.model.name_or_path}'"))
    names = [n for n, _ in model.named_parameters()]
    missing = [t for t in cfg.lora.target_parameters if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        problems.append(f"lora.target_parameters: {', '.join(map(repr, missing))} match no parameter of "
                        f"{cfg.model.name_or_path}; its 3-D expert parameters are "
                        f"{sorted(_expert_parameter_names(model)) or 'none (not a Mixture-of-Experts)'}")
    return problems


def _meta_skeleton(cfg: RunConfig):
    """The model of `cfg` with its weights on the meta device (no memory, no download of weights), or None."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.model.name_or_path == SCRATCH:
        config = scratch_hf_config(cfg, cfg.tokenize.vocab_size)
    elif (source := already_loadable(cfg.model)) is None:
        return None  # a GGUF not dequantized yet: training checks with the real model
    else:
        try:
            config = AutoConfig.from_pretrained(source, revision=cfg.model.revision,
                                                trust_remote_code=cfg.model.trust_remote_code)
        except (OSError, ValueError):
            return None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)


def qlora_base_in_4_bits(cfg, device: torch.device, precision: torch.dtype) -> bool:
    """After a QLoRA run of `cfg`: whether its base must stay in 4 bits on `device` (`quantised_evaluation`
    with the base's size from its config and the device's free memory now); logged with why. Without
    the model's config to size it: on CUDA, yes (training fitted the 4-bit base)."""
    import logging

    from leantune.devices import cuda_free_bytes, describe, quantised_evaluation
    from leantune.monitor.hostmem import host_memory

    if cfg.model.method != "qlora":
        return False
    skeleton = _meta_skeleton(cfg)
    if skeleton is None:
        return device.type == "cuda"
    base_bytes = sum(p.numel() for p in skeleton.parameters()) * precision.itemsize
    free = cuda_free_bytes(device) if device.type == "cuda" else host_memory().available_bytes
    quantised, why = quantised_evaluation(cfg.model.method, describe(device), base_bytes, free,
                                          cfg.monitor.memory_high_fraction)
    logging.getLogger(__name__).info("QLoRA base: %s (%s)", "4-bit" if quantised else "unquantised", why)
    return quantised
