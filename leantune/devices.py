"""What leantune picks on a device, each decision one pure function of a `Device` description.

`Device` is what the decisions need to know of a card: its name, compute capability, memory,
whether it computes bf16 natively (not emulated) and whether flash_attn is installed. `describe`
reads it from torch for the device training runs on; `KNOWN` holds the cards of the README's device
table (`device_table`, printed by `python -m leantune.cost --devices`), so tests and the table call
the same functions the training and evaluation processes call:

  auto_dtype        model.dtype 'auto': bf16 where the card computes it natively (compute capability
                    8.0 or later: Ampere, Ada, Hopper); fp16 with loss scaling (a GradScaler) on older
                    cards (T4, V100, RTX 20xx), where torch only emulates bf16, several times slower;
                    fp32 on the CPU
  choose_attention  model.attn_implementation 'auto': flash_attention_2 when flash_attn is installed,
                    the card is Ampere or later (FlashAttention 2 has no kernels before it) and the
                    compute dtype is bf16/fp16; else sdpa. Returns why, for the log.
  fused_adamw       torch's fused AdamW kernel on CUDA (train.optimizer 'adamw')
  quantised_evaluation  after QLoRA: whether evaluation and the merged export keep the base in 4 bits
                    (or, for the export, merge on the CPU): when the unquantised base does not fit the
                    card's free memory (leantune/modeling.py's `qlora_base_in_4_bits` applies it to a run's
                    config, with the memory this process can still allocate, `cuda_free_bytes`)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

GIB = 2**30
AMPERE = (8, 0)  # native bf16 tensor cores and FlashAttention 2 start here


@dataclass(frozen=True)
class Device:
    """A training device as leantune's decisions see it; kind 'cpu' has no capability."""

    name: str
    kind: str = "cuda"  # "cuda" or "cpu"
    capability: tuple[int, int] | None = None
    total_memory: int | None = None  # bytes
    bf16_native: bool = False  # bf16 tensor cores, not torch's emulation
    flash_attn_installed: bool = False


def describe(device: torch.device) -> Device:
    """The Device torch trains on: its CUDA properties, or the CPU."""
    import importlib.util

    import torch

    flash = importlib.util.find_spec("flash_attn") is not None
    if device.type != "cuda":
        return Device(name="cpu", kind=device.type, flash_attn_installed=flash)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return Device(
        name=torch.cuda.get_device_name(index), capability=tuple(torch.cuda.get_device_capability(index)),
        total_memory=torch.cuda.get_device_properties(index).total_memory,
        # The default counts emulation (any CUDA card "supports" bf16, several times slower before Ampere).
        bf16_native=torch.cuda.is_bf16_supported(including_emulation=False), flash_attn_installed=flash)


def auto_dtype(device: Device) -> str:
    """model.dtype 'auto' on `device`: 'bf16', 'fp16' (trained with a GradScaler) or 'fp32'."""
    if device.kind != "cuda":
        return "fp32"
    return "bf16" if device.bf16_native else "fp16"


def flash_attention_problem(device: Device, dtype: str) -> str | None:
    """Why FlashAttention 2 cannot run on `device` in `dtype` ('bf16', 'fp16', 'fp32'), or None."""
    if device.kind != "cuda":
        return f"it needs a CUDA device, not {device.kind}"
    if not device.flash_attn_installed:
        return "the flash_attn package is not installed"
    if device.capability is None or device.capability < AMPERE:
        cc = ".".join(map(str, device.capability or ()))
        return f"{device.name} has compute capability {cc}; FlashAttention 2 needs 8.0 or later (Ampere)"
    if dtype not in ("bf16", "fp16"):
        return f"it has kernels for bf16/fp16 only, not {dtype}"
    return None


def choose_attention(device: Device, dtype: str, wanted: str = "auto") -> tuple[str, str]:
    """(attention implementation, why) for model.attn_implementation `wanted`; 'auto' takes
    flash_attention_2 where `flash_attention_problem` finds none, else sdpa. An explicit choice is kept
    (the caller refuses flash_attention_2 when `flash_attention_problem` says why it cannot run)."""
    if wanted != "auto":
        return wanted, "model.attn_implementation"
    problem = flash_attention_problem(device, dtype)
    if problem is None:
        return "flash_attention_2", "flash_attn installed, Ampere or later, half precision"
    return "sdpa", f"no flash_attention_2: {problem}"


def fused_adamw(device: Device) -> bool:
    """train.optimizer 'adamw' uses torch's fused kernel (one launch for all parameters) on CUDA."""
    return device.kind == "cuda"


