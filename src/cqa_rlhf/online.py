"""What every online-RL method (PPO, GRPO) shares, as a Lightning module base and the stage's fit.

One training batch is one *iteration*: a batch of prompts, rolled out through the shared
:class:`~cqa_rlhf.rollout.RolloutEngine` (sampling, log-probs, reward scores on the exact sampled
ids), then minibatch updates (manual optimisation). A method supplies its step: how rollouts
become losses. The base owns the rest: the loop in iterations, seeds, score shaping, the
minibatch/micro-batch update loop with token-level global-batch weights, the NaN guard, the
held-out evaluation (answers to fixed prompts with fixed seeds, so iterations are compared on
the same questions and noise), sample tables and the checkpoint state.

Every random draw is seeded from ``(seed, iteration)``, so a run resumed from a checkpoint draws
exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import csv
import shutil
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from cqa_rlhf.batches import LengthGroupedBatchSampler, ListDataset, PromptCollator, ResumableDataLoader
from cqa_rlhf.config import Loop, OnlineRLConfig, PromptConfig, TrainerConfig
from cqa_rlhf.data.tables import read_table
from cqa_rlhf.errors import CqaError, DataError
from cqa_rlhf.generation import row_seed
from cqa_rlhf.io import atomic_path
from cqa_rlhf.models import exported_dir
from cqa_rlhf.ppo_math import check_finite
from cqa_rlhf.prompts import PromptFormatter
from cqa_rlhf.reward import load_judge
from cqa_rlhf.rollout import Rollout, RolloutEngine
from cqa_rlhf.tokenizer import load_tokenizer
from cqa_rlhf.training import HarnessModule, fingerprint, load_best_weights, prepare_run, refuse_sharded


class DivergedError(CqaError):
    """A non-finite loss, reward or log-prob: the run stops with one line naming the iteration
    and the quantity, and the last good checkpoint stays in place."""


def shape_scores(raw: torch.Tensor, ended: torch.Tensor, mean: float, std: float, cfg: OnlineRLConfig) -> torch.Tensor:
    """Raw reward-model scores [B] -> (s - mean) / std with the mean/std stored in the reward
    model, minus ``missing_eos_penalty`` for responses that never emitted EOS, clipped to
    +-``score_clip``."""
    s = (raw - mean) / std
    if cfg.missing_eos_penalty is not None:
        s = s - cfg.missing_eos_penalty * (~ended).float()
    if cfg.score_clip is not None:
        s = s.clamp(-cfg.score_clip, cfg.score_clip)
    return s


EVAL_SUMS = ("score", "score_normalized", "kl", "length", "eos", "n")
# A micro-batch's backward: (indices into the rollout [b], W / tokens of the global minibatch) -> statistics.
Backward = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


class OnlineRLModule(HarnessModule):
    """The trained ``model`` holds the policy (:attr:`policy_lm` samples); the reference and the
    reward model are frozen inside the rollout ``engine`` and kept out of the checkpoint (they
    are stage inputs). Its steps are optimizer steps; its curves and progress count iterations."""

    name = "online"

    def __init__(self, model: nn.Module, engine: RolloutEngine, cfg: OnlineRLConfig, fingerprint: str,
                 reward_norm: tuple[float, float], samples_dir: str | Path | None = None) -> None:
        super().__init__(model, cfg.optim, fingerprint)
        self.automatic_optimization = False
        self.cfg, self.engine, self.norm = cfg, engine, reward_norm
        self.iteration = 0  # completed iterations
        self.samples_dir = Path(samples_dir) if samples_dir is not None else None
        self.eval_history: list[dict[str, float]] = []

    @property
    def policy_lm(self) -> nn.Module:
        """The causal LM that samples answers."""
        raise NotImplementedError

    # ---- loop, devices and checkpoint state ---------------------------------------------------
    def loop(self) -> Loop:
        """``iterations`` x ``updates_per_iteration`` optimizer steps; a held-out evaluation (and
        checkpoint) every ``eval_every`` training batches, i.e. iterations. The module clips its
        own gradients (Lightning does not under manual optimisation)."""
        cfg = self.cfg
        return Loop(max_steps=cfg.iterations * cfg.updates_per_iteration, max_epochs=-1,
                    val_check_interval=cfg.eval_every, monitor="eval/score", monitor_mode="max")

    @staticmethod
    def curve_step(checkpoint: dict) -> int:
        return int(checkpoint["cqa_online"]["iteration"])  # the curves' x axis counts iterations

    def progress(self) -> tuple[int, int]:
        return self.iteration, self.cfg.iterations

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.engine.to(self.device)

    def extra_state(self) -> dict:
        """A method's own state in checkpoints (PPO: its KL controller)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        return None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["cqa_online"] = {"iteration": self.iteration, "eval_history": self.eval_history,
                                    **self.extra_state()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint["cqa_online"]
        self.iteration = int(state["iteration"])
        self.eval_history = list(state["eval_history"])
        self.load_extra_state(state)

    def iteration_seed(self, iteration: int) -> int:
        return self.cfg.seed * 1_000_003 + iteration

    def rollout_seed(self, iteration: int) -> int:
        """Every process draws its own answers (its share of the global batch of prompts)."""
        return self.iteration_seed(iteration) + 1_000_000_007 * self.global_rank

    def rollout(self, questions: list[str], seed: int, with_values: bool = True) -> Rollout:
        """Sampled answers with the policy's and the reference's log-probs and the reward scores."""
        return self.engine.rollout(self.policy_lm, questions, seed)

    def group_rollout(self, prompts: list[str], it: int, g: int) -> Rollout:
        """``g`` answers to each prompt, groups contiguous ([N * g] rollouts). Each answer has its
        own seed, from (iteration, question, index in its group): the same answers on any number
        of processes as one process with the whole global batch draws."""
        questions = [q for q in prompts for _ in range(g)]
        seeds = [row_seed(self.iteration_seed(it), q, i % g) for i, q in enumerate(questions)]
        return self.engine.rollout(self.policy_lm, questions, self.iteration_seed(it), row_seeds=seeds)

    # ---- updates ---------------------------------------------------------------------------
    def minibatch_updates(self, n: int, mask: torch.Tensor, backward: Backward, it: int) -> dict[str, torch.Tensor]:
        """``cfg.epochs`` passes over the ``n`` rollouts in shuffled minibatches; each minibatch is
        one optimizer step, accumulated over micro-batches. ``backward`` gets a micro-batch's
        indices and W / (the minibatch's ``mask`` tokens over all processes): weighting its
        token-mean loss by its tokens times that makes the losses token means over the global
        minibatch, so gradient accumulation and data parallelism change memory and speed, never
        the update. Returns the mean of each statistic."""
        cfg = self.cfg
        opt, sched = self.optimizers(), self.lr_schedulers()
        gen = torch.Generator().manual_seed(self.iteration_seed(it))
        stats: dict[str, list[torch.Tensor]] = defaultdict(list)
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=gen).to(self.device)
            for start in range(0, n, cfg.mini_batch_size):
                minibatch = order[start: start + cfg.mini_batch_size]
                weight = self.global_weight(mask[minibatch].sum())  # W / tokens of the global minibatch
                opt.zero_grad()
                for m0 in range(0, len(minibatch), cfg.micro_batch_size):
                    for k, v in backward(minibatch[m0: m0 + cfg.micro_batch_size], weight).items():
                        stats[k].append(v)
                if cfg.optim.gradient_clip_val > 0:
                    self.clip_to(opt, cfg.optim.gradient_clip_val)
                opt.step()
                sched.step()
        return {k: torch.stack(v).mean() for k, v in stats.items()}

    def finite(self, iteration: int, **quantities: torch.Tensor) -> None:
        try:
            check_finite(iteration, **quantities)
        except FloatingPointError as exc:
            raise DivergedError(f"{self.name}: {exc}; the last good checkpoint is kept") from None

    def log_iteration(self, logged: dict[str, torch.Tensor], n: int) -> None:
        """One row per iteration (x = the iteration, with the learning rate), means over
        processes (equal shares)."""
        logged = {**logged, "lr": torch.tensor(self.lr_schedulers().get_last_lr()[0]),
                  "step": torch.tensor(float(self.iteration))}  # Lightning takes a logged `step` as the curves' x
        self.log_dict({k: v.float() for k, v in logged.items()}, on_step=True, on_epoch=False,
                      sync_dist=self.trainer.world_size > 1, batch_size=n)

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
        return [{"question": q, "answer": a, "score": round(float(s), 4), "ended": bool(e), "kl": round(float(k), 4)}
                for q, a, s, e, k in zip(rollout.questions, rollout.answers, rollout.raw_scores.tolist(),
                                         rollout.ended.tolist(), kl.tolist())]

    def evaluate_prompts(self, questions: list[str], samples_to: Path | None = None) -> dict[str, float]:
        """The held-out evaluation outside the fit loop (the SFT policy before training, the final
        policy after it): the same batches and seeds as the validation loop. ``samples_to``: a
        folder for its answers' table too (the SFT policy's, as iteration 0)."""
        sums = {k: torch.zeros((), dtype=torch.float64) for k in EVAL_SUMS}
        size, rows = self.cfg.sample.batch_size, []
        for i, start in enumerate(range(0, len(questions), size)):
            rows.extend(self.evaluate_batch(questions[start: start + size], i, sums))
        if samples_to is not None:
            write_samples(samples_to / f"iteration_{self.iteration:04d}.csv", rows)
        return eval_means(sums)

    def on_validation_epoch_end(self) -> None:
        # Every process evaluates every held-out prompt with the same weights and seeds, so the
        # sums are complete and equal on every process: nothing to reduce. (64 prompts every
        # eval_every iterations: cheap next to training, and no process is ever left without a
        # batch when the held-out set is one batch.)
        result = eval_means(self._eval)
        self.finite(self.iteration, **{f"eval/{k}": torch.tensor(v) for k, v in result.items()})
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
    """A table of sample generations (question, answer, the reward model's score, ended, k1 KL to
    the reference in nats) that pandas opens."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["question", "answer", "score", "ended", "kl"])
        w.writeheader()
        w.writerows(rows)


# --------------------------------------------------------------------------------------------
# The stage side: inputs, the rollout engine, the fit, the final figures
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OnlineInputs:
    """What an online-RL stage reads before it builds its policy."""

    trainer: TrainerConfig
    fmt: PromptFormatter
    train_rows: list[dict]
    eval_questions: list[str]

    @property
    def tok(self):
        return self.fmt.tok


def load_inputs(stage: str, cfg: OnlineRLConfig, trainer_cfg: TrainerConfig, prompt: PromptConfig,
                tokenizer_dir: str) -> OnlineInputs:
    """The stage's inputs: sharded strategies refused (rollouts sample outside the wrapped
    forward), its input models checked, seeds set, the tokenizer, the prompts."""
    refuse_sharded(trainer_cfg, stage, "samples rollouts from the policy outside the wrapped forward")
    exported_dir(cfg.sft_dir, f"{stage}.sft_dir")
    exported_dir(cfg.reward_model, f"{stage}.reward_model")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    fmt = PromptFormatter(prompt, load_tokenizer(tokenizer_dir))
    return OnlineInputs(trainer_cfg, fmt, *load_prompts(cfg, stage))


def rollout_engine(stage: str, cfg: OnlineRLConfig, inputs: OnlineInputs, prompt: PromptConfig, dtype: str,
                   reference: nn.Module) -> tuple[RolloutEngine, tuple[float, float]]:
    """The rollout engine with the frozen ``reference`` and reward model, and the reward model's
    score normalisation (mean, std on the SFT training answers)."""
    judge = load_judge(cfg.reward_model, f"{stage}.reward_model", prompt, inputs.tok, dtype)
    engine = RolloutEngine(inputs.fmt, cfg.sample, cfg.max_prompt_length, cfg.max_length, cfg.micro_batch_size,
                           reference, judge.model, judge.retokenize)
    return engine, judge.norm


def run_fingerprint(resolved: dict, cfg: OnlineRLConfig, tokenizer_dir: str) -> str:
    """The run's identity: resolved params, the prompt tables, tokenizer, SFT policy, reward model, code."""
    data = Path(cfg.data)
    return fingerprint(resolved, [data / "train" / "prompts", data / "val" / "prompts", tokenizer_dir,
                                  cfg.sft_dir, cfg.reward_model])


