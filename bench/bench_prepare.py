"""Benchmark the data stage: throughput (MB/s of XML) and peak RSS on large generated dumps.

Large dumps are made by repeating the real rows of the dumps in ../shared (beer and
matheducators) with fresh ids (ParentId/AcceptedAnswerId remapped), so the text is real and the
question/answer structure is kept. Prepare runs as the real stage CLI in a subprocess; peak RSS
is the largest sum of RSS over its process tree (parent + cleaning workers), sampled every 50 ms.

Usage: python bench/bench_prepare.py [--sizes 100,1000] [--budget 512] [--keep]
Writes the figures as a Markdown table on stdout (paste into bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

from cqa_rlhf.data.tables import read_table

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "stackexchange"
SITES = ("beer.stackexchange.com", "matheducators.stackexchange.com")
_ROW = re.compile(rb"^\s*<row .*/>\s*$")
_ID = re.compile(rb'( Id|ParentId|AcceptedAnswerId)="(\d+)"')


def make_dump(path: Path, target_mb: int) -> int:
    """Write a Posts.xml of about ``target_mb`` MB by repeating real rows with fresh ids."""
    rows = []
    for site in SITES:
        for line in (SHARED / site / "Posts.xml").read_bytes().splitlines():
            if _ROW.match(line):
                rows.append(line.strip())
    max_id = max(int(m.group(2)) for r in rows for m in _ID.finditer(r) if m.group(1) == b" Id")
    stride = max_id + 1
    target = target_mb * 10**6
    written = 0
    with open(path, "wb") as f:
        f.write(b'\xef\xbb\xbf<?xml version="1.0" encoding="utf-8"?>\r\n<posts>\r\n')
        copy = 0
        while written < target:
            offset = copy * stride
            for r in rows:
                line = _ID.sub(lambda m: m.group(1) + b'="' + str(int(m.group(2)) + offset).encode() + b'"', r)
                f.write(b"  " + line + b"\r\n")
                written += len(line) + 4
            copy += 1
        f.write(b"</posts>\r\n")
    return path.stat().st_size


def run_prepare(source: Path, out: Path, budget_mb: int, extra: dict | None = None) -> dict:
    params = {"data": {"source": str(source), "out": str(out), "metrics": str(out) + ".json",
                       "memory_budget_mb": budget_mb, **(extra or {})}}
    pfile = out.parent / f"params-{out.name}.yaml"
    pfile.write_text(yaml.safe_dump(params))
    start = time.perf_counter()
    proc = psutil.Popen([sys.executable, "-m", "cqa_rlhf.stages.data", "--params", str(pfile)],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - start
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed: {err.decode()}")
    return {"wall_s": wall, "peak_rss_mb": peak / 2**20}


def same_output(a: Path, b: Path) -> bool:
    for split in ("train", "val", "test"):
        for table in ("sft", "reward", "pairs", "prompts"):
            if not read_table(a / split / table).equals(read_table(b / split / table)):
                return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100,1000", help="dump sizes in MB")
    ap.add_argument("--budget", type=int, default=512, help="data.memory_budget_mb")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-prepare-", dir=os.environ.get("BENCH_TMP")))
    rows = []
    try:
        # Same output as an in-memory run: one shard, no workers vs. many shards with workers.
        small = SHARED / SITES[0]
        mem = run_prepare(small, tmp / "inmem", 4096, {"shards": 1, "workers": 0})
        streamed = run_prepare(small, tmp / "sharded", 512, {"shards": 16, "workers": 2})
        same = same_output(tmp / "inmem", tmp / "sharded")
        print(f"small dump ({SITES[0]}): 1 shard in-process vs 16 shards in 2 worker processes: "
              f"identical output = {same} ({mem['wall_s']:.2f}s vs {streamed['wall_s']:.2f}s)")
        for mb in (int(s) for s in args.sizes.split(",")):
            dump = tmp / f"dump{mb}" / "Posts.xml"
            dump.parent.mkdir()
            size = make_dump(dump, mb)
            res = run_prepare(dump.parent, tmp / f"out{mb}", args.budget)
            meta = yaml.safe_load((tmp / f"out{mb}.json").read_text())
            rows.append((size, res, meta))
            print(f"{size / 1e6:8.0f} MB: {size / 1e6 / res['wall_s']:6.1f} MB/s, "
                  f"peak RSS {res['peak_rss_mb']:7.0f} MB, wall {res['wall_s']:6.1f}s, "
                  f"questions {meta['input']['questions']}", flush=True)
            shutil.rmtree(dump.parent)
            shutil.rmtree(tmp / f"out{mb}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    cpu = platform.processor() or platform.machine()
    print(f"\nmachine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, {cpu}; "
          f"budget {args.budget} MB")
    print("| dump | MB/s | peak RSS (MB) | wall (s) | questions in |")
    print("|---|---|---|---|---|")
    for size, res, meta in rows:
        print(f"| {size / 1e6:.0f} MB | {size / 1e6 / res['wall_s']:.1f} | {res['peak_rss_mb']:.0f} | "
              f"{res['wall_s']:.1f} | {meta['input']['questions']} |")


if __name__ == "__main__":
    main()
