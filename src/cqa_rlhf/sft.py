"""Supervised fine-tuning: the dataset, the LightningModule and the token-level evaluator."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from cqa_rlhf.batches import CausalLMCollator, EvalBatchSampler, ListDataset
from cqa_rlhf.config import TrainConfig
from cqa_rlhf.prompts import IGNORE_INDEX, PromptFormatter
from cqa_rlhf.models import eval_mode
from cqa_rlhf.training import SupervisedModule


def encode_sft(rows: list[dict], fmt: PromptFormatter, max_length: int) -> list[dict]:
    """Rows of the ``sft`` table to ``{input_ids, labels}`` items (loss on answer tokens only)."""
    items = []
    for r in rows:
        e = fmt.encode(r["question"], r["answer"], max_length)
        items.append({"input_ids": e.input_ids, "labels": e.labels})
    return items


def token_loss_sums(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over labelled tokens, and their count (exact token-level
    means across batches of any shape)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()  # [B, T-1, V] predicts tokens 1..T-1
    labels = batch["labels"][:, 1:]  # [B, T-1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (labels != IGNORE_INDEX).sum()


def eval_loader(items: list[dict], batch_size: int, pad_token_id: int, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Longest-first batches; with ``world_size`` > 1 this rank's share of them (validation in the fit)."""
    sampler = EvalBatchSampler(len(items), batch_size, [len(x["input_ids"]) for x in items], rank, world_size)
    return DataLoader(ListDataset(items), batch_sampler=sampler, collate_fn=CausalLMCollator(pad_token_id))


@torch.no_grad()
def evaluate_loss(model: PreTrainedModel, loader: DataLoader) -> dict[str, float]:
    """Token-level validation loss and perplexity of ``model`` (eval mode, no grad)."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    with eval_mode(model):
        for batch in loader:
            s, n = token_loss_sums(model, batch)
            total += s.double()
            count += int(n)
    loss = float(total / max(count, 1))
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


class SFTModule(SupervisedModule):
    """Causal-LM fine-tuning on answer tokens; logs ``train_loss``, ``val_loss``, ``val_perplexity``."""

    def __init__(self, model: PreTrainedModel, train: TrainConfig, fingerprint: str) -> None:
        super().__init__(model, train, fingerprint)
        self._val_sum = torch.zeros((), dtype=torch.float64)
        self._val_count = torch.zeros((), dtype=torch.float64)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        s, n = token_loss_sums(self.model, batch)
        return self.train_loss(s / n.clamp(min=1), n)  # token-level mean over the global batch

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_count = torch.zeros((), dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        s, n = token_loss_sums(self.model, batch)
        self._val_sum += s.double()
        self._val_count += n.double()

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        count = self.trainer.strategy.reduce(self._val_count, reduce_op="sum")
        loss = (total / count.clamp(min=1)).float()
        self.log("val_loss", loss, sync_dist=False)
        self.log("val_perplexity", torch.exp(loss.clamp(max=50.0)), sync_dist=False)
