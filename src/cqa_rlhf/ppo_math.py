"""The maths of PPO for RLHF as small pure functions (each unit-tested on hand-computed numbers).

Shapes: ``B`` rollouts, ``R`` response positions (right-padded); ``mask`` [B, R] is 1 on real
response tokens -- up to and including the first EOS -- and 0 after it, so nothing past EOS
enters a loss or a statistic (ppo-details #9). References in brackets are to
``shared/docs/ppo-details.md``: [NID] Huang et al., "The N Implementation Details of RLHF with
PPO"; [TRL] TRL's last PPO trainer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from cqa_rlhf.exact_math import sqrt

KLEstimator = Literal["k1", "k3"]


# --------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (all of them, or along ``dim``)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over masked positions; unbiased (n - 1) by default, as TRL."""
    mean = masked_mean(x, mask)
    n = mask.to(x.dtype).sum()
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        if n < 2:
            return torch.zeros((), dtype=x.dtype, device=x.device)
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(x - mean) / std over masked positions, 0 where ``mask`` is 0. With ``shift_mean`` False
    the mean is added back (TRL whitens rewards that way); advantages are shifted [TRL].

    ``all_sum`` sums a tensor over data-parallel processes: then mean and (unbiased) variance
    are those of every process's masked positions together, so W processes whiten exactly as one
    process holding all their rollouts would."""
    if all_sum is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        m = mask.to(x.dtype)
        sums = all_sum(torch.stack([(x * m).sum(), m.sum()]))  # [2]: sum of x, count
        n = sums[1].clamp(min=1)
        mean = sums[0] / n
        var = all_sum(((x - mean) ** 2 * m).sum()) / n
        var = var * n / (n - 1) if sums[1] >= 2 else torch.zeros_like(var)
    white = (x - mean) / sqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return white * mask.to(x.dtype)


# --------------------------------------------------------------------------------------------
# Log-probabilities, entropy, KL
# --------------------------------------------------------------------------------------------
def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) [B, R] under ``softmax(logits / temperature)``; ``logits`` [B, R, V]. The
    temperature is the one used for sampling, for policy and reference alike, or the KL is
    wrong [NID #12]."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy [B, R] of the sampling distribution ``softmax(logits / temperature)``."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) on tokens sampled from the policy.

    k1 = logp - ref_logp (unbiased, can be negative per token; TRL's and OpenRLHF's default);
    k3 = (r - 1) - log r with r = exp(ref_logp - logp) (unbiased, never negative)."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}")


# --------------------------------------------------------------------------------------------
# Rewards and advantages
# --------------------------------------------------------------------------------------------
def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index [B] of the last real response token (0 for an empty response)."""
    return (mask.long().sum(-1) - 1).clamp(min=0)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token reward [B, R]: -beta * KL_t on every response token, plus the sequence score
    [B] once, at the last response token [NID, ppo-details #1]; 0 after EOS."""
    rewards = -beta * kl * mask.to(kl.dtype)
    idx = last_token_index(mask)
    rewards[torch.arange(len(scores)), idx] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response positions.

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, with V and A
    taken as 0 past the last real token (the episode ends at EOS or at max_new_tokens).
    Returns (advantages, returns = advantages + values), both [B, R] and 0 where ``mask`` is 0.
    """
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    length = rewards.shape[-1]
    last = torch.zeros_like(rewards[:, 0])
    adv = torch.zeros_like(rewards)
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    return adv, (adv + values) * m


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------
def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float, cliprange_high: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, as a loss to minimise: mean over tokens of
    max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high)), eps_high = ``cliprange_high`` or eps
    (DAPO's clip-higher sets it above eps). Stats: clipfrac (share of tokens where the clipped
    branch is taken), approxkl = 0.5 * mean((logp - old_logp)^2) [TRL], ratio, and TRL's GRPO
    clip regions: clip_low (ratio < 1 - eps with A < 0), clip_high (ratio > 1 + eps_high with
    A > 0), clip_region (either)."""
    high = cliprange if cliprange_high is None else cliprange_high
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + high)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        low_region = (ratio < 1.0 - cliprange) & (advantages < 0)
        high_region = (ratio > 1.0 + high) & (advantages > 0)
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
                 "approxkl": 0.5 * masked_mean(log_ratio ** 2, mask),
                 "ratio": masked_mean(ratio, mask),
                 "clip_low": masked_mean(low_region.float(), mask),
                 "clip_high": masked_mean(high_region.float(), mask),
                 "clip_region": masked_mean((low_region | high_region).float(), mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 * mean max((v - R)^2, (clip(v, v_old +- eps) - R)^2) [TRL, ppo-details #7].
    Stats: clipfrac (share of tokens where the clipped error is the larger)."""
    clipped_v = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    err = (values - returns) ** 2
    err_clipped = (clipped_v - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((err_clipped > err).float(), mask)}
    return loss, stats


# --------------------------------------------------------------------------------------------
# KL coefficient
# --------------------------------------------------------------------------------------------
class FixedKLController:
    """A constant beta (TRL 1.x)."""

    def __init__(self, beta: float) -> None:
        self.beta = beta

    def update(self, current_kl: float, n_steps: int) -> None:
        return None

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.beta = float(state["beta"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019), as TRL 0.x: e = clip(KL / target - 1, -0.2, 0.2);
    beta <- beta * (1 + e * n_steps / horizon), with n_steps the rollouts of this iteration over
    all processes (the caller reduces KL and n_steps across processes first)."""

    def __init__(self, beta: float, target: float, horizon: int) -> None:
        super().__init__(beta)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon


def check_finite(iteration: int, **quantities: torch.Tensor | float) -> None:
    """Raise ``FloatingPointError`` naming the iteration and the first non-finite quantity."""
    for name, value in quantities.items():
        ok = bool(torch.isfinite(value).all()) if isinstance(value, torch.Tensor) else math.isfinite(value)
        if not ok:
            raise FloatingPointError(f"iteration {iteration}: {name} is not finite (NaN or inf)")
