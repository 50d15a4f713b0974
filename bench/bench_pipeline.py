"""Wall time of the whole default pipeline as a newcomer runs it, and of a no-op `dvc repro`.

Clones the committed repository into a temporary directory (`../shared` is not needed: the
default data is embedded), runs `dvc repro` there with this interpreter's environment, times it
stage by stage from DVC's output, then times `dvc repro` again (nothing to do) a few times, and
checks with `dvc metrics diff` that the committed metrics were reproduced.

Usage: python bench/bench_pipeline.py [--noop-runs 3] [--keep]
Targets (issue #6): full default pipeline <= 15 minutes; no-op `dvc repro` <= 3 seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path) -> tuple[float, str]:
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("PYTHONPATH", None)
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return elapsed, proc.stdout + proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--noop-runs", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    args = ap.parse_args()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, commit {head}")
    tmp = Path(tempfile.mkdtemp(prefix="cqa-bench-"))
    clone = tmp / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    dvc = [sys.executable, "-m", "dvc"]

    full, out = run([*dvc, "repro"], clone)
    stamps = [line for line in out.splitlines() if line.startswith("Running stage")]
    print(f"full `dvc repro`: {full:.0f} s ({full / 60:.1f} min) for {len(stamps)} stages")
    for line in out.splitlines():
        if any(line.startswith(f"{s}:") or line.startswith(f"{s}@") for s in
               ("synth", "data", "tokenizer", "sft", "reward", "ppo", "base", "evaluate", "compare")):
            print(f"  {line}")
    noop = []
    for _ in range(args.noop_runs):
        t, out = run([*dvc, "repro"], clone)
        assert "Running stage" not in out, out
        noop.append(t)
    print(f"no-op `dvc repro`: {', '.join(f'{t:.2f}' for t in noop)} s (min {min(noop):.2f})")
    _, diff = run([*dvc, "metrics", "diff", "--json"], clone)
    changed = json.loads(diff or "{}")
    print("committed metrics reproduced exactly" if not changed else f"metrics differ: {json.dumps(changed)[:2000]}")
    if args.keep:
        print(f"clone kept at {clone}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
