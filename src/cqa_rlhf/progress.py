"""What a user sees while a stage runs: progress bars drawn in place, and no library noise.

Bars (tqdm, on stderr) show position, rate and ETA, for training (with the loss, or PPO's score
and KL), ingestion of a dump and generation. ``CQA_PROGRESS=0`` turns them off, ``1`` forces
them on; unset, they are on when stderr is a terminal, so a log file (``dvc repro > log``, CI)
gets no carriage-return lines. Each stage still prints its one summary line on stdout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
ENV = "CQA_PROGRESS"


def progress_enabled() -> bool:
    """``CQA_PROGRESS`` 0/1, else whether stderr is a terminal."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    return sys.stderr.isatty()


def bar(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """``items`` with a progress bar when bars are on; the items alone otherwise."""
    if not progress_enabled():
        return iter(items)
    return iter(tqdm(items, desc=desc, total=total, unit=unit, dynamic_ncols=True, leave=False))


class ReadProgress:
    """A binary stream that draws a bar of the bytes read from it (``total``: the stream's size)."""

    def __init__(self, stream, total: int, desc: str) -> None:
        self._stream = stream
        self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, dynamic_ncols=True, leave=False)

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        self._bar.update(len(data))
        return data

    def close(self) -> None:
        self._bar.close()
        self._stream.close()


def read_progress(stream, total: int, desc: str):
    """``stream`` with a bytes bar when bars are on; ``stream`` itself otherwise."""
    return ReadProgress(stream, total, desc) if progress_enabled() else stream


# Messages that say nothing to a user of this pipeline, whatever they run.
_NOISE = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # torch pytree, inside Lightning
    r"Checkpoint directory .* exists and is not empty.*",  # ours: it holds the resume fingerprint
    r".*does not have many workers which may be a bottleneck.*",  # in-memory lists need no workers
    r"`is_gradient_checkpointing` is deprecated.*",  # peft asks transformers with the old name
    r".*is smaller than the logging interval.*",  # a short run logs less often than log_every_n_steps: fine
)


def quiet() -> None:
    """Silence Lightning's banners (GPU/TPU lines, the litlogger advert), transformers' loading
    bars and known harmless warnings."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    if "transformers" in sys.modules:  # imported before cqa_rlhf set HF_HUB_DISABLE_PROGRESS_BARS
        sys.modules["transformers"].utils.logging.disable_progress_bar()


@contextlib.contextmanager
def transformers_silent() -> Iterator[None]:
    """transformers' warnings off for a call whose outcome the caller checks itself (a reward
    model's load report listing its new head, the embedding-resize notice)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
