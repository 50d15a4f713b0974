"""Sampling answers from a policy: batched, left-padded, KV cache, stops at EOS.

Shared by SFT's sample check, the rollouts of online RL (:mod:`cqa_rlhf.rollout`), evaluation and
the answer command. A :class:`Generation` keeps the token ids the policy saw and sampled, so
later log-probs and reward scores use exactly those ids rather than a re-tokenised text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel

from cqa_rlhf.errors import ConfigError

from cqa_rlhf.batches import pad_rows
from cqa_rlhf.config import SampleConfig
from cqa_rlhf.models import eval_mode
from cqa_rlhf.progress import bar
from cqa_rlhf.prompts import PromptFormatter


@dataclass(frozen=True)
class Generation:
    question: str
    text: str  # the answer, decoded without special tokens
    prompt_ids: list[int]  # the encoded prompt the policy answered (question cut to max_prompt_len)
    response_ids: list[int]  # up to and including the first EOS (if any)
    ended: bool  # emitted EOS within max_new_tokens


@torch.no_grad()
def generate(model: PreTrainedModel, fmt: PromptFormatter, questions: list[str], sample: SampleConfig,
             seed: int, max_prompt_len: int, progress: str | None = None,
             row_seeds: Sequence[int] | None = None) -> list[Generation]:
    """One sampled answer per question; deterministic in ``seed`` on CPU. ``progress``: the
    label of a progress bar over the batches (none by default: rollouts run inside a fit).
    ``row_seeds`` (one per question): each answer drawn from its own seed instead
    (:class:`GumbelSampler`), so it does not depend on which batch or process it is drawn in."""
    if row_seeds is not None and len(row_seeds) != len(questions):
        raise ValueError("row_seeds: one seed per question")
    torch.manual_seed(seed)
    prompts = [fmt.encode_prompt(q, max_prompt_len) for q in questions]
    starts = range(0, len(questions), sample.batch_size)
    if progress is not None:
        starts = bar(starts, progress, total=len(starts), unit="batch")
    out: list[Generation] = []
    with eval_mode(model):
        for start in starts:
            stop = start + sample.batch_size
            seeds = None if row_seeds is None else row_seeds[start:stop]
            out.extend(_sample_batch(model, fmt.tok, questions[start:stop], prompts[start:stop], sample, seeds))
    return out


def row_seed(seed: int, question: str, index: int) -> int:
    """The seed of answer ``index`` to ``question`` under ``seed`` (63 bits of a sha256)."""
    digest = hashlib.sha256(f"{seed}\x00{index}\x00{question}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class GumbelSampler(LogitsProcessor):
    """Sampling from softmax(logits / T) as argmax(logits / T + Gumbel noise) (the Gumbel-max
    trick: an exact sample), with one noise stream per row, seeded by the row's seed and the
    decoding step. Run under greedy decoding, each answer is a function of its prompt, its seed
    and the weights alone: not of its batch company or of the process that draws it."""

    def __init__(self, seeds: Sequence[int], temperature: float) -> None:
        self.seeds, self.temperature, self.step = list(seeds), temperature, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        vocab = scores.shape[-1]
        noise = torch.stack([gumbel_noise(vocab, (s + self.step * 0x9E3779B97F4A7C15) % 2 ** 63) for s in self.seeds])
        self.step += 1
        return scores.float() / self.temperature + noise.to(scores.device)  # [B, V]


def gumbel_noise(n: int, seed: int) -> torch.Tensor:
    """``n`` standard Gumbel draws, -log(-log U), from a generator seeded with ``seed``."""
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return -torch.log(-torch.log(u.clamp(min=1e-300))).float()


def _sample_batch(model: PreTrainedModel, tok, questions: list[str], prompts: list[list[int]],
                  sample: SampleConfig, seeds: Sequence[int] | None = None) -> list[Generation]:
    ids, mask = pad_rows(prompts, tok.pad_token_id, "left")  # [B, P]
    if seeds is None:
        how = dict(do_sample=True, temperature=sample.temperature, top_k=sample.top_k, top_p=sample.top_p)
    else:
        if sample.top_k or sample.top_p < 1.0:
            raise ConfigError("per-answer seeds sample the full distribution: set sample.top_k 0 and top_p 1")
        how = dict(do_sample=False, num_beams=1, temperature=None, top_k=None, top_p=None,
                   logits_processor=LogitsProcessorList([GumbelSampler(seeds, sample.temperature)]))
    seqs = model.generate(
        input_ids=ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=sample.max_new_tokens,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, use_cache=True, **how,
    )  # [B, P + R]
    out = []
    for q, prompt, row in zip(questions, prompts, seqs[:, ids.shape[1]:].tolist()):
        ended = tok.eos_token_id in row
        resp = row[: row.index(tok.eos_token_id) + 1] if ended else row
        text = tok.decode([t for t in resp if t not in (tok.eos_token_id, tok.pad_token_id)],
                          skip_special_tokens=True).strip()
        out.append(Generation(question=q, text=text, prompt_ids=prompt, response_ids=resp, ended=ended))
    return out
