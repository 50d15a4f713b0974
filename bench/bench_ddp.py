"""Benchmark data parallelism on this machine: the real `sft` stage with 1 process and with
`devices: 2` (DDP over gloo), the same global batch, on the pipeline's prepared data.

Each configuration runs twice, for `--steps` and `--steps * 3` optimizer steps; the difference
of the two wall times over the difference of steps is the time per step without the fixed costs
(process start, imports, the DDP launch, evaluation and export).

Needs the prepared data and tokenizer: run `dvc repro tokenizer` first.
Usage: python bench/bench_ddp.py [--steps 50] [--batch 16]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(work: Path, devices: int, steps: int, batch: int) -> float:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["trainer"].update(devices=devices, strategy="ddp" if devices > 1 else "auto")
    params["sft"].update(data=str(ROOT / params["sft"]["data"]), batch_size=batch // devices, max_steps=steps,
                         val_check_interval=10 ** 6, out=str(work / "sft"), metrics=str(work / "sft.json"),
                         live_dir=str(work / "live"), checkpoint_dir=str(work / "ckpt"),
                         sample={**params["sft"]["sample"], "n": 8})
    params["tokenizer"]["out"] = str(ROOT / params["tokenizer"]["out"])
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cqa_rlhf.stages.sft", "--params", str(work / "params.yaml")],
                   cwd=work, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=16, help="global batch (split over the processes)")
    args = ap.parse_args()
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {platform.machine()}, torch {torch.__version__}; "
          f"sft stage, default model, global batch {args.batch}")
    print("| processes | threads each | wall, {0} steps (s) | wall, {1} steps (s) | s / step | fixed cost (s) |"
          .format(args.steps, 3 * args.steps))
    print("|---|---|---|---|---|---|")
    for devices in (1, 2):
        walls = []
        for steps in (args.steps, 3 * args.steps):
            with tempfile.TemporaryDirectory() as tmp:
                walls.append(run(Path(tmp), devices, steps, args.batch))
        per_step = (walls[1] - walls[0]) / (2 * args.steps)
        threads = max(1, (os.cpu_count() or 1) // devices)  # Lightning's default under DDP on CPU
        print(f"| {devices} | {threads} | {walls[0]:.1f} | {walls[1]:.1f} | {per_step:.3f} | "
              f"{walls[0] - per_step * args.steps:.1f} |")


if __name__ == "__main__":
    main()
