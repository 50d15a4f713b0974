"""Evaluation metrics as small functions: reference overlap (BLEU, ROUGE) (win rates and their intervals: stats.py). BLEU is sacrebleu's corpus BLEU; ROUGE is Google's
``rouge-score`` (ROUGE-1.5.5 reimplemented, Porter stemming): both offline, no hub downloads."""

from __future__ import annotations

from collections.abc import Sequence


def bleu(generated: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) of the generated answers against one reference answer each."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(generated), [list(references)]).score)


def rouge(generated: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (0-1) over answers."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    sums = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for g, r in zip(generated, references):
        for k, s in scorer.score(r, g).items():
            sums[k] += s.fmeasure
    n = max(len(generated), 1)
    return {k: v / n for k, v in sums.items()}
