"""Best-of-N as a policy: N answers sampled from a policy, a judge picks one (Stiennon et al.
2020; Gao et al. 2022). Nothing is trained; the maths (selection, KL) is in
:mod:`cqa_rlhf.bon_math`."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedModel

from cqa_rlhf.bon_math import best_index, empirical_kl
from cqa_rlhf.config import SampleConfig
from cqa_rlhf.generation import Generation, generate, row_seed
from cqa_rlhf.prompts import PromptFormatter


def sample_pool(policy: PreTrainedModel, fmt: PromptFormatter, questions: list[str], sample: SampleConfig,
                seed: int, max_prompt_length: int, n: int, progress: str | None = None) -> list[Generation]:
    """``n`` answers to each question, groups contiguous ([Q * n]); each answer from its own seed
    (question, index in its group), so a pool does not depend on batching."""
    flat = [q for q in questions for _ in range(n)]
    seeds = [row_seed(seed, q, i % n) for i, q in enumerate(flat)]
    return generate(policy, fmt, flat, sample, seed, max_prompt_length, progress=progress, row_seeds=seeds)


def pick(scores: Sequence[float], n: int) -> list[int]:
    """The flat index of each group's best answer by ``scores`` [Q * n] (the first of equal ones)."""
    return [g * n + best_index(scores[g * n: (g + 1) * n]) for g in range(len(scores) // n)]


def group_kls(scores: Sequence[float], pool: Sequence[Generation], n: int) -> list[float]:
    """Per question, the sampled KL estimate of Best-of-n to the sampling policy: the exact KL of
    picking from the question's own n answers (equal answers, i.e. equal ids, merged)."""
    return [empirical_kl(scores[g * n: (g + 1) * n], [tuple(x.response_ids) for x in pool[g * n: (g + 1) * n]], n)
            for g in range(len(pool) // n)]
