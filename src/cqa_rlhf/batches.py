"""Batch shapes and samplers shared by the training stages (one collator per batch shape).

``LengthGroupedBatchSampler`` puts training sequences of similar length together, so dynamic padding
wastes little compute on pad tokens, and it is resumable: its position inside an epoch is part of
every Lightning checkpoint (through :class:`ResumableDataLoader`), so an interrupted run continues
with exactly the batches it would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cqa_rlhf.prompts import IGNORE_INDEX


class ListDataset(Dataset):
    def __init__(self, items: Sequence[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, side: Literal["left", "right"] = "right"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows to ``input_ids`` [B, T] filled with ``pad_id`` and ``attention_mask`` [B, T]
    (1 on real tokens), T the longest row. Left padding is for generation (every row continues
    from its last real token); right padding for everything else. The one padding routine of
    the package."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span] = torch.tensor(list(r), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only: ``cumsum(mask) - 1`` (0 on left padding) [B, T], so
    a row's outputs do not depend on its padding side or amount (ppo-details #11)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


class CausalLMCollator:
    """``input_ids`` [B, T] right-padded with the pad id, ``attention_mask`` [B, T] and
    ``labels`` [B, T] padded with IGNORE_INDEX; T is the longest sequence in the batch."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = pad_token_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask = pad_rows([x["input_ids"] for x in items], self.pad)
        labels, _ = pad_rows([x["labels"] for x in items], IGNORE_INDEX)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class PairCollator:
    """Preference pairs, chosen and rejected in one batch (one forward): ``input_ids`` /
    ``attention_mask`` [2B, T] right-padded, chosen rows first, then rejected; ``labels`` [2B, T]
    (IGNORE_INDEX on prompt and padding) when the items carry them (DPO); and every per-pair
    number the items carry (``margin``; DPO's reference log-probs) as a [B] tensor."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = pad_token_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask = pad_rows([x["chosen"] for x in items] + [x["rejected"] for x in items], self.pad)
        out = {"input_ids": ids, "attention_mask": mask}
        if "chosen_labels" in items[0]:
            out["labels"] = pad_rows([x["chosen_labels"] for x in items] + [x["rejected_labels"] for x in items],
                                     IGNORE_INDEX)[0]
        for key, value in items[0].items():
            if isinstance(value, float):
                out[key] = torch.tensor([x[key] for x in items], dtype=torch.float32)
        return out


def pair_lengths(items: list[dict]) -> list[int]:
    """A pair's length for length-grouped batches: its longer answer's sequence."""
    return [max(len(x["chosen"]), len(x["rejected"])) for x in items]


class PromptCollator:
    """Prompts for rollouts: ``{"questions": [B]}``; the generator encodes and left-pads them."""

    def __call__(self, items: list[dict]) -> dict[str, list[str]]:
        return {"questions": [x["question"] for x in items]}


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Training batches of similar-length items, shuffled, deterministic in (seed, epoch).

    Each epoch: a seeded permutation is cut into mega-batches of ``group`` batches, each sorted
    by length and cut into batches; the batches are then shuffled. ``batch_size`` is per
    process: with ``world_size`` W the *global* batches (``batch_size * W`` items) are made
    exactly as a single process with that batch size makes them, and rank r takes items r, r+W,
    ... of each. So a run on W processes sees the same global batches as one process with a W
    times larger batch. A global batch with fewer than W items (the epoch's tail) is dropped so
    every rank has an item; with ``drop_last`` every global batch is full.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group: int = 50, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False) -> None:
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.group, self.rank, self.world_size, self.drop_last = group, rank, world_size, drop_last
        self.epoch = 0
        self.skip = 0  # batches of ``epoch`` already consumed (set when resuming)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        size = self.batch_size * self.world_size  # the global batch
        idx = list(range(len(self.lengths)))
        rng = random.Random(self.seed * 100003 + self.epoch)
        rng.shuffle(idx)
        mega = size * self.group
        batches = []
        for m in range(0, len(idx), mega):
            chunk = sorted(idx[m: m + mega], key=lambda i: (-self.lengths[i], i))
            batches.extend(chunk[i: i + size] for i in range(0, len(chunk), size))
        rng.shuffle(batches)
        keep = size if self.drop_last else self.world_size  # fewest items a kept global batch holds
        return [b[self.rank:: self.world_size] for b in batches if len(b) >= keep]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._batches()
        skip, self.skip = self.skip, 0
        yield from batches[skip:]

    def __len__(self) -> int:
        return len(self._batches())

    def batches_of(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch`` (what iterating yields in that epoch from its start)."""
        current = self.epoch
        self.epoch = epoch
        try:
            return self._batches()
        finally:
            self.epoch = current


class EvalBatchSampler(Sampler[list[int]]):
    """Fixed evaluation batches: in order, or longest first when ``lengths`` are given (less
    padding). With ``world_size`` W, rank r takes items r, r+W, ... of every batch (a batch with
    fewer than W items leaves some ranks without a share of it): every item is evaluated once,
    every rank gets a share of the first batch (Lightning needs one batch per rank), and sums
    reduced over ranks equal one process's sums over the same batches."""

    def __init__(self, n: int, batch_size: int, lengths: Sequence[int] | None = None, rank: int = 0,
                 world_size: int = 1) -> None:
        order = sorted(range(n), key=lambda i: (-lengths[i], i)) if lengths is not None else list(range(n))
        shares = (order[i: i + batch_size][rank:: world_size] for i in range(0, n, batch_size))
        self.batches = [b for b in shares if b]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches

    def __len__(self) -> int:
        return len(self.batches)


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning saves in checkpoints (it has ``state_dict``): the epoch and the
    number of batches the fit loop has *completed* in it. The loader's own count would be wrong:
    Lightning prefetches one batch ahead, so ``completed`` comes from the trainer."""

    def __init__(self, dataset: Dataset, batch_sampler: LengthGroupedBatchSampler, collate_fn: Callable,
                 completed_in_epoch: Callable[[], int]) -> None:
        super().__init__(dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, num_workers=0)
        self._completed = completed_in_epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.batch_sampler.epoch, "completed": int(self._completed())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.epoch = state["epoch"]
        self.batch_sampler.skip = state["completed"]
