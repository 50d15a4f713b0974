"""Each stage's wall time and the GPU's peak used memory while it ran, from bench/gpu_smoke.sh's
logs: dvc's output with a Unix time on every line ("Running stage 'sft':" starts a stage) and
nvidia-smi's samples (timestamp, MiB used)."""

from __future__ import annotations

import argparse
import csv
import re
from datetime import datetime


def stages(log: str) -> list[tuple[str, float, float]]:
    """(stage, start, end): a stage runs from its "Running stage" line to the next one or the log's end."""
    rows = [(float(t), rest) for t, _, rest in (line.partition(" ") for line in open(log, encoding="utf-8")) if t]
    starts = [(t, m.group(1)) for t, rest in rows if (m := re.search(r"Running stage '([^']+)'", rest))]
    ends = [t for t, _ in starts[1:]] + [rows[-1][0]]
    return [(name, t, end) for (t, name), end in zip(starts, ends)]


def memory(path: str) -> list[tuple[float, float]]:
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for stamp, used in csv.reader(f):
            when = datetime.strptime(stamp.strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
            out.append((when, float(used)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("logs", nargs="+")
    ap.add_argument("--memory", required=True)
    args = ap.parse_args()
    samples = memory(args.memory)
    print("| stage | wall s | peak GPU memory MiB |\n|---|---|---|")
    for log in args.logs:
        for name, start, end in stages(log):
            peak = max((used for t, used in samples if start <= t <= end), default=float("nan"))
            print(f"| {name}{' (fsdp)' if 'fsdp' in log else ''} | {end - start:.1f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
