"""Does a run reproduce a revision's numbers, within tolerances? For where bits cannot match:
a GPU, another BLAS, another torch version. Exact reproduction on x86-64 CPUs is checked by
`dvc metrics diff` being empty; this check reruns nothing itself.

It compares every metric of ``dvc metrics diff --all --json <rev> [<run>]`` (the run: the workspace
by default, or any revision or experiment) and fails when a number moves more than its tolerance.
Tolerances come from the 5-seed study (bench/seed_study.py writes them): for each metric,
``--k`` (default 3) times its standard deviation across seeds. A metric that was the same under
every seed (counts, sizes) must match exactly; text values must be equal; a metric the study has
no tolerance for fails, so a new metric gets one before it is trusted.

    python scripts/check_repro.py                      # the workspace against HEAD
    python scripts/check_repro.py --rev v1 --run my-exp --k 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

TOLERANCES = Path(__file__).resolve().parents[1] / "bench" / "seed_sd.json"


def metrics_diff(rev: str, run: str | None) -> dict[str, dict[str, dict]]:
    """``{file: {key: {"old", "new", "diff"}}}`` for every metric, changed or not."""
    cmd = [sys.executable, "-m", "dvc", "metrics", "diff", "--all", "--json", rev, *([run] if run else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"check_repro: {' '.join(cmd[2:])} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout or "{}")


def problems(diff: dict[str, dict[str, dict]], sd: dict[str, float], k: float) -> list[str]:
    """One line per metric outside its tolerance (or without one)."""
    out = []
    for path, keys in sorted(diff.items()):
        for key, d in sorted(keys.items()):
            name, old, new = f"{path}:{key}", d.get("old"), d.get("new")
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (old, new))
            if not numbers:
                if old != new:
                    out.append(f"{name}: {old!r} -> {new!r}")
            elif name not in sd:
                out.append(f"{name}: {old} -> {new}: no tolerance (rerun bench/seed_study.py)")
            elif abs(new - old) > k * sd[name]:
                out.append(f"{name}: {old} -> {new}: moved {abs(new - old):.6g} > {k:g} x seed sd {sd[name]:.6g}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default="HEAD", help="the revision whose metrics are the reference (default HEAD)")
    ap.add_argument("--run", default=None, help="the run to check: a revision or experiment (default: the workspace)")
    ap.add_argument("--k", type=float, default=3.0, help="tolerance in seed standard deviations (default 3)")
    ap.add_argument("--tolerances", type=Path, default=TOLERANCES, help=f"seed sds (default {TOLERANCES.name})")
    args = ap.parse_args(argv)
    sd = json.loads(args.tolerances.read_text(encoding="utf-8"))["sd"]
    diff = metrics_diff(args.rev, args.run)
    bad = problems(diff, sd, args.k)
    checked = sum(len(v) for v in diff.values())
    for line in bad:
        print(line, file=sys.stderr)
    print(f"check_repro: {checked - len(bad)} of {checked} metrics within {args.k:g} seed sd of {args.rev}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
