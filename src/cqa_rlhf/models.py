"""The model factory: every stage gets its model here and nowhere else.

Any causal LM family transformers' Auto classes cover (GPT-Neo is the default; GPT-2,
GPT-NeoX/Pythia and Llama/SmolLM2 are tested). Variants: ``causal`` (policy / SFT), ``reward``
(sequence classification, one scalar, read at the last real token) and ``value`` (a causal LM
plus a scalar value head for PPO). Weights come from ``init_from`` (an exported stage
directory), else ``model.name`` (hub id or local ``save_pretrained`` directory), else a fresh
model built from ``model.config``. Loading is safetensors-only and never runs remote code.
With ``lora``, peft adapters wrap the model (heads trained in full); :func:`merge_lora` folds
them back before export, so exported directories load without peft.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPTNeoConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from cqa_rlhf.config import LoraConfig, ModelConfig
from cqa_rlhf.errors import ConfigError, DataError
from cqa_rlhf.exact_math import use_thread_free_layer_norms
from cqa_rlhf.progress import transformers_silent

Kind = Literal["causal", "reward", "value"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def fresh_config(model: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """``model.config`` as a GPT-Neo config, or as the family its ``model_type`` names."""
    fields = {"vocab_size": len(tokenizer), **model.config}
    ids = {"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    model_type = fields.pop("model_type", None)
    if model_type is None:
        return GPTNeoConfig(**fields, **ids)
    return AutoConfig.for_model(str(model_type), **fields, **ids)


def num_layers(model: nn.Module) -> int:
    """Transformer blocks of any family (``num_hidden_layers`` is every config's common name)."""
    return int(unwrap(model).config.num_hidden_layers)


def _tie_to_tokenizer(m: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Embeddings cover the tokenizer (a pretrained tokenizer may have gained a pad token), and
    the config names the pad/EOS ids, so padded batches and generation stop correctly."""
    if m.get_input_embeddings().num_embeddings < len(tokenizer):
        with transformers_silent():  # its notice says what mean_resizing does; we asked for it
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
        m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return m


def build_model(model: ModelConfig, tokenizer: PreTrainedTokenizerBase, kind: Kind,
                init_from: str | Path | None = None, lora: bool = False) -> nn.Module:
    """A ``kind`` model from ``init_from``, ``model.name`` or ``model.config``; with ``lora``,
    wrapped in ``model.lora`` adapters (the reward head and value head train in full)."""
    source = str(init_from) if init_from is not None else model.name
    if kind in ("causal", "value"):
        lm = _checkpointing(_tie_to_tokenizer(_load(AutoModelForCausalLM, source, model, tokenizer), tokenizer), model)
        lm = with_lora(lm, model.lora, "CAUSAL_LM") if lora else lm
        return lm if kind == "causal" else CausalLMWithValueHead(lm)
    rm, new_head = _load_reward(source, model, tokenizer)
    rm = _checkpointing(_tie_to_tokenizer(rm, tokenizer), model)
    if new_head:  # N(0, 1/sqrt(d+1)) as in the RLHF literature (NID #15), not the LM's init
        nn.init.normal_(rm.score.weight, std=1 / math.sqrt(rm.config.hidden_size + 1))
    return with_lora(rm, model.lora, "SEQ_CLS") if lora else rm


def _load(auto, source: str | None, model: ModelConfig, tokenizer: PreTrainedTokenizerBase,
          **kwargs) -> PreTrainedModel:
    """``auto.from_pretrained(source)`` (safetensors, no remote code), or a fresh model."""
    dtype = _DTYPES[model.dtype]
    if source is not None:
        loaded = auto.from_pretrained(source, use_safetensors=True, dtype=dtype, trust_remote_code=False, **kwargs)
        # (model, loading info) when kwargs ask for it; LayerNorm gradients free of the thread count
        use_thread_free_layer_norms(loaded[0] if isinstance(loaded, tuple) else loaded)
        return loaded
    try:  # a family's own checks (e.g. heads must divide the width) become one params error
        config = fresh_config(model, tokenizer)
        for key, value in kwargs.items():
            setattr(config, key, value)
        built = auto.from_config(config)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model.config: {str(exc).splitlines()[0]}") from None
    return use_thread_free_layer_norms(built.to(dtype))


def _load_reward(source: str | None, model: ModelConfig,
                 tokenizer: PreTrainedTokenizerBase) -> tuple[PreTrainedModel, bool]:
    """A sequence-classification model with one label, and whether its ``score`` head is new."""
    if source is None:
        return _load(AutoModelForSequenceClassification, None, model, tokenizer, num_labels=1), True
    with transformers_silent():  # its load report lists the new head: checked here instead
        rm, info = _load(AutoModelForSequenceClassification, source, model, tokenizer, num_labels=1,
                         output_loading_info=True)
    missing = sorted(k for k in info["missing_keys"] if not k.startswith("score."))
    if missing:
        raise DataError(f"{source}: weights missing for a reward model: {', '.join(missing[:5])}")
    return rm, any(k.startswith("score.") for k in info["missing_keys"])


def with_lora(m: PreTrainedModel, cfg: LoraConfig, task: Literal["CAUSAL_LM", "SEQ_CLS"]) -> nn.Module:
    """``m`` with fresh LoRA adapters (B = 0: the wrapped model computes what ``m`` did); every
    base weight frozen, the ``score`` head of a reward model trained in full."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    target = linear_names(m) if cfg.target_modules == "all-linear" else cfg.target_modules
    n = int(m.config.num_hidden_layers)
    layers = sorted({i % n for i in cfg.layers}) or None
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target,
                              layers_to_transform=layers, task_type=task,
                              modules_to_save=["score"] if task == "SEQ_CLS" else None)
    return get_peft_model(m, peft_cfg)


def linear_names(m: PreTrainedModel) -> list[str]:
    """peft's ``all-linear`` spelt out (peft refuses the string with ``layers_to_transform``):
    the names of every linear layer (GPT-2's ``Conv1D`` too) but the output head and ``score``."""
    head = m.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, mod in m.named_modules()
             if type(mod).__name__ in ("Linear", "Conv1D") and mod is not head and name.rsplit(".", 1)[-1] != "score"}
    return sorted(names)


