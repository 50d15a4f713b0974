"""Same-machine A/B of stage wall time between two checkouts of the project, each after its own
`dvc repro` (its models/ and data/ in place): SFT 200 steps, reward@regression 100 steps, PPO 12
iterations, from each tree's own params.yaml and code (PYTHONPATH=<tree>/src), interleaved, two
repeats; outputs under /tmp/ab.

Usage: python bench/bench_stage_ab.py BEFORE_CHECKOUT AFTER_CHECKOUT
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

TREES = {"before": Path(sys.argv[1]).resolve(), "after": Path(sys.argv[2]).resolve()}
def params(tree: Path, tag: str) -> Path:
    p = yaml.safe_load((tree / "params.yaml").read_text())
    out = Path(f"/tmp/ab/{tag}")
    for sec in (p["sft"], p["reward"]["regression"], p["ppo"]):
        sec.update(out=str(out / "model"), metrics=str(out / "m.json"), live_dir=str(out / "live"),
                   checkpoint_dir=str(out / "ckpt"))
    p["sft"]["max_steps"] = 200
    p["reward"]["regression"]["max_steps"] = 100
    p["ppo"]["iterations"] = 12
    out.parent.mkdir(parents=True, exist_ok=True)
    f = out.parent / f"{tag}.yaml"
    f.write_text(yaml.safe_dump(p))
    return f
def run(tree: Path, stage: str, args: list[str], tag: str) -> float:
    shutil.rmtree(f"/tmp/ab/{tag}", ignore_errors=True)  # a fresh run, never a resume
    f = params(tree, tag)
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "CQA_PROGRESS": "0"}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", f"cqa_rlhf.stages.{stage}", "--params", str(f), *args], cwd=tree,
                   env=env, check=True, capture_output=True)
    return time.perf_counter() - t
res = {}
for rep in range(2):
    for name, tree in (TREES.items() if rep == 0 else reversed(list(TREES.items()))):
        for stage, args in (("sft", []), ("reward", ["--kind", "regression"]), ("ppo", [])):
            s = run(tree, stage, args, f"{name}-{stage}")
            res.setdefault((stage, name), []).append(round(s, 1))
            print(stage, name, rep, f"{s:.1f}s", flush=True)
for (stage, name), v in sorted(res.items()):
    print(f"| {stage} | {name} | {v} |")
