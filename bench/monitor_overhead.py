"""Overhead of the resource monitor on training steps, against the same steps without it, in one run.

The steps: leantune's scratch Llama (hidden 128, 2 layers, LoRA r=16 on every linear; about 0.9M
parameters), micro-batches of 4 x 256 tokens, forward + backward + AdamW, on the CUDA device when
there is one, else the CPU. The monitor runs as in training: its thread samples at
monitor.interval_seconds (default 1 s) with the real backend (NVML when present, else psutil) and
writes monitor.csv.

Two measures:
  direct   median step time with the monitor running over median step time without it; blocks
           alternate (off, on, off, on, ...) so that drift on a shared machine hits both alike.
           On a busy machine this ratio is noisy at the 1% level.
  bound    the sampler's own time per sample (measured over many samples) divided by the interval:
           the share of one core the sampler can take from training at most (it holds the GIL for
           that long, at most once per interval).
Both are printed, the bound also for the NVML reading code on a scripted GPU (FakeNvml); the target
is under 1% of step time at the default interval.

    .venv/bin/python bench/monitor_overhead.py                 # a minute or two on 2 idle cores
    .venv/bin/python bench/monitor_overhead.py --blocks 10 --steps 30 --interval 0.1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


def build(device):
    import torch

    from leantune.config import load_config
    from leantune.modeling import build_model
    from leantune.training.optim import build_optimizer

    cfg = load_config(overrides=[
        f"train.device={device.type}", "model.scratch.hidden_size=128", "model.scratch.intermediate_size=344",
        "model.scratch.num_layers=2", "model.scratch.num_heads=4", "model.scratch.num_kv_heads=2",
        "tokenize.vocab_size=2000", "tokenize.max_seq_len=256", "lora.r=16",
    ])

    class Tokenizer:  # what build_model reads of a tokenizer
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

        def __len__(self):
            return 2000

        def get_vocab(self):
            return {str(i): i for i in range(2000)}

    torch.manual_seed(0)
    model = build_model(cfg, Tokenizer(), device)
    return cfg, model, build_optimizer(cfg, model)


def step_times(model, optimizer, batch, steps: int, device) -> list[float]:
    import torch

    times = []
    for _ in range(steps):
        start = time.perf_counter()
        logits = model(input_ids=batch).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def time_samples(monitor, n: int) -> float:
    """Seconds per `sample_once` (reading, monitor.csv row), averaged over n samples."""
    start = time.perf_counter()
    for _ in range(n):
        monitor.sample_once()
    seconds = (time.perf_counter() - start) / n
    monitor.stop()
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, default=6, help="blocks per side, alternating")
    p.add_argument("--steps", type=int, default=20, help="steps per block")
    p.add_argument("--interval", type=float, default=None, help="sampling interval (default: the config's)")
    p.add_argument("--samples", type=int, default=300, help="samples timed for the per-sample cost")
    args = p.parse_args()

    import torch

    from leantune.monitor.sampler import Monitor

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the scripted NVML of the tests
    from fakes import FakeNvml

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, model, optimizer = build(device)
    monitor_cfg = cfg.monitor if args.interval is None else cfg.monitor.model_copy(
        update={"interval_seconds": args.interval})
    batch = torch.randint(3, 2000, (4, 256), device=device)
    step_times(model, optimizer, batch, 3, device)  # warm-up: allocator, kernels, optimizer state

    with tempfile.TemporaryDirectory() as tmp:
        off, on = [], []
        for block in range(args.blocks):
            off += step_times(model, optimizer, batch, args.steps, device)
            with Monitor(monitor_cfg, Path(tmp) / f"monitor-{block}.csv", device_type=device.type) as monitor:
                on += step_times(model, optimizer, batch, args.steps, device)
                backend = monitor.latest.backend
        per_sample = time_samples(Monitor(monitor_cfg, Path(tmp) / "timed.csv", device_type=device.type),
                                  args.samples)
        # The NVML reading code on a scripted GPU: its Python cost where no real GPU is at hand.
        fake = FakeNvml([{"t": 0}], time.monotonic)
        per_fake_sample = time_samples(Monitor(monitor_cfg, Path(tmp) / "fake.csv", device_type="cuda", nvml=fake),
                                       args.samples)

    base, with_monitor = statistics.median(off), statistics.median(on)
    interval = monitor_cfg.interval_seconds
    print(f"device {device.type}, monitor backend {backend}, interval {interval:g} s, "
          f"{args.blocks} x {args.steps} steps per side")
    print(f"step time: {base * 1000:.1f} ms without the monitor, {with_monitor * 1000:.1f} ms with it "
          f"(median); ratio {with_monitor / base:.4f}")
    print(f"sampler: {per_sample * 1000:.3f} ms per sample, once per {interval:g} s: at most "
          f"{per_sample / interval:.4%} of step time")
    print(f"sampler with a (fake) NVML GPU: {per_fake_sample * 1000:.3f} ms per sample: at most "
          f"{per_fake_sample / interval:.4%} of step time")


if __name__ == "__main__":
    main()
