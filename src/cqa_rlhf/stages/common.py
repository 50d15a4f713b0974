"""What every stage entry point shares: its argument parser, and params.yaml read once into the
typed sections a stage asks for (the shared ``prompt``/``model``/``tokenizer``/``trainer``
sections as one :class:`Shared`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

from cqa_rlhf.config import (
    ModelConfig,
    PromptConfig,
    Section,
    TokenizerConfig,
    TrainerConfig,
    TrainerOverride,
    parse_section,
    read_params,
    seeded,
)
from cqa_rlhf import numerics
from cqa_rlhf.errors import ConfigError
from cqa_rlhf.progress import quiet

C = TypeVar("C", bound=Section)


def stage_parser(description: str | None) -> argparse.ArgumentParser:
    """The parser of every stage (``--params``); a stage adds its own flags (``--kind``, ``--policy``)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return parser


def stage_args(description: str | None, argv: list[str] | None = None) -> argparse.Namespace:
    return stage_parser(description).parse_args(argv)


def entry_args(description: str | None, flag: str, argv: list[str] | None = None, **argument) -> tuple[Params, str]:
    """A stage run once per entry of a params mapping (``--policy``, ``--name``, ``--kind``):
    params read, and the entry's name (``argument``: argparse's options of the flag)."""
    parser = stage_parser(description)
    parser.add_argument(flag, required=True, **argument)
    args = parser.parse_args(argv)
    return Params.read(args.params), getattr(args, flag.removeprefix("--"))


def entry_name(name: str, entries: Iterable[str], key: str, params_path: str) -> str:
    """``name`` when it is one of ``entries`` (the keys of params ``key``), else a one-line
    params error naming the key and the entries there are."""
    entries = sorted(entries)
    if name not in entries:
        raise ConfigError(f"{params_path}: {key}.{name}: no such entry (have {', '.join(entries) or 'none'})")
    return name


@dataclass(frozen=True)
class Shared:
    """The sections every training stage reads besides its own."""

    prompt: PromptConfig
    model: ModelConfig
    tokenizer: TokenizerConfig
    trainer: TrainerConfig

    def trainer_for(self, override: TrainerOverride) -> TrainerConfig:
        """The shared ``trainer`` section with a stage's ``<stage>.trainer`` changes applied."""
        return override.apply(self.trainer)

    def resolved(self, stage: str, cfg: Section | dict) -> dict:
        """The params a stage exports beside its model (and fingerprints its run with)."""
        own = cfg if isinstance(cfg, dict) else cfg.model_dump(mode="json")
        return {"prompt": self.prompt.model_dump(mode="json"), "model": self.model.model_dump(mode="json"),
                "trainer": self.trainer.model_dump(mode="json"), stage: own, "numerics": numerics.state()}


@dataclass(frozen=True)
class Params:
    """params.yaml, read once; typed sections on demand (errors name the file and the key)."""

    path: str
    data: dict

    @classmethod
    def read(cls, path: str) -> Params:
        quiet()  # every stage starts here: no library banners or loading bars from now on
        if "torch" in sys.modules:  # a stage that computes with torch: its numeric pin must hold
            numerics.check()
        return cls(path, seeded(read_params(path), path))

    def section(self, name: str, model: type[C]) -> C:
        return parse_section(self.data, name, model, self.path)

    def shared(self) -> Shared:
        return Shared(self.section("prompt", PromptConfig), self.section("model", ModelConfig),
                      self.section("tokenizer", TokenizerConfig), self.section("trainer", TrainerConfig))
