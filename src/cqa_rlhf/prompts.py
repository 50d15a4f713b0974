"""The one prompt template and the one way to turn (question, answer) into model inputs.

Every stage (SFT, reward models, PPO, evaluation, the answer command) builds its inputs here,
so the template, the EOS handling and the truncation policy cannot drift between stages.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from cqa_rlhf.config import PromptConfig
from cqa_rlhf.errors import ConfigError

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on the prompt; the answer (and its EOS) otherwise
    prompt_len: int  # tokens before the answer starts
    truncated_answer: bool


_MARK = "\x00QUESTION\x00"


def chat_template(tok: PreTrainedTokenizerBase) -> str:
    """The tokenizer's chat template as a plain template: the text before and after a user turn
    holding ``{question}``, up to where the assistant's answer starts. Refused (ConfigError) when
    the tokenizer has none, or when its assistant turn does not end with the tokenizer's EOS
    (the answer's last label must be the token that ends a turn, so sampling stops there)."""
    if not tok.chat_template:
        raise ConfigError(f"prompt.chat: the tokenizer {tok.name_or_path!r} has no chat template")
    user = [{"role": "user", "content": _MARK}]
    prompt = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    whole = tok.apply_chat_template(user + [{"role": "assistant", "content": "A"}], tokenize=False)
    if not whole.startswith(prompt + "A" + tok.eos_token):
        raise ConfigError(f"prompt.chat: the chat template of {tok.name_or_path!r} does not end the "
                         f"assistant turn with the EOS token {tok.eos_token!r}")
    return prompt.replace(_MARK, "{question}")


class PromptFormatter:
    """Formats prompts and encodes (question, answer) pairs with a fixed truncation policy.

    The template is split around ``{question}`` into a prefix and a suffix that are tokenized
    apart from the question: a byte-level BPE splits words at spaces, so the pieces tokenize as
    the whole prompt does (tests check this), and the question can be cut without touching the
    template. Truncation to ``max_length`` cuts the end of the question first (the title comes
    first and is kept), then, only if the answer alone does not fit, the end of the answer,
    which then gets no EOS: a cut answer must not teach the model to stop mid-sentence.
    """

    def __init__(self, cfg: PromptConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        self.chat = cfg.chat
        self.template = chat_template(tokenizer) if cfg.chat else cfg.template
        self.prefix, self.suffix = self.template.split("{question}")
        self.tok = tokenizer
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("tokenizer needs an EOS and a pad token")
        if tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise ValueError("pad token must differ from EOS (a padded EOS hides the real one)")
        self._prefix_ids = self._ids(self.prefix)
        self._suffix_ids = self._ids(self.suffix)

    def _ids(self, text: str) -> list[int]:
        # verbose=False: a long question or answer is cut on purpose below, so transformers'
        # "Token indices sequence length is longer than the specified maximum" is noise here.
        return self.tok(text, add_special_tokens=False, verbose=False)["input_ids"] if text else []

    def prompt(self, question: str) -> str:
        """The prompt's text: exactly what :meth:`encode_prompt` tokenizes (around the question)."""
        return self.prefix + question + self.suffix

    def answer_text(self, answer: str) -> str:
        """What follows the prompt: one space, then the answer (the plain template ends at
        'Answer:'); under a chat template the assistant turn's text as it stands."""
        return answer.strip() if self.chat else " " + answer.strip()

    def encode_prompt(self, question: str, max_prompt_len: int) -> list[int]:
        """Prompt ids for generation, the question cut from its end to fit ``max_prompt_len``."""
        q = self._ids(question)
        room = max(0, max_prompt_len - len(self._prefix_ids) - len(self._suffix_ids))
        return self._prefix_ids + q[:room] + self._suffix_ids

    def encode(self, question: str, answer: str, max_length: int) -> Encoded:
        """Prompt + answer + EOS within ``max_length``; labels mask the prompt."""
        fixed = len(self._prefix_ids) + len(self._suffix_ids)
        a = self._ids(self.answer_text(answer)) + [self.tok.eos_token_id]
        q = self._ids(question)
        truncated = False
        if fixed + len(q) + len(a) > max_length:
            q = q[: max(0, max_length - fixed - len(a))]
            if fixed + len(q) + len(a) > max_length:
                a = a[: max(1, max_length - fixed - len(q))]  # the cut drops the EOS at the end
                truncated = True
        prompt = self._prefix_ids + q + self._suffix_ids
        return Encoded(
            input_ids=prompt + a,
            labels=[IGNORE_INDEX] * len(prompt) + a,
            prompt_len=len(prompt),
            truncated_answer=truncated,
        )
