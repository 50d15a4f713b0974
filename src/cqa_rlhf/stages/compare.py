"""Stage `compare`: win rates of one policy over another on the same test questions, by every
judge (each reward model, and gold where it exists) (params: evaluate, compare)."""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow.parquet as pq

from cqa_rlhf.config import CompareConfig, EvaluateConfig, parse_section, read_params
from cqa_rlhf.errors import DataError, cli
from cqa_rlhf.evaluation import win_rate
from cqa_rlhf.io import write_json_atomic
from cqa_rlhf.stages.common import stage_args


@cli
def main() -> None:
    args = stage_args(__doc__)
    params = read_params(args.params)
    ev = parse_section(params, "evaluate", EvaluateConfig, args.params)
    cfg = parse_section(params, "compare", CompareConfig, args.params)
    tables = {}
    for role, name in (("baseline", cfg.baseline), ("candidate", cfg.candidate)):
        path = Path(ev.out) / name / "generations.parquet"
        if not path.is_file():
            raise DataError(f"{path}: no generations for compare.{role} = {name!r} (run evaluate@{name})")
        tables[role] = pq.read_table(path).to_pydict()
    base, cand = tables["baseline"], tables["candidate"]
    if base["question"] != cand["question"]:
        raise DataError(f"compare: {cfg.baseline} and {cfg.candidate} answered different questions")
    judges = sorted(k for k in cand if (k.startswith("score_") or k == "gold") and k in base)
    rates = {j.removeprefix("score_"): round(win_rate(cand[j], base[j]), 6) for j in judges}
    key = f"{cfg.candidate}_vs_{cfg.baseline}"
    write_json_atomic(cfg.metrics, {key: {"win_rate": rates, "questions": len(cand["question"])}})
    plot = Path(cfg.plot)
    plot.parent.mkdir(parents=True, exist_ok=True)
    tmp = plot.with_name(f".{plot.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["judge", "win_rate"])
        w.writerows(rates.items())
    tmp.replace(plot)
    print(f"compare: {key} win rate " + ", ".join(f"{j} {r:.3f}" for j, r in rates.items()))


if __name__ == "__main__":
    main()
