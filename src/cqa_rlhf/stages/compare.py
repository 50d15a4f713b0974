"""Stage `compare`: the leaderboard. Every evaluated policy against the baseline (SFT) on the same
test questions, by every judge (each reward model, and gold where it exists): win rate and mean
paired score difference, each with a 95% paired-bootstrap interval over questions (the same
resamples for every policy and judge); beside them each policy's KL to the reference, answer
length, EOS rate and the wall time of the stage that trained it; and how much the judges agree
with each other (params: evaluate, compare, and the `live_dir` of each stage in compare.methods)."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pyarrow.parquet as pq

from cqa_rlhf.config import SECTIONS, BoNConfig, CompareConfig, EvaluateConfig
from cqa_rlhf.errors import ConfigError, DataError, cli
from cqa_rlhf.io import atomic_path, write_json_atomic, write_text_atomic
from cqa_rlhf.stages.common import Params, stage_args
from cqa_rlhf.stats import correlation, interval, paired_comparison, ranks, resample_indices, verdict_agreement

FIELDS = ("win_rate", "win_rate_ci95", "score_diff", "score_diff_ci95")
ORACLE = "bon_oracle"  # Best-of-N picked by gold: the headroom of reranking, never a method


def judge_metrics(candidate: list[float], baseline: list[float], indices) -> dict:
    """One judge's win rate and mean paired score difference, each with its 95% interval."""
    c = paired_comparison(candidate, baseline, indices)
    return {"win_rate": round(c["win_rate"], 6), "win_rate_ci95": interval((c["win_rate_low"], c["win_rate_high"]), 6),
            "score_diff": round(c["score_diff"], 6), "score_diff_ci95": interval((c["score_diff_low"], c["score_diff_high"]), 6)}


def table_paths(evaluate: EvaluateConfig, bon: BoNConfig | None) -> dict[str, Path]:
    """Every policy's generations table: each of ``evaluate.policies``, then Best-of-N and its
    oracle (when the bon stage wrote one: gold exists)."""
    paths = {name: Path(evaluate.out) / name / "generations.parquet" for name in evaluate.policies}
    if bon is not None:
        paths["bon"] = Path(bon.out) / "generations.parquet"
        if (Path(bon.out) / "oracle" / "generations.parquet").is_file():
            paths[ORACLE] = Path(bon.out) / "oracle" / "generations.parquet"
    return paths


def read_generations(paths: dict[str, Path]) -> dict[str, dict]:
    """Every policy's generation table (same questions, same order)."""
    tables = {}
    for name, path in paths.items():
        if not path.is_file():
            raise DataError(f"{path}: no generations of policy {name} (run its evaluate or bon stage)")
        tables[name] = pq.read_table(path).to_pydict()
    first = next(iter(tables))
    for name, table in tables.items():
        if table["question"] != tables[first]["question"]:
            raise DataError(f"compare: {name} and {first} answered different questions")
    return tables


def policy_summary(table: dict) -> dict:
    """A policy's own figures: KL to the reference, mean answer tokens, EOS rate, gold."""
    out = {"kl_to_reference": round(statistics.fmean(table["kl"]), 6),
           "mean_tokens": round(statistics.fmean(table["tokens"]), 3),
           "eos_rate": round(sum(table["ended"]) / len(table["ended"]), 6)}
    if "gold" in table:
        out["gold"] = round(statistics.fmean(table["gold"]), 6)
    return out


def leaderboard(tables: dict[str, dict], baseline: str) -> dict:
    """``<policy>_vs_<baseline>`` for every other policy (by every judge), and ``policies``:
    each policy's own figures."""
    if baseline not in tables:
        raise ConfigError(f"compare.baseline: no evaluated policy {baseline!r} (have {', '.join(tables)})")
    base = tables[baseline]
    judges = sorted(k for k in base if k.startswith("score_") or k == "gold")
    indices = resample_indices(len(base["question"]))
    metrics: dict = {"baseline": baseline, "questions": len(base["question"]), "bootstrap_resamples": len(indices)}
    for name, table in tables.items():
        if name != baseline:
            judged = {j.removeprefix("score_"): judge_metrics(table[j], base[j], indices) for j in judges}
            metrics[f"{name}_vs_{baseline}"] = {f: {j: m[f] for j, m in judged.items()} for f in FIELDS}
    metrics["policies"] = {name: policy_summary(table) for name, table in tables.items()}
    metrics["oracles"] = [name for name in tables if name == ORACLE]
    metrics["judges"] = judge_agreement({k: v for k, v in tables.items() if k != ORACLE}, baseline, judges)
    return metrics


def finite(value: float) -> float | None:
    """A metric rounded, or null where it is undefined (JSON has no NaN)."""
    return None if math.isnan(value) else round(value, 6)


