"""Execution-time breakdown of training steps: attention / experts / router / optimizer / other, from torch.profiler.

The MoE fine-tuning study splits a step's time into attention, the experts (the MLP of a dense model),
the router and the optimizer. leantune measures it on the real training loop:

- While the profiler records, global module hooks open a `record_function` range around the forward of
  every attention module (class name ending in "Attention"), every MLP or MoE block (ending in "MLP",
  "MoeBlock" or "Experts") and every top-k router (ending in "TopKRouter"), named `leantune::<part>`.
- Forward time of a part is the self time of its ranges: a router inside an MoE block is router time,
  not experts time; the shared expert inside a Qwen2-MoE block is experts time either way.
- Backward time: every autograd node that an op inside a part's range created runs in backward as an
  `autograd::engine::evaluate_function: <Node>` event carrying the forward op's sequence number (and
  forward thread); that event's whole duration goes to the part. Nodes made outside any part
  (embeddings, norms, the LM head, the loss) and AccumulateGrad (no sequence number) go to "other".
- Optimizer time is the profiler's own `Optimizer.step#...` and `Optimizer.zero_grad#...` ranges.
- The window is the loop's throughput window: from the end of the first optimizer step (warm-up) to the
  end of the last; step_ms is its length over the optimizer steps in it, and other = step - the four
  parts (data, loss scaling, gradient clipping, metrics lines, the parts named above as "other").

Limits: the profiler slows every op, small ones most, so shares are more trustworthy than absolute ms;
ranges and nodes inside a backward node (the forward recomputation of gradient checkpointing) stay
with that backward node; with torch.compile the module hooks see compiled graphs, not modules.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

PARTS = ("attention", "experts", "router", "optimizer")
RANGE_PREFIX = "leantune::"
BACKWARD_PREFIX = "autograd::engine::evaluate_function: "
OPTIMIZER_PREFIXES = ("Optimizer.step#", "Optimizer.zero_grad#")


def module_part(module) -> str | None:
    """The part a module's forward belongs to, from its class name; None for the rest."""
    name = type(module).__name__
    if name.endswith("TopKRouter"):
        return "router"
    if name.endswith("Attention"):
        return "attention"
    if name.endswith(("MLP", "MoeBlock", "Experts")):
        return "experts"
    return None


@contextlib.contextmanager
def part_ranges():
    """While active, every attention / MLP-or-experts / router forward is a `leantune::<part>` profiler range."""
    import torch
    from torch.nn.modules import module as nn_module

    open_ranges: dict[int, list] = {}

    def enter(module, args):
        part = module_part(module)
        if part is not None:
            r = torch.profiler.record_function(RANGE_PREFIX + part)
            r.__enter__()
            open_ranges.setdefault(id(module), []).append(r)

    def leave(module, args, output):
        stack = open_ranges.get(id(module))
        if stack:
            stack.pop().__exit__(None, None, None)

    handles = [nn_module.register_module_forward_pre_hook(enter),
               nn_module.register_module_forward_hook(leave, always_call=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class Event:
    """What the breakdown needs of a profiler event (times in microseconds)."""
    name: str
    start: float
    end: float
    sequence_nr: int = -1
    thread: int = 0
    fwd_thread: int = 0


def events_of(prof) -> list[Event]:
    return [Event(e.name, e.time_range.start, e.time_range.end, e.sequence_nr, e.thread, e.fwd_thread)
            for e in prof.events()]


def _outermost(intervals: list[Event]) -> list[Event]:
    """The events not nested in another of the list."""
    out, end = [], float("-inf")
    for e in sorted(intervals, key=lambda e: (e.start, -e.end)):
        if e.start >= end:
            out.append(e)
            end = e.end
    return out


def _inside(e: Event, spans: list[Event]) -> bool:
    import bisect

    i = bisect.bisect_right([s.start for s in spans], e.start) - 1
    return i >= 0 and e.end <= spans[i].end


def breakdown(events: list[Event]) -> dict:
    """Milliseconds per optimizer step of each part and of the whole step (see the module docstring).

    Returns {"steps", "step_ms", "attention_ms", "experts_ms", "router_ms", "optimizer_ms", "other_ms"};
    the parts and other add up to step_ms.
    """
    opt_steps = sorted((e for e in events if e.name.startswith(OPTIMIZER_PREFIXES[0])), key=lambda e: e.end)
    if len(opt_steps) < 2:
        raise ValueError(f"the profile holds {len(opt_steps)} optimizer step(s); the breakdown needs 2 or more")
    lo, hi = opt_steps[0].end, opt_steps[-1].end
    window = [e for e in events if e.start >= lo and e.end <= hi]
    backward = _outermost([e for e in window if e.name.startswith(BACKWARD_PREFIX)])
    forward = [e for e in window if not e.name.startswith(BACKWARD_PREFIX) and not _inside(e, backward)]
    totals = dict.fromkeys(PARTS, 0.0)

    # Forward: self time of the part ranges; and which part each autograd-recording op ran in.
    ranges = [e for e in forward if e.name.startswith(RANGE_PREFIX)]
    ops = [e for e in forward if e.sequence_nr >= 0 and not e.name.startswith(RANGE_PREFIX)]
    node_part: dict[tuple[int, int], str] = {}
    stack: list[Event] = []
    for e in sorted(ranges + ops, key=lambda e: (e.start, -e.end, not e.name.startswith(RANGE_PREFIX))):
        while stack and stack[-1].end <= e.start:
            stack.pop()
        if e.name.startswith(RANGE_PREFIX):
            part = e.name[len(RANGE_PREFIX):]
            totals[part] += e.end - e.start
            if stack:
                totals[stack[-1].name[len(RANGE_PREFIX):]] -= e.end - e.start
            stack.append(e)
        elif stack:
            node_part[(e.thread, e.sequence_nr)] = stack[-1].name[len(RANGE_PREFIX):]

    # Backward: each node's evaluation goes to the part its forward op ran in.
    for e in backward:
        part = node_part.get((e.fwd_thread, e.sequence_nr)) if e.sequence_nr >= 0 else None
        if part is not None:
            totals[part] += e.end - e.start

    # Optimizer: the optimizer's own ranges (step and zero_grad), outermost only.
    for e in _outermost([e for e in forward if e.name.startswith(OPTIMIZER_PREFIXES)]):
        totals["optimizer"] += e.end - e.start

    steps = len(opt_steps) - 1
    step_us = (hi - lo) / steps
    out = {"steps": steps, "step_ms": round(step_us / 1000, 3)}
    for part in PARTS:
        out[f"{part}_ms"] = round(totals[part] / steps / 1000, 3)
    out["other_ms"] = round(out["step_ms"] - sum(out[f"{p}_ms"] for p in PARTS), 3)
    return out


@contextlib.contextmanager
def profiled_parts():
    """Profile the enclosed code with the part ranges on; yields a list that receives the events at exit."""
    import torch

    collected: list[Event] = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, part_ranges():
        yield collected
    collected.extend(events_of(prof))
