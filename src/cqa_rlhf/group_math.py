"""The maths of critic-free online RL (GRPO, Dr. GRPO, RLOO) as small pure functions, each
unit-tested on hand-computed numbers. References in brackets are to
``shared/docs/dpo-grpo-details.md``: [GRPO] Shao et al. 2024; [DrGRPO] Liu et al. 2025;
[RLOO] Ahmadian et al. 2024; [DAPO] Yu et al. 2025; [TRL] TRL's ``GRPOTrainer``.

Shapes: ``N`` prompts, ``G`` answers to each (a *group*); rewards [N, G].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from cqa_rlhf.exact_math import sqrt, std

Estimator = Literal["grpo", "rloo"]
Scale = Literal["group", "batch", "none"]


def group_baseline(rewards: torch.Tensor, estimator: Estimator) -> torch.Tensor:
    """The baseline [N, G] each reward is compared with: its group's mean [GRPO], or the mean of
    the *other* G - 1 rewards of its group (leave-one-out) [RLOO]."""
    g = rewards.shape[1]
    total = rewards.sum(1, keepdim=True)
    if estimator == "grpo":
        return (total / g).expand_as(rewards)
    if estimator == "rloo":
        if g < 2:
            raise ValueError("rloo needs at least 2 answers per prompt")
        return (total - rewards) / (g - 1)
    raise ValueError(f"unknown estimator {estimator!r}")


def group_advantages(rewards: torch.Tensor, estimator: Estimator = "grpo", scale: Scale = "group",
                     eps: float = 1e-4, all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Advantage [N, G] of each answer: reward minus its baseline (:func:`group_baseline`),
    divided by the group's std (``group``, GRPO), the whole batch's std (``batch``) or nothing
    (``none``, Dr. GRPO: std scaling favours prompts whose answers all score alike [DrGRPO]).
    Stds are unbiased (n - 1), as ``torch.std`` and TRL; ``eps`` as TRL. ``all_sum`` sums over
    data-parallel processes, so ``batch`` uses every process's rewards."""
    adv = rewards - group_baseline(rewards, estimator)
    if scale == "none":
        return adv
    if scale == "group":
        return adv / (std(rewards, 1, keepdim=True) + eps)
    if scale == "batch":
        return adv / (batch_std(rewards, all_sum) + eps)
    raise ValueError(f"unknown scale_rewards {scale!r}")


def batch_std(x: torch.Tensor, all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Unbiased std of every element of ``x`` (over all processes with ``all_sum``)."""
    x = x.double()
    sums = torch.stack([x.sum(), (x * x).sum(), torch.tensor(float(x.numel()), dtype=x.dtype, device=x.device)])
    s, sq, n = all_sum(sums) if all_sum is not None else sums
    var = (sq - s * s / n) / (n - 1).clamp(min=1)
    return sqrt(var.clamp(min=0))


def zero_std_share(rewards: torch.Tensor) -> torch.Tensor:
    """Share of groups whose rewards are all equal [N, G] -> []: their advantages are 0, they
    teach nothing (TRL's ``frac_reward_zero_std``)."""
    return (rewards.max(1).values == rewards.min(1).values).float().mean()
