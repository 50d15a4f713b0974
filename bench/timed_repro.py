"""The README's first command on a fresh clone of this checkout, timed by stage: ``scripts/setup.sh``,
then ``dvc repro`` in the clone's venv, its stages timed by the seed study's ``timed_run`` (from the
times DVC starts each one, as ``bench_pin_cost.py`` times its runs). Prints the stage seconds and
writes them as JSON. The clone is deleted first and kept afterwards, to diff its metrics and lock.

Usage: python3 bench/timed_repro.py [--clone ../fresh] [--out bench/timed_repro.json]
(any Python 3: it needs no package, the clone's setup makes its own venv)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from machine import cpu_model
from seed_study import timed_run

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clone", type=Path, default=ROOT.parent / "fresh")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "timed_repro.json")
    args = ap.parse_args()
    clone = args.clone.resolve()
    shutil.rmtree(clone, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    start = time.perf_counter()
    subprocess.run(["bash", "scripts/setup.sh"], cwd=clone, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    setup = time.perf_counter() - start
    stages, graph = timed_run(["bash", "-c", "source .venv/bin/activate && dvc repro"], clone, dict(os.environ))
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    result = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "cores": os.cpu_count(), "commit": head,
              "setup_s": round(setup, 1), "graph_s": round(graph, 1), "stage_s": stages}
    print(json.dumps(result, indent=1))
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