def optimizer_name(device: Device, optimizer: str = "adamw") -> str:
    """train.optimizer as it runs on `device`."""
    if optimizer == "adamw":
        return "AdamW, fused kernel" if fused_adamw(device) else "AdamW"
    return {"adamw_8bit": "8-bit AdamW (bitsandbytes)", "paged_adamw_8bit": "paged 8-bit AdamW (bitsandbytes)"}[
        optimizer]


def quantised_evaluation(method: str, device: Device, base_bytes: int, free_bytes: int,
                         high_fraction: float) -> tuple[bool, str]:
    """After a QLoRA run: (keep the base in 4 bits, why). The unquantised base (`base_bytes` in the
    compute dtype) is loaded only where it fits `high_fraction` of the device's free memory
    (monitor.memory_high_fraction, the share training may use too); else evaluation scores the base
    with the adapter off and on over the same 4-bit base training used. LoRA and full fine-tunes
    trained on the unquantised base, so they are evaluated on it."""
    if method != "qlora":
        return False, f"{method} trained on the unquantised base"
    budget = int(free_bytes * high_fraction)
    if device.kind == "cuda" and base_bytes > budget:
        return True, (f"the unquantised base needs {base_bytes / GIB:.1f} GiB, over the "
                      f"{budget / GIB:.1f} GiB free on {device.name}: the 4-bit base of training")
    return False, f"the unquantised base ({base_bytes / GIB:.1f} GiB) fits {budget / GIB:.1f} GiB free"


def cuda_free_bytes(device: torch.device) -> int:
    """What this process can still allocate on CUDA `device`: the driver's free memory plus torch's cached
    but unused blocks, capped by torch.cuda.set_per_process_memory_fraction (a process given 16 GB of an
    80 GB card must size its loads against 16 GB)."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    allocated, reserved = torch.cuda.memory_allocated(index), torch.cuda.memory_reserved(index)
    cap = int(torch.cuda.get_per_process_memory_fraction(index) * total) - allocated
    return max(0, min(free + reserved - allocated, cap))


# ------------------------------------------------------------------------------------ device table

# The cards of the README's table: compute capability and memory as sold (a 16 GB card holds 16 GiB).
KNOWN = (
    Device("T4", capability=(7, 5), total_memory=16 * GIB),
    Device("V100", capability=(7, 0), total_memory=16 * GIB),
    Device("RTX 3090", capability=(8, 6), total_memory=24 * GIB, bf16_native=True),
    Device("RTX 4060", capability=(8, 9), total_memory=8 * GIB, bf16_native=True),
    Device("RTX 4090", capability=(8, 9), total_memory=24 * GIB, bf16_native=True),
    Device("A10", capability=(8, 6), total_memory=24 * GIB, bf16_native=True),
    Device("L4", capability=(8, 9), total_memory=24 * GIB, bf16_native=True),
    Device("A100", capability=(8, 0), total_memory=80 * GIB, bf16_native=True),
    Device("H100", capability=(9, 0), total_memory=80 * GIB, bf16_native=True),
)
# The table's workload: QLoRA of an 8B model (Llama-3.1-8B: 8.03e9 parameters), the run the router
# sends to 16 GB cards.
TABLE_PARAMS = 8_030_261_248
TABLE_HIGH_FRACTION = 0.92  # monitor.memory_high_fraction's default


def device_table(flash_attn_installed: bool = True) -> str:
    """The README's device table (Markdown): what leantune picks on each card of `KNOWN` for an 8B QLoRA
    run, flash_attn installed or not, from the decision functions above and their reasons."""
    rows = ["| GPU | compute capability | dtype | attention | optimizer | 8B QLoRA evaluation | why |",
            "|---|---|---|---|---|---|---|"]
    for card in KNOWN:
        card = Device(**{**card.__dict__, "flash_attn_installed": flash_attn_installed})
        dtype = auto_dtype(card)
        attention, attention_why = choose_attention(card, dtype)
        base_bytes = TABLE_PARAMS * (2 if dtype != "fp32" else 4)
        quantised, evaluation_why = quantised_evaluation("qlora", card, base_bytes, card.total_memory,
                                                         TABLE_HIGH_FRACTION)
        dtype_why = "native bf16" if card.bf16_native else "bf16 only emulated before compute capability 8.0"
        rows.append(f"| {card.name} | {card.capability[0]}.{card.capability[1]} | "
                    f"{dtype + (' + GradScaler' if dtype == 'fp16' else '')} | {attention} | {optimizer_name(card)} | "
                    f"{'4-bit base' if quantised else 'unquantised base'} | "
                    f"{dtype_why}; {attention_why}; {evaluation_why} |")
    return "\n".join(rows)
