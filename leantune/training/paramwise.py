"""One optimizer per trained weight: bf16 weights stepped in fp32 and rounded without losing small
updates, and the step fused into backward.

Full fine-tuning (model.method=full) uses it when train.full_precision is a bf16 one or
train.optimizer_in_backward is on (training/optim.py builds it); otherwise a run has one optimizer
over all its weights.

**bf16 weights** (train.full_precision). Rounding w + update to the nearest bf16 (8 bits of
mantissa) drops every update under half a unit in the weight's last place: at lr 1e-5 most of
AdamW's updates (about lr each) to weights of 0.01 to 0.1, so training stalls. Here a step hands the
weight's optimizer (its state as train.optimizer keeps it: fp32 for adamw) the weight and its
gradient in fp32, and rounds the new weight to bf16 in one of two ways:
  kahan       each weight has a bf16 compensation buffer c: the step starts from w + c and stores
              in c what rounding the result lost (Kahan summation; Zamirai et al. 2020, "Revisiting
              BFloat16 Training"): close to the fp32 run, 2 bytes more per weight.
  stochastic  rounds up or down at random, with the probabilities that make the expected bf16
              weight the fp32 one: no extra memory. The random bits come from a generator seeded
              by train.seed, the weight's index and its step count, so they do not depend on the
              order weights step in (backward's order with the step in backward) and a resume
              draws the same ones.
The fp32 copies exist for one weight at a time.

**Optimizer in backward** (train.optimizer_in_backward). A post-accumulate-grad hook on each weight
steps it as soon as backward has accumulated its gradient, and frees that gradient (torchtune's
optimizer-in-backward), so the gradients of the whole model never exist at once. What the hooks do
is set by `arm`: 'step'; 'keep' the gradient, for the micro-batches of a step before its last, which
accumulate as usual; or 'drop' it, for the loop's start-up probe, whose gradients are discarded
(so that it needs the memory of a step, not of every gradient). Clipping cannot work (config.py refuses
train.max_grad_norm with it); the gradient norm is summed as the weights step (`take_grad_norm`).

The optimizer is a torch Optimizer whose param_groups are the per-weight optimizers' own group
dicts, so the lr schedule and checkpoint.py's lr rescale reach every one; its state_dict holds every
per-weight optimizer's state, every compensation buffer and step count, so a resume continues exactly.
"""

from __future__ import annotations

import functools

STEP_CHUNK = 1 << 24  # elements of a bf16 weight stepped in fp32 at a time (Llama-8B's embedding has 525 M)


def paramwise_optimizer(weights: list[tuple[object, float]], make, *, rounding: str, seed: int, in_backward: bool):
    """The optimizer over `weights` ((parameter, weight decay) pairs): `make(param_groups)` builds each weight's
    own optimizer; `rounding` of bf16 weights: 'kahan', 'stochastic' (from `seed`), or 'fp32' (weights in fp32:
    nothing to round); `in_backward`: step in backward."""
    return _optimizer_class()(weights, make, rounding=rounding, seed=seed, in_backward=in_backward)


def stochastic_round(exact, seed: int):
    """`exact` (fp32) rounded to bf16 up or down at random, P(up) = the distance to the lower neighbour over the
    gap: 16 random bits added to the low half of its bit pattern, then cut off (for a negative number the bits
    are its magnitude's, so it rounds symmetrically). `exact` is overwritten."""
    import torch

    generator = torch.Generator(device=exact.device).manual_seed(seed)
    bits = exact.view(torch.int32)
    noise = torch.randint(0, 1 << 16, exact.shape, dtype=torch.int32, device=exact.device, generator=generator)
    return bits.add_(noise).bitwise_and_(-(1 << 16)).view(torch.float32).to(torch.bfloat16)


def _seed(*numbers: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence(list(numbers)).generate_state(1, np.uint64)[0] >> 1)


