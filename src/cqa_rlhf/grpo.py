"""GRPO (and Dr. GRPO, RLOO) as a Lightning module on the online-RL base (:mod:`cqa_rlhf.online`):
no critic; each prompt's ``num_generations`` answers are judged against each other.

One iteration: sample G answers to each prompt (the rollout engine PPO uses: the same sampling,
log-probs and reward scores on the exact ids; each answer from its own seed, so the answers do not
depend on the number of processes), shape the scores as PPO does, turn each group's
scores into advantages (:mod:`cqa_rlhf.group_math`), broadcast to the answer's tokens, then
``grpo_epochs`` passes of minibatch updates of the clipped ratio objective plus ``beta`` x k3 KL
to the reference. Aggregation is token-level: every answer token in a minibatch (over all
processes) weighs the same, so long answers are not down-weighted per token as in the original
per-answer mean (shared/docs/dpo-grpo-details.md, GRPO #4). Logged under TRL's GRPO names.
"""

from __future__ import annotations

import torch
from torch import nn

from cqa_rlhf.config import GRPOConfig
from cqa_rlhf.exact_math import std
from cqa_rlhf.group_math import group_advantages, zero_std_share
from cqa_rlhf.online import OnlineRLModule, shape_scores
from cqa_rlhf.ppo_math import entropy_from_logits, kl_per_token, masked_mean, policy_loss
from cqa_rlhf.rollout import Rollout, lm_outputs


class GRPOModule(OnlineRLModule):
    """The trained ``model`` is the policy itself (a causal LM, LoRA-wrapped or not)."""

    name = "grpo"
    progress_keys = ("reward", "kl")
    cfg: GRPOConfig

    @property
    def policy_lm(self) -> nn.Module:
        return self.model

    def training_step(self, batch: dict[str, list[str]], batch_idx: int) -> None:
        cfg, it, g = self.cfg, self.iteration + 1, self.cfg.num_generations

        # 1. Rollout: G answers to each prompt (each its own draw), the policy's log-probs at
        #    sampling time, the reference's, reward-model scores shaped as for PPO.
        rollout = self.group_rollout(batch["questions"], it, g)  # [N * G], groups contiguous
        scores = shape_scores(rollout.raw_scores, rollout.ended, *self.norm, cfg)  # [N * G]
        self.finite(it, logprobs=rollout.logprobs, ref_logprobs=rollout.ref_logprobs, scores=rollout.raw_scores)

        # 2. Group-relative advantages [N * G], one per answer; answers without EOS may carry no loss.
        all_sum = self.all_sum if self.trainer.world_size > 1 else None
        advantages = group_advantages(scores.view(-1, g), cfg.advantage, cfg.scale_rewards, all_sum=all_sum).flatten()
        loss_mask = rollout.seq.mask  # [N * G, R]
        if cfg.mask_truncated_completions:
            loss_mask = loss_mask * rollout.ended.float()[:, None]
        self.finite(it, advantages=advantages)

        # 3. grpo_epochs passes of clipped-ratio + KL updates, token-level over each global minibatch.
        stats = self.minibatch_updates(len(rollout.gens), loss_mask,
                                       lambda idx, weight: self._backward(rollout, advantages, loss_mask, idx, weight, it), it)
        self.iteration = it

        # 4. Statistics, with TRL's names.
        self._log_iteration(rollout, scores.view(-1, g), stats)

    def _backward(self, rollout: Rollout, advantages: torch.Tensor, loss_mask: torch.Tensor, idx: torch.Tensor,
                  weight: torch.Tensor, it: int) -> dict[str, torch.Tensor]:
        """The loss of one micro-batch ``idx``: token mean of the clipped objective plus beta x k3,
        back-propagated with its share of the minibatch's token mean; returns its statistics."""
        cfg = self.cfg
        seq, mask = rollout.seq.select(idx), loss_mask[idx]  # [b, R]
        logits, logprobs = lm_outputs(self.model, seq, cfg.sample.temperature)
        adv = advantages[idx, None].expand_as(logprobs)  # [b, R]: the answer's advantage on each token
        p_loss, p_stats = policy_loss(logprobs, rollout.logprobs[idx], adv, mask, cfg.epsilon, cfg.epsilon_high)
        kl = masked_mean(kl_per_token(logprobs, rollout.ref_logprobs[idx], "k3"), mask)
        loss = p_loss + cfg.beta * kl
        self.finite(it, loss=loss)
        self.manual_backward(loss * (mask.sum() * weight).float())
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(logits, cfg.sample.temperature), mask)
        return {"loss": loss.detach(), "kl": kl.detach(), "entropy": entropy,
                "clip_ratio/low_mean": p_stats["clip_low"], "clip_ratio/high_mean": p_stats["clip_high"],
                "clip_ratio/region_mean": p_stats["clip_region"]}

    def _log_iteration(self, rollout: Rollout, groups: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        """One row per iteration; ``groups`` [N, G] the shaped scores."""
        self.log_iteration({
            "reward": groups.mean(), "reward_std": std(groups, 1).mean(), "frac_reward_zero_std": zero_std_share(groups),
            "raw_reward": rollout.raw_scores.mean(), "completions/mean_length": rollout.seq.mask.sum(1).mean(),
            "completions/clipped_ratio": (~rollout.ended).float().mean(), **stats}, len(rollout.gens))
