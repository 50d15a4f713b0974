"""What the numeric pin costs (CQA_NUMERICS, src/cqa_rlhf/numerics.py), measured both ways in one
run on one machine:

1. the default pipeline, every stage, `dvc repro` in a fresh clone of HEAD (its own DVC cache,
   so nothing is restored) under ``CQA_NUMERICS=free`` and under ``pinned``, and how many
   metrics files come out byte-identical to the committed ones (all of them, pinned);
2. SFT step time (bench/bench_sft.py, default config) and PPO phase times (bench/bench_ppo.py,
   the pinned clone's trained models), free vs pinned.

    python bench/bench_pin_cost.py            # about 30 minutes on 2 cores
    python bench/bench_pin_cost.py --modes free --pinned-from bench/seed_study.json   # pinned: the seed runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_model
from seed_study import timed_run  # the same stage timing as the seed study (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "pin_cost.json"  # the last run's stage times, as data
MODES = ("free", "pinned")


def repro(clone: Path, mode: str) -> dict[str, float]:
    """Seconds per stage of a full `dvc repro` (from the times DVC starts each stage), and total."""
    env = {**os.environ, "CQA_NUMERICS": mode, "CQA_PROGRESS": "0"}
    stages, total = timed_run([sys.executable, "-m", "dvc", "repro"], clone, env)
    return {**stages, "total": total}


def table(stages: dict[str, dict[str, float]]) -> str:
    """Seconds per stage for the modes that ran (and pinned / free when both did)."""
    modes = [m for m in MODES if m in stages]
    names = dict.fromkeys(n for m in modes for n in stages[m])
    rows = ["| stage | " + " | ".join(f"{m} (s)" for m in modes) + (" | pinned / free |" if len(modes) == 2 else " |"),
            "|---" * (len(modes) + 1 + (len(modes) == 2)) + "|"]
    for n in names:
        cells = [f"{stages[m].get(n, float('nan')):.1f}" for m in modes]
        if len(modes) == 2:
            cells.append(f"{stages['pinned'].get(n, float('nan')) / stages['free'].get(n, float('nan')):.2f}")
        rows.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def bench_lines(cmd: list[str], cwd: Path, mode: str) -> list[str]:
    """The result table rows a bench script prints."""
    proc = subprocess.run([sys.executable, *cmd], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "CQA_NUMERICS": mode, "CQA_PROGRESS": "0"})
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} ({mode}) failed: {proc.stderr[-2000:]}")
    return [ln for ln in proc.stdout.splitlines() if ln.startswith("| ") and "---" not in ln]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--pinned-from", type=Path, default=None,
                    help="take the pinned stage times from bench/seed_study.json (each stage: the mean over the seeds that ran it)")
    ap.add_argument("--skip-steps", action="store_true", help="only the dvc repro times")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stages: dict[str, dict[str, float]] = {}
        if args.pinned_from:
            runs = [r for r in json.loads(args.pinned_from.read_text())["runs"] if "stage_s" in r]
            names = dict.fromkeys(n for r in runs for n in r["stage_s"])
            stages["pinned"] = {n: statistics.mean(r["stage_s"][n] for r in runs if n in r["stage_s"]) for n in names}
            stages["pinned"]["total"] = sum(stages["pinned"].values())
        for mode in args.modes:
            clone = Path(tmp) / mode
            subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
            stages[mode] = repro(clone, mode)
            same = [p.name for p in sorted((ROOT / "metrics").glob("*.json"))
                    if (clone / "metrics" / p.name).read_bytes() == p.read_bytes()]
            print(f"{mode}: dvc repro {stages[mode]['total']:.0f} s; metrics files byte-identical to the "
                  f"committed ones: {len(same)} of {len(list((ROOT / 'metrics').glob('*.json')))}", flush=True)
        steps = {} if args.skip_steps else {
            mode: bench_lines(["bench/bench_sft.py", "--steps", "40", "--skip-big"], ROOT, mode) for mode in MODES}
        ppo = {} if args.skip_steps else {
            mode: bench_lines(["bench/bench_ppo.py", "--iterations", "4", "--skip-big"], ROOT, mode) for mode in MODES}
    cpu = cpu_model()
    print(f"\n{time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} cores\n")
    print(table(stages))
    OUT.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpu": cpu, "cores": os.cpu_count(),
                               "stage_s": stages}, indent=1) + "\n")
    for mode in steps:
        print(f"\nSFT step, {mode}:\n" + "\n".join(steps[mode]) + f"\n\nPPO phases, {mode}:\n" + "\n".join(ppo[mode]))


if __name__ == "__main__":
    main()
