"""Reward models: datasets, the two training modules, and the one scoring API.

A reward model is a GPT-Neo sequence classifier with one output, read at the last real token of
``prompt + answer + EOS`` (the shared template and truncation). Scores do not depend on padding
side or batch company: position ids always come from the attention mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from cqa_rlhf.batches import pad_rows
from cqa_rlhf.config import ClassificationConfig, RegressionConfig
from cqa_rlhf.losses import center_penalty, pairwise_loss, regression_loss
from cqa_rlhf.prompts import PromptFormatter
from cqa_rlhf.training import HarnessModule


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only: ``cumsum(mask) - 1`` (0 on left padding) [B, T]."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def reward_forward(model: PreTrainedModel, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scores [B] at the last real token, for left or right padding alike."""
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids(mask))
    return out.logits[:, 0].float()


@torch.no_grad()
def score(model: PreTrainedModel, fmt: PromptFormatter, pairs: Sequence[tuple[str, str]], max_length: int,
          batch_size: int = 64) -> list[float]:
    """Reward of each (question, answer): batches sorted by length, no gradient, the training
    template and truncation. PPO and evaluation use this; nothing else re-implements scoring."""
    was_training = model.training
    model.eval()
    encoded = [fmt.encode(q, a, max_length).input_ids for q, a in pairs]
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    out = [0.0] * len(encoded)
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        ids, mask = pad_rows([encoded[i] for i in idx], fmt.tok.pad_token_id)
        for i, s in zip(idx, reward_forward(model, ids.to(model.device), mask.to(model.device)).tolist()):
            out[i] = s
    model.train(was_training)
    return out


def normalization(model: PreTrainedModel) -> tuple[float, float]:
    """(mean, std) stored by the reward stage; a model without them is an error, never 0/1."""
    mean, std = getattr(model.config, "cqa_score_mean", None), getattr(model.config, "cqa_score_std", None)
    if mean is None or std is None:
        raise ValueError(f"{model.name_or_path}: reward model has no cqa_score_mean/std in its config")
    return float(mean), float(std)


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


class PairCollator:
    """Chosen and rejected in one batch: ``input_ids``/``attention_mask`` [2B, T] (chosen rows
    first, then rejected), ``margin`` [B]."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = pad_token_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask = pad_rows([x["chosen"] for x in items] + [x["rejected"] for x in items], self.pad)
        return {"input_ids": ids, "attention_mask": mask,
                "margin": torch.tensor([x["margin"] for x in items], dtype=torch.float32)}


def pair_lengths(items: list[dict]) -> list[int]:
    return [max(len(x["chosen"]), len(x["rejected"])) for x in items]


# --------------------------------------------------------------------------------------------
# Training modules
# --------------------------------------------------------------------------------------------
class _ValAccumulator(HarnessModule):
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

    def __init__(self, model: PreTrainedModel, cfg: ClassificationConfig, fingerprint: str) -> None:
        super().__init__(model, cfg, fingerprint)
        self.cfg = cfg

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
                 rejected_text: Sequence[str]) -> dict[str, float]:
    """Pairwise accuracy and mean margin of a reward model, beside the two baselines it must
    beat: the longer answer wins (ties count half), and chance."""
    n = len(chosen)
    if n == 0:
        return {"pairs": 0, "pairwise_accuracy": math.nan, "mean_margin": math.nan,
                "length_baseline_accuracy": math.nan, "chance_accuracy": 0.5}
    acc = sum(c > r for c, r in zip(chosen, rejected)) / n
    length = sum(1.0 if len(a) > len(b) else 0.5 if len(a) == len(b) else 0.0
                 for a, b in zip(chosen_text, rejected_text)) / n
    return {"pairs": n, "pairwise_accuracy": round(acc, 4),
            "mean_margin": round(sum(c - r for c, r in zip(chosen, rejected)) / n, 4),
            "length_baseline_accuracy": round(length, 4), "chance_accuracy": 0.5}
