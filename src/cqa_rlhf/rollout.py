"""The online-RL core shared by PPO (and the methods after it): prompts -> sampled ids ->
:class:`Sequences` -> policy and reference log-probs -> reward-model scores.

Token ids are kept end to end: the prompt ids the policy answered and the response ids it sampled
are the ids whose log-probs are taken and that the reward model scores. Nothing is decoded and
re-encoded on the way, so the reward model never scores tokens the policy did not sample. Only
when the reward model has another tokenizer (another vocabulary) is the answer re-tokenised, on
purpose and in one place: :func:`score_generations`, through the reward model's own template.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from cqa_rlhf.batches import pad_rows, position_ids
from cqa_rlhf.config import SampleConfig
from cqa_rlhf.generation import Generation, generate
from cqa_rlhf.models import eval_mode
from cqa_rlhf.ppo_math import logprobs_from_logits
from cqa_rlhf.prompts import PromptFormatter
from cqa_rlhf.reward import reward_forward, score


@dataclass
class Sequences:
    """Prompt + response tokens of B rollouts: ``input_ids``/``attention_mask``/``position_ids``
    [B, P + R] (prompts left-padded to P, responses right-padded to R), ``response`` [B, R] and
    ``mask`` [B, R], 1 on response tokens up to and including the first EOS."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response: torch.Tensor
    mask: torch.Tensor

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1] - self.response.shape[1]

    def select(self, idx: torch.Tensor) -> Sequences:
        return Sequences(*(t[idx] for t in self.tensors()))

    def to(self, device: torch.device | str) -> Sequences:
        return Sequences(*(t.to(device) for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.input_ids, self.attention_mask, self.position_ids, self.response, self.mask


def build_sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> Sequences:
    """Left-padded prompts followed by right-padded responses; positions count real tokens only
    (ppo-details #11), so a row's log-probs do not depend on its padding."""
    q_ids, q_mask = pad_rows(prompts, pad_id, "left")
    r_ids, r_mask = pad_rows(responses, pad_id, "right")
    mask = torch.cat([q_mask, r_mask], dim=1)
    return Sequences(torch.cat([q_ids, r_ids], dim=1), mask, position_ids(mask), r_ids, r_mask.float())


def generation_sequences(gens: Sequence[Generation], pad_id: int) -> Sequences:
    """The exact prompt and response ids of sampled answers, as :class:`Sequences`."""
    return build_sequences([g.prompt_ids for g in gens], [g.response_ids for g in gens], pad_id)


def response_slice(x: torch.Tensor, seq: Sequences) -> torch.Tensor:
    """Positions P-1 .. P+R-2 of ``x`` [B, P+R, ...]: the states that predict response tokens 0..R-1."""
    p, r = seq.prompt_len, seq.response.shape[1]
    return x[:, p - 1: p - 1 + r]


def lm_outputs(lm: PreTrainedModel, seq: Sequences, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits over response positions [B, R, V], log-probs of the response [B, R]) under a
    causal LM at the sampling temperature, with gradients (the learner's forward)."""
    logits = lm(input_ids=seq.input_ids, attention_mask=seq.attention_mask, position_ids=seq.position_ids).logits
    logits = response_slice(logits, seq)
    return logits, logprobs_from_logits(logits, seq.response, temperature)


@torch.no_grad()
def sequence_logprobs(lm: PreTrainedModel, seq: Sequences, temperature: float) -> torch.Tensor:
    """Log-probs [B, R] of the response under a causal LM, at the sampling temperature."""
    return lm_outputs(lm, seq, temperature)[1]


@torch.no_grad()
def score_generations(reward_model: PreTrainedModel, gens: Sequence[Generation], pad_id: int, max_length: int,
                      batch_size: int, retokenize: PromptFormatter | None = None) -> list[float]:
    """The reward model's score of each sampled answer. With the policy's tokenizer
    (``retokenize`` None) it scores the exact ids the policy saw and sampled (prompt + response,
    EOS included when it was sampled; never more than ``max_length``). With another tokenizer,
    ``retokenize`` (a formatter over the reward model's tokenizer) encodes the decoded answer
    with the reward model's template, as the reward stage trained it. Batches are sorted by
    length; a score depends on neither padding nor batch company."""
    if retokenize is not None:
        return score(reward_model, retokenize, [(g.question, g.text) for g in gens], max_length, batch_size)
    rows = [(g.prompt_ids + g.response_ids)[:max_length] for g in gens]
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
    out = [0.0] * len(rows)
    with eval_mode(reward_model):
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            ids, mask = pad_rows([rows[i] for i in idx], pad_id)  # [b, T] right-padded
            scores = reward_forward(reward_model, ids.to(reward_model.device), mask.to(reward_model.device))
            for i, s in zip(idx, scores.tolist()):
                out[i] = s
    return out


@dataclass
class Rollout:
    """B sampled answers and what the learner needs of them (response-shaped tensors masked)."""

    gens: list[Generation]
    seq: Sequences
    ended: torch.Tensor  # [B] bool: emitted EOS
    raw_scores: torch.Tensor  # [B] the reward model's score
    logprobs: torch.Tensor  # [B, R] the policy at sampling time
    ref_logprobs: torch.Tensor  # [B, R] the frozen reference
    values: torch.Tensor | None = None  # [B, R] a critic's values, when the policy pass gives them

    @property
    def questions(self) -> list[str]:
        return [g.question for g in self.gens]

    @property
    def answers(self) -> list[str]:
        return [g.text for g in self.gens]


# A policy pass: a micro-batch of sequences -> (log-probs [b, R], values [b, R] or None).
PolicyPass = Callable[[Sequences], tuple[torch.Tensor, torch.Tensor | None]]


class RolloutEngine:
    """Samples answers from a policy and measures them: log-probs of the policy and of the frozen
    ``reference``, and scores of the frozen ``reward_model``. Forward passes run in micro-batches
    of ``micro_batch_size``: the logits of a whole rollout batch ([B, P+R, V] in float32) would be
    the largest tensor of a run (4.9 GB for 64 x 384 tokens of GPT-Neo's vocabulary)."""

    def __init__(self, fmt: PromptFormatter, sample: SampleConfig, max_prompt_length: int, max_length: int,
                 micro_batch_size: int, reference: PreTrainedModel, reward_model: PreTrainedModel,
                 reward_fmt: PromptFormatter | None = None) -> None:
        self.fmt, self.sample_cfg = fmt, sample
        self.max_prompt_length, self.max_length, self.micro_batch_size = max_prompt_length, max_length, micro_batch_size
        self.reference, self.reward_model, self.reward_fmt = reference, reward_model, reward_fmt

    def to(self, device: torch.device | str) -> None:
        self.reference.to(device)
        self.reward_model.to(device)

    def sample(self, lm: PreTrainedModel, questions: list[str], seed: int,
               row_seeds: Sequence[int] | None = None) -> tuple[list[Generation], Sequences]:
        """One answer per question (KV cache, left padding, stop at EOS) and its exact ids as
        sequences; with ``row_seeds``, each answer drawn from its own seed."""
        gens = generate(lm, self.fmt, questions, self.sample_cfg, seed, self.max_prompt_length, row_seeds=row_seeds)
        return gens, generation_sequences(gens, self.fmt.tok.pad_token_id).to(lm.device)

    def chunks(self, seq: Sequences) -> list[Sequences]:
        n, size = seq.input_ids.shape[0], self.micro_batch_size
        return [seq.select(torch.arange(i, min(i + size, n), device=seq.input_ids.device)) for i in range(0, n, size)]

    def logprobs(self, lm: PreTrainedModel, seq: Sequences) -> torch.Tensor:
        """Log-probs [B, R] of the responses under ``lm`` (eval mode, no gradient), micro-batched."""
        with eval_mode(lm):
            return torch.cat([sequence_logprobs(lm, c, self.sample_cfg.temperature) for c in self.chunks(seq)])

    @torch.no_grad()
    def rollout(self, lm: PreTrainedModel, questions: list[str], seed: int,
                policy_pass: PolicyPass | None = None, row_seeds: Sequence[int] | None = None) -> Rollout:
        """1. sample (``row_seeds``: one seed per answer); 2. the policy's log-probs at sampling
        time (``policy_pass`` when the learner also needs values from the same forward); 3. the
        reference's log-probs; 4. reward scores."""
        gens, seq = self.sample(lm, questions, seed, row_seeds)
        if policy_pass is None:
            logprobs, values = self.logprobs(lm, seq), None
        else:
            parts = [policy_pass(c) for c in self.chunks(seq)]
            logprobs = torch.cat([p[0] for p in parts])
            values = torch.cat([p[1] for p in parts]) * seq.mask if parts[0][1] is not None else None
        ref_logprobs = self.logprobs(self.reference, seq)
        raw = score_generations(self.reward_model, gens, self.fmt.tok.pad_token_id, self.max_length,
                                self.sample_cfg.batch_size, self.reward_fmt)
        device = seq.input_ids.device
        return Rollout(gens, seq, torch.tensor([g.ended for g in gens], device=device), torch.tensor(raw, device=device),
                       logprobs * seq.mask, ref_logprobs * seq.mask, values)


@torch.no_grad()
def kl_to_reference(policy: PreTrainedModel, reference: PreTrainedModel, gens: Sequence[Generation], pad_id: int,
                    temperature: float, batch_size: int = 32) -> list[float]:
    """Per-answer KL estimate (k1, nats): sum over the answer's tokens of log pi - log pi_ref, on
    answers sampled from ``policy`` (their exact ids)."""
    out: list[float] = []
    with eval_mode(policy), eval_mode(reference):
        for start in range(0, len(gens), batch_size):
            seq = generation_sequences(gens[start: start + batch_size], pad_id).to(policy.device)
            logp = sequence_logprobs(policy, seq, temperature)
            ref = sequence_logprobs(reference, seq, temperature)
            out.extend(((logp - ref) * seq.mask).sum(1).tolist())
    return out


def policy_outputs(model: nn.Module, seq: Sequences, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits over response positions [B, R, V], log-probs of the response [B, R], values [B, R])
    of a policy with a value head or critic (``model(ids, mask, positions) -> (logits, values)``)."""
    logits, values = model(seq.input_ids, seq.attention_mask, seq.position_ids)
    logits = response_slice(logits, seq)
    return logits, logprobs_from_logits(logits, seq.response, temperature), response_slice(values, seq).float()