def train(module: OnlineRLModule, inputs: OnlineInputs, trainable: int) -> tuple[L.Trainer, dict]:
    """Fit (resuming from last.ckpt only if it was made with this fingerprint), with the SFT
    policy's held-out figures first; the policy to export (``export: best``: the best checkpoint's
    weights) ends in ``module.model``. Returns the trainer and the stage's metrics."""
    cfg = module.cfg
    trainer, ckpt = prepare_run(inputs.trainer, module, cfg.live_dir, cfg.checkpoint_dir, module.fingerprint,
                                module.name)
    fresh = ckpt is None and trainer.is_global_zero and module.samples_dir is not None
    if fresh:
        shutil.rmtree(module.samples_dir, ignore_errors=True)
    # iteration 0: the SFT policy (its table once, on a fresh start)
    sft_eval = module.evaluate_prompts(inputs.eval_questions, module.samples_dir if fresh else None)
    fit(module, trainer, ckpt, inputs.train_rows, inputs.eval_questions, inputs.fmt)
    metrics = final_metrics(module, sft_eval, inputs.eval_questions, trainer.global_step, trainable)
    if cfg.export == "best":
        load_best_weights(module.model, cfg.checkpoint_dir)
    return trainer, metrics


def summary(module: OnlineRLModule, metrics: dict, seconds: float) -> str:
    """The stage's one line on stdout."""
    sft, last = metrics["sft"], metrics["final"]
    return (f"{module.name}: held-out score {sft['score']:.3f} (SFT) -> {last['score']:.3f}, KL {last['kl']:.2f} nats, "
            f"EOS rate {last['eos_rate']:.2f}, {module.iteration} iterations, {seconds:.0f}s -> {module.cfg.out}")


