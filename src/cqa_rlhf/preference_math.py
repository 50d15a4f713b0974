"""The maths of offline preference optimisation (DPO and its variants) as small pure functions,
each unit-tested on hand-computed numbers. References in brackets are to
``shared/docs/dpo-grpo-details.md``: [DPO] Rafailov et al. 2023; [IPO] Azar et al. 2023;
[cDPO] Mitchell 2023; [TRL] TRL's ``DPOTrainer``.

Shapes: ``B`` pairs; a pair's *log-prob* is the sum of its answer tokens' log-probs (prompt and
padding masked, as in SFT), or their mean for IPO [IPO, TRL].
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from cqa_rlhf.prompts import IGNORE_INDEX

LossType = Literal["sigmoid", "ipo"]


def answer_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs [B] of the labelled (answer) tokens and their count [B]. ``logits``
    [B, T, V] predict the next token; ``labels`` [B, T] hold IGNORE_INDEX on prompt and padding."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]  # [B, T-1, V] predicts [B, T-1]
    mask = labels != IGNORE_INDEX
    tokens = labels.masked_fill(~mask, 0)
    logp = F.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [B, T-1]
    return (logp * mask).sum(-1), mask.sum(-1)


def preference_logits(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                      ref_rejected: torch.Tensor) -> torch.Tensor:
    """h [B] = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)) [DPO]."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def dpo_loss(h: torch.Tensor, beta: float, loss_type: LossType = "sigmoid",
             label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair loss [B] from ``h`` (:func:`preference_logits`).

    sigmoid: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h); eps = 0 is DPO [DPO],
    eps > 0 conservative DPO, for preferences flipped with probability eps [cDPO].
    ipo: (h - 1 / (2 beta))^2, with h built from *mean* token log-probs [IPO, TRL]."""
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss {loss_type!r}")


def implicit_rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """beta * (log pi(y) - log ref(y)) [B]: DPO's implicit reward of an answer [DPO, TRL]."""
    return beta * (policy_logps - ref_logps)


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, loss_type: LossType = "sigmoid") -> torch.Tensor:
    """An answer's log-prob [B] from its tokens' log-probs [B, R] under ``mask`` [B, R]: the sum,
    or the mean for IPO [IPO, TRL]."""
    total = (token_logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if loss_type == "ipo" else total


def best_worst_pairs(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Online DPO's pairs from ``scores`` [N, K] (K answers to each of N prompts, rows contiguous
    in a flat [N * K] batch): (chosen [N], rejected [N]) flat indices of each group's best and
    worst answer (the first of equal scores), and ``valid`` [N], False where all K scores tie
    (no preference: the pair carries no loss) [Guo et al. 2024; Xiong et al. 2024]."""
    n, k = scores.shape
    offset = torch.arange(n, device=scores.device) * k
    best = torch.argmax(scores, dim=1)   # the first maximum
    worst = torch.argmin(scores, dim=1)  # the first minimum
    valid = scores.max(dim=1).values > scores.min(dim=1).values
    return offset + best, offset + worst, valid
