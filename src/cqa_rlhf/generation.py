"""Sampling answers from a policy: batched, left-padded, KV cache, stops at EOS.

Shared by SFT's sample check, the rollouts of online RL (:mod:`cqa_rlhf.rollout`), evaluation and
the answer command. A :class:`Generation` keeps the token ids the policy saw and sampled, so
later log-probs and reward scores use exactly those ids rather than a re-tokenised text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

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
             seed: int, max_prompt_len: int, progress: str | None = None) -> list[Generation]:
    """One sampled answer per question; deterministic in ``seed`` on CPU. ``progress``: the
    label of a progress bar over the batches (none by default: rollouts run inside a fit)."""
    torch.manual_seed(seed)
    prompts = [fmt.encode_prompt(q, max_prompt_len) for q in questions]
    starts = range(0, len(questions), sample.batch_size)
    if progress is not None:
        starts = bar(starts, progress, total=len(starts), unit="batch")
    out: list[Generation] = []
    with eval_mode(model):
        for start in starts:
            stop = start + sample.batch_size
            out.extend(_sample_batch(model, fmt.tok, questions[start:stop], prompts[start:stop], sample))
    return out


def _sample_batch(model: PreTrainedModel, tok, questions: list[str], prompts: list[list[int]],
                  sample: SampleConfig) -> list[Generation]:
    ids, mask = pad_rows(prompts, tok.pad_token_id, "left")  # [B, P]
    seqs = model.generate(
        input_ids=ids.to(model.device), attention_mask=mask.to(model.device), do_sample=True,
        max_new_tokens=sample.max_new_tokens, temperature=sample.temperature, top_k=sample.top_k,
        top_p=sample.top_p, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, use_cache=True,
    )  # [B, P + R]
    out = []
    for q, prompt, row in zip(questions, prompts, seqs[:, ids.shape[1]:].tolist()):
        ended = tok.eos_token_id in row
        resp = row[: row.index(tok.eos_token_id) + 1] if ended else row
        text = tok.decode([t for t in resp if t not in (tok.eos_token_id, tok.pad_token_id)],
                          skip_special_tokens=True).strip()
        out.append(Generation(question=q, text=text, prompt_ids=prompt, response_ids=resp, ended=ended))
    return out
