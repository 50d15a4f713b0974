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
from transformers import DynamicCache, PreTrainedModel

from cqa_rlhf.errors import ConfigError

from cqa_rlhf.batches import pad_rows
from cqa_rlhf.config import SampleConfig
from cqa_rlhf.exact_math import log as exact_log
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
    (:func:`next_tokens`), so it does not depend on which batch or process it is drawn in."""
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


def _uniforms(n: int, seed: int) -> torch.Tensor:
    """``n`` float64 uniforms [n] from a generator seeded with ``seed``."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _gumbel(u: torch.Tensor) -> torch.Tensor:
    """-log(-log U) of float64 uniforms ``u`` (any shape; overwritten), as float32; the logarithm
    :func:`~cqa_rlhf.exact_math.log`, elementwise, so the draws are the same on every CPU and
    whatever rows are computed together."""
    return exact_log(exact_log(u.clamp_(min=1e-300)).neg_()).neg_().float()


def gumbel_noise(n: int, seed: int) -> torch.Tensor:
    """``n`` standard Gumbel draws [n] from a generator seeded with ``seed``."""
    return _gumbel(_uniforms(n, seed))


NOISE_CHUNK = 1 << 16  # values per pass: rows together while they fit a core's cache (a small vocabulary)


def step_noise(seeds: Sequence[int], step: int, vocab: int) -> torch.Tensor:
    """Gumbel noise [len(seeds), vocab] of decoding step ``step``: one stream per row seed, row
    ``i`` equal to ``gumbel_noise(vocab, seed_i)``. Rows go through the logarithms together, up to
    :data:`NOISE_CHUNK` values at a time (one pass each instead of one per row: six times faster
    at the default's 864 tokens; a 49k vocabulary goes a row at a time)."""
    out = torch.empty(len(seeds), vocab)  # [b, V]
    per = max(1, NOISE_CHUNK // vocab)
    for a in range(0, len(seeds), per):
        u = torch.stack([_uniforms(vocab, (s + step * 0x9E3779B97F4A7C15) % 2 ** 63) for s in seeds[a:a + per]])
        out[a:a + per] = _gumbel(u)
    return out


@torch.no_grad()
def decode(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, sample: SampleConfig, eos_id: int,
           seeds: Sequence[int] | None = None) -> list[list[int]]:
    """Each row's sampled answer ids (up to and including EOS) for left-padded prompts ``ids`` /
    ``mask`` [B, P], with a KV cache; a row that emits EOS leaves the batch, its cache rows too,
    so the batch shrinks as answers end instead of running every row to the longest answer as
    ``generate`` does. The draws are ``generate``'s all the same (tests compare token for token):
    see :func:`next_tokens`."""
    cache = DynamicCache(config=model.config)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # [B, P], as generate numbers them
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                   logits_to_keep=1).logits[:, -1]  # [B, V]
    rows, last, answers = torch.arange(len(ids), device=ids.device), pos[:, -1], [[] for _ in range(len(ids))]
    for step in range(sample.max_new_tokens):
        tokens = next_tokens(logits, rows, step, len(ids), sample, seeds)  # [b]
        for r, t in zip(rows.tolist(), tokens.tolist()):
            answers[r].append(t)
        alive = tokens != eos_id  # [b]
        if step + 1 == sample.max_new_tokens or not bool(alive.any()):
            break
        if not bool(alive.all()):
            keep = alive.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, tokens, mask, last = rows[keep], tokens[keep], mask[keep], last[keep]
        mask, last = torch.cat([mask, mask.new_ones(len(rows), 1)], 1), last + 1  # [b, P + step + 1], [b]
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=last[:, None], cache=cache,
                       use_cache=True).logits[:, -1]
    return answers


def next_tokens(logits: torch.Tensor, rows: torch.Tensor, step: int, batch: int, sample: SampleConfig,
                seeds: Sequence[int] | None) -> torch.Tensor:
    """The next token [b] of the rows still answering (``rows`` [b] of ``batch``) from their
    logits [b, V] at temperature T, by one of two exact samplers of softmax(logits / T):
    - ``seeds``: the Gumbel-max trick, argmax(logits / T + Gumbel noise of (row seed, step)), so an
      answer depends on its prompt, seed and the weights alone, not on its batch or process;
    - none: ``generate``'s draw, ``torch.multinomial`` over the whole batch [batch, V]. It draws
      argmax(probs / E) with E ~ Exp(1) filled in for every row in order, so the rows that
      already ended draw too (from a placeholder): every row then gets the random numbers it
      gets in ``generate`` under the same torch seed."""
    scores = logits.float() / sample.temperature  # [b, V]
    if seeds is not None:
        noise = step_noise([seeds[r] for r in rows.tolist()], step, scores.shape[-1])
        return (scores + noise.to(scores.device)).argmax(-1)
    full = scores.new_zeros(batch, scores.shape[-1])  # [batch, V]
    full[rows] = scores
    return torch.multinomial(torch.softmax(full, -1), 1).squeeze(1)[rows]


def _sample_batch(model: PreTrainedModel, tok, questions: list[str], prompts: list[list[int]],
                  sample: SampleConfig, seeds: Sequence[int] | None = None) -> list[Generation]:
    ids, mask = pad_rows(prompts, tok.pad_token_id, "left")  # [B, P]
    ids, mask = ids.to(model.device), mask.to(model.device)
    filtered = bool(sample.top_k) or sample.top_p < 1.0
    if filtered and seeds is not None:
        raise ConfigError("per-answer seeds sample the full distribution: set sample.top_k 0 and top_p 1")
    if filtered:  # generate's top-k / top-p warpers
        seqs = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=sample.max_new_tokens, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id, use_cache=True, do_sample=True, temperature=sample.temperature,
            top_k=sample.top_k, top_p=sample.top_p,
        )  # [B, P + R]
        rows = seqs[:, ids.shape[1]:].tolist()
    else:
        rows = decode(model, ids, mask, sample, tok.eos_token_id, seeds)
    return [_generation(tok, q, prompt, row) for q, prompt, row in zip(questions, prompts, rows)]


def _generation(tok, question: str, prompt: list[int], row: list[int]) -> Generation:
    """A sampled row (padded after EOS, or not) as a :class:`Generation`."""
    ended = tok.eos_token_id in row
    resp = row[: row.index(tok.eos_token_id) + 1] if ended else row
    text = tok.decode([t for t in resp if t not in (tok.eos_token_id, tok.pad_token_id)], skip_special_tokens=True).strip()
    return Generation(question=question, text=text, prompt_ids=prompt, response_ids=resp, ended=ended)
