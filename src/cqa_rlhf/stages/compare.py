"""Stage `compare`: win rates of one policy over another on the same test questions, by every
judge (each reward model, and gold where it exists), each with a 95% paired-bootstrap
interval over questions (params: evaluate, compare)."""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow.parquet as pq

from cqa_rlhf.config import CompareConfig, EvaluateConfig
from cqa_rlhf.errors import DataError, cli
from cqa_rlhf.io import atomic_path, write_json_atomic
from cqa_rlhf.stages.common import Params, stage_args
from cqa_rlhf.stats import interval, paired_comparison, resample_indices


def write_plot(path: str | Path, judged: dict[str, dict]) -> None:
    """The win rates and their intervals as a CSV that `dvc plots` draws with error bars."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["judge", "win_rate", "ci_low", "ci_high"])
        w.writerows((j, m["win_rate"], m["win_rate_ci95"]["low"], m["win_rate_ci95"]["high"]) for j, m in judged.items())


def judge_metrics(candidate: list[float], baseline: list[float], indices) -> dict:
    """One judge's win rate and mean paired score difference, each with its 95% interval."""
    c = paired_comparison(candidate, baseline, indices)
    return {"win_rate": round(c["win_rate"], 6), "win_rate_ci95": interval((c["win_rate_low"], c["win_rate_high"]), 6),
            "score_diff": round(c["score_diff"], 6), "score_diff_ci95": interval((c["score_diff_low"], c["score_diff_high"]), 6)}


def read_generations(cfg: CompareConfig, evaluate: EvaluateConfig) -> tuple[dict, dict]:
    """The baseline's and the candidate's generation tables (same questions, same order)."""
    tables = {}
    for role, name in (("baseline", cfg.baseline), ("candidate", cfg.candidate)):
        path = Path(evaluate.out) / name / "generations.parquet"
        if not path.is_file():
            raise DataError(f"{path}: no generations for compare.{role} = {name!r} (run evaluate@{name})")
        tables[role] = pq.read_table(path).to_pydict()
    if tables["baseline"]["question"] != tables["candidate"]["question"]:
        raise DataError(f"compare: {cfg.baseline} and {cfg.candidate} answered different questions")
    return tables["baseline"], tables["candidate"]


def run(cfg: CompareConfig, evaluate: EvaluateConfig) -> dict:
    """Win rates of ``cfg.candidate`` over ``cfg.baseline`` by every judge, with paired-bootstrap
    intervals over questions (the same resamples for every judge); writes the metrics and plot."""
    base, cand = read_generations(cfg, evaluate)
    judges = sorted(k for k in cand if (k.startswith("score_") or k == "gold") and k in base)
    indices = resample_indices(len(cand["question"]))
    judged = {j.removeprefix("score_"): judge_metrics(cand[j], base[j], indices) for j in judges}
    key = f"{cfg.candidate}_vs_{cfg.baseline}"
    metrics = {key: {"questions": len(cand["question"]), "bootstrap_resamples": len(indices),
                     **{field: {j: m[field] for j, m in judged.items()}
                        for field in ("win_rate", "win_rate_ci95", "score_diff", "score_diff_ci95")}}}
    write_json_atomic(cfg.metrics, metrics)
    write_plot(cfg.plot, judged)
    print(f"compare: {key} win rate " + ", ".join(
        f"{j} {m['win_rate']:.3f} [{m['win_rate_ci95']['low']:.3f}, {m['win_rate_ci95']['high']:.3f}]"
        for j, m in judged.items()))
    return metrics


@cli
def main(argv: list[str] | None = None) -> None:
    params = Params.read(stage_args(__doc__, argv).params)
    run(params.section("compare", CompareConfig), params.section("evaluate", EvaluateConfig))


if __name__ == "__main__":
    main()
