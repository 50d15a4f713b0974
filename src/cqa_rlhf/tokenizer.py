"""Tokenizer: the pretrained model's own, or a byte-level BPE trained on the training split.

Either way the result is a ``transformers`` tokenizer directory with an EOS token and a pad
token distinct from it (pad = EOS hides the real EOS from attention masks and labels, a known
cause of policies that never stop: TRL #1623, #734).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from cqa_rlhf.config import ModelConfig, TokenizerConfig


def train_bpe(texts: Iterator[str], cfg: TokenizerConfig, model_max_length: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (as GPT-2/GPT-Neo) with EOS and PAD as special tokens (ids 0 and 1)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[cfg.eos_token, cfg.pad_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=cfg.eos_token,
        bos_token=cfg.eos_token,
        pad_token=cfg.pad_token,
        model_max_length=model_max_length,
        padding_side="right",
    )


def pretrained_tokenizer(model: ModelConfig, cfg: TokenizerConfig) -> PreTrainedTokenizerBase:
    """The pretrained model's tokenizer, given a pad token distinct from EOS if it lacks one."""
    assert model.name is not None
    tok = AutoTokenizer.from_pretrained(model.name)  # never trust_remote_code
    if tok.eos_token_id is None:
        raise ValueError(f"{model.name}: tokenizer has no EOS token")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": cfg.pad_token})
    tok.padding_side = "right"
    return tok


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(str(path))
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id, path
    return tok


def same_vocabulary(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Both map every token to the same id (and agree on EOS and pad): ids from one are ids of the other."""
    return (a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id
            and a.pad_token_id == b.pad_token_id)