def is_lora(m: nn.Module) -> bool:
    return type(m).__module__.startswith("peft.")


def unwrap(m: nn.Module) -> PreTrainedModel:
    """The transformers model under a peft wrapper (adapters still injected), or ``m``."""
    return m.get_base_model() if is_lora(m) else m


def merge_lora(m: nn.Module) -> nn.Module:
    """``m`` with every LoRA adapter folded into its base weights and the peft wrappers gone:
    a plain transformers model (or value-head / critic wrapper) that loads without peft."""
    if is_lora(m):
        return m.merge_and_unload()
    if isinstance(m, CausalLMWithValueHead | PolicyWithCritic):
        m.lm = merge_lora(m.lm)
    if isinstance(m, PolicyWithCritic):
        m.critic.rm = merge_lora(m.critic.rm)
    return m


class AdapterFreeReference(nn.Module):
    """PPO's frozen reference under LoRA: the policy's own base weights with its adapters
    switched off, as TRL and OpenRLHF do, so no second copy of the model sits in memory.
    ``forward`` returns what the policy's base model returns (logits ``[B, T, V]``)."""

    def __init__(self, policy_lm: nn.Module) -> None:
        super().__init__()
        self._policy = [policy_lm]  # a list: not a submodule, its weights stay the policy's alone

    @property
    def config(self) -> PretrainedConfig:
        return self._policy[0].config

    def forward(self, *args, **kwargs):
        lm = self._policy[0]
        with lm.disable_adapter(), torch.no_grad():
            return lm(*args, **kwargs)


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
        rm = unwrap(self.rm)  # the backbone and head of any family (``rm.transformer`` is GPT's)
        hidden = rm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids).last_hidden_state
        return rm.score(hidden).squeeze(-1).float()


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
                 critic: Literal["shared", "separate"], reward_dir: str | Path, lora: bool = False) -> nn.Module:
    """PPO's trained model: the SFT policy with a zero-initialised value head on its backbone
    (``shared``), or with a separate critic initialised from the reward model. Dropout off.
    With ``lora`` the policy (and a separate critic) train adapters; the heads train in full."""
    if critic == "shared":
        return disable_dropout(build_model(model, tokenizer, "value", init_from=sft_dir, lora=lora))
    lm = build_model(model, tokenizer, "causal", init_from=sft_dir, lora=lora)
    rm = build_model(model, tokenizer, "reward", init_from=reward_dir, lora=lora)
    return disable_dropout(PolicyWithCritic(lm, TokenCritic(rm)))


def reference_for(policy_lm: nn.Module, sft_dir: str | Path, tokenizer: PreTrainedTokenizerBase,
                  dtype: str) -> nn.Module:
    """The frozen reference of online RL: the policy's base with its adapters off under LoRA (the
    policy starts from ``sft_dir`` with zero adapters, so that base is the SFT model), else a
    loaded copy of ``sft_dir``."""
    if is_lora(policy_lm):
        return AdapterFreeReference(policy_lm)
    return load_frozen(sft_dir, tokenizer, "causal", dtype)


# --------------------------------------------------------------------------------------------
# GGUF checkpoints: converted once into a float32 save_pretrained directory
# --------------------------------------------------------------------------------------------
def load_gguf(file: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The GGUF file's model, dequantised to float32 by transformers (``gguf`` package), and its tokenizer."""
    if not file.is_file():
        raise DataError(f"{file}: GGUF file not found")
    tok = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
    return model.eval(), tok


def plain_copy(gguf_model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a model built from the config without ``quantization_config``: the
    GGUF-loaded model refuses ``save_pretrained``; this one saves and reloads as any model."""
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    return model.eval()


@torch.no_grad()
def logits_gap(a: PreTrainedModel, b: PreTrainedModel, ids: torch.Tensor) -> float:
    """Largest absolute difference of two models' logits on ``ids`` [1, T] (0.0: identical)."""
    return float((a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max())