@functools.cache
def _optimizer_class():
    """The class, defined on first use (torch is imported inside functions only)."""
    import torch

    class ParamwiseOptimizer(torch.optim.Optimizer):
        def __init__(self, weights, make, *, rounding: str, seed: int, in_backward: bool):
            params = [p for p, _ in weights]
            super().__init__(params, {})
            self.weights, self.seed = params, seed
            # Per weight, [(start, end, stand-in, optimizer)]: a bf16 weight is stepped STEP_CHUNK elements at a
            # time through a stand-in tensor that holds the chunk in fp32 during its step; an fp32 weight is
            # stepped whole by its own optimizer (start None).
            self.chunks = []
            for p, decay in weights:
                if p.dtype != torch.bfloat16:
                    self.chunks.append([(None, None, p, make([{"params": [p], "weight_decay": decay}]))])
                    continue
                spans = [(start, min(start + STEP_CHUNK, p.numel())) for start in range(0, p.numel(), STEP_CHUNK)]
                stand_ins = [torch.empty(0, device=p.device) for _ in spans]
                self.chunks.append([(start, end, t, make([{"params": [t], "weight_decay": decay}]))
                                    for (start, end), t in zip(spans, stand_ins, strict=True)])
            self.param_groups = [g for chunks in self.chunks for *_, opt in chunks for g in opt.param_groups]
            bf16 = [i for i, p in enumerate(params) if p.dtype == torch.bfloat16]
            # By index of the weight, bf16 weights only: what rounding lost (kahan); steps taken (stochastic).
            self.compensation = {i: torch.zeros_like(params[i]) for i in bf16} if rounding == "kahan" else {}
            self.steps = dict.fromkeys(bf16, 0) if rounding == "stochastic" else {}
            self.mode = "step"
            self.stepped = 0  # weights whose step began in backward since `arm`
            self._grad_sq = None
            for i, p in enumerate(params if in_backward else []):
                p.register_post_accumulate_grad_hook(functools.partial(self._hook, i))

        def arm(self, mode: str) -> None:
            """What the next backward does with each gradient (optimizer in backward): 'step', 'keep', 'drop'."""
            self.mode, self.stepped = mode, 0

        def _hook(self, index: int, param) -> None:
            if self.mode != "step":
                if self.mode == "drop":
                    param.grad = None
                return
            norm_sq = torch.linalg.vector_norm(param.grad, dtype=torch.float32).square()
            self._grad_sq = norm_sq if self._grad_sq is None else self._grad_sq + norm_sq
            self.stepped += 1  # before the step: one that fails halfway has changed the weight too
            self._step_weight(index)

        def take_grad_norm(self) -> float:
            """The norm of the gradients stepped in backward since the last call, which ends the step."""
            norm = 0.0 if self._grad_sq is None else float(self._grad_sq) ** 0.5
            self._grad_sq, self.stepped = None, 0
            return norm

        def _step_weight(self, index: int) -> None:
            """Step one weight with its gradient, which is freed."""
            p, chunks = self.weights[index], self.chunks[index]
            if chunks[0][0] is None:  # an fp32 weight: stepped as it is
                chunks[0][3].step()
                p.grad = None
                return
            comp, weight, grad = self.compensation.get(index), p.detach().view(-1), p.grad.view(-1)
            if comp is None:
                self.steps[index] += 1
            for k, (start, end, stand_in, opt) in enumerate(chunks):
                # The chunk in fp32 (Kahan: bf16 w plus what rounding lost), stepped with its gradient in fp32.
                stand_in.data = weight[start:end].float()
                if comp is not None:
                    stand_in.data.add_(comp.view(-1)[start:end])
                stand_in.grad = grad[start:end].float()
                opt.step()
                exact = stand_in.data
                stand_in.grad, stand_in.data = None, stand_in.data.new_empty(0)
                if comp is None:
                    weight[start:end] = stochastic_round(exact, _seed(self.seed, index, k, self.steps[index]))
                else:
                    weight[start:end] = exact  # rounded to the nearest bf16
                    comp.view(-1)[start:end] = exact.sub_(weight[start:end])  # what the rounding lost
            p.grad = None

        @torch.no_grad()
        def step(self, closure=None):
            """Step every weight that has a gradient (none after an armed backward: those stepped in it)."""
            for i, p in enumerate(self.weights):
                if p.grad is not None:
                    self._step_weight(i)

        def zero_grad(self, set_to_none: bool = True) -> None:
            for p in self.weights:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

        def _optimizers(self) -> list:
            return [opt for chunks in self.chunks for *_, opt in chunks]

        def state_dict(self) -> dict:
            return {"optimizers": [opt.state_dict() for opt in self._optimizers()],
                    "compensation": dict(self.compensation), "steps": dict(self.steps)}

        def load_state_dict(self, state_dict: dict) -> None:
            saved, compensation, steps = state_dict["optimizers"], state_dict["compensation"], state_dict["steps"]
            optimizers = self._optimizers()
            if (len(saved), set(compensation), set(steps)) != (len(optimizers), set(self.compensation),
                                                                set(self.steps)):
                raise ValueError(f"optimizer state for {len(saved)} weights or chunks, {len(compensation)} "
                                 f"compensated and {len(steps)} stochastically rounded; this optimizer has "
                                 f"{len(optimizers)}, {len(self.compensation)} and {len(self.steps)}")
            for opt, state in zip(optimizers, saved, strict=True):
                # An optimizer casts a loaded state to its weight's dtype: a stand-in's is fp32, so the state stays.
                opt.load_state_dict(state)
            for i, c in compensation.items():
                self.compensation[i].copy_(c)
            self.steps.update(steps)
            # Loading gives each optimizer new group dicts.
            self.param_groups = [g for opt in optimizers for g in opt.param_groups]

    return ParamwiseOptimizer
