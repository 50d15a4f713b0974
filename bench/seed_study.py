"""The default pipeline under several seeds: how much do the headline numbers move?

Each seed runs in its own clone of the repository's HEAD with ``dvc exp run -S seed=<n>``: the one
switch every training and sampling stage takes its seed from. The clones share one new DVC cache:
the first seed runs the whole graph from nothing (a fresh-clone run: its metrics are checked
byte for byte against the committed ones when it is the committed seed), the next ones restore
the seed-independent stages (synth, data, tokenizer) from DVC's run-cache. Per seed it records
every metric and the wall time; then mean ± sd and min/max of the headline metrics, on how many
seeds each method (PPO, DPO, GRPO, online DPO, Best-of-16) beats SFT (``METHODS``) and online DPO
beats offline DPO, and, for every metric, its standard
deviation across seeds in bench/seed_sd.json (the tolerances of scripts/check_repro.py).

    python bench/seed_study.py --seeds 0 1 2 3 4       # about 16 minutes a seed on 2 cores
    python bench/seed_study.py --with-committed --seeds 1 2 3 4   # the committed run as seed 0
    python bench/seed_study.py --summarize             # the tables again from bench/seed_study.json
    python bench/seed_study.py --with-committed --seeds 1 2 3 4 --resume   # after an interruption:
                                                       # keeps the seeds recorded at this commit, runs the rest
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "seed_study.json"
SD = ROOT / "bench" / "seed_sd.json"
HEADLINE = {
    "SFT val perplexity": "metrics/sft.json:val_perplexity",
    "RM regression test accuracy": "metrics/reward_regression.json:pairwise_accuracy",
    "RM classification test accuracy": "metrics/reward_classification.json:pairwise_accuracy",
    "length baseline accuracy": "metrics/reward_classification.json:length_baseline_accuracy",
    "PPO vs SFT win rate, gold": "metrics/compare.json:ppo_vs_sft.win_rate.gold",
    "PPO vs SFT win rate, classification RM": "metrics/compare.json:ppo_vs_sft.win_rate.classification",
    "PPO vs SFT win rate, regression RM": "metrics/compare.json:ppo_vs_sft.win_rate.regression",
    "GRPO vs SFT win rate, gold": "metrics/compare.json:grpo_vs_sft.win_rate.gold",
    "GRPO vs SFT win rate, regression RM": "metrics/compare.json:grpo_vs_sft.win_rate.regression",
    "DPO vs SFT win rate, gold": "metrics/compare.json:dpo_vs_sft.win_rate.gold",
    "DPO test preference accuracy": "metrics/dpo.json:pairwise_accuracy",
    "gold: base": "metrics/eval_base.json:gold",
    "gold: SFT": "metrics/eval_sft.json:gold",
    "gold: PPO": "metrics/eval_ppo.json:gold",
    "gold: DPO": "metrics/eval_dpo.json:gold",
    "gold: GRPO": "metrics/eval_grpo.json:gold",
    "PPO KL to SFT (test questions)": "metrics/eval_ppo.json:kl_to_reference",
    "PPO KL to SFT (training, final)": "metrics/ppo.json:final.kl",
    "answer length, SFT (tokens)": "metrics/eval_sft.json:mean_tokens",
    "answer length, PPO (tokens)": "metrics/eval_ppo.json:mean_tokens",
    "GRPO KL to SFT (test questions)": "metrics/eval_grpo.json:kl_to_reference",
    "answer length, GRPO (tokens)": "metrics/eval_grpo.json:mean_tokens",
    "online DPO vs SFT win rate, gold": "metrics/compare.json:online_dpo_vs_sft.win_rate.gold",
    "Best-of-16 vs SFT win rate, gold": "metrics/compare.json:bon_vs_sft.win_rate.gold",
    "oracle Best-of-16 vs SFT win rate, gold": "metrics/compare.json:bon_oracle_vs_sft.win_rate.gold",
    "gold: online DPO": "metrics/eval_online_dpo.json:gold",
    "gold: Best-of-16": "metrics/eval_bon.json:best_of_n.gold",
    "online DPO KL to SFT (test questions)": "metrics/eval_online_dpo.json:kl_to_reference",
    "answer length, online DPO (tokens)": "metrics/eval_online_dpo.json:mean_tokens",
    "answer length, Best-of-16 (tokens)": "metrics/eval_bon.json:best_of_n.mean_tokens",
    "Best-of-N gold gain, best over N (overopt)": "metrics/overopt.json:bon.gold_gain_best",
}
# method -> (its gold, its name in compare.json); the oracle is not a method and is not counted
METHODS = {"PPO": ("metrics/eval_ppo.json:gold", "ppo"), "DPO": ("metrics/eval_dpo.json:gold", "dpo"),
           "GRPO": ("metrics/eval_grpo.json:gold", "grpo"),
           "online DPO": ("metrics/eval_online_dpo.json:gold", "online_dpo"),
           "Best-of-16": ("metrics/eval_bon.json:best_of_n.gold", "bon")}


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    """Nested metrics as DVC names them (``a.b.c``)."""
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def timed_run(cmd: list[str], cwd: Path, env: dict) -> tuple[dict[str, float], float]:
    """Seconds per stage (from the times DVC starts each one) and in all."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    start, marks, tail = time.perf_counter(), [], []
    for line in proc.stdout:
        tail = (tail + [line])[-40:]
        if line.startswith("Running stage '"):
            marks.append((line.split("'")[1], time.perf_counter()))
    end = time.perf_counter()
    if proc.wait() != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{''.join(tail)}")
    stages = {name: round((marks[i + 1][1] if i + 1 < len(marks) else end) - t, 1) for i, (name, t) in enumerate(marks)}
    return stages, end - start


