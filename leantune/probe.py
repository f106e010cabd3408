"""Memory estimator, and the starting method, micro-batch and gradient checkpointing it picks.

Model shape (`ModelShape`, Llama-family decoders: Llama, Mistral, Qwen2, Gemma, Phi-3): h hidden
size, L layers, n_h / n_kv attention / key-value heads of width d (a = n_h d, c = n_kv d), i MLP
width, V vocabulary. Per layer the linears are q (h->a), k and v (h->c), o (a->h), gate and up
(h->i), down (i->h); the embeddings are V h (twice when the output head is not tied).

Memory of a training step (bytes; p = 2 for bf16/fp16 compute, 4 for fp32):

  weights     full: every parameter in fp32 (4), plus the p-byte copies autocast makes of the
              linear weights and keeps for backward when p < 4, or with train.full_precision
              bf16-*: in bf16 (2), no copies; lora: every parameter in p;
              qlora: linear weights in 4-bit NF4, 0.5 byte plus the quantisation constants
              (one fp32 absmax per 64 weights = 0.0625, or with double quantisation an 8-bit
              absmax plus one fp32 per 256 blocks = 0.0159), and every other parameter in fp32
              (peft's prepare_model_for_kbit_training upcasts embeddings, head and norms).
  trainable   lora/qlora: r (in + out) per adapted linear, fp32 (4); full: the weights above.
  gradients   4 per trainable parameter (fp32); full with bf16 weights: 2. With
              train.optimizer_in_backward and no accumulation (one micro-batch per step) each
              gradient is stepped and freed as backward makes it: the largest parameter's only.
  optimizer   AdamW: two fp32 states, 8 per trainable parameter; 8-bit AdamW: 2. Full fine-tuning
              with the paged 8-bit AdamW on CUDA: the state lives in unified memory that spills to the
              host, so the GPU needs the largest parameter's state only (`paged_host`: the whole
              state, host memory, not in the total). bf16-kahan adds its bf16 compensation, 2.
  activations per token of the micro-batch (micro_batch_size x max_seq_len tokens), kept for
              backward; per layer:
                attention (SDPA / flash): p (2a + 2c) for q, k, v and the output, 4 n_h for the
                  log-sum-exp; eager attention adds p n_h T for the probabilities (T = sequence)
                MLP: p 2i (gate and up; the fused SwiGLU recomputes the SiLU and the product)
                norms: 4 (2h + 2) (RMSNorm computes in fp32 and keeps its input and 1/rms)
                full fine-tune: p (2h + a + i) linear inputs and p 2h normalised outputs, for the
                  weight gradients
                LoRA (fused, fused.py): each distinct input of the adapted linears once
                  (q/k/v share one, gate/up another; down_proj's is recomputed), p per element (fused.py
                  keeps them, and multiplies, in the compute dtype),
                  p r per adapted linear for the A output, and with dropout > 0 its keep mask (1 byte
                  per element of its input)
                QLoRA (peft's forward): per adapted linear with input width n, dropout > 0 keeps its
                  mask (1 byte on CUDA, p on the CPU) and its output (p) of width n; dropout 0 keeps
                  each distinct input once, down_proj's too; plus p r for the A output
              after the layers: 4 (h + 1) for the final norm; p h + 8 per target token (the gradient
              of its hidden row and its index; every token counted as a target)
              packed sequences add their block-diagonal attention mask, p T
  loss chunk  once per micro-batch, not per token: the output head and the cross-entropy run over
              target rows only, in chunks of CHUNK_LOGITS logits (training/loss.py): V (p + 8) per
              row of a chunk (the logits in p, their fp32 log-softmax and its gradient)
  gradient checkpointing keeps only each layer's input, p h per layer, and recomputes one layer at
              a time once the loss chunks are freed: L p h + max(one layer, loss chunk) + the rest
              qlora adds one dequantised weight (the largest linear, in p) at a time.
  optimizer step on the CPU: torch's foreach AdamW makes one fp32 temporary per trainable
              parameter (CUDA uses the fused kernel); it does not coexist with the activations.
              Full fine-tuning with one optimizer per weight (training/paramwise.py) steps one
              weight at a time, a bf16 one in chunks of STEP_CHUNK elements: fp32 copies of the chunk
              and of its gradient (8 per element, 12 with stochastic rounding's random bits), and
              AdamW on the CPU one more fp32 temporary (4), for the largest chunk (fp32 weights: the
              largest parameter); with train.optimizer_in_backward they coexist with the activations
              (added to them).
  preference pairs (train.objective dpo or simpo): a micro-batch of m pairs runs 2m rows (prompt +
              chosen, prompt + rejected), so the activations are those of 2m sequences; DPO's
              reference pass runs without gradients and is freed before the policy's forward,
              so it keeps nothing for backward (full fine-tuning reads it from disk).

  peak = weights + trainable + gradients + optimizer + max(activations, optimizer step temporary)

FSDP (train.distributed.strategy fsdp over W = nproc_per_node x nnodes GPUs, training/fsdp.py): the
figure is per GPU. Each holds 1/W of the stored weights, of the trainable parameters, of the optimizer
state and of its step's temporary; and gathered in the compute dtype (p): two decoder layers at a time
(the one running and the one prefetched; QLoRA's at their packed 4-bit size, 0.5 byte a weight) and the
rest of the model (embeddings, head, norms), which the root keeps gathered from forward to backward. QLoRA's
quantisation constants are not sharded: bitsandbytes keeps them on the module, outside the parameters, so
each GPU holds all of them (0.0159 byte a weight with double quantisation). Gradients: LoRA
keeps its unsharded gradients until the last micro-batch (all of them, as without FSDP); full
fine-tuning holds 1/W of them plus two layers' unsharded fp32 gradients being reduce-scattered.
Activations are those of the GPU's own micro-batch, as without FSDP. With train.distributed.cpu_offload
the shards of the weights, trainable parameters, gradients and optimizer state, and the CPU AdamW step's
temporary (one fp32 per trainable parameter of the shard), are in host memory (`offloaded_host`, not in
the total): the GPU keeps the gathered layers and rest of the model, QLoRA's quantisation constants, the
unsharded gradients (LoRA's, until the last micro-batch; full fine-tuning's two layers being
reduce-scattered) and the activations.

Loading under FSDP (`load_memory_problems`): rank 0 reads the whole model into host memory, where it stays
until every rank's shards are filled from it; each GPU then holds its shards (none with the offload), QLoRA's
constants and one whole tensor at a time, the one being sent (`largest_stored_tensor`).

Checked against published figures (tests/test_probe.py): Llama-2-7B's 6.74 B parameters and its
39,976,960 LoRA parameters at r=16 on every linear; NF4 weights of 7-8 B models at 3.5-5 GB;
and against the measured peak of every tensor of a training step of tiny CPU models.

`plan_start` keeps the configured method and settings when they fit under
monitor.memory_high_fraction of the free memory; otherwise it lowers the micro-batch first (the
same updates, the controller may grow it again), then turns on gradient checkpointing (the same
gradients, about a third more compute), then moves to a lighter method (full -> lora -> qlora on
CUDA), which changes the run, so it is the last resort. It never raises the micro-batch: growing
is the adaptive controller's job, on measured headroom.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from leantune.config import RunConfig, compute_dtype, divisors, method_values, with_values
from leantune.gguf import model_source
from leantune.tables import markdown_table
from leantune.training.loss import CHUNK_LOGITS
from leantune.training.paramwise import STEP_CHUNK

log = logging.getLogger(__name__)

GIB = 2**30
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Which saved tensor feeds each linear: linears of one group share their input.
INPUT_GROUP = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "qkv_proj": "attn_in",
               "o_proj": "attn_out", "gate_proj": "mlp_in", "up_proj": "mlp_in", "gate_up_proj": "mlp_in",
               "down_proj": "mlp_mid", "shared_expert_gate": "mlp_in"}
NF4_BYTES = 0.5 + 4 / 64  # 4-bit weights + one fp32 absmax per block of 64
NF4_DOUBLE_QUANT_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 8-bit absmax + an fp32 scale per 256 blocks
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2}
METHOD_LADDER = ("full", "lora", "qlora")


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int
    tied_embeddings: bool
    # Mixture-of-Experts (every layer's MLP): routed experts of width intermediate_size, top-k per token,
    # and a shared expert of width shared_expert_size (Qwen-MoE; 0 without). num_experts 0: dense.
    num_experts: int = 0
    experts_per_token: int = 0
    shared_expert_size: int = 0

    @classmethod
    def from_hf_config(cls, config) -> ModelShape:
        """From a transformers config (a multimodal one's text_config); MoE configs give their expert width."""
        from leantune.moe import moe_geometry

        c = getattr(config, "text_config", None) or config
        heads = c.num_attention_heads
        moe = moe_geometry(c)
        return cls(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers, num_heads=heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            intermediate_size=(moe and getattr(c, "moe_intermediate_size", None)) or c.intermediate_size,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            tied_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            num_experts=moe.num_experts if moe else 0, experts_per_token=moe.top_k if moe else 0,
            shared_expert_size=(getattr(c, "shared_expert_intermediate_size", 0) or 0) if moe else 0,
        )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of one layer's linears, by module name (fused Phi-3 names included)."""
        h, i = self.hidden_size, self.intermediate_size
        a, c = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if self.is_moe:
            # The nn.Linear layers of an MoE layer: attention, and the shared expert's MLP (Qwen-MoE) with its
            # sigmoid gate; the routed experts are 3-D parameters (`expert_tensors`), the router a 2-D one.
            s = self.shared_expert_size
            shared = {"gate_proj": (h, s), "up_proj": (h, s), "down_proj": (s, h), "shared_expert_gate": (h, 1)}
            return {"q_proj": (h, a), "k_proj": (h, c), "v_proj": (h, c), "o_proj": (a, h),
                    **(shared if s else {})}
        return {"q_proj": (h, a), "k_proj": (h, c), "v_proj": (h, c), "o_proj": (a, h), "gate_proj": (h, i),
                "up_proj": (h, i), "down_proj": (i, h), "qkv_proj": (h, a + 2 * c), "gate_up_proj": (h, 2 * i)}

    def expert_tensors(self) -> dict[str, tuple[int, int]]:
        """(in, out) of one expert in each fused 3-D expert parameter of a layer, by lora.target_parameters name."""
        h, i = self.hidden_size, self.intermediate_size
        return {"mlp.experts.gate_up_proj": (h, 2 * i), "mlp.experts.down_proj": (i, h)} if self.is_moe else {}

    @property
    def linear_names(self) -> tuple[str, ...]:
        """The linears of one layer ('all-linear')."""
        return tuple(self.linears()) if self.is_moe else LLAMA_LINEARS

    @property
    def largest_param(self) -> int:
        """Elements of the largest single parameter: the embedding (or head), a linear, or a fused expert tensor."""
        shapes = self.linears()
        experts = [self.num_experts * n * m for n, m in self.expert_tensors().values()]
        return max(self.vocab_size * self.hidden_size, *(shapes[n][0] * shapes[n][1] for n in self.linear_names),
                   *experts)

    @property
    def expert_params(self) -> int:
        """Routed experts of every layer: all of them are resident."""
        return self.num_layers * self.num_experts * sum(n * m for n, m in self.expert_tensors().values())

    @property
    def router_params(self) -> int:
        return self.num_layers * self.num_experts * self.hidden_size

    @property
    def linear_params(self) -> int:
        """Every matmul weight: the linears, and an MoE's routed experts and routers."""
        shapes = self.linears()
        dense = self.num_layers * sum(shapes[n][0] * shapes[n][1] for n in self.linear_names)
        return dense + self.expert_params + self.router_params

    @property
    def active_params(self) -> int:
        """Parameters one token's forward pass multiplies: an MoE's top-k experts instead of all of them."""
        if not self.is_moe:
            return self.total_params
        return self.total_params - self.expert_params * (self.num_experts - self.experts_per_token) // self.num_experts

    @property
    def other_params(self) -> int:
        """Embeddings, output head and norms: what QLoRA does not quantise."""
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)
        return embeddings + (2 * self.num_layers + 1) * self.hidden_size

    @property
    def total_params(self) -> int:
        return self.linear_params + self.other_params

    def adapted(self, targets: list[str] | str) -> list[str]:
        """The linears of one layer LoRA adapts ('all-linear': every one, the output head excepted)."""
        if targets == "all-linear":
            return list(self.linear_names)
        return [t for t in targets if t in self.linears()]

    def adapted_experts(self, target_parameters: list[str]) -> list[str]:
        """The fused expert parameters of one layer LoRA adapts (lora.target_parameters)."""
        return [t for t in self.expert_tensors() if any(t.endswith(p) or p.endswith(t) for p in target_parameters)]

    def lora_params(self, r: int, targets: list[str] | str, target_parameters: list[str] = ()) -> int:
        """LoRA parameters; peft's ParamWrapper gives a fused expert tensor A of r E x in and B of out x r E."""
        shapes, experts = self.linears(), self.expert_tensors()
        linear = sum(r * (shapes[n][0] + shapes[n][1]) for n in self.adapted(targets))
        fused = sum(r * self.num_experts * sum(experts[n]) for n in self.adapted_experts(list(target_parameters)))
        return self.num_layers * (linear + fused)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per component of a training step's peak; see the module docstring."""

    weights: int
    trainable: int
    gradients: int
    optimizer: int
    activations: int
    optimizer_step: int
    paged_host: int = 0  # the paged optimizer's state, in host memory when the GPU runs short: not in `total`
    offloaded_host: int = 0  # FSDP's CPU offload: this process's shards in host memory; not in `total`

    @property
    def total(self) -> int:
        return (self.weights + self.trainable + self.gradients + self.optimizer
                + max(self.activations, self.optimizer_step))

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in asdict(self).items()
                          if v and k not in ("paged_host", "offloaded_host"))
        host = f"; paged optimizer state {self.paged_host / GIB:.2f} GiB on the host" if self.paged_host else ""
        if self.offloaded_host:
            host += f"; offloaded shards {self.offloaded_host / GIB:.2f} GiB on the host"
        return f"{self.total / GIB:.2f} GiB ({parts}){host}"


