"""Batch shapes and samplers shared by the training stages (one collator per batch shape).

``LengthGroupedBatchSampler`` puts sequences of similar length together, so dynamic padding
wastes little compute on pad tokens, and it is resumable: its position inside an epoch is part of
every Lightning checkpoint (through :class:`ResumableDataLoader`), so an interrupted run continues
with exactly the batches it would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence

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


class CausalLMCollator:
    """``input_ids`` [B, T] right-padded with the pad id, ``attention_mask`` [B, T] and
    ``labels`` [B, T] padded with IGNORE_INDEX; T is the longest sequence in the batch."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = pad_token_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(x["input_ids"]) for x in items)
        ids = torch.full((len(items), width), self.pad, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, x in enumerate(items):
            n = len(x["input_ids"])
            ids[i, :n] = torch.tensor(x["input_ids"])
            labels[i, :n] = torch.tensor(x["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Shuffled batches of similar-length items, deterministic in (seed, epoch).

    Each epoch: a seeded permutation is cut into mega-batches of ``group`` batches, each sorted
    by length and cut into batches; the batches are then shuffled. With ``world_size > 1`` every
    rank takes every ``world_size``-th batch (the tail that does not divide evenly is dropped so
    all ranks step together).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool = True,
                 group: int = 50, rank: int = 0, world_size: int = 1) -> None:
        self.lengths, self.batch_size, self.seed, self.shuffle = list(lengths), batch_size, seed, shuffle
        self.group, self.rank, self.world_size = group, rank, world_size
        self.epoch = 0
        self.skip = 0  # batches of ``epoch`` already consumed (set when resuming)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        idx = list(range(len(self.lengths)))
        if not self.shuffle:
            idx.sort(key=lambda i: (-self.lengths[i], i))
            batches = [idx[i: i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        else:
            rng = random.Random(self.seed * 100003 + self.epoch)
            rng.shuffle(idx)
            mega = self.batch_size * self.group
            batches = []
            for m in range(0, len(idx), mega):
                chunk = sorted(idx[m: m + mega], key=lambda i: (-self.lengths[i], i))
                batches.extend(chunk[i: i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
            rng.shuffle(batches)
        usable = len(batches) - len(batches) % self.world_size if self.world_size > 1 else len(batches)
        return batches[self.rank: usable: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._batches()
        skip, self.skip = self.skip, 0
        yield from batches[skip:]

    def __len__(self) -> int:
        n = -(-len(self.lengths) // self.batch_size) if not self.shuffle else len(self._batches())
        return n // self.world_size if not self.shuffle and self.world_size > 1 else n


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