def judge_agreement(tables: dict[str, dict], baseline: str, judges: list[str]) -> dict:
    """Every pair of judges: Pearson and Spearman correlation of their scores over every answer
    of every policy, and how often they call the same verdict on a policy's answer against the
    baseline's. Two judges that agree on everything are one judge, not two."""
    out = {}
    for i, a in enumerate(judges):
        for b in judges[i + 1:]:
            xs = [v for t in tables.values() for v in t[a]]
            ys = [v for t in tables.values() for v in t[b]]
            diffs = {j: [c - r for n, t in tables.items() if n != baseline for c, r in zip(t[j], tables[baseline][j])]
                     for j in (a, b)}
            out[f"{a.removeprefix('score_')}~{b.removeprefix('score_')}"] = {
                "pearson": finite(correlation(xs, ys)), "spearman": finite(correlation(ranks(xs), ranks(ys))),
                "verdict_agreement": round(verdict_agreement(diffs[a], diffs[b]), 6) if diffs[a] else None}
    return out


def write_plot(path: str | Path, metrics: dict) -> None:
    """Every win rate with its interval, as a CSV that `dvc plots` draws with error bars."""
    baseline = metrics["baseline"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["comparison", "win_rate", "ci_low", "ci_high"])
        for key, block in metrics.items():
            if key.endswith(f"_vs_{baseline}"):
                for judge, rate in block["win_rate"].items():
                    ci = block["win_rate_ci95"][judge]
                    w.writerow([f"{key.removesuffix('_vs_' + baseline)}: {judge}", rate, ci["low"], ci["high"]])


def write_table(path: str | Path, metrics: dict, seconds: dict[str, float | None]) -> None:
    """The leaderboard as a Markdown table (wall times included: a plain output, not a metric)."""
    baseline, policies = metrics["baseline"], metrics["policies"]
    judges = next((list(b["win_rate"]) for k, b in metrics.items() if k.endswith(f"_vs_{baseline}")), [])
    head = ["policy", *[f"win vs {baseline}: {j} [95% CI]" for j in judges], "KL to ref", "tokens", "EOS rate", "stage s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, own in policies.items():
        block = metrics.get(f"{name}_vs_{baseline}")
        wins = [f"{block['win_rate'][j]:.3f} [{block['win_rate_ci95'][j]['low']:.3f}, "
                f"{block['win_rate_ci95'][j]['high']:.3f}]" if block else "baseline" for j in judges]
        wall = seconds.get(name)
        label = f"{name} (oracle: not a method)" if name in metrics.get("oracles", []) else name
        lines.append("| " + " | ".join([label, *wins, f"{own['kl_to_reference']:.3f}", f"{own['mean_tokens']:.1f}",
                                         f"{own['eos_rate']:.3f}", "—" if wall is None else f"{wall:.0f}"]) + " |")
    write_text_atomic(path, "\n".join(lines) + "\n")


def read_seconds(live_dirs: dict[str, str]) -> dict[str, float]:
    """Each trained policy's stage wall time from ``<live_dir>/timing.json``."""
    out = {}
    for name, live_dir in live_dirs.items():
        path = Path(live_dir) / "timing.json"
        try:
            out[name] = float(json.loads(path.read_text(encoding="utf-8"))["wall_seconds"])
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"{path}: no wall time of {name}'s stage ({type(exc).__name__}); rerun that stage") from None
    return out


def run(cfg: CompareConfig, evaluate: EvaluateConfig, live_dirs: dict[str, str] | None = None,
        bon: BoNConfig | None = None) -> dict:
    """The leaderboard of every policy in ``evaluate.policies`` and Best-of-N (``bon``); writes
    the metrics, the plot and the table (with the wall times read from ``live_dirs``: policy ->
    its stage's live dir)."""
    metrics = leaderboard(read_generations(table_paths(evaluate, bon)), cfg.baseline)
    seconds = read_seconds({k: v for k, v in (live_dirs or {}).items() if k in evaluate.policies})
    write_json_atomic(cfg.metrics, metrics)
    write_plot(cfg.plot, metrics)
    write_table(cfg.table, metrics, seconds)
    for key, block in metrics.items():
        if key.endswith(f"_vs_{cfg.baseline}"):
            print(f"compare: {key} win rate " + ", ".join(
                f"{j} {r:.3f} [{block['win_rate_ci95'][j]['low']:.3f}, {block['win_rate_ci95'][j]['high']:.3f}]"
                for j, r in block["win_rate"].items()))
    return metrics


def live_dirs(params: Params, cfg: CompareConfig) -> dict[str, str]:
    """Policy -> the live dir of the stage that trained it (``compare.methods`` names its section)."""
    out = {}
    for policy, section in cfg.methods.items():
        if section not in SECTIONS or "live_dir" not in SECTIONS[section].model_fields:
            raise ConfigError(f"{params.path}: compare.methods.{policy}: {section!r} is not a training stage's section")
        out[policy] = params.section(section, SECTIONS[section]).live_dir
    return out


@cli
def main(argv: list[str] | None = None) -> None:
    params = Params.read(stage_args(__doc__, argv).params)
    cfg = params.section("compare", CompareConfig)
    run(cfg, params.section("evaluate", EvaluateConfig), live_dirs(params, cfg), params.section("bon", BoNConfig))


if __name__ == "__main__":
    main()
