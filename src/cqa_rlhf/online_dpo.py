"""Online DPO as a Lightning module on the online-RL base (:mod:`cqa_rlhf.online`): DPO's loss
on pairs the policy itself answered, labelled by the reward model (Guo et al. 2024, "Direct
Language Model Alignment from Online AI Feedback"; iterative DPO, Xiong et al. 2024; TRL's
``OnlineDPOTrainer``).

One iteration: sample K answers to each prompt with the rollout engine GRPO uses (each answer
from its own seed; the reference's log-probs and the reward model's scores on the exact ids),
shape the scores as PPO does (the missing-EOS penalty included), take each prompt's best and
worst answer as (chosen, rejected) (prompts whose K scores all tie carry no pair), then
``dpo_epochs`` passes of minibatch updates of the DPO loss (:mod:`cqa_rlhf.preference_math`)
against the frozen SFT reference. Chosen and rejected go through the policy in one forward.
Every valid pair of a global minibatch weighs the same. Logged under TRL's names.
"""

from __future__ import annotations

import torch
from torch import nn

from cqa_rlhf.config import OnlineDPOConfig
from cqa_rlhf.online import OnlineRLModule, shape_scores
from cqa_rlhf.preference_math import (best_worst_pairs, dpo_loss, implicit_rewards, preference_logits,
                                      sequence_logps)
from cqa_rlhf.rollout import Rollout, lm_outputs


class OnlineDPOModule(OnlineRLModule):
    """The trained ``model`` is the policy itself (a causal LM, LoRA-wrapped or not)."""

    name = "online_dpo"
    progress_keys = ("objective/scores", "objective/kl")
    cfg: OnlineDPOConfig

    @property
    def policy_lm(self) -> nn.Module:
        return self.model

    def training_step(self, batch: dict[str, list[str]], batch_idx: int) -> None:
        cfg, it, k = self.cfg, self.iteration + 1, self.cfg.num_generations

        # 1. Rollout: K answers to each prompt, the reference's log-probs, shaped reward scores.
        rollout = self.group_rollout(batch["questions"], it, k)  # [N * K], groups contiguous
        scores = shape_scores(rollout.raw_scores, rollout.ended, *self.norm, cfg)  # [N * K]
        self.finite(it, logprobs=rollout.logprobs, ref_logprobs=rollout.ref_logprobs, scores=rollout.raw_scores)

        # 2. Pairs: each prompt's best (chosen) and worst (rejected) answer; ties carry no loss.
        chosen, rejected, valid = best_worst_pairs(scores.view(-1, k))  # [N] each
        pairs = torch.stack([chosen, rejected], dim=1)  # [N, 2] flat rollout indices
        weights = valid.float()[:, None]  # [N, 1]: minibatch weights count valid pairs

        # 3. dpo_epochs passes of minibatch updates over the N pairs.
        stats = self.minibatch_updates(len(pairs), weights,
                                       lambda idx, weight: self._backward(rollout, pairs[idx], valid[idx], weight, it),
                                       it)
        self.iteration = it

        # 4. Statistics, with TRL's names.
        self._log_iteration(rollout, scores, pairs, valid, stats)

    def _backward(self, rollout: Rollout, pairs: torch.Tensor, valid: torch.Tensor, weight: torch.Tensor,
                  it: int) -> dict[str, torch.Tensor]:
        """The DPO loss of one micro-batch of b ``pairs`` [b, 2], back-propagated as its share of the
        global minibatch's mean over valid pairs; returns its statistics (means over valid pairs)."""
        cfg = self.cfg
        rows = torch.cat([pairs[:, 0], pairs[:, 1]])  # [2b]: chosen first, then rejected
        seq = rollout.seq.select(rows)
        _, token_logps = lm_outputs(self.model, seq, cfg.sample.temperature)  # [2b, R]
        policy = sequence_logps(token_logps, seq.mask, cfg.loss)  # [2b]
        ref = sequence_logps(rollout.ref_logprobs[rows], seq.mask, cfg.loss)
        (pc, pr), (rc, rr) = policy.chunk(2), ref.chunk(2)
        losses = dpo_loss(preference_logits(pc, pr, rc, rr), cfg.beta, cfg.loss, cfg.label_smoothing)  # [b]
        mask = valid.float()
        self.finite(it, loss=losses)
        self.manual_backward((losses * mask).sum() * weight.float())
        with torch.no_grad():
            n = mask.sum().clamp(min=1)
            chosen_r, rejected_r = implicit_rewards(pc, rc, cfg.beta), implicit_rewards(pr, rr, cfg.beta)
            return {"loss": (losses * mask).sum() / n, "rewards/chosen": (chosen_r * mask).sum() / n,
                    "rewards/rejected": (rejected_r * mask).sum() / n,
                    "rewards/accuracies": ((chosen_r > rejected_r).float() * mask).sum() / n,
                    "rewards/margins": ((chosen_r - rejected_r) * mask).sum() / n,
                    "logps/chosen": (pc.detach() * mask).sum() / n, "logps/rejected": (pr.detach() * mask).sum() / n}

    def _log_iteration(self, rollout: Rollout, scores: torch.Tensor, pairs: torch.Tensor, valid: torch.Tensor,
                       stats: dict[str, torch.Tensor]) -> None:
        """One row per iteration: ``scores`` [N * K] shaped, ``pairs`` [N, 2], ``valid`` [N]."""
        kl = (rollout.logprobs - rollout.ref_logprobs).sum(1)  # [N * K] k1 per answer
        margin = scores[pairs[:, 0]] - scores[pairs[:, 1]]  # [N]
        self.log_iteration({
            "objective/kl": kl.mean(), "objective/entropy": -rollout.logprobs.sum(1).mean(),
            "objective/non_score_reward": -self.cfg.beta * kl.mean(),
            "objective/rlhf_reward": (scores - self.cfg.beta * kl).mean(), "objective/scores": scores.mean(),
            "objective/scores_margin": (margin * valid).sum() / valid.sum().clamp(min=1),
            "raw_reward": rollout.raw_scores.mean(), "pairs/tied_share": (~valid).float().mean(),
            "val/contain_eos_token": rollout.ended.float().mean(),
            "completions/mean_length": rollout.seq.mask.sum(1).mean(), "beta": torch.tensor(self.cfg.beta), **stats},
            len(rollout.gens))
