"""Sampling answers from a policy: batched, left-padded, KV cache, stops at EOS.

Shared by SFT's sample check, PPO rollouts, evaluation and the answer command.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from cqa_rlhf.batches import pad_rows
from cqa_rlhf.config import SampleConfig
from cqa_rlhf.prompts import PromptFormatter


@dataclass(frozen=True)
class Generation:
    question: str
    text: str  # the answer, decoded without special tokens
    response_ids: list[int]  # up to and including the first EOS (if any)
    ended: bool  # emitted EOS within max_new_tokens


@torch.no_grad()
def generate(model: PreTrainedModel, fmt: PromptFormatter, questions: list[str], sample: SampleConfig,
             seed: int, max_prompt_len: int) -> list[Generation]:
    """One sampled answer per question; deterministic in ``seed`` on CPU."""
    tok = fmt.tok
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    out: list[Generation] = []
    for start in range(0, len(questions), sample.batch_size):
        batch = questions[start: start + sample.batch_size]
        ids, mask = pad_rows([fmt.encode_prompt(q, max_prompt_len) for q in batch], tok.pad_token_id, "left")
        ids, mask = ids.to(model.device), mask.to(model.device)
        seqs = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=sample.max_new_tokens,
            temperature=sample.temperature, top_k=sample.top_k, top_p=sample.top_p,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, use_cache=True,
        )
        for q, row in zip(batch, seqs[:, ids.shape[1]:].tolist()):
            ended = tok.eos_token_id in row
            resp = row[: row.index(tok.eos_token_id) + 1] if ended else row
            text = tok.decode([t for t in resp if t not in (tok.eos_token_id, tok.pad_token_id)],
                              skip_special_tokens=True).strip()
            out.append(Generation(question=q, text=text, response_ids=resp, ended=ended))
    model.train(was_training)
    return out
