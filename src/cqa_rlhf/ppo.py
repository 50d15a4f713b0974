"""PPO for RLHF as a Lightning module: rollouts, scoring, and the clipped PPO update.

One training batch is one PPO *iteration* (a batch of prompts): sample answers, score them,
turn scores and the KL to the reference into per-token rewards, estimate advantages, then
``ppo_epochs`` passes of minibatch updates (manual optimisation). Validation is the held-out
evaluation: answers to fixed prompts with fixed seeds, so iterations are compared on the same
questions and noise. The maths lives in :mod:`cqa_rlhf.ppo_math`.

Every random draw is seeded from ``(seed, iteration)``, so a run resumed from a checkpoint draws
exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from cqa_rlhf.batches import pad_rows
from cqa_rlhf.config import PPOConfig, TrainConfig
from cqa_rlhf.errors import CqaError
from cqa_rlhf.generation import Generation, generate
from cqa_rlhf.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    check_finite,
    entropy_from_logits,
    gae,
    kl_per_token,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)
from cqa_rlhf.prompts import PromptFormatter
from cqa_rlhf.reward import position_ids, score
from cqa_rlhf.training import HarnessModule


class DivergedError(CqaError):
    """A non-finite loss, reward or log-prob: the run stops with one line naming the iteration
    and the quantity, and the last good checkpoint stays in place."""


@dataclass
class Sequences:
    """Prompt + response tokens of B rollouts: ``input_ids``/``attention_mask``/``position_ids``
    [B, P + R] (prompts left-padded to P, responses right-padded to R), ``response`` [B, R] and
    ``mask`` [B, R], 1 on response tokens up to and including the first EOS."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response: torch.Tensor
    mask: torch.Tensor

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1] - self.response.shape[1]

    def select(self, idx: torch.Tensor) -> Sequences:
        return Sequences(*(t[idx] for t in (self.input_ids, self.attention_mask, self.position_ids,
                                            self.response, self.mask)))


