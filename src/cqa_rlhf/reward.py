"""Reward models: datasets, the two training modules, and the one scoring API.

A reward model is a GPT-Neo sequence classifier with one output, read at the last real token of
``prompt + answer + EOS`` (the shared template and truncation). Scores do not depend on padding
side or batch company: position ids always come from the attention mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cqa_rlhf.batches import PairCollator, pad_rows, pair_lengths, position_ids
from cqa_rlhf.config import PromptConfig, RegressionConfig, RewardKindConfig
from cqa_rlhf.errors import ConfigError
from cqa_rlhf.losses import center_penalty, pairwise_loss, regression_loss
from cqa_rlhf.models import eval_mode, exported_dir, load_frozen
from cqa_rlhf.prompts import PromptFormatter
from cqa_rlhf.stats import bootstrap_ci, exact_mean, interval, resample_indices, wilson, win_points
from cqa_rlhf.tokenizer import load_tokenizer, same_vocabulary
from cqa_rlhf.training import SupervisedModule


def reward_forward(model: PreTrainedModel, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scores [B] at the last real token, for left or right padding alike."""
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids(mask))
    return out.logits[:, 0].float()


@torch.no_grad()
def score(model: PreTrainedModel, fmt: PromptFormatter, pairs: Sequence[tuple[str, str]], max_length: int,
          batch_size: int = 64) -> list[float]:
    """Reward of each (question, answer) text: batches sorted by length, no gradient, the training
    template and truncation. The reward stage and re-tokenised judging use this; sampled answers
    are scored on their exact ids (:func:`cqa_rlhf.rollout.score_generations`)."""
    encoded = [fmt.encode(q, a, max_length).input_ids for q, a in pairs]
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    out = [0.0] * len(encoded)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            ids, mask = pad_rows([encoded[i] for i in idx], fmt.tok.pad_token_id)
            for i, s in zip(idx, reward_forward(model, ids.to(model.device), mask.to(model.device)).tolist()):
                out[i] = s
    return out


def normalization(model: PreTrainedModel, what: str = "reward model") -> tuple[float, float]:
    """(mean, std) stored by the reward stage; a model without them is a one-line error naming
    ``what`` (the params key), never a silent 0/1."""
    mean, std = getattr(model.config, "cqa_score_mean", None), getattr(model.config, "cqa_score_std", None)
    if mean is None or std is None:
        raise ConfigError(f"{what}: {model.name_or_path} has no cqa_score_mean/std in its config.json "
                          "(export it with the reward stage)")
    return float(mean), float(std)


@dataclass
class Judge:
    """A frozen reward model ready to score sampled answers: ``retokenize`` is None when it shares
    the policy's vocabulary (it then scores the exact sampled ids), else a formatter over its own
    tokenizer; ``norm`` is the (mean, std) of its scores on the SFT training answers."""

    model: PreTrainedModel
    retokenize: PromptFormatter | None
    norm: tuple[float, float]


def load_judge(path: str | Path, what: str, prompt: PromptConfig, policy_tok: PreTrainedTokenizerBase,
               dtype: str = "float32") -> Judge:
    """An exported reward model (``what``: the params key naming it) as a :class:`Judge` for a
    policy with tokenizer ``policy_tok``."""
    rm_dir = exported_dir(path, what)
    rm_tok = load_tokenizer(rm_dir)
    same = same_vocabulary(rm_tok, policy_tok)
    model = load_frozen(rm_dir, policy_tok if same else rm_tok, "reward", dtype)
    return Judge(model, None if same else PromptFormatter(prompt, rm_tok), normalization(model, what))


# --------------------------------------------------------------------------------------------
# Datasets and collators
# --------------------------------------------------------------------------------------------
def encode_scored(rows: list[dict], fmt: PromptFormatter, max_length: int) -> list[dict]:
    return [{"input_ids": fmt.encode(r["question"], r["answer"], max_length).input_ids, "target": float(r["score"])}
            for r in rows]


def encode_pairs(rows: list[dict], fmt: PromptFormatter, max_length: int) -> list[dict]:
    return [{"chosen": fmt.encode(r["question"], r["chosen"], max_length).input_ids,
             "rejected": fmt.encode(r["question"], r["rejected"], max_length).input_ids,
             "margin": float(r["margin"])} for r in rows]


