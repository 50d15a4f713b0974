"""The losses and statistics of the pipeline as small pure functions (unit-tested on hand-computed
numbers). Shapes: ``[B]`` for per-sequence quantities."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry: mean of -log sigmoid(r_c - r_r - margin); ``margin`` [B] or None."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def center_penalty(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """mean((r_c + r_r)^2): pulls the pair's mean reward to 0 (TRL's center_rewards_coefficient)."""
    return ((r_chosen + r_rejected) ** 2).mean()


def regression_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "mae":
        return F.l1_loss(pred, target)
    raise ValueError(f"unknown regression loss {kind!r}")