def estimate_memory(shape: ModelShape, *, method: str, compute_bytes: int, micro_batch_size: int, seq_len: int,
                    gradient_checkpointing: bool, lora_r: int = 16, lora_targets: list[str] | str = "all-linear",
                    lora_dropout: float = 0.0, optimizer: str = "adamw", device_type: str = "cuda",
                    attention: str = "sdpa", double_quant: bool = True, packed: bool = False,
                    lora_target_parameters: list[str] = (), full_precision: str = "fp32",
                    optimizer_in_backward: bool = False, accumulation_steps: int = 1) -> MemoryEstimate:
    """The peak memory of one training step; the formula is in the module docstring."""
    p = compute_bytes
    h, i, n_h = shape.hidden_size, shape.intermediate_size, shape.num_heads
    a, c = n_h * shape.head_dim, shape.num_kv_heads * shape.head_dim
    shapes = shape.linears()

    if method == "full":
        w = 4 if full_precision == "fp32" else 2
        weights = shape.total_params * w + (shape.linear_params * p if p < w else 0)
        trainable_params = shape.total_params
        trainable = 0  # the weights are the trainable parameters
    else:
        if method == "qlora":
            per_weight = NF4_DOUBLE_QUANT_BYTES if double_quant else NF4_BYTES
            weights = round(shape.linear_params * per_weight) + shape.other_params * 4
        else:
            weights = shape.total_params * p
        trainable_params = shape.lora_params(lora_r, lora_targets, lora_target_parameters)
        trainable = trainable_params * 4

    layer = p * (2 * a + 2 * c) + _mlp_activations(shape, p) + 4 * (n_h + 2 * h + 2)
    if attention == "eager":
        layer += p * n_h * seq_len
    if method == "full":
        layer += p * (2 * h + a + i) + p * 2 * h
    else:
        adapted = shape.adapted(lora_targets)
        if method == "qlora" and lora_dropout > 0:
            mask = 1 if device_type == "cuda" else p
            layer += sum((mask + p) * shapes[n][0] for n in adapted)
        else:
            # Fused LoRA (leantune/fused.py) recomputes a dense MLP's down_proj input; peft's forward keeps it.
            recomputed = {"down_proj"} if method == "lora" and not shape.is_moe else set()
            widths = {INPUT_GROUP[n]: shapes[n][0] for n in adapted if n not in recomputed}
            layer += p * sum(widths.values())
            if lora_dropout > 0:
                layer += sum(shapes[n][0] for n in adapted)
        layer += p * lora_r * len(adapted)
    tokens = micro_batch_size * seq_len
    # The head and loss run over target rows only, a chunk at a time (training/loss.py); every token may be a target.
    chunk = min(tokens, max(1, CHUNK_LOGITS // shape.vocab_size)) * shape.vocab_size * (p + 8)
    per_token = 4 * (h + 1) + p * h + 8 + (p * seq_len if packed else 0)
    if gradient_checkpointing:
        # The loss's chunks are freed by the time backward recomputes the last layer.
        activations = (shape.num_layers * p * h + per_token) * tokens + max(layer * tokens, chunk)
    else:
        activations = (shape.num_layers * layer + per_token) * tokens + chunk
    if method == "qlora":
        activations += max(n_in * n_out for n_in, n_out in (shapes[n] for n in LLAMA_LINEARS)) * p
    if method != "full" and shape.is_moe:
        # peft's LoRA on a fused expert tensor (lora.target_parameters) adds B A to the whole tensor on every
        # forward: per layer two tensors of its full size stay for backward (measured on the CPU: the merged
        # weight and the copy the grouped expert matmul keeps), and backward adds two more for its gradient, one
        # layer at a time. Checkpointing keeps none between layers: the recomputed layer's two and the two of
        # its gradient.
        merged = p * shape.num_experts * sum(
            n * m for n, m in (shape.expert_tensors()[t] for t in shape.adapted_experts(list(lora_target_parameters))))
        activations += merged * (4 if gradient_checkpointing else 2 * shape.num_layers + 2)

    if method == "full" and (full_precision != "fp32" or optimizer_in_backward):
        return _paramwise_estimate(shape, weights, activations, full_precision=full_precision, optimizer=optimizer,
                                   device_type=device_type, in_backward=optimizer_in_backward,
                                   accumulation_steps=accumulation_steps)
    return MemoryEstimate(
        weights=weights, trainable=trainable, gradients=trainable_params * 4,
        optimizer=trainable_params * OPTIMIZER_STATE_BYTES[optimizer], activations=activations,
        optimizer_step=trainable_params * 4 if device_type != "cuda" and optimizer == "adamw" else 0,
    )


def _paramwise_estimate(shape: ModelShape, weights: int, activations: int, *, full_precision: str, optimizer: str,
                        device_type: str, in_backward: bool, accumulation_steps: int) -> MemoryEstimate:
    """Full fine-tuning with one optimizer per weight (training/paramwise.py); see the module docstring."""
    n, largest = shape.total_params, shape.largest_param
    bf16 = full_precision != "fp32"
    state = OPTIMIZER_STATE_BYTES[optimizer]
    paged = optimizer == "paged_adamw_8bit" and device_type == "cuda"
    # A bf16 weight steps STEP_CHUNK elements at a time; an fp32 one whole.
    stepped = min(largest, STEP_CHUNK) if bf16 else largest
    step = stepped * ((12 if full_precision == "bf16-stochastic" else 8) if bf16 else 0)
    step += stepped * 4 if device_type != "cuda" and optimizer == "adamw" else 0
    return MemoryEstimate(
        weights=weights, trainable=0,
        gradients=(largest if in_backward and accumulation_steps == 1 else n) * (2 if bf16 else 4),
        optimizer=(largest if paged else n) * state + (2 * n if full_precision == "bf16-kahan" else 0),
        activations=activations + (step if in_backward else 0), optimizer_step=0 if in_backward else step,
        paged_host=n * state if paged else 0,
    )


def _mlp_activations(shape: ModelShape, p: int) -> int:
    """Bytes one token's MLP keeps for backward: the dense gate and up (p 2i: fused.py's SwiGLU); or, in an MoE
    layer, the router's logits and fp32 probabilities (E (p + 4)), and per expert the token is routed to
    (transformers' grouped experts): its gathered input, gate-up output, activation and gated product, the
    expert output and the weighted output (p (2h + 4i)) and its routing index and weight (16); plus the
    shared expert's (fused) MLP and gate (p (2s + 1))."""
    h, i = shape.hidden_size, shape.intermediate_size
    if not shape.is_moe:
        return p * 2 * i
    routed = shape.experts_per_token * (p * (2 * h + 4 * i) + 16)
    shared = p * (2 * shape.shared_expert_size + 1) if shape.shared_expert_size else 0
    return shape.num_experts * (p + 4) + routed + shared


def compute_bytes(cfg: RunConfig, device_type: str) -> int:
    """Bytes per activation: model.dtype, with 'auto' as modeling.resolve_precision reads it."""
    return 4 if compute_dtype(cfg.model.dtype, device_type) == "fp32" else 2


def estimate_for_config(cfg: RunConfig, shape: ModelShape, device_type: str) -> MemoryEstimate:
    """`estimate_memory` with every setting from `cfg` (the longest sequence: tokenize.max_seq_len); per GPU
    under FSDP (`sharded_estimate`)."""
    world = cfg.train.distributed.nproc_per_node * cfg.train.distributed.nnodes
    estimate = estimate_memory(
        shape, method=cfg.model.method, compute_bytes=compute_bytes(cfg, device_type),
        # A pair is two rows (training/preference.py).
        micro_batch_size=cfg.train.micro_batch_size * (1 if cfg.train.objective == "sft" else 2),
        seq_len=cfg.tokenize.max_seq_len,
        gradient_checkpointing=cfg.model.gradient_checkpointing, lora_r=cfg.lora.r,
        lora_targets=cfg.lora.target_modules, lora_dropout=cfg.lora.dropout, optimizer=cfg.train.optimizer,
        device_type=device_type, attention="eager" if cfg.model.attn_implementation == "eager" else "sdpa",
        double_quant=cfg.model.double_quant, packed=cfg.tokenize.packing,
        lora_target_parameters=cfg.lora.target_parameters, full_precision=cfg.train.full_precision,
        optimizer_in_backward=cfg.train.optimizer_in_backward,
        # Micro-batches per step of each training process.
        accumulation_steps=cfg.train.global_batch_size // (cfg.train.micro_batch_size * world),
    )
    d = cfg.train.distributed
    if d.strategy == "fsdp" and d.nproc_per_node * d.nnodes > 1:
        return sharded_estimate(estimate, shape, cfg.model.method, compute_bytes(cfg, device_type),
                                d.nproc_per_node * d.nnodes, cfg.model.double_quant, d.cpu_offload)
    return estimate


def sharded_estimate(estimate: MemoryEstimate, shape: ModelShape, method: str, compute_bytes: int, world: int,
                     double_quant: bool = True, cpu_offload: bool = False) -> MemoryEstimate:
    """One GPU's share of `estimate` (one process's, unsharded) under FSDP over `world` GPUs (module docstring)."""
    p = compute_bytes
    layer = shape.linear_params // shape.num_layers
    constants = quantisation_constants(shape, method, double_quant)
    stored = stored_bytes(shape, method, p, double_quant) - constants
    if method == "qlora":
        layer = round(layer * 0.5 / p)  # two gathered layers below cost their packed 4-bit size
    # Gathered in the compute dtype, and QLoRA's constants, whole on every GPU.
    gathered = (2 * layer + shape.other_params) * p + constants
    unsharded_gradients = 2 * layer * 4 if method == "full" else estimate.gradients
    if cpu_offload:
        # The shards, their gradients and optimizer state, and the CPU AdamW step's fp32 temporary on the host.
        host = (stored + estimate.trainable + 2 * estimate.gradients + estimate.optimizer) // world
        return MemoryEstimate(weights=gathered, trainable=0, gradients=unsharded_gradients, optimizer=0,
                              activations=estimate.activations, optimizer_step=0, offloaded_host=host)
    gradients = estimate.gradients // world + unsharded_gradients if method == "full" else estimate.gradients
    return MemoryEstimate(
        weights=stored // world + gathered, trainable=estimate.trainable // world,
        gradients=gradients, optimizer=estimate.optimizer // world, activations=estimate.activations,
        optimizer_step=estimate.optimizer_step // world)


def quantisation_constants(shape: ModelShape, method: str, double_quant: bool = True) -> int:
    """QLoRA's quantisation constants (absmax, and with double quantisation its own constants): bitsandbytes keeps
    them on the 4-bit module, outside the parameters FSDP shards, so every GPU holds all of them (training/fsdp.py);
    0 for the other methods."""
    if method != "qlora":
        return 0
    per_weight = NF4_DOUBLE_QUANT_BYTES if double_quant else NF4_BYTES
    return round(shape.linear_params * (per_weight - 0.5))


def largest_stored_tensor(shape: ModelShape, method: str, compute_bytes: int) -> int:
    """Bytes of the largest single tensor of the model as a training process stores it (`stored_bytes`): what rank
    0 sends, whole, to every GPU when an FSDP run loads (training/fsdp.py). QLoRA: the fp32 embedding or head, or
    the largest packed 4-bit linear."""
    if method == "qlora":
        linears = shape.linears()
        return max(shape.vocab_size * shape.hidden_size * 4,
                   *(linears[n][0] * linears[n][1] // 2 for n in shape.linear_names))
    return shape.largest_param * (4 if method == "full" else compute_bytes)


def stored_bytes(shape: ModelShape, method: str, compute_bytes: int, double_quant: bool = True) -> int:
    """The whole model's weights as a training process stores them (before any sharding): full fine-tuning in
    fp32, LoRA in the compute dtype, QLoRA's linears in 4 bits and the rest in fp32."""
    if method == "full":
        return shape.total_params * 4
    if method == "qlora":
        per_weight = NF4_DOUBLE_QUANT_BYTES if double_quant else NF4_BYTES
        return round(shape.linear_params * per_weight) + shape.other_params * 4
    return shape.total_params * compute_bytes


def load_memory_problems(cfg: RunConfig, shape: ModelShape, device_type: str) -> list[str]:
    """What the training processes of this machine need beyond the per-GPU estimate of a training step, against
    the memory there is now (`free_memory_bytes`); one sentence per memory that falls short, [] when both hold it.

    Host memory: with train.distributed.cpu_offload each process keeps its shards there (`offloaded_host`), and
    on CUDA copies there each whole tensor it receives while loading, to cut its shard (`largest_stored_tensor`);
    a process that reads the weights holds the whole model there (`stored_bytes`): under FSDP rank 0 alone
    (`fsdp.loads_on_rank0`), on the CPU device and on CUDA alike (fsdp.build_to_shard), until every rank's shards
    are filled from it, so beside the offloaded shards; without FSDP on the CPU device every process, for good
    (on CUDA they load straight onto their GPU). The machine's need is the sum over its
    train.distributed.nproc_per_node processes. GPU memory under FSDP on CUDA: while the shards are filled each
    GPU holds its shards (none with cpu_offload), QLoRA's quantisation constants (`quantisation_constants`, whole
    on every GPU) and the tensor being sent (`largest_stored_tensor`), counted together (the constants come after
    the last tensor: an upper bound), against GPU 0's free memory. The configured method is checked, not one the
    probe may choose later (it only moves to lighter ones)."""
    from leantune.training.fsdp import loads_on_rank0

    d = cfg.train.distributed
    procs, world = d.nproc_per_node, d.nproc_per_node * d.nnodes
    sharded = d.strategy == "fsdp" and world > 1 and loads_on_rank0(cfg)
    if device_type == "cuda" and not sharded or cfg.model.method == "qlora" and shape.is_moe:
        return []  # QLoRA of a Mixture-of-Experts is refused on its own (modeling.moe_problems)
    method, p = cfg.model.method, compute_bytes(cfg, device_type)
    whole = stored_bytes(shape, method, p, cfg.model.double_quant)
    offload = estimate_for_config(cfg, shape, device_type).offloaded_host if d.cpu_offload else 0
    who, how = (("rank 0 reads", "the ranks' shards are filled from it") if sharded else
                ("each process loads", f"train.distributed.strategy {d.strategy} keeps a whole model in every process")
                if procs > 1 else ("the training process loads", ""))
    problems = []
    on_host = whole if device_type == "cpu" or sharded else 0
    # FSDP on CUDA with the offload: torch receives each whole tensor on the GPU and copies it to the host to cut
    # each process's shard from it (_state_dict_utils._broadcast_tensors), one tensor at a time.
    passing = largest_stored_tensor(shape, method, p) if sharded and offload and device_type == "cuda" else 0
    host_need = (on_host if sharded else procs * on_host) + procs * (offload + passing)
    available = free_memory_bytes("cpu")
    if host_need > available:
        parts = []
        if on_host:
            parts.append(f"{who} the whole model into host memory ({_size(whole)}{'; ' * bool(how)}{how})")
        if offload:
            parts.append(f"each keeps {_size(offload)} of shards of the weights, gradients and optimizer state "
                         "there (train.distributed.cpu_offload: true)")
        if passing:
            parts.append(f"each copies there the tensor it is loading, whole, to cut its shard ({_size(passing)} "
                         "at most)")
        fixes = (["set train.distributed.cpu_offload=false with GPUs that hold the shards (python -m leantune.cost "
                  "--config YAML shows the memory per GPU)", "raise train.distributed.nnodes (each machine then "
                  "holds a smaller share of the shards)"] if offload else []) + (
            ["set train.distributed.strategy=fsdp (rank 0 alone loads the model)", "lower "
             "train.distributed.nproc_per_node"] if on_host and not sharded and procs > 1 else []) + [
            "run on a machine with more memory"]
        problems.append(f"host memory: the {procs} training process{'es' if procs > 1 else ''} of this machine "
                        f"(train.distributed.nproc_per_node {procs}) need {_size(host_need)} and "
                        f"{_size(available)} is available: {'; '.join(parts)}. To fit: {', or '.join(fixes)}")
    if device_type == "cuda":
        shards, constants, sent = sharded_load_gpu_bytes(cfg, shape)
        free = free_memory_bytes("cuda", 0)
        if shards + constants + sent > free:
            parts = [f"its shards ({_size(shards)})"] if shards else []
            parts += [f"the quantisation constants ({_size(constants)})"] if constants else []
            parts.append(f"the largest tensor rank 0 sends, whole ({_size(sent)})")
            fixes = ["set train.distributed.cpu_offload=true (the shards in host memory)",
                     "raise train.distributed.nproc_per_node"] if shards else []
            problems.append(
                f"GPU memory: while the model loads each GPU holds {', '.join(parts)}: "
                f"{_size(shards + constants + sent)}, and GPU 0 has {_size(free)} free. To fit: "
                f"{', or '.join([*fixes, 'GPUs with more free memory'])}")
    return problems


def sharded_load_gpu_bytes(cfg: RunConfig, shape: ModelShape) -> tuple[int, int, int]:
    """(shards, constants, sent): what each GPU of an FSDP run on CUDA holds while its shards are filled from rank
    0's host copy (training/fsdp.py): its shards of the weights (0 with train.distributed.cpu_offload), QLoRA's
    quantisation constants, whole, and the one whole tensor being sent, at most `largest_stored_tensor`."""
    d, method = cfg.train.distributed, cfg.model.method
    p = compute_bytes(cfg, "cuda")
    constants = quantisation_constants(shape, method, cfg.model.double_quant)
    shards = 0 if d.cpu_offload else (stored_bytes(shape, method, p, cfg.model.double_quant) - constants) // (
        d.nproc_per_node * d.nnodes)
    return shards, constants, largest_stored_tensor(shape, method, p)


def _size(n: int) -> str:
    """Bytes in GiB, or in MiB below a tenth of a GiB (the tiny models of the tests)."""
    return f"{n / GIB:.2f} GiB" if n >= GIB // 10 else f"{n / 2**20:.1f} MiB"


def model_shape(cfg: RunConfig, vocab_size: int | None = None) -> ModelShape | None:
    """The shape of model.name_or_path: the scratch model from model.scratch (vocabulary: `vocab_size`,
    default tokenize.vocab_size), else its config.json (a local directory or the hub cache); None when
    that cannot be read here."""
    m = cfg.model
    if m.name_or_path == "scratch":
        from leantune.modeling import scratch_hf_config

        return ModelShape.from_hf_config(scratch_hf_config(cfg, vocab_size or cfg.tokenize.vocab_size))
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_source(m), revision=m.revision,
                                            trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as e:
        log.info("memory probe: cannot read the config of %s (%s); no estimate", m.name_or_path, e)
        return None
    return ModelShape.from_hf_config(config)


def free_memory_bytes(device_type: str, index: int = 0) -> int:
    """Free memory of the training device: CUDA's free memory, or on the CPU available host RAM (in a
    container: what its cgroup's memory limit leaves, when that is less)."""
    if device_type == "cuda":
        import torch

        return torch.cuda.mem_get_info(index)[0]
    from leantune.monitor.hostmem import host_memory

    return host_memory().available_bytes


@dataclass(frozen=True)
class StartPlan:
    """What training starts with; `changes` are 'key: old -> new' lines (empty: the config as given)."""

    method: str
    micro_batch_size: int
    gradient_checkpointing: bool
    estimate: MemoryEstimate
    free_bytes: int
    budget_bytes: int
    fits: bool
    changes: list[str] = field(default_factory=list)

    def apply(self, cfg: RunConfig) -> RunConfig:
        """`cfg` with the plan's method, micro-batch and gradient checkpointing."""
        return with_values(cfg, {**method_values(cfg, self.method), "train.micro_batch_size": self.micro_batch_size,
                                 "model.gradient_checkpointing": self.gradient_checkpointing})

    def markdown(self) -> str:
        """The plan for the flow's artifact: free memory, budget, the estimate per component, the changes."""
        rows = markdown_table(["component", "GiB"], ([k, f"{v / GIB:.3f}"] for k, v in self.estimate.to_dict().items()))
        return (f"## Memory probe\n\nfree {self.free_bytes / GIB:.2f} GiB, budget {self.budget_bytes / GIB:.2f} GiB "
                f"(monitor.memory_high_fraction), fits: {self.fits}\n\n{rows}\n"
                f"changes: {', '.join(self.changes) or 'none'}\n")

    def to_dict(self) -> dict:
        return {"method": self.method, "micro_batch_size": self.micro_batch_size,
                "gradient_checkpointing": self.gradient_checkpointing, "estimate_bytes": self.estimate.to_dict(),
                "free_bytes": self.free_bytes, "budget_bytes": self.budget_bytes, "fits": self.fits,
                "changes": self.changes}


def plan_start(cfg: RunConfig, shape: ModelShape, free_bytes: int, device_type: str) -> StartPlan:
    """The first candidate (see the module docstring) whose estimate fits under
    monitor.memory_high_fraction of `free_bytes`; the lightest one, with fits=False, when none does."""
    budget = int(free_bytes * cfg.monitor.memory_high_fraction)
    global_batch = cfg.train.global_batch_size
    micro_sizes = divisors(global_batch, cfg.train.micro_batch_size)
    checkpointing = [True] if cfg.model.gradient_checkpointing else [False, True]
    start = METHOD_LADDER.index(cfg.model.method)
    # QLoRA needs CUDA (unless asked for), and is refused for a Mixture-of-Experts (config.qlora_moe_problem).
    methods = [m for m in METHOD_LADDER[start:]
               if m != "qlora" or ((device_type == "cuda" or cfg.model.method == "qlora") and not shape.is_moe)]
    candidate = None
    for method in methods:
        for gc in checkpointing:
            for micro in micro_sizes:
                trial = with_values(cfg, {**method_values(cfg, method), "model.gradient_checkpointing": gc,
                                          "train.micro_batch_size": micro})
                candidate = (method, micro, gc, estimate_for_config(trial, shape, device_type))
                if candidate[3].total <= budget:
                    return _plan(cfg, candidate, free_bytes, budget, fits=True)
    return _plan(cfg, candidate, free_bytes, budget, fits=False)


def _plan(cfg: RunConfig, candidate: tuple, free_bytes: int, budget: int, fits: bool) -> StartPlan:
    method, micro, gc, estimate = candidate
    changes = [f"{key}: {old} -> {new}" for key, old, new in (
        ("train.micro_batch_size", cfg.train.micro_batch_size, micro),
        ("model.gradient_checkpointing", cfg.model.gradient_checkpointing, gc),
        ("model.method", cfg.model.method, method),
    ) if old != new]
    # Leaving full fine-tuning resets the settings only it takes.
    only_full = {"train.full_precision": cfg.train.full_precision,
                 "train.optimizer_in_backward": cfg.train.optimizer_in_backward}
    changes += [f"{key}: {only_full[key]} -> {new}" for key, new in method_values(cfg, method).items()
                if key in only_full]
    return StartPlan(method=method, micro_batch_size=micro, gradient_checkpointing=gc, estimate=estimate,
                     free_bytes=free_bytes, budget_bytes=budget, fits=fits, changes=changes)


def probe(cfg: RunConfig, vocab_size: int | None = None) -> StartPlan | None:
    """The start plan for `cfg` on the device it trains on (train.device), against that device's free
    memory now; None when the model's shape cannot be read here."""
    from leantune.modeling import resolve_device

    shape = model_shape(cfg, vocab_size)
    if shape is None:
        return None
    if shape.is_moe and cfg.model.method == "qlora":
        from leantune.config import qlora_moe_problem
        from leantune.errors import UserError

        raise UserError(qlora_moe_problem(f"'{cfg.model.name_or_path}'"))
    device = resolve_device(cfg)
    plan = plan_start(cfg, shape, free_memory_bytes(device.type, device.index or 0), device.type)
    log.info("memory probe: estimated %s against %.2f GiB free (budget %.2f GiB)%s", plan.estimate.describe(),
             plan.free_bytes / GIB, plan.budget_bytes / GIB,
             f"; starting with {', '.join(plan.changes)}" if plan.changes else "; the config fits as given")
    if not plan.fits:
        log.warning("memory probe: even the lightest settings (%s) are estimated above the budget; training "
                    "starts with them and the attempts adjust on failure. Lower tokenize.max_seq_len or choose a "
                    "smaller model.name_or_path", ", ".join(plan.changes) or "as configured")
    return plan
