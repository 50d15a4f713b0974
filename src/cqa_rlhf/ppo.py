"""PPO for RLHF as a Lightning module: rollouts, scoring, and the clipped PPO update.

One training batch is one PPO *iteration* (a batch of prompts): sample answers, score them,
turn scores and the KL to the reference into per-token rewards, estimate advantages, then
``ppo_epochs`` passes of minibatch updates (manual optimisation). Validation is the held-out
evaluation: answers to fixed prompts with fixed seeds, so iterations are compared on the same
questions and noise. The rollout (sampling, log-probs, reward scores on the exact sampled ids)
is the shared engine of :mod:`cqa_rlhf.rollout`; the maths lives in :mod:`cqa_rlhf.ppo_math`.

Logged statistics keep TRL's names (``objective/kl``, ``policy/clipfrac_avg``, ...). In them
``val/`` means the *value function* (``val/clipfrac_avg``: share of clipped value updates;
``val/ratio``: the policy ratio, under TRL's name), not validation; the held-out evaluation
is logged as ``eval/*``.

Every random draw is seeded from ``(seed, iteration)``, so a run resumed from a checkpoint draws
exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from torch import nn

from cqa_rlhf.config import Loop, PPOConfig
from cqa_rlhf.errors import CqaError
from cqa_rlhf.io import atomic_path
from cqa_rlhf.models import eval_mode
from cqa_rlhf.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    check_finite,
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
from cqa_rlhf.training import HarnessModule


class DivergedError(CqaError):
    """A non-finite loss, reward or log-prob: the run stops with one line naming the iteration
    and the quantity, and the last good checkpoint stays in place."""


def shape_scores(raw: torch.Tensor, ended: torch.Tensor, mean: float, std: float, cfg: PPOConfig) -> torch.Tensor:
    """Raw reward-model scores [B] -> (s - mean) / std with the mean/std stored in the reward
    model, minus ``missing_eos_penalty`` for responses that never emitted EOS, clipped to
    +-``score_clip``."""
    s = (raw - mean) / std
    if cfg.missing_eos_penalty is not None:
        s = s - cfg.missing_eos_penalty * (~ended).float()
    if cfg.score_clip is not None:
        s = s.clamp(-cfg.score_clip, cfg.score_clip)
    return s


STAT_NAMES = ("policy/approxkl_avg", "policy/clipfrac_avg", "policy/entropy_avg", "loss/policy_avg",
              "loss/value_avg", "val/clipfrac_avg", "val/ratio")
EVAL_SUMS = ("score", "score_normalized", "kl", "length", "eos", "n")


class PPOModule(HarnessModule):
    """The policy (with its value head or critic) is the trained ``model``; the reference and
    the reward model are frozen inside the rollout ``engine`` and kept out of the checkpoint
    (they are stage inputs). Its steps are optimizer steps; its curves and progress count
    iterations."""

    progress_keys = ("objective/scores", "objective/kl")

    def __init__(self, policy: nn.Module, engine: RolloutEngine, cfg: PPOConfig, fingerprint: str,
                 reward_norm: tuple[float, float], samples_dir: str | Path | None = None) -> None:
        super().__init__(policy, cfg.optim, fingerprint)
        self.automatic_optimization = False
        self.cfg, self.engine, self.norm = cfg, engine, reward_norm
        self.kl_ctl = (AdaptiveKLController(cfg.kl.beta, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive
                       else FixedKLController(cfg.kl.beta))
        self.iteration = 0  # completed PPO iterations
        self.samples_dir = Path(samples_dir) if samples_dir is not None else None
        self.eval_history: list[dict[str, float]] = []

    # ---- loop, devices and checkpoint state ---------------------------------------------------
    def loop(self) -> Loop:
        """``iterations`` x ``updates_per_iteration`` optimizer steps; a held-out evaluation (and
        checkpoint) every ``eval_every`` training batches, i.e. iterations. PPO clips its own
        gradients (Lightning does not under manual optimisation)."""
        cfg = self.cfg
        return Loop(max_steps=cfg.iterations * cfg.updates_per_iteration, max_epochs=-1,
                    val_check_interval=cfg.eval_every, monitor="eval/score", monitor_mode="max")

    @staticmethod
    def curve_step(checkpoint: dict) -> int:
        return int(checkpoint["cqa_ppo"]["iteration"])  # the curves' x axis counts iterations

    def progress(self) -> tuple[int, int]:
        return self.iteration, self.cfg.iterations

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.engine.to(self.device)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["cqa_ppo"] = {"iteration": self.iteration, "kl_ctl": self.kl_ctl.state_dict(),
                                 "eval_history": self.eval_history}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint["cqa_ppo"]
        self.iteration = int(state["iteration"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.eval_history = list(state["eval_history"])

    def iteration_seed(self, iteration: int) -> int:
        return self.cfg.seed * 1_000_003 + iteration

    # ---- rollouts --------------------------------------------------------------------------
    def rollout(self, questions: list[str], seed: int, with_values: bool = True) -> Rollout:
        """Sampled answers with the policy's log-probs (and values, from the same forward) at
        sampling time, the reference's log-probs and the reward model's scores."""
        if not with_values:
            return self.engine.rollout(self.model.lm, questions, seed)
        t = self.cfg.sample.temperature
        with eval_mode(self.model):
            return self.engine.rollout(self.model.lm, questions, seed, lambda chunk: policy_outputs(self.model, chunk, t)[1:])

    # ---- one PPO iteration -----------------------------------------------------------------
    def training_step(self, batch: dict[str, list[str]], batch_idx: int) -> None:
        cfg, it = self.cfg, self.iteration + 1
        # Every process draws its own answers (its share of the global batch of prompts).
        seed = self.iteration_seed(it) + 1_000_000_007 * self.global_rank

        # 1. Rollout: sample answers, log-probs and values at sampling time, reference
        #    log-probs, reward-model scores (normalised, EOS penalty, clipping).
        rollout = self.rollout(batch["questions"], seed)
        mask = rollout.seq.mask  # [B, R]
        scores = shape_scores(rollout.raw_scores, rollout.ended, *self.norm, cfg)  # [B]
        self._finite(it, logprobs=rollout.logprobs, ref_logprobs=rollout.ref_logprobs, values=rollout.values,
                     scores=rollout.raw_scores)

        # 2. Per-token reward: -beta * KL_t, plus the normalised score at the last response token.
        beta = self.kl_ctl.beta
        kl = kl_per_token(rollout.logprobs, rollout.ref_logprobs, cfg.kl.estimator) * mask  # [B, R]
        rewards = token_rewards(scores, kl, mask, beta)

        # 3. GAE, then advantages whitened once over the whole rollout batch (every process's).
        advantages, returns = gae(rewards, rollout.values, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask, all_sum=self.all_sum if self.trainer.world_size > 1 else None)
        self._finite(it, rewards=rewards, advantages=advantages, returns=returns)

        # 4. ppo_epochs passes of clipped policy and value updates.
        stats = self.learn(rollout, advantages, returns, it)

        # 5. KL controller, on the KL averaged over every process's rollouts.
        seq_kl = kl.sum(1)  # [B] nats per sequence
        mean_kl = self.trainer.strategy.reduce(seq_kl.mean().detach(), reduce_op="mean")  # equal shares
        self.kl_ctl.update(float(mean_kl), len(rollout.gens) * self.trainer.world_size)
        self.iteration = it

        # 6. Statistics, with TRL's names.
        self._log_iteration(rollout, scores, seq_kl, -beta * kl.sum(1), beta, stats)

    def _log_iteration(self, rollout: Rollout, scores: torch.Tensor, seq_kl: torch.Tensor,
                       non_score: torch.Tensor, beta: float, stats: dict[str, torch.Tensor]) -> None:
        """One row per iteration (x = the iteration), means over processes (equal shares)."""
        n, world = len(rollout.gens), self.trainer.world_size
        logged = {
            "objective/kl": seq_kl.mean(), "objective/entropy": (-rollout.logprobs).sum(1).mean(),
            "objective/non_score_reward": non_score.mean(), "objective/rlhf_reward": (scores + non_score).mean(),
            "objective/scores": scores.mean(), "objective/raw_scores": rollout.raw_scores.mean(),
            "objective/beta": torch.tensor(beta), "rollout/response_length": rollout.seq.mask.sum(1).mean(),
            "rollout/eos_rate": rollout.ended.float().mean(),
            "lr": torch.tensor(self.lr_schedulers().get_last_lr()[0]),
            "step": torch.tensor(float(self.iteration)),  # Lightning takes a logged `step` as the curves' x
            **stats,
        }
        self.log_dict({k: v.float() for k, v in logged.items()}, on_step=True, on_epoch=False,
                      sync_dist=world > 1, batch_size=n)
        self.log("val/num_eos_tokens", rollout.ended.float().sum(), on_step=True, on_epoch=False,
                 sync_dist=world > 1, reduce_fx="sum", batch_size=n)  # a count: summed over processes

    def learn(self, rollout: Rollout, advantages: torch.Tensor, returns: torch.Tensor, it: int) -> dict[str, torch.Tensor]:
        """``ppo_epochs`` passes over shuffled minibatches; each minibatch is one optimizer step,
        accumulated over micro-batches. The losses are token means over the minibatch -- over
        every process's share of it: a micro-batch's token-mean loss is weighted by its tokens
        times W / (the minibatch's tokens over all processes), so gradient accumulation and
        data parallelism change memory and speed, never the update. Returns the mean of each
        statistic."""
        cfg = self.cfg
        opt, sched = self.optimizers(), self.lr_schedulers()
        gen = torch.Generator().manual_seed(self.iteration_seed(it))
        stats: dict[str, list[torch.Tensor]] = {k: [] for k in STAT_NAMES}
        n = len(rollout.gens)
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(n, generator=gen).to(self.device)
            for start in range(0, n, cfg.mini_batch_size):
                minibatch = order[start: start + cfg.mini_batch_size]
                weight = self.global_weight(rollout.seq.mask[minibatch].sum())  # W / tokens of the global minibatch
                opt.zero_grad()
                for m0 in range(0, len(minibatch), cfg.micro_batch_size):
                    idx = minibatch[m0: m0 + cfg.micro_batch_size]
                    for k, v in self._backward(rollout, advantages, returns, idx, weight, it).items():
                        stats[k].append(v)
                if cfg.optim.gradient_clip_val > 0:
                    self.clip_gradients(opt, gradient_clip_val=cfg.optim.gradient_clip_val,
                                        gradient_clip_algorithm="norm")
                opt.step()
                sched.step()
        return {k: torch.stack(v).mean() for k, v in stats.items()}

    def _backward(self, rollout: Rollout, advantages: torch.Tensor, returns: torch.Tensor, idx: torch.Tensor,
                  weight: torch.Tensor, it: int) -> dict[str, torch.Tensor]:
        """The clipped policy and value losses of one micro-batch ``idx``, back-propagated with
        its share of the minibatch's token mean; returns its statistics."""
        cfg = self.cfg
        seq = rollout.seq.select(idx)
        logits, logprobs, values = policy_outputs(self.model, seq, cfg.sample.temperature)
        p_loss, p_stats = policy_loss(logprobs, rollout.logprobs[idx], advantages[idx], seq.mask, cfg.cliprange)
        v_loss, v_stats = value_loss(values, rollout.values[idx], returns[idx], seq.mask, cfg.cliprange_value)
        self._finite(it, **{"loss/policy": p_loss, "loss/value": v_loss})
        self.manual_backward((p_loss + cfg.vf_coef * v_loss) * (seq.mask.sum() * weight).float())
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(logits, cfg.sample.temperature), seq.mask)
        return {"policy/approxkl_avg": p_stats["approxkl"], "policy/clipfrac_avg": p_stats["clipfrac"],
                "policy/entropy_avg": entropy, "loss/policy_avg": p_loss.detach(), "loss/value_avg": v_loss.detach(),
                "val/clipfrac_avg": v_stats["clipfrac"], "val/ratio": p_stats["ratio"]}

    def _finite(self, iteration: int, **quantities: torch.Tensor) -> None:
        try:
            check_finite(iteration, **quantities)
        except FloatingPointError as exc:
            raise DivergedError(f"ppo: {exc}; the last good checkpoint is kept") from None

    # ---- held-out evaluation (Lightning's validation loop) --------------------------------
    def on_validation_epoch_start(self) -> None:
        self._eval = {k: torch.zeros((), dtype=torch.float64, device=self.device) for k in EVAL_SUMS}
        self._eval_rows: list[dict] = []

    def validation_step(self, batch: dict[str, list[str]], batch_idx: int) -> None:
        self._eval_rows.extend(self.evaluate_batch(batch["questions"], batch_idx, self._eval))

    def evaluate_batch(self, questions: list[str], batch_idx: int, sums: dict[str, torch.Tensor]) -> list[dict]:
        """Adds one batch of held-out answers to ``sums``: the raw and normalised score, the KL to
        the reference on the policy's own samples (k1, nats per answer), length and EOS. Seeds
        depend on the batch only, so every evaluation sees the same draws."""
        rollout = self.rollout(questions, self.cfg.seed * 7919 + batch_idx, with_values=False)
        kl = (rollout.logprobs - rollout.ref_logprobs).sum(1)
        shaped = (rollout.raw_scores - self.norm[0]) / self.norm[1]
        for k, v in (("score", rollout.raw_scores), ("score_normalized", shaped), ("kl", kl),
                     ("length", rollout.seq.mask.sum(1)), ("eos", rollout.ended.float())):
            sums[k] += v.double().sum()
        sums["n"] += len(questions)
        return [{"question": q, "answer": a, "score": round(float(s), 4), "ended": bool(e)} for q, a, s, e in
                zip(rollout.questions, rollout.answers, rollout.raw_scores.tolist(), rollout.ended.tolist())]

    def evaluate_prompts(self, questions: list[str]) -> dict[str, float]:
        """The held-out evaluation outside the fit loop (the SFT policy before training, the final
        policy after it): the same batches and seeds as the validation loop."""
        sums = {k: torch.zeros((), dtype=torch.float64) for k in EVAL_SUMS}
        size = self.cfg.sample.batch_size
        for i, start in enumerate(range(0, len(questions), size)):
            self.evaluate_batch(questions[start: start + size], i, sums)
        return eval_means(sums)

    def on_validation_epoch_end(self) -> None:
        # Every process evaluates every held-out prompt with the same weights and seeds, so the
        # sums are complete and equal on every process: nothing to reduce. (64 prompts every
        # eval_every iterations: cheap next to training, and no process is ever left without a
        # batch when the held-out set is one batch.)
        result = eval_means(self._eval)
        self._finite(self.iteration, **{f"eval/{k}": torch.tensor(v) for k, v in result.items()})
        self.log_dict({**{f"eval/{k}": torch.tensor(v, dtype=torch.float32) for k, v in result.items()},
                       "step": torch.tensor(float(self.iteration))}, sync_dist=False)
        self.eval_history.append({"iteration": self.iteration, **result})
        if (self.samples_dir is not None and self.trainer.is_global_zero
                and self.iteration % self.cfg.samples_every == 0):
            write_samples(self.samples_dir / f"iteration_{self.iteration:04d}.csv", self._eval_rows)


def eval_means(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    n = max(float(sums["n"]), 1.0)
    return {"score": round(float(sums["score"]) / n, 6), "score_normalized": round(float(sums["score_normalized"]) / n, 6),
            "kl": round(float(sums["kl"]) / n, 6), "response_length": round(float(sums["length"]) / n, 4),
            "eos_rate": round(float(sums["eos"]) / n, 6)}


def write_samples(path: Path, rows: list[dict]) -> None:
    """A table of sample generations (question, answer, score, ended) that pandas opens."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["question", "answer", "score", "ended"])
        w.writeheader()
        w.writerows(rows)
