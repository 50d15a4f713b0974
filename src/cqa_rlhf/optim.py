"""AdamW, owned: torch's update rule and operation order with a correctly rounded square root.

``torch.optim.AdamW`` divides by ``exp_avg_sq.sqrt()``, and CPU ``torch.sqrt`` is not correctly
rounded: which floats come out one ulp off follows the CPU's vector extensions, so the first
optimizer step already parts an Intel Xeon from an AMD EPYC (bench/RESULTS.md, "Exact on every
x86 CPU"). torch's optimizer cannot be told to round otherwise, so the project owns the update,
as it owns its losses. State (``step``, ``exp_avg``, ``exp_avg_sq``) and param-group keys are
torch's, so schedulers, Lightning checkpoints and ``state_dict`` work unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from cqa_rlhf.exact_math import sqrt


def adamw_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 step: int, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """One AdamW step in place (Loshchilov & Hutter 2019), ``step`` counted from 1.

    1. decoupled weight decay: ``param *= 1 - lr * weight_decay``;
    2. moments: ``m = lerp(m, g, 1 - beta1)``, ``v = beta2 * v + (1 - beta2) * g * g``;
    3. ``param -= lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)``.
    The order of operations is torch's single-tensor AdamW; the square roots are correctly
    rounded (:func:`cqa_rlhf.exact_math.sqrt`, and ``math.sqrt`` for the bias correction)."""
    beta1, beta2 = betas
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    denom = (sqrt(exp_avg_sq) / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


class AdamW(torch.optim.Optimizer):
    """``torch.optim.AdamW``'s interface and state, updating with :func:`adamw_update`."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW settings: lr {lr}, betas {betas}, eps {eps}, weight_decay {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # torch's layout: a float32 step counter, moments like the parameter
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                adamw_update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], int(state["step"].item()),
                             group["lr"], group["betas"], group["eps"], group["weight_decay"])
        return loss
