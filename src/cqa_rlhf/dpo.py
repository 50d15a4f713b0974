"""DPO (and IPO, conservative DPO) as a Lightning module on the shared harness, with its data.

Each pair's reference log-probs come from the frozen SFT policy, computed once before the fit
(:func:`add_reference_logps`) for the pairs the fit will see, and carried in the batches: the
reference never runs during training, so no second model sits in memory (under LoRA or not).
They are saved beside the checkpoints (:func:`saved_references`), so that a restarted fit, whose
pairs are the same, takes them back (:func:`restore_references`) instead of scoring every pair
again: on real data that pass is most of an hour on 2 cores.
Chosen and rejected answers go through the policy in one forward ([2B, T], chosen first). The
maths lives in :mod:`cqa_rlhf.preference_math`; statistics are logged under TRL's names
(``rewards/chosen``, ``rewards/margins``, ``logps/rejected``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cqa_rlhf.batches import EvalBatchSampler, PairCollator, pair_lengths
from cqa_rlhf.config import DPOConfig
from cqa_rlhf.models import eval_mode
from cqa_rlhf.preference_math import answer_logps, dpo_loss, implicit_rewards, preference_logits
from cqa_rlhf.prompts import PromptFormatter
from cqa_rlhf.reward import _ValAccumulator as ValAccumulator  # the reward models' exact validation means


def encode_preferences(rows: list[dict], fmt: PromptFormatter, max_length: int) -> list[dict]:
    """Rows of a ``pairs`` table to items: each answer's ids and labels (loss on answer tokens only)."""
    items = []
    for r in rows:
        chosen, rejected = fmt.encode(r["question"], r["chosen"], max_length), fmt.encode(r["question"], r["rejected"], max_length)
        items.append({"chosen": chosen.input_ids, "chosen_labels": chosen.labels,
                      "rejected": rejected.input_ids, "rejected_labels": rejected.labels})
    return items


def pair_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs [2B] of a pair batch (chosen rows first) and their token counts [2B]."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return answer_logps(logits, batch["labels"])


@torch.no_grad()
def add_reference_logps(model: nn.Module, items: list[dict], indices: Sequence[int], batch_size: int,
                        pad_id: int) -> None:
    """Store the (frozen) ``model``'s summed answer log-probs in ``items[i]`` (``ref_chosen``,
    ``ref_rejected``) for every ``i`` in ``indices``: once, in eval mode, longest pairs first."""
    todo = [items[i] for i in sorted(set(indices))]
    with eval_mode(model):
        for idx in EvalBatchSampler(len(todo), batch_size, pair_lengths(todo)):
            group = [todo[j] for j in idx]
            logps, _ = pair_logps(model, PairCollator(pad_id)(group))  # [2B], chosen first
            for item, chosen, rejected in zip(group, logps[: len(group)].tolist(), logps[len(group):].tolist()):
                item["ref_chosen"], item["ref_rejected"] = chosen, rejected


def saved_references(items: dict[str, list[dict]], wanted: dict[str, Sequence[int]]) -> dict[str, list[list]]:
    """The reference log-probs that the ``wanted`` items of each split carry, as
    ``[index, ref_chosen, ref_rejected]`` rows (JSON keeps the floats exactly)."""
    return {split: [[i, items[split][i]["ref_chosen"], items[split][i]["ref_rejected"]] for i in sorted(set(indices))]
            for split, indices in wanted.items()}


def restore_references(saved: dict[str, list[list]], items: dict[str, list[dict]],
                       wanted: dict[str, Sequence[int]]) -> bool:
    """Put ``saved`` (:func:`saved_references`) back on the items. False, and nothing touched,
    unless it holds exactly the ``wanted`` items of every split."""
    if not _well_formed(saved) or {split: [row[0] for row in rows] for split, rows in saved.items()} != \
            {split: sorted(set(indices)) for split, indices in wanted.items()}:
        return False
    for split, rows in saved.items():
        for i, chosen, rejected in rows:
            items[split][int(i)].update(ref_chosen=float(chosen), ref_rejected=float(rejected))
    return True


def _well_formed(saved: object) -> bool:
    """Whether ``saved`` has :func:`saved_references`' shape: split -> ``[int, float, float]`` rows."""
    def row_ok(row: object) -> bool:
        return (isinstance(row, list) and len(row) == 3 and type(row[0]) is int
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in row[1:]))
    return isinstance(saved, dict) and all(isinstance(rows, list) and all(map(row_ok, rows)) for rows in saved.values())


class DPOModule(ValAccumulator):
    """Preference optimisation of a causal LM on pairs whose reference log-probs are in the batch;
    validation means exact over all batches and processes, as the reward models'."""

    _keys = ("loss", "accuracy", "margin")
    progress_keys = ("train_loss", "rewards/accuracies")
    cfg: DPOConfig

    def pair_stats(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-pair losses [B], implicit rewards and log-probs of one batch (with gradients)."""
        cfg = self.cfg
        logps, counts = pair_logps(self.model, batch)  # [2B]
        b = logps.shape[0] // 2
        ref = torch.cat([batch["ref_chosen"], batch["ref_rejected"]])  # [2B]
        # IPO compares mean token log-probs (TRL); DPO and cDPO the summed ones.
        pol_h, ref_h = (logps / counts, ref / counts) if cfg.loss == "ipo" else (logps, ref)
        h = preference_logits(pol_h[:b], pol_h[b:], ref_h[:b], ref_h[b:])
        rewards = implicit_rewards(logps, ref, cfg.beta)
        return {"loss": dpo_loss(h, cfg.beta, cfg.loss, cfg.label_smoothing), "chosen": rewards[:b],
                "rejected": rewards[b:], "logps_chosen": logps[:b], "logps_rejected": logps[b:]}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        s = self.pair_stats(batch)
        n = s["loss"].shape[0]
        with torch.no_grad():
            logged = {"rewards/chosen": s["chosen"].mean(), "rewards/rejected": s["rejected"].mean(),
                      "rewards/accuracies": (s["chosen"] > s["rejected"]).float().mean(),
                      "rewards/margins": (s["chosen"] - s["rejected"]).mean(),
                      "logps/chosen": s["logps_chosen"].mean(), "logps/rejected": s["logps_rejected"].mean()}
        self.log_dict(logged, on_step=True, on_epoch=False, batch_size=n, sync_dist=self.trainer.world_size > 1)
        return self.train_loss(s["loss"].mean(), n)  # mean over the global batch's pairs

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        s = self.pair_stats(batch)
        self._add(s["loss"].shape[0], loss=s["loss"], accuracy=(s["chosen"] > s["rejected"]).float(),
                  margin=s["chosen"] - s["rejected"])


@torch.no_grad()
def implicit_reward_pairs(model: nn.Module, items: list[dict], cfg: DPOConfig, pad_id: int) -> tuple[list[float], list[float]]:
    """Implicit rewards beta (log pi - log ref) of every pair's chosen and rejected answer (items
    carry their reference log-probs), for the held-out pair metrics."""
    sampler = EvalBatchSampler(len(items), cfg.score_batch_size, pair_lengths(items))
    chosen, rejected = [0.0] * len(items), [0.0] * len(items)
    with eval_mode(model):
        for idx in sampler:
            batch = PairCollator(pad_id)([items[i] for i in idx])
            logps, _ = pair_logps(model, batch)
            r = implicit_rewards(logps, torch.cat([batch["ref_chosen"], batch["ref_rejected"]]), cfg.beta)
            for k, i in enumerate(idx):
                chosen[i], rejected[i] = float(r[k]), float(r[k + len(idx)])
    return chosen, rejected
