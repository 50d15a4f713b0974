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
from cqa_rlhf.data.tables import read_table
from cqa_rlhf.errors import DataError
from cqa_rlhf.evaluation import bleu, rouge
from cqa_rlhf.generation import Generation
from cqa_rlhf.io import atomic_path
from cqa_rlhf.reward import Judge, load_judge
from cqa_rlhf.rollout import score_generations


def use_gold(cfg: EvaluateConfig, data: DataConfig, synth: SynthConfig) -> bool:
    """Gold quality exists only for the embedded synthetic site."""
    if cfg.gold != "auto":
        return cfg.gold == "on"
    return Path(data.source).resolve() == Path(synth.out).resolve()


def load_test_questions(cfg: EvaluateConfig) -> tuple[list[str], list[str]]:
    """The test questions and their reference answers (the first ``max_questions``)."""
    rows = read_table(Path(cfg.data) / "test" / "sft").to_pylist()[: cfg.max_questions]
    if not rows:
        raise DataError(f"{cfg.data}/test/sft: no test questions")
    return [r["question"] for r in rows], [r["answer"] for r in rows]


def normalised(mean: float, norm: tuple[float, float] | None) -> float:
    """A reward model's mean score in its normalised units (``norm``: mean, std on the SFT
    training answers); as is when the model has no normalisation."""
    return mean if norm is None else (mean - norm[0]) / norm[1]


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
                out[f"{key}_normalized"] = round(normalised(statistics.fmean(values), self.norms[name]), 6)
        return out


def load_judges(cfg: EvaluateConfig, prompt: PromptConfig, tok) -> dict[str, Judge]:
    """Every reward model of ``cfg.reward_models``, by name, for a policy with tokenizer ``tok``."""
    return {name: load_judge(path, f"evaluate.reward_models.{name}", prompt, tok)
            for name, path in sorted(cfg.reward_models.items())}


def judge(gens: Sequence[Generation], cfg: EvaluateConfig, prompt: PromptConfig, tok, with_gold: bool) -> Judged:
    """Every reward model of ``cfg.reward_models`` scores every answer; gold where it exists."""
    judges = load_judges(cfg, prompt, tok)
    columns = {f"score_{name}": score_generations(j.model, gens, tok.pad_token_id, cfg.max_length,
                                                  cfg.score_batch_size, j.retokenize)
               for name, j in judges.items()}
    norms = {name: j.norm for name, j in judges.items()}
    if with_gold:
        columns["gold"] = [gold(g.question, g.text) for g in gens]
    return Judged(columns, norms)


def summary_line(stage: str, metrics: dict, seconds: float, out: Path) -> str:
    """The line a judging stage prints: questions, every judge's mean, KL, BLEU, time, output."""
    shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()
                      if (k.startswith("score_") or k.startswith("gold")) and not k.endswith("normalized"))
    return (f"{stage}: {metrics['questions']} questions; {shown}; KL {metrics['kl_to_reference']:.2f}; "
            f"BLEU {metrics['bleu']:.2f}; {seconds:.0f}s -> {out}")


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
