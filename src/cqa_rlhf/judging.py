"""The judges of sampled answers, shared by every stage that ranks policies (evaluate, bon,
overopt): every reward model (on the exact sampled ids when it shares the policy's tokenizer),
and the embedded default's hidden gold quality where it exists; then the figures of a set of
answers (judges' means, reference overlap, length, EOS)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cqa_rlhf.config import DataConfig, EvaluateConfig, PromptConfig, SynthConfig
from cqa_rlhf.data.synthetic import gold
from cqa_rlhf.evaluation import bleu, rouge
from cqa_rlhf.generation import Generation
from cqa_rlhf.io import atomic_path
from cqa_rlhf.reward import load_judge
from cqa_rlhf.rollout import score_generations


def use_gold(cfg: EvaluateConfig, data: DataConfig, synth: SynthConfig) -> bool:
    """Gold quality exists only for the embedded synthetic site."""
    if cfg.gold != "auto":
        return cfg.gold == "on"
    return Path(data.source).resolve() == Path(synth.out).resolve()


@dataclass
class Judged:
    """Every judge's score of every answer: ``columns`` score_<reward model> (and gold) [n], and
    each reward model's normalisation (mean, std of its scores on the SFT training answers)."""

    columns: dict[str, list[float]]
    norms: dict[str, tuple[float, float]]

    def select(self, idx: Sequence[int]) -> Judged:
        return Judged({k: [v[i] for i in idx] for k, v in self.columns.items()}, self.norms)

    def means(self) -> dict[str, float]:
        """Each judge's mean, and each reward model's in its normalised units."""
        out: dict[str, float] = {}
        for key, values in self.columns.items():
            out[key] = round(statistics.fmean(values), 6)
            name = key.removeprefix("score_")
            if name in self.norms:
                mean, std = self.norms[name]
                out[f"{key}_normalized"] = round((statistics.fmean(values) - mean) / std, 6)
        return out


def judge(gens: Sequence[Generation], cfg: EvaluateConfig, prompt: PromptConfig, tok, with_gold: bool) -> Judged:
    """Every reward model of ``cfg.reward_models`` scores every answer; gold where it exists."""
    columns: dict[str, list[float]] = {}
    norms: dict[str, tuple[float, float]] = {}
    for name, path in sorted(cfg.reward_models.items()):
        j = load_judge(path, f"evaluate.reward_models.{name}", prompt, tok)
        columns[f"score_{name}"] = score_generations(j.model, gens, tok.pad_token_id, cfg.max_length,
                                                     cfg.score_batch_size, j.retokenize)
        norms[name] = j.norm
    if with_gold:
        columns["gold"] = [gold(g.question, g.text) for g in gens]
    return Judged(columns, norms)


def answer_metrics(gens: Sequence[Generation], references: Sequence[str], with_gold: bool) -> dict[str, float]:
    """Reference overlap (BLEU, ROUGE), length, EOS rate, and gold of the reference answers."""
    answers = [g.text for g in gens]
    out = {"bleu": round(bleu(answers, references), 4),
           **{k: round(v, 6) for k, v in rouge(answers, references).items()},
           "mean_tokens": round(statistics.fmean(len(g.response_ids) for g in gens), 3),
           "mean_words": round(statistics.fmean(len(a.split()) for a in answers), 3),
           "eos_rate": round(sum(g.ended for g in gens) / len(gens), 6)}
    if with_gold:
        out["gold_reference"] = round(statistics.fmean(gold(g.question, r) for g, r in zip(gens, references)), 6)
    return out


def generation_columns(gens: Sequence[Generation], references: Sequence[str], judged: Judged,
                       kl: Sequence[float]) -> dict[str, list]:
    """The generations table: question, reference, answer, EOS, tokens, every judge, KL."""
    return {"question": [g.question for g in gens], "reference": list(references),
            "generated": [g.text for g in gens], "ended": [g.ended for g in gens],
            "tokens": [len(g.response_ids) for g in gens], **judged.columns, "kl": list(kl)}


def write_generations(path: Path, columns: dict[str, list]) -> None:
    """The table (pandas opens it), written whole or not at all."""
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(columns), tmp)