class ScoredCollator:
    """``input_ids``/``attention_mask`` [B, T] right-padded, ``target`` [B]."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = pad_token_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask = pad_rows([x["input_ids"] for x in items], self.pad)
        return {"input_ids": ids, "attention_mask": mask,
                "target": torch.tensor([x["target"] for x in items], dtype=torch.float32)}


def item_lengths(items: list[dict]) -> list[int]:
    return [len(x["input_ids"]) for x in items]


# --------------------------------------------------------------------------------------------
# Training modules
# --------------------------------------------------------------------------------------------
class _ValAccumulator(SupervisedModule):
    """Exact validation means over all batches (summed, then reduced across processes)."""

    _keys: tuple[str, ...] = ()

    def on_validation_epoch_start(self) -> None:
        self._sums = {k: torch.zeros((), dtype=torch.float64, device=self.device) for k in (*self._keys, "n")}

    def _add(self, n: int, **values: torch.Tensor) -> None:
        for k, v in values.items():
            self._sums[k] += v.double().sum()
        self._sums["n"] += n

    def on_validation_epoch_end(self) -> None:
        sums = {k: self.trainer.strategy.reduce(v, reduce_op="sum") for k, v in self._sums.items()}
        for k in self._keys:
            self.log(f"val_{k}", (sums[k] / sums["n"].clamp(min=1)).float(), sync_dist=False)


class RegressionModule(_ValAccumulator):
    """Fits scaled scores. Logs val_loss, val_mae and val_sign_accuracy (the original project's
    check: does the predicted score have the sign of the true one)."""

    _keys = ("loss", "mae", "sign_accuracy")

    def __init__(self, model: PreTrainedModel, cfg: RegressionConfig, fingerprint: str) -> None:
        super().__init__(model, cfg, fingerprint)
        self.loss_kind = cfg.loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        pred = reward_forward(self.model, batch["input_ids"], batch["attention_mask"])
        return self.train_loss(regression_loss(pred, batch["target"], self.loss_kind), pred.shape[0])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        pred = reward_forward(self.model, batch["input_ids"], batch["attention_mask"])
        t = batch["target"]
        per = (pred - t) ** 2 if self.loss_kind == "mse" else (pred - t).abs()
        self._add(len(t), loss=per, mae=(pred - t).abs(), sign_accuracy=(torch.sign(pred) == torch.sign(t)).float())


class PairwiseModule(_ValAccumulator):
    """Bradley-Terry on pairs, chosen and rejected through the model in one forward."""

    _keys = ("loss", "accuracy", "margin")

    def _rewards(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        r = reward_forward(self.model, batch["input_ids"], batch["attention_mask"])  # [2B]
        b = r.shape[0] // 2
        return r[:b], r[b:]

    def _loss(self, rc: torch.Tensor, rr: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
        m = margin * self.cfg.margin_scale if self.cfg.use_margin else None
        loss = pairwise_loss(rc, rr, m)
        if self.cfg.center_coef > 0:
            loss = loss + self.cfg.center_coef * center_penalty(rc, rr)
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        rc, rr = self._rewards(batch)
        return self.train_loss(self._loss(rc, rr, batch["margin"]), rc.shape[0])  # mean over the global batch's pairs

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        rc, rr = self._rewards(batch)
        m = batch["margin"] * self.cfg.margin_scale if self.cfg.use_margin else torch.zeros_like(rc)
        per = -torch.nn.functional.logsigmoid(rc - rr - m)
        self._add(len(rc), loss=per, accuracy=(rc > rr).float(), margin=rc - rr)


# --------------------------------------------------------------------------------------------
# Held-out evaluation
# --------------------------------------------------------------------------------------------
def pair_metrics(chosen: Sequence[float], rejected: Sequence[float], chosen_text: Sequence[str],
                 rejected_text: Sequence[str]) -> dict:
    """Pairwise accuracy and mean margin of a reward model, beside the two baselines it must
    beat: the longer answer wins (ties count half), and chance. Both accuracies carry a 95%
    Wilson interval, and their paired difference a 95% bootstrap interval over pairs."""
    n = len(chosen)
    if n == 0:
        return {"pairs": 0, "pairwise_accuracy": math.nan, "mean_margin": math.nan,
                "length_baseline_accuracy": math.nan, "chance_accuracy": 0.5}
    correct = [1.0 if c > r else 0.0 for c, r in zip(chosen, rejected)]
    longer = win_points([float(len(a)) for a in chosen_text], [float(len(b)) for b in rejected_text])
    over = [c - x for c, x in zip(correct, longer)]
    return {"pairs": n, "pairwise_accuracy": round(exact_mean(correct), 4),
            "pairwise_accuracy_ci95": interval(wilson(math.fsum(correct), n)),
            "mean_margin": round(exact_mean([c - r for c, r in zip(chosen, rejected)]), 4),
            "length_baseline_accuracy": round(exact_mean(longer), 4),
            "length_baseline_ci95": interval(wilson(math.fsum(longer), n)),
            "accuracy_over_length": round(exact_mean(over), 4),
            "accuracy_over_length_ci95": interval(bootstrap_ci(over, resample_indices(n))),
            "chance_accuracy": 0.5}


def test_pair_metrics(model: PreTrainedModel, fmt: PromptFormatter, rows: list[dict],
                      cfg: RewardKindConfig) -> dict[str, float]:
    """:func:`pair_metrics` of ``model`` on ``rows`` of a ``pairs`` table."""
    rc = score(model, fmt, [(r["question"], r["chosen"]) for r in rows], cfg.max_length, cfg.score_batch_size)
    rr = score(model, fmt, [(r["question"], r["rejected"]) for r in rows], cfg.max_length, cfg.score_batch_size)
    return pair_metrics(rc, rr, [r["chosen"] for r in rows], [r["rejected"] for r in rows])


def regression_validation(model: PreTrainedModel, fmt: PromptFormatter, rows: list[dict],
                          cfg: RewardKindConfig) -> dict[str, float]:
    """MAE and sign accuracy of the predicted scores on ``rows`` of a ``reward`` table."""
    pred = score(model, fmt, [(r["question"], r["answer"]) for r in rows], cfg.max_length, cfg.score_batch_size)
    n = max(len(rows), 1)
    return {"val_mae": round(sum(abs(p - r["score"]) for p, r in zip(pred, rows)) / n, 6),
            "val_sign_accuracy": round(sum((p > 0) == (r["score"] > 0) for p, r in zip(pred, rows)) / n, 6)}


def pairwise_validation(model: PreTrainedModel, fmt: PromptFormatter, rows: list[dict],
                        cfg: RewardKindConfig) -> dict[str, float]:
    """Pairwise accuracy on ``rows`` of a ``pairs`` table."""
    rc = score(model, fmt, [(r["question"], r["chosen"]) for r in rows], cfg.max_length, cfg.score_batch_size)
    rr = score(model, fmt, [(r["question"], r["rejected"]) for r in rows], cfg.max_length, cfg.score_batch_size)
    return {"val_pairwise_accuracy": round(sum(c > r for c, r in zip(rc, rr)) / max(len(rows), 1), 6)}


@dataclass(frozen=True)
class RewardKind:
    """Everything that differs between the two reward models, in one place: the prepared table it
    trains on, how rows become items and batches, the module, and its validation figures."""

    table: str
    encode: Callable[[list[dict], PromptFormatter, int], list[dict]]
    collator: Callable[[int], Callable[[list[dict]], dict[str, torch.Tensor]]]
    lengths: Callable[[list[dict]], list[int]]
    module: type[SupervisedModule]
    validation: Callable[[PreTrainedModel, PromptFormatter, list[dict], RewardKindConfig], dict[str, float]]


KINDS: dict[str, RewardKind] = {
    "regression": RewardKind("reward", encode_scored, ScoredCollator, item_lengths, RegressionModule,
                             regression_validation),
    "classification": RewardKind("pairs", encode_pairs, PairCollator, pair_lengths, PairwiseModule,
                                 pairwise_validation),
}