def load_prompts(cfg: OnlineRLConfig, stage: str) -> tuple[list[dict], list[str]]:
    """Training prompt rows, and the held-out questions of the evaluation."""
    data = Path(cfg.data)
    train_rows = read_table(data / "train" / "prompts").to_pylist()
    eval_questions = [r["question"] for r in read_table(data / "val" / "prompts").to_pylist()][: cfg.eval_prompts]
    if len(train_rows) < cfg.rollout_batch_size or not eval_questions:
        raise DataError(f"{data}: {len(train_rows)} training prompts and {len(eval_questions)} held-out prompts; "
                        f"{stage} needs at least {stage}.rollout_batch_size={cfg.rollout_batch_size} and 1")
    return train_rows, eval_questions


def fit(module: OnlineRLModule, trainer: L.Trainer, ckpt: Path | None, train_rows: list[dict],
        eval_questions: list[str], fmt: PromptFormatter) -> None:
    """With W processes each rolls out its share of every global batch of prompts
    (rollout_batch_size per process); every process runs the held-out evaluation."""
    cfg, stage = module.cfg, module.name
    lengths = [len(fmt.encode_prompt(r["question"], cfg.max_prompt_length)) for r in train_rows]
    sampler = LengthGroupedBatchSampler(lengths, cfg.rollout_batch_size, cfg.seed,
                                        rank=trainer.global_rank, world_size=trainer.world_size, drop_last=True)
    if len(sampler) == 0:
        raise DataError(f"{cfg.data}: {len(train_rows)} training prompts; {trainer.world_size} processes need at "
                        f"least {stage}.rollout_batch_size x {trainer.world_size} = "
                        f"{cfg.rollout_batch_size * trainer.world_size}")
    train = ResumableDataLoader(ListDataset(train_rows), sampler, PromptCollator(), module.completed_in_epoch)
    held_out = DataLoader(ListDataset([{"question": q} for q in eval_questions]), batch_size=cfg.sample.batch_size,
                          collate_fn=PromptCollator())
    trainer.fit(module, train, held_out, ckpt_path=ckpt, weights_only=True)  # DivergedError: exit 2


def final_metrics(module: OnlineRLModule, sft_eval: dict, eval_questions: list[str], steps: int,
                  trainable: int) -> dict:
    """The SFT policy's, the final and the best held-out figures, and the run's counts."""
    history = module.eval_history
    last = history[-1] if history and history[-1]["iteration"] == module.iteration \
        else {"iteration": module.iteration, **module.evaluate_prompts(eval_questions)}
    best = max(history or [last], key=lambda e: e["score"])
    return {"sft": sft_eval, "final": last, "best": best, "exported": module.cfg.export,
            "iterations": module.iteration, "steps": steps, "trainable_params": trainable}
