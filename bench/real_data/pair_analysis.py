"""Why a real-data reward model does (or does not) beat "the longer answer wins": both exported
reward models of a run scored on its held-out human votes (the test pairs; the validation pairs too on request), with
the project's own scoring (template, truncation, batches of ``reward.score``), then

- each model's accuracy on the pairs where the voters preferred the longer answer and on those
  where they preferred the shorter one (a model that only reads length gets the second wrong);
- how often it picks the longer answer, whatever the vote;
- the rank correlation of its score with the answer's length over every answer of the pairs;
- how often the two models pick the same answer (two judges that always agree are one judge).

Usage (from the repository, on a run directory that holds both models):

    PYTHONPATH=src python bench/real_data/pair_analysis.py --run ../cqa-real-run --out bench/real_data/<date>/pairs.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from cqa_rlhf.config import RewardConfig
from cqa_rlhf.data.tables import read_table
from cqa_rlhf.models import load_frozen
from cqa_rlhf.prompts import PromptFormatter
from cqa_rlhf.reward import score
from cqa_rlhf.stages.common import Params
from cqa_rlhf.stats import correlation, interval, ranks, verdict_agreement, wilson
from cqa_rlhf.tokenizer import load_tokenizer


def proportion(successes: int, n: int) -> dict:
    """``successes`` of ``n`` with its 95% Wilson interval."""
    return {"n": n, "rate": round(successes / n, 4) if n else None,
            "ci95": interval(wilson(float(successes), n)) if n else None}


def rate(hits: list[bool]) -> dict:
    return proportion(sum(hits), len(hits))


def split_by_length(rows: list[dict], margins: list[float]) -> dict:
    """``margins``: score(chosen) - score(rejected) per pair. Pairs of equal length are left out
    of the two subsets (the length baseline calls them a tie)."""
    longer = [len(r["chosen"]) > len(r["rejected"]) for r in rows]
    shorter = [len(r["chosen"]) < len(r["rejected"]) for r in rows]
    picks_longer = [(m > 0) == (len(r["chosen"]) > len(r["rejected"])) for m, r in zip(margins, rows)
                    if len(r["chosen"]) != len(r["rejected"])]
    return {"accuracy": rate([m > 0 for m in margins]),
            "accuracy_voters_chose_longer": rate([m > 0 for m, is_l in zip(margins, longer) if is_l]),
            "accuracy_voters_chose_shorter": rate([m > 0 for m, is_s in zip(margins, shorter) if is_s]),
            "picks_the_longer": rate(picks_longer)}


def analyse(rows: list[dict], scores: dict[str, tuple[list[float], list[float]]]) -> dict:
    """``scores[kind]``: (chosen scores, rejected scores) on ``rows``."""
    lengths = [float(len(r["chosen"])) for r in rows] + [float(len(r["rejected"])) for r in rows]
    out: dict = {"pairs": len(rows), "voters_chose_longer": rate([len(r["chosen"]) > len(r["rejected"]) for r in rows])}
    margins = {k: [c - r for c, r in zip(*v)] for k, v in scores.items()}
    for kind, (chosen, rejected) in scores.items():
        out[kind] = split_by_length(rows, margins[kind])
        out[kind]["spearman_score_length"] = round(correlation(ranks(chosen + rejected), ranks(lengths)), 4)
    a, b = sorted(margins)
    out["same_pick"] = proportion(round(verdict_agreement(margins[a], margins[b]) * len(rows)), len(rows))
    out["margin_spearman"] = round(correlation(ranks(margins[a]), ranks(margins[b])), 4)
    return out


def analyse_run(run: Path, splits: tuple[str, ...] = ("test",)) -> dict:
    """:func:`analyse` of both exported reward models of ``run`` on its ``splits`` pairs."""
    here = Path.cwd()
    os.chdir(run)  # the run's params name paths relative to it
    try:
        params = Params.read("params.yaml")
        shared, reward = params.shared(), params.section("reward", RewardConfig)
        tok = load_tokenizer(shared.tokenizer.out)
        fmt = PromptFormatter(shared.prompt, tok)
        rows = {s: read_table(Path(reward.regression.data) / s / "pairs").to_pylist() for s in splits}
        scores: dict[str, dict] = {s: {} for s in splits}
        for kind, cfg in (("regression", reward.regression), ("classification", reward.classification)):
            model = load_frozen(cfg.out, tok, "reward", shared.model.dtype)
            for s in splits:
                scores[s][kind] = tuple(score(model, fmt, [(r["question"], r[side]) for r in rows[s]],
                                              cfg.max_length, cfg.score_batch_size) for side in ("chosen", "rejected"))
    finally:
        os.chdir(here)
    return {s: analyse(rows[s], scores[s]) for s in splits}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="the run's directory (params.yaml, data, models)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--splits", nargs="+", default=["test"], choices=["test", "val"],
                    help="which held-out pairs (each costs two reward-model passes over its answers)")
    args = ap.parse_args()
    result = analyse_run(args.run, tuple(args.splits))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for s, r in result.items():
        print(s, json.dumps({k: r[k] for k in ("pairs", "same_pick")}))


if __name__ == "__main__":
    main()
