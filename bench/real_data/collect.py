"""Collect a finished real-data run (bench/real_data/run.sh) as data to commit: every
``metrics/*.json``, the leaderboard, every stage's DVCLive curves, the params used, dvc.lock, each training stage's wall time
(``<live_dir>/timing.json``: the last invocation's) and, from monitor.sh's samples, each stage's
wall time summed over every session the run spanned and its peak resident memory, the machine,
what the two reward models read in the test pairs (``pairs.json``, pair_analysis.py), and sample answers of SFT and of the policy the
independent judge ranks best, side by side on the same test questions."""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import pandas as pd
import yaml
from pair_analysis import analyse_run


def stage_times(run: Path) -> dict[str, float]:
    return {str(p.parent.relative_to(run / "dvclive")): json.loads(p.read_text())["wall_seconds"]
            for p in sorted((run / "dvclive").rglob("timing.json"))}


def stage_usage(mem: Path, every: float = 20.0) -> dict[str, dict[str, float]]:
    """Per stage, from monitor.sh's lines "time, stage, VmRSS kB, VmHWM kB": the wall seconds its
    samples span (gaps over two sampling intervals are the pauses between sessions, not counted)
    and its peak resident memory in MB (the process's own high-water mark)."""
    rows = pd.read_csv(mem, sep="\t", names=["t", "stage", "rss_kb", "hwm_kb"])
    out = {}
    for stage, group in rows.groupby("stage", sort=False):
        gaps = group["t"].drop_duplicates().diff().dropna()
        out[stage] = {"sampled_wall_s": float(gaps[gaps <= 2 * every].sum()),
                      "peak_rss_mb": round(float(group["hwm_kb"].max()) / 1024, 1)}
    return out


def samples(run: Path, params: dict, judge: str, n: int) -> list[dict]:
    """The first ``n`` test questions: SFT's answer and the best policy's by ``judge``'s win rate."""
    compare = json.loads((run / params["compare"]["metrics"]).read_text())
    rates = {k.removesuffix("_vs_sft"): v["win_rate"].get(judge) for k, v in compare.items()
             if k.endswith("_vs_sft") and k != "bon_oracle_vs_sft"}
    best = max((k for k, v in rates.items() if v is not None), key=lambda k: rates[k])
    out_dir = Path(params["evaluate"]["out"])
    path = lambda name: run / (Path(params["bon"]["out"]) if name == "bon" else out_dir / name) / "generations.parquet"  # noqa: E731
    sft, pol = pd.read_parquet(path("sft")), pd.read_parquet(path(best))
    return [{"question": q, "sft": a, best: b, f"score_{judge}_sft": round(float(sa), 4), f"score_{judge}_{best}": round(float(sb), 4)}
            for q, a, b, sa, sb in zip(sft["question"][:n], sft["generated"][:n], pol["generated"][:n],
                                       sft[f"score_{judge}"][:n], pol[f"score_{judge}"][:n])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", required=True)
    ap.add_argument("--wall", type=float, required=True, help="seconds of the dvc exp run that finished the run")
    ap.add_argument("--mem", type=Path, default=None, help="monitor.sh's samples (stage times and peak memory)")
    ap.add_argument("--judge", default="regression", help="the independent judge (a key of evaluate.reward_models)")
    args = ap.parse_args()
    params = yaml.safe_load((args.run / "params.yaml").read_text())
    (args.out / "metrics").mkdir(parents=True, exist_ok=True)
    for p in sorted((args.run / "metrics").glob("*")):
        shutil.copy2(p, args.out / "metrics" / p.name)
    for p in sorted((args.run / "dvclive").rglob("*")):  # every stage's curves: small tables
        if p.is_file() and (p.suffix == ".tsv" or p.name == "metrics.json"):
            dest = args.out / p.relative_to(args.run)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dest)
    for name in ("params.yaml", "dvc.lock"):
        shutil.copy2(args.run / name, args.out / name)
    shutil.copy2(args.run / args.preset, args.out / "preset.yaml")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    run = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu, "machine": platform.machine(), "preset": args.preset,
           "last_invocation_wall_s": args.wall, "stage_wall_s": stage_times(args.run)}
    mem = args.mem or args.run.parent / "cqa-real-run.mem.tsv"
    if mem.exists():
        run["stage_usage"] = stage_usage(mem)
        run["peak_rss_mb"] = max(v["peak_rss_mb"] for v in run["stage_usage"].values())
    (args.out / "run.json").write_text(json.dumps(run, indent=1) + "\n")
    (args.out / "pairs.json").write_text(json.dumps(analyse_run(args.run.resolve()), indent=1) + "\n")
    (args.out / "samples.json").write_text(json.dumps(samples(args.run, params, args.judge, 8), indent=1) + "\n")
    print(f"collected into {args.out}")


if __name__ == "__main__":
    main()
