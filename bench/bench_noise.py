"""Per-answer Gumbel noise of one decoding step (cqa_rlhf.generation.step_noise, what GRPO, online
DPO and Best-of-N sample with): the rows in passes of up to NOISE_CHUNK values against one row at a
time (step_noise of one row at a time, the way it worked before), at the default's vocabulary (864)
and SmolLM2's (49152). Both give the same bits (checked on every repeat). Interleaved repeats; the
median and best wall time of each, in ms, at the numeric pin's thread count.

Usage: python bench/bench_noise.py [--repeats 15] [--out bench/noise.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import cqa_rlhf  # noqa: F401  first: it pins the numeric code paths before torch loads
import torch

from cqa_rlhf.generation import step_noise
from machine import cpu_model

CASES = ((864, 64), (864, 16), (49152, 16))  # (vocabulary, rows still answering)


def one_row_at_a_time(seeds: list[int], step: int, vocab: int) -> torch.Tensor:
    """The reference: each row's noise on its own [1, V], stacked [b, V]."""
    return torch.cat([step_noise([s], step, vocab) for s in seeds])


def timed(fn, *args) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn(*args)
    return (time.perf_counter() - start) * 1e3, out


def measure(vocab: int, rows: int, repeats: int) -> dict:
    seeds = list(range(1000, 1000 + rows))
    times: dict[str, list[float]] = {"one row at a time": [], "step_noise": []}
    for rep in range(repeats):
        a_ms, a = timed(one_row_at_a_time, seeds, rep, vocab)
        b_ms, b = timed(step_noise, seeds, rep, vocab)
        assert torch.equal(a, b), (vocab, rows, rep)
        times["one row at a time"].append(a_ms)
        times["step_noise"].append(b_ms)
    return {"vocab": vocab, "rows": rows,
            **{name: {"median_ms": round(statistics.median(t), 3), "best_ms": round(min(t), 3)} for name, t in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default="bench/noise.json")
    args = ap.parse_args()
    results = [measure(v, r, args.repeats) for v, r in CASES]
    for r in results:
        print(f"V {r['vocab']:6d}, {r['rows']:3d} rows: one row at a time {r['one row at a time']['median_ms']:8.2f} ms, "
              f"step_noise {r['step_noise']['median_ms']:8.2f} ms (medians)")
    Path(args.out).write_text(json.dumps({"threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(),
                                          "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
