"""Typed stage configs loaded from ``params.yaml``.

Each stage reads exactly one section (named after the stage) into a frozen pydantic model that
rejects unknown keys and wrong types, so a typo in ``params.yaml`` fails loudly with the key's
dotted path instead of silently falling back to a default. No raw dicts travel past ``main()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cqa_rlhf.errors import ConfigError

C = TypeVar("C", bound="Section")


class Section(BaseModel):
    """Base of every params section: strict types, no unknown keys, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# --------------------------------------------------------------------------------------------
# synth: the embedded default site
# --------------------------------------------------------------------------------------------
class SynthConfig(Section):
    """The offline synthetic community-QA site, written as a Stack Exchange dump."""

    out: str = "data/raw/synthetic"  # directory; the dump is <out>/Posts.xml
    seed: int = 1234
    n_questions: int = Field(2000, ge=1)
    min_answers: int = Field(1, ge=0)
    max_answers: int = Field(6, ge=1)
    p_accepted: float = Field(0.8, ge=0.0, le=1.0)  # questions that have an accepted answer
    p_accept_best: float = Field(0.85, ge=0.0, le=1.0)  # accepted answer is the gold-best one
    vote_noise: float = Field(1.5, ge=0.0)  # std of the Gaussian noise on votes

    @model_validator(mode="after")
    def _answers_range(self) -> SynthConfig:
        if self.min_answers > self.max_answers:
            raise ValueError("min_answers must be <= max_answers")
        return self


# --------------------------------------------------------------------------------------------
# data: ingestion of raw dumps into the prepared Parquet tables
# --------------------------------------------------------------------------------------------
class SplitRatios(Section):
    train: float = Field(0.9, ge=0.0, le=1.0)
    val: float = Field(0.05, ge=0.0, le=1.0)
    test: float = Field(0.05, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitRatios:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1, got {total:g}")
        return self


class Filters(Section):
    min_question_chars: int = Field(10, ge=0)
    max_question_chars: int = Field(4000, ge=1)
    min_answer_chars: int = Field(10, ge=0)
    max_answer_chars: int = Field(4000, ge=1)
    min_answers_per_question: int = Field(1, ge=1)
    dedup_answers: bool = True  # drop answers whose normalised text repeats one to the same question


class ScoreScaling(Section):
    """How the ``reward`` table's ``score`` column is derived from raw votes.

    transform: ``raw`` keeps votes; ``log`` is sign(s)*log1p(|s|), which tames the long tail
    of popular answers. normalize: ``none`` or ``question`` (z-score within each question, 0 when
    the question's answers all have the same score), which removes per-question popularity.
    """

    transform: Literal["raw", "log"] = "log"
    normalize: Literal["none", "question"] = "none"


class PairsConfig(Section):
    """Preference pairs: accepted vs. others, and higher vs. lower score (gap >= min_score_gap)."""

    accepted: bool = True
    by_score: bool = True
    min_score_gap: int = Field(2, ge=1)  # >= 1 so equal scores never make a pair
    max_pairs_per_question: int = Field(10, ge=1)


class DataConfig(Section):
    source: str = "data/raw/synthetic"  # Posts.xml, a site folder with Posts.xml, a site .7z, or JSON
    format: Literal["auto", "stackexchange", "json"] = "auto"
    out: str = "data/prepared"
    metrics: str = "metrics/data.json"
    split_seed: int = 0
    splits: SplitRatios = SplitRatios()
    filters: Filters = Filters()
    score: ScoreScaling = ScoreScaling()
    pairs: PairsConfig = PairsConfig()
    # Runtime knobs; none of them changes the output (tests check that).
    memory_budget_mb: int = Field(1024, ge=64)  # bounds prepare's peak memory, not the input size
    shards: int | None = Field(None, ge=1)  # null: planned from the input size and the budget
    workers: int | None = Field(None, ge=0)  # cleaning processes; 0: in-process; null: auto
    workdir: str | None = None  # scratch for spill files; null: next to `out`

    @model_validator(mode="after")
    def _filter_bounds(self) -> DataConfig:
        f = self.filters
        if f.min_question_chars > f.max_question_chars or f.min_answer_chars > f.max_answer_chars:
            raise ValueError("filters: min_*_chars must be <= max_*_chars")
        return self


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def read_params(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 at byte {exc.start}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: {where}invalid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


def _format_validation(path: Path, section: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (section, *err["loc"]))
        if err["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown key")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            parts.append(f"{loc}: {err['msg']}{shown}")
    return f"{path}: " + "; ".join(parts)


def parse_section(data: dict, section: str, model: type[C], path: str | Path = "params.yaml") -> C:
    """Validate ``data[section]`` into ``model``; errors name the file and the dotted key."""
    path = Path(path)
    raw = data.get(section, {})
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: {section}: must be a mapping, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation(path, section, exc)) from None


def load_section(path: str | Path, section: str, model: type[C]) -> C:
    """Read one section of a params file into its typed config."""
    return parse_section(read_params(path), section, model, path)