def build_sequences(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> Sequences:
    """Left-padded prompts followed by right-padded responses; positions count real tokens only
    (ppo-details #11), so a row's log-probs do not depend on its padding."""
    q_ids, q_mask = pad_rows(prompts, pad_id, "left")
    r_ids, r_mask = pad_rows(responses, pad_id, "right")
    mask = torch.cat([q_mask, r_mask], dim=1)
    return Sequences(torch.cat([q_ids, r_ids], dim=1), mask, position_ids(mask), r_ids, r_mask.float())


def response_slice(x: torch.Tensor, seq: Sequences) -> torch.Tensor:
    """Positions P-1 .. P+R-2 of ``x`` [B, P+R, ...]: the states that predict response tokens 0..R-1."""
    p, r = seq.prompt_len, seq.response.shape[1]
    return x[:, p - 1: p - 1 + r]


def policy_outputs(model: nn.Module, seq: Sequences, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits over response positions [B, R, V], log-probs of the response [B, R], values [B, R])
    of a policy with a value head."""
    logits, values = model(seq.input_ids, seq.attention_mask, seq.position_ids)
    logits = response_slice(logits, seq)
    return logits, logprobs_from_logits(logits, seq.response, temperature), response_slice(values, seq).float()


@torch.no_grad()
def reference_logprobs(lm: PreTrainedModel, seq: Sequences, temperature: float) -> torch.Tensor:
    """Log-probs [B, R] of the response under a causal LM, at the sampling temperature."""
    logits = lm(input_ids=seq.input_ids, attention_mask=seq.attention_mask, position_ids=seq.position_ids).logits
    return logprobs_from_logits(response_slice(logits, seq), seq.response, temperature)


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


@dataclass
class Rollout:
    questions: list[str]
    answers: list[str]
    seq: Sequences
    ended: torch.Tensor  # [B] bool: emitted EOS
    raw_scores: torch.Tensor  # [B] the reward model's score
    scores: torch.Tensor  # [B] normalised (and penalised, clipped) score used as reward
    logprobs: torch.Tensor  # [B, R] policy at sampling time
    ref_logprobs: torch.Tensor  # [B, R]
    values: torch.Tensor  # [B, R]


class PPOModule(HarnessModule):
    """The policy (with its value head or critic) is the trained ``model``; the reference and
    the reward model are frozen and kept out of the checkpoint (they are stage inputs)."""

    def __init__(self, policy: nn.Module, ref: PreTrainedModel, reward_model: PreTrainedModel,
                 fmt: PromptFormatter, cfg: PPOConfig, harness_cfg: TrainConfig, fingerprint: str,
                 reward_norm: tuple[float, float], samples_dir: str | Path | None = None) -> None:
        super().__init__(policy, harness_cfg, fingerprint)
        self.automatic_optimization = False
        self.cfg, self.fmt = cfg, fmt
        self.frozen = {"ref": ref, "rm": reward_model}  # a dict: not registered as submodules
        self.norm = reward_norm
        self.kl_ctl = (AdaptiveKLController(cfg.kl.beta, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive
                       else FixedKLController(cfg.kl.beta))
        self.iteration = 0  # completed PPO iterations
        self.samples_dir = Path(samples_dir) if samples_dir is not None else None
        self.eval_history: list[dict[str, float]] = []

    # ---- devices and checkpoint state ------------------------------------------------------
    def on_fit_start(self) -> None:
        for m in self.frozen.values():
            m.to(self.device)

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

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the data-parallel processes (``x`` itself with one process)."""
        return self.trainer.strategy.reduce(x.clone(), reduce_op="sum") if self.trainer.world_size > 1 else x

    # ---- rollouts --------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, questions: list[str], seed: int) -> tuple[list[Generation], Sequences]:
        """Answers sampled from the policy (KV cache, left padding, stop at EOS), as sequences."""
        cfg, fmt = self.cfg, self.fmt
        gens = generate(self.model.lm, fmt, questions, cfg.sample, seed, cfg.max_prompt_length)
        prompts = [fmt.encode_prompt(q, cfg.max_prompt_length) for q in questions]
        seq = build_sequences(prompts, [g.response_ids for g in gens], fmt.tok.pad_token_id)
        return gens, Sequences(*(t.to(self.device) for t in (seq.input_ids, seq.attention_mask, seq.position_ids,
                                                             seq.response, seq.mask)))

    @torch.no_grad()
    def measure(self, questions: list[str], gens: list[Generation], seq: Sequences, with_values: bool = True) -> Rollout:
        """Log-probs (and values) of the policy at sampling time, the reference's log-probs (once
        per rollout), and the reward model's scores through the shared scoring API."""
        cfg, t = self.cfg, self.cfg.sample.temperature
        was_training = self.model.training
        self.model.eval()
        # In micro-batches: the logits of a whole rollout batch ([B, P+R, V] in float32) would
        # be the largest tensor of the run (4.9 GB for 64 x 384 tokens of GPT-Neo's vocabulary).
        if with_values:
            logprobs, values = (torch.cat(parts) for parts in zip(*(
                policy_outputs(self.model, chunk, t)[1:] for chunk in self._chunks(seq))))
        else:
            logprobs = torch.cat([reference_logprobs(self.model.lm, chunk, t) for chunk in self._chunks(seq)])
            values = torch.zeros_like(logprobs)
        self.model.train(was_training)
        ref_logprobs = torch.cat([reference_logprobs(self.frozen["ref"], chunk, t) for chunk in self._chunks(seq)])
        answers = [g.text for g in gens]
        raw = torch.tensor(score(self.frozen["rm"], self.fmt, list(zip(questions, answers)), cfg.max_length,
                                 cfg.sample.batch_size), device=self.device)
        ended = torch.tensor([g.ended for g in gens], device=self.device)
        return Rollout(questions, answers, seq, ended, raw, shape_scores(raw, ended, *self.norm, cfg),
                       logprobs * seq.mask, ref_logprobs * seq.mask, values * seq.mask)

    def _chunks(self, seq: Sequences) -> list[Sequences]:
        n, size = seq.input_ids.shape[0], self.cfg.micro_batch_size
        return [seq.select(torch.arange(i, min(i + size, n), device=seq.input_ids.device)) for i in range(0, n, size)]

    def rollout(self, questions: list[str], seed: int, with_values: bool = True) -> Rollout:
        gens, seq = self.sample(questions, seed)
        return self.measure(questions, gens, seq, with_values)

    # ---- one PPO iteration -----------------------------------------------------------------
    def training_step(self, batch: dict[str, list[str]], batch_idx: int) -> None:
        cfg = self.cfg
        it = self.iteration + 1
        world = self.trainer.world_size
        # Every process draws its own answers (its share of the global batch of prompts).
        seed = self.iteration_seed(it) + 1_000_000_007 * self.global_rank

        # 1. Rollout: sample answers, log-probs and values at sampling time, reference
        #    log-probs, reward-model scores (normalised, EOS penalty, clipping).
        ro = self.rollout(batch["questions"], seed)
        mask = ro.seq.mask  # [B, R]
        self._finite(it, logprobs=ro.logprobs, ref_logprobs=ro.ref_logprobs, values=ro.values,
                     scores=ro.raw_scores)

        # 2. Per-token reward: -beta * KL_t, plus the normalised score at the last response token.
        beta = self.kl_ctl.beta
        kl = kl_per_token(ro.logprobs, ro.ref_logprobs, cfg.kl.estimator) * mask  # [B, R]
        rewards = token_rewards(ro.scores, kl, mask, beta)

        # 3. GAE, then advantages whitened once over the whole rollout batch (every process's).
        advantages, returns = gae(rewards, ro.values, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask, all_sum=self.all_sum if world > 1 else None)
        self._finite(it, rewards=rewards, advantages=advantages, returns=returns)

        # 4. ppo_epochs passes of clipped policy and value updates.
        stats = self.learn(ro, advantages, returns, it)

        # 5. KL controller, on the KL averaged over every process's rollouts.
        n = len(ro.questions)
        seq_kl = kl.sum(1)  # [B] nats per sequence
        mean_kl = self.trainer.strategy.reduce(seq_kl.mean().detach(), reduce_op="mean")  # equal shares
        self.kl_ctl.update(float(mean_kl), n * world)
        self.iteration = it

        # 6. Statistics, with TRL's names.
        non_score = (-beta * kl).sum(1)
        logged = {
            "objective/kl": seq_kl.mean(), "objective/entropy": (-ro.logprobs).sum(1).mean(),
            "objective/non_score_reward": non_score.mean(), "objective/rlhf_reward": (ro.scores + non_score).mean(),
            "objective/scores": ro.scores.mean(), "objective/raw_scores": ro.raw_scores.mean(),
            "objective/beta": torch.tensor(beta), "rollout/response_length": mask.sum(1).mean(),
            "rollout/eos_rate": ro.ended.float().mean(),
            "lr": torch.tensor(self.lr_schedulers().get_last_lr()[0]),
            "step": torch.tensor(float(it)),  # Lightning takes a logged `step` as the curves' x: the iteration
            **stats,
        }
        self.log_dict({k: v.float() for k, v in logged.items()}, on_step=True, on_epoch=False,
                      sync_dist=world > 1, batch_size=n)  # means over processes (equal shares)
        self.log("val/num_eos_tokens", ro.ended.float().sum(), on_step=True, on_epoch=False,
                 sync_dist=world > 1, reduce_fx="sum", batch_size=n)  # a count: summed over processes

    def learn(self, ro: Rollout, advantages: torch.Tensor, returns: torch.Tensor, it: int) -> dict[str, torch.Tensor]:
        """``ppo_epochs`` passes over shuffled minibatches; each minibatch is one optimizer step,
        accumulated over micro-batches. The losses are token means over the minibatch -- over
        every process's share of it: a micro-batch's token-mean loss is weighted by its tokens
        times W / (the minibatch's tokens over all processes), so gradient accumulation and
        data parallelism change memory and speed, never the update. Returns the mean of each
        statistic."""
        cfg = self.cfg
        opt, sched = self.optimizers(), self.lr_schedulers()
        gen = torch.Generator().manual_seed(self.iteration_seed(it))
        stats: dict[str, list[torch.Tensor]] = {k: [] for k in (
            "policy/approxkl_avg", "policy/clipfrac_avg", "policy/entropy_avg", "loss/policy_avg",
            "loss/value_avg", "val/clipfrac_avg", "val/ratio")}
        n = len(ro.questions)
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(n, generator=gen).to(self.device)
            for start in range(0, n, cfg.mini_batch_size):
                mini = order[start: start + cfg.mini_batch_size]
                weight = self.global_weight(ro.seq.mask[mini].sum())  # W / tokens of the global minibatch
                opt.zero_grad()
                for m0 in range(0, len(mini), cfg.micro_batch_size):
                    idx = mini[m0: m0 + cfg.micro_batch_size]
                    seq = ro.seq.select(idx)
                    logits, logp, values = policy_outputs(self.model, seq, cfg.sample.temperature)
                    pl, pst = policy_loss(logp, ro.logprobs[idx], advantages[idx], seq.mask, cfg.cliprange)
                    vl, vst = value_loss(values, ro.values[idx], returns[idx], seq.mask, cfg.cliprange_value)
                    self._finite(it, **{"loss/policy": pl, "loss/value": vl})
                    self.manual_backward((pl + cfg.vf_coef * vl) * (seq.mask.sum() * weight).float())
                    with torch.no_grad():
                        ent = masked_mean(entropy_from_logits(logits, cfg.sample.temperature), seq.mask)
                    for k, v in (("policy/approxkl_avg", pst["approxkl"]), ("policy/clipfrac_avg", pst["clipfrac"]),
                                 ("policy/entropy_avg", ent), ("loss/policy_avg", pl.detach()),
                                 ("loss/value_avg", vl.detach()), ("val/clipfrac_avg", vst["clipfrac"]),
                                 ("val/ratio", pst["ratio"])):
                        stats[k].append(v)
                if cfg.gradient_clip_val > 0:
                    self.clip_gradients(opt, gradient_clip_val=cfg.gradient_clip_val, gradient_clip_algorithm="norm")
                opt.step()
                sched.step()
        return {k: torch.stack(v).mean() for k, v in stats.items()}

    def _finite(self, iteration: int, **quantities: torch.Tensor) -> None:
        try:
            check_finite(iteration, **quantities)
        except FloatingPointError as exc:
            raise DivergedError(f"ppo: {exc}; the last good checkpoint is kept") from None

    # ---- held-out evaluation (Lightning's validation loop) --------------------------------
    def on_validation_epoch_start(self) -> None:
        self._eval = {k: torch.zeros((), dtype=torch.float64, device=self.device)
                      for k in ("score", "score_normalized", "kl", "length", "eos", "n")}
        self._eval_rows: list[dict] = []

    def validation_step(self, batch: dict[str, list[str]], batch_idx: int) -> None:
        self._eval_rows.extend(self.evaluate_batch(batch["questions"], batch_idx, self._eval))

    def evaluate_batch(self, questions: list[str], batch_idx: int, sums: dict[str, torch.Tensor]) -> list[dict]:
        """Adds one batch of held-out answers to ``sums``: the raw and normalised score, the KL to
        the reference on the policy's own samples (k1, nats per answer), length and EOS. Seeds
        depend on the batch only, so every evaluation sees the same draws."""
        ro = self.rollout(questions, self.cfg.seed * 7919 + batch_idx, with_values=False)
        kl = (ro.logprobs - ro.ref_logprobs).sum(1)
        shaped = (ro.raw_scores - self.norm[0]) / self.norm[1]
        for k, v in (("score", ro.raw_scores), ("score_normalized", shaped), ("kl", kl),
                     ("length", ro.seq.mask.sum(1)), ("eos", ro.ended.float())):
            sums[k] += v.double().sum()
        sums["n"] += len(questions)
        return [{"question": q, "answer": a, "score": round(float(s), 4), "ended": bool(e)}
                for q, a, s, e in zip(ro.questions, ro.answers, ro.raw_scores.tolist(), ro.ended.tolist())]

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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["question", "answer", "score", "ended"])
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


@torch.no_grad()
def kl_to_reference(policy: PreTrainedModel, reference: PreTrainedModel, fmt: PromptFormatter,
                    gens: Sequence[Generation], max_prompt_len: int, temperature: float,
                    batch_size: int = 32) -> list[float]:
    """Per-answer KL estimate (k1, nats): sum over the answer's tokens of log pi - log pi_ref,
    on answers sampled from ``policy``."""
    out: list[float] = []
    for start in range(0, len(gens), batch_size):
        chunk = gens[start: start + batch_size]
        seq = build_sequences([fmt.encode_prompt(g.question, max_prompt_len) for g in chunk],
                              [g.response_ids for g in chunk], fmt.tok.pad_token_id)
        logp = reference_logprobs(policy, seq, temperature)
        ref = reference_logprobs(reference, seq, temperature)
        out.extend(((logp - ref) * seq.mask).sum(1).tolist())
    return out
