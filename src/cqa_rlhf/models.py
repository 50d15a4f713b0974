"""The model factory: every stage gets its GPT-Neo variant here and nowhere else.

Variants: ``causal`` (policy / SFT), ``reward`` (sequence classification, one scalar, read at
the last real token) and ``value`` (a causal LM plus a scalar value head for PPO). Weights come
from ``init_from`` (an exported stage directory), else ``model.name`` (hub id or local
``save_pretrained`` directory), else a fresh GPT-Neo built from ``model.config``. Loading is
safetensors-only and never runs remote code.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import (
    GPTNeoConfig,
    GPTNeoForCausalLM,
    GPTNeoForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from cqa_rlhf.config import ModelConfig
from cqa_rlhf.errors import DataError

Kind = Literal["causal", "reward", "value"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def fresh_config(model: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> GPTNeoConfig:
    return GPTNeoConfig(
        **{"vocab_size": len(tokenizer), **model.config},
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tie_to_tokenizer(m: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Embeddings cover the tokenizer (a pretrained tokenizer may have gained a pad token), and
    the config names the pad/EOS ids, so padded batches and generation stop correctly."""
    if m.get_input_embeddings().num_embeddings < len(tokenizer):
        m.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    m.config.pad_token_id = tokenizer.pad_token_id
    m.config.eos_token_id = tokenizer.eos_token_id
    if getattr(m, "generation_config", None) is not None:
        m.generation_config.pad_token_id = tokenizer.pad_token_id
        m.generation_config.eos_token_id = tokenizer.eos_token_id
    return m


def _checkpointing(m: PreTrainedModel, model: ModelConfig) -> PreTrainedModel:
    """Gradient checkpointing (active in training mode only; generation keeps its KV cache).
    Non-reentrant: works with frozen inputs and under DDP."""
    if model.gradient_checkpointing:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return m


def build_model(model: ModelConfig, tokenizer: PreTrainedTokenizerBase, kind: Kind,
                init_from: str | Path | None = None) -> nn.Module:
    source = str(init_from) if init_from is not None else model.name
    dtype = _DTYPES[model.dtype]
    if kind in ("causal", "value"):
        if source is not None:
            lm = GPTNeoForCausalLM.from_pretrained(source, use_safetensors=True, dtype=dtype,
                                                   trust_remote_code=False)
        else:
            lm = GPTNeoForCausalLM(fresh_config(model, tokenizer)).to(dtype)
        lm = _checkpointing(_tie_to_tokenizer(lm, tokenizer), model)
        return lm if kind == "causal" else CausalLMWithValueHead(lm)
    new_head = True
    if source is not None:
        rm, info = GPTNeoForSequenceClassification.from_pretrained(
            source, num_labels=1, use_safetensors=True, dtype=dtype, trust_remote_code=False,
            output_loading_info=True)
        new_head = any(k.startswith("score.") for k in info["missing_keys"])
    else:
        config = fresh_config(model, tokenizer)
        config.num_labels = 1
        rm = GPTNeoForSequenceClassification(config).to(dtype)
    rm = _checkpointing(_tie_to_tokenizer(rm, tokenizer), model)
    if new_head:  # N(0, 1/sqrt(d+1)) as in the RLHF literature (NID #15), not the LM's init
        nn.init.normal_(rm.score.weight, std=1 / math.sqrt(rm.config.hidden_size + 1))
    return rm


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; its previous mode comes back even if the block raises."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def exported_dir(path: str | Path, what: str) -> Path:
    """``path`` if it is an exported model directory (a ``config.json`` in it); else a one-line
    error naming ``what`` (the params key or flag that gave the path)."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise DataError(f"{path}: {what} is not an exported model directory (no config.json)")
    return p


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout to p = 0: PPO compares log-probs across forward passes, and dropout
    would make the ratio noisy (ppo-details #13). Pretrained GPT-Neo configs have dropout > 0."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


class CausalLMWithValueHead(nn.Module):
    """A causal LM with a scalar value head on its last hidden state (head initialised to 0,
    so the critic starts neutral). ``forward`` returns logits ``[B, T, V]`` and values ``[B, T]``."""

    def __init__(self, lm: PreTrainedModel) -> None:
        super().__init__()
        self.lm = lm
        self.v_head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      output_hidden_states=True)
        values = self.v_head(out.hidden_states[-1]).squeeze(-1)
        return out.logits, values


class TokenCritic(nn.Module):
    """A separate critic: a reward model's backbone and scalar head read at *every* position,
    so it starts from the reward model (as OpenRLHF and TRL initialise their value model).
    ``forward`` returns values ``[B, T]``."""

    def __init__(self, reward_model: PreTrainedModel) -> None:
        super().__init__()
        self.rm = reward_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.rm.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                     position_ids=position_ids).last_hidden_state
        return self.rm.score(hidden).squeeze(-1).float()


class PolicyWithCritic(nn.Module):
    """A causal LM and a separate :class:`TokenCritic`, with the interface of
    :class:`CausalLMWithValueHead`: ``forward`` returns logits ``[B, T, V]`` and values ``[B, T]``."""

    def __init__(self, lm: PreTrainedModel, critic: TokenCritic) -> None:
        super().__init__()
        self.lm = lm
        self.critic = critic

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        return logits, self.critic(input_ids, attention_mask, position_ids)


def load_frozen(path: str | Path, tokenizer: PreTrainedTokenizerBase, kind: Literal["causal", "reward"],
                dtype: str = "float32") -> PreTrainedModel:
    """An exported stage directory as a frozen model in eval mode (reference policy, reward model)."""
    m = build_model(ModelConfig(dtype=dtype), tokenizer, kind, init_from=path)
    m.eval().requires_grad_(False)
    return disable_dropout(m)


def build_policy(model: ModelConfig, tokenizer: PreTrainedTokenizerBase, sft_dir: str | Path,
                 critic: Literal["shared", "separate"], reward_dir: str | Path) -> nn.Module:
    """PPO's trained model: the SFT policy with a zero-initialised value head on its backbone
    (``shared``), or with a separate critic initialised from the reward model. Dropout off."""
    if critic == "shared":
        return disable_dropout(build_model(model, tokenizer, "value", init_from=sft_dir))
    lm = build_model(model, tokenizer, "causal", init_from=sft_dir)
    return disable_dropout(PolicyWithCritic(lm, TokenCritic(build_model(model, tokenizer, "reward",
                                                                          init_from=reward_dir))))