def run_seed(seed: int, work: Path) -> dict:
    """Clone, share the study's cache, ``dvc exp run -S seed=<seed>``; every metric and the times."""
    clone = work / f"seed{seed}"
    env = {**os.environ, "CQA_PROGRESS": "0"}
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run(dvc + ["cache", "dir", "--local", str(work / "cache")], cwd=clone, check=True, env=env)
    stages, wall = timed_run(dvc + ["exp", "run", "-S", f"seed={seed}"], clone, env)
    metrics = {f"metrics/{p.name}:{k}": v for p in sorted((clone / "metrics").glob("*.json"))
               for k, v in flatten(json.loads(p.read_text())).items()}
    same = [p.name for p in sorted((ROOT / "metrics").glob("*.json"))
            if (clone / "metrics" / p.name).read_bytes() == p.read_bytes()]
    return {"seed": seed, "wall_s": round(wall, 1), "stage_s": stages, "numerics": os.environ.get("CQA_NUMERICS", "pinned"),
            "metrics_files_identical_to_committed": len(same), "metrics": metrics}


def numeric(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def summarize(runs: list[dict]) -> str:
    """Markdown: the headline table, each method over SFT on every seed, wall times; writes seed_sd.json."""
    keys = sorted(set.intersection(*(set(r["metrics"]) for r in runs)))
    sd = {k: round(statistics.stdev([r["metrics"][k] for r in runs]), 6) for k in keys
          if all(numeric(r["metrics"][k]) for r in runs)}
    SD.write_text(json.dumps({"seeds": [r["seed"] for r in runs], "sd": sd}, indent=1, sort_keys=True) + "\n")
    lines = ["| metric | mean ± sd | min | max | per seed (" + ", ".join(str(r["seed"]) for r in runs) + ") |",
             "|---|---|---|---|---|"]
    for label, key in HEADLINE.items():
        vals = [r["metrics"][key] for r in runs]
        lines.append(f"| {label} | {statistics.mean(vals):.4g} ± {statistics.stdev(vals):.2g} | {min(vals):.4g} | "
                     f"{max(vals):.4g} | {', '.join(f'{v:.4g}' for v in vals)} |")
    lines.append("")
    for label, (gold, policy) in METHODS.items():
        beats = [r["metrics"][gold] > r["metrics"]["metrics/eval_sft.json:gold"] for r in runs]
        above = [r["metrics"][f"metrics/compare.json:{policy}_vs_sft.win_rate_ci95.gold.low"] > 0.5 for r in runs]
        lines.append(f"{label}'s mean gold above SFT's: {sum(beats)} of {len(runs)} seeds; gold win rate's 95% "
                     f"interval above 0.5: {sum(above)} of {len(runs)} seeds.")
    online = [r["metrics"]["metrics/eval_online_dpo.json:gold"] > r["metrics"]["metrics/eval_dpo.json:gold"] for r in runs]
    lines.append(f"online DPO's mean gold above offline DPO's: {sum(online)} of {len(runs)} seeds.")
    lines += ["Wall time per seed (s): " + ", ".join(f"seed {r['seed']} {r['wall_s']:.0f} ({len(r['stage_s'])} stages run)"
                                                     for r in runs if "wall_s" in r)]
    return "\n".join(lines)


def committed_metrics() -> dict:
    """Every committed metric, flattened (the committed seed's entry of the study)."""
    return {f"metrics/{p.name}:{k}": v for p in sorted((ROOT / "metrics").glob("*.json"))
            for k, v in flatten(json.loads(p.read_text())).items()}


def same_numbers(study: dict) -> bool:
    """The study was run on code that gives today's committed numbers (its committed seed's
    metrics equal them), so its runs may be kept: a commit that only touched benches or docs
    does not restart it."""
    committed = [r for r in study.get("runs", []) if r.get("committed")]
    return bool(committed) and committed[0]["metrics"] == committed_metrics()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--summarize", action="store_true", help="only summarise bench/seed_study.json")
    ap.add_argument("--with-committed", action="store_true",
                    help="count the committed metrics (params.yaml's seed) as one seed, without rerunning it")
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs bench/seed_study.json holds for this commit; run only the seeds it lacks")
    args = ap.parse_args()
    runs = json.loads(RESULTS.read_text())["runs"] if args.summarize else []
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if args.resume and RESULTS.is_file() and same_numbers(json.loads(RESULTS.read_text())):
        runs = [r for r in json.loads(RESULTS.read_text())["runs"] if not r.get("committed")]
        done = {r["seed"] for r in runs}
        args.seeds = [s for s in args.seeds if s not in done]
        print(f"resuming at {head}: seeds {sorted(done)} kept, {args.seeds} to run", flush=True)
    if args.with_committed and not args.summarize:
        import yaml

        runs.append({"seed": yaml.safe_load((ROOT / "params.yaml").read_text()).get("seed", 0), "committed": True,
                     "metrics": committed_metrics()})
    if not args.summarize:
        with tempfile.TemporaryDirectory() as tmp:
            for seed in args.seeds:
                runs.append(run_seed(seed, Path(tmp)))
                RESULTS.write_text(json.dumps({"commit": head, "machine": platform.processor() or platform.machine(),
                                               "runs": runs}, indent=1) + "\n")  # kept as each seed ends
                print(f"seed {seed}: {runs[-1]['wall_s']:.0f} s", flush=True)
    print(summarize(runs))


if __name__ == "__main__":
    main()
