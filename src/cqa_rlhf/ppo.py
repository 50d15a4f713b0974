"""PPO for RLHF as a Lightning module: the clipped PPO update with a value function, on the
online-RL base (:mod:`cqa_rlhf.online`: iterations, rollouts, minibatch updates, the held-out
evaluation). The maths lives in :mod:`cqa_rlhf.ppo_math`.

One iteration: sample answers, score them, turn scores and the KL to the reference into
per-token rewards, estimate advantages, then ``ppo_epochs`` passes of minibatch updates.

Logged statistics keep TRL's names (``objective/kl``, ``policy/clipfrac_avg``, ...). In them
``val/`` means the *value function* (``val/clipfrac_avg``: share of clipped value updates;
``val/ratio``: the policy ratio, under TRL's name), not validation; the held-out evaluation
is logged as ``eval/*``.
"""

from __future__ import annotations

import torch
from torch import nn

from cqa_rlhf.config import PPOConfig
from cqa_rlhf.models import eval_mode
from cqa_rlhf.online import OnlineRLModule, shape_scores
from cqa_rlhf.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae,
    kl_per_token,
    masked_mean,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)
from cqa_rlhf.rollout import Rollout, RolloutEngine, policy_outputs


class PPOModule(OnlineRLModule):
    """The trained ``model`` is the policy with its value head or critic."""

    name = "ppo"
    progress_keys = ("objective/scores", "objective/kl")

    def __init__(self, policy: nn.Module, engine: RolloutEngine, cfg: PPOConfig, fingerprint: str,
                 reward_norm: tuple[float, float], samples_dir=None) -> None:
        super().__init__(policy, engine, cfg, fingerprint, reward_norm, samples_dir)
        self.kl_ctl = (AdaptiveKLController(cfg.kl.beta, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive
                       else FixedKLController(cfg.kl.beta))

    @property
    def policy_lm(self) -> nn.Module:
        return self.model.lm

    def extra_state(self) -> dict:
        return {"kl_ctl": self.kl_ctl.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])

    # ---- rollouts --------------------------------------------------------------------------
    def rollout(self, questions: list[str], seed: int, with_values: bool = True) -> Rollout:
        """Sampled answers with the policy's log-probs (and values, from the same forward) at
        sampling time, the reference's log-probs and the reward model's scores."""
        if not with_values:
            return super().rollout(questions, seed)
        t = self.cfg.sample.temperature
        with eval_mode(self.model):
            return self.engine.rollout(self.model.lm, questions, seed, lambda chunk: policy_outputs(self.model, chunk, t)[1:])

    # ---- one PPO iteration -----------------------------------------------------------------
    def training_step(self, batch: dict[str, list[str]], batch_idx: int) -> None:
        cfg, it = self.cfg, self.iteration + 1

        # 1. Rollout: sample answers, log-probs and values at sampling time, reference
        #    log-probs, reward-model scores (normalised, EOS penalty, clipping).
        rollout = self.rollout(batch["questions"], self.rollout_seed(it))
        mask = rollout.seq.mask  # [B, R]
        scores = shape_scores(rollout.raw_scores, rollout.ended, *self.norm, cfg)  # [B]
        self.finite(it, logprobs=rollout.logprobs, ref_logprobs=rollout.ref_logprobs, values=rollout.values,
                     scores=rollout.raw_scores)

        # 2. Per-token reward: -beta * KL_t, plus the normalised score at the last response token.
        beta = self.kl_ctl.beta
        kl = kl_per_token(rollout.logprobs, rollout.ref_logprobs, cfg.kl.estimator) * mask  # [B, R]
        rewards = token_rewards(scores, kl, mask, beta)

        # 3. GAE, then advantages whitened once over the whole rollout batch (every process's).
        advantages, returns = gae(rewards, rollout.values, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask, all_sum=self.all_sum if self.trainer.world_size > 1 else None)
        self.finite(it, rewards=rewards, advantages=advantages, returns=returns)

        # 4. ppo_epochs passes of clipped policy and value updates.
        stats = self.minibatch_updates(len(rollout.gens), mask,
                                       lambda idx, weight: self._backward(rollout, advantages, returns, idx, weight, it), it)

        # 5. KL controller, on the KL averaged over every process's rollouts.
        seq_kl = kl.sum(1)  # [B] nats per sequence
        mean_kl = self.trainer.strategy.reduce(seq_kl.mean().detach(), reduce_op="mean")  # equal shares
        self.kl_ctl.update(float(mean_kl), len(rollout.gens) * self.trainer.world_size)
        self.iteration = it

        # 6. Statistics, with TRL's names.
        self._log_iteration(rollout, scores, seq_kl, -beta * kl.sum(1), beta, stats)

    def _log_iteration(self, rollout: Rollout, scores: torch.Tensor, seq_kl: torch.Tensor,
                       non_score: torch.Tensor, beta: float, stats: dict[str, torch.Tensor]) -> None:
        """One row per iteration under TRL's names, and the EOS count summed over processes."""
        n, world = len(rollout.gens), self.trainer.world_size
        self.log_iteration({
            "objective/kl": seq_kl.mean(), "objective/entropy": (-rollout.logprobs).sum(1).mean(),
            "objective/non_score_reward": non_score.mean(), "objective/rlhf_reward": (scores + non_score).mean(),
            "objective/scores": scores.mean(), "objective/raw_scores": rollout.raw_scores.mean(),
            "objective/beta": torch.tensor(beta), "rollout/response_length": rollout.seq.mask.sum(1).mean(),
            "rollout/eos_rate": rollout.ended.float().mean(), **stats}, n)
        self.log("val/num_eos_tokens", rollout.ended.float().sum(), on_step=True, on_epoch=False,
                 sync_dist=world > 1, reduce_fx="sum", batch_size=n)  # a count: summed over processes

    def _backward(self, rollout: Rollout, advantages: torch.Tensor, returns: torch.Tensor, idx: torch.Tensor,
                  weight: torch.Tensor, it: int) -> dict[str, torch.Tensor]:
        """The clipped policy and value losses of one micro-batch ``idx``, back-propagated with
        its share of the minibatch's token mean; returns its statistics."""
        cfg = self.cfg
        seq = rollout.seq.select(idx)
        logits, logprobs, values = policy_outputs(self.model, seq, cfg.sample.temperature)
        p_loss, p_stats = policy_loss(logprobs, rollout.logprobs[idx], advantages[idx], seq.mask, cfg.cliprange)
        v_loss, v_stats = value_loss(values, rollout.values[idx], returns[idx], seq.mask, cfg.cliprange_value)
        self.finite(it, **{"loss/policy": p_loss, "loss/value": v_loss})
        self.manual_backward((p_loss + cfg.vf_coef * v_loss) * (seq.mask.sum() * weight).float())
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(logits, cfg.sample.temperature), seq.mask)
        return {"policy/approxkl_avg": p_stats["approxkl"], "policy/clipfrac_avg": p_stats["clipfrac"],
                "policy/entropy_avg": entropy, "loss/policy_avg": p_loss.detach(), "loss/value_avg": v_loss.detach(),
                "val/clipfrac_avg": v_stats["clipfrac"], "val/ratio": p_stats["ratio"]}
