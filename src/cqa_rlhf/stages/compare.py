"""Stage `compare`: win rates of one policy over another on the same test questions, by every
judge (each reward model, and gold where it exists) (params: evaluate, compare)."""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow.parquet as pq

from cqa_rlhf.config import CompareConfig, EvaluateConfig
from cqa_rlhf.errors import DataError, cli
from cqa_rlhf.evaluation import win_rate
from cqa_rlhf.io import atomic_path, write_json_atomic
from cqa_rlhf.stages.common import Params, stage_args


def write_plot(path: str | Path, rates: dict[str, float]) -> None:
    """The win rates as a CSV (judge, win_rate) that `dvc plots` draws."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["judge", "win_rate"])
        w.writerows(rates.items())


def run(cfg: CompareConfig, evaluate: EvaluateConfig) -> dict:
    """Win rates of ``cfg.candidate`` over ``cfg.baseline``; writes the metrics and the plot."""
    tables = {}
    for role, name in (("baseline", cfg.baseline), ("candidate", cfg.candidate)):
        path = Path(evaluate.out) / name / "generations.parquet"
        if not path.is_file():
            raise DataError(f"{path}: no generations for compare.{role} = {name!r} (run evaluate@{name})")
        tables[role] = pq.read_table(path).to_pydict()
    base, cand = tables["baseline"], tables["candidate"]
    if base["question"] != cand["question"]:
        raise DataError(f"compare: {cfg.baseline} and {cfg.candidate} answered different questions")
    judges = sorted(k for k in cand if (k.startswith("score_") or k == "gold") and k in base)
    rates = {j.removeprefix("score_"): round(win_rate(cand[j], base[j]), 6) for j in judges}
    key = f"{cfg.candidate}_vs_{cfg.baseline}"
    metrics = {key: {"win_rate": rates, "questions": len(cand["question"])}}
    write_json_atomic(cfg.metrics, metrics)
    write_plot(cfg.plot, rates)
    print(f"compare: {key} win rate " + ", ".join(f"{j} {r:.3f}" for j, r in rates.items()))
    return metrics


@cli
def main(argv: list[str] | None = None) -> None:
    params = Params.read(stage_args(__doc__, argv).params)
    run(params.section("compare", CompareConfig), params.section("evaluate", EvaluateConfig))


if __name__ == "__main__":
    main()
