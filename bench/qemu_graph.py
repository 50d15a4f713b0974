"""The tiny graph of the tests (tests/dvc_repo.py) under qemu-user's emulated CPUs, compared file by
file with the golden hashes (tests/golden.json). synth, data and tokenizer run natively (no float
maths a CPU changes); every stage that trains or evaluates runs under ``qemu-x86_64 -cpu <CPU>``,
launched directly (a process qemu-user runs starts its children natively, so not through dvc).
Slow: each stage pays torch's import under emulation (about an hour per CPU on 2 cores). The result
(verdict, first differing file, stage seconds) is appended as one JSON line to ``--out``.

    python bench/qemu_graph.py Haswell EPYC-Rome                 # from the project root, in the venv
    python bench/qemu_graph.py Haswell --threads 1 &             # two CPUs side by side, one core each
    python bench/qemu_graph.py EPYC-Rome --threads 1 &
"""

from __future__ import annotations

import argparse
import json
import os
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from dvc_repo import _make_repo  # noqa: E402
from golden import GOLDEN, cpu_info, first_difference, graph_hashes  # noqa: E402

NATIVE = (("synth",), ("data",), ("tokenizer",))
EMULATED = (("sft",), ("reward", "--kind", "regression"), ("reward", "--kind", "classification"), ("ppo",),
            ("dpo",), ("grpo",), ("online_dpo",), ("base",),
            *(("evaluate", "--policy", p) for p in ("base", "sft", "ppo", "dpo", "grpo", "online_dpo")),
            ("bon",), ("overopt",))
OUT = ROOT / "bench" / "qemu_graph.jsonl"


def run(stage: tuple[str, ...], repo: Path, cpu: str | None, threads: int) -> float:
    """One stage in ``repo`` (natively, or under qemu with ``cpu``); its seconds."""
    python = os.path.realpath(sys.executable)
    cmd = [python, "-m", f"cqa_rlhf.stages.{stage[0]}", *stage[1:]]
    env = {**os.environ, "PYTHONPATH": f"{repo / 'src'}{os.pathsep}{site.getsitepackages()[0]}", "CQA_THREADS": str(threads)}
    if cpu:
        cmd = ["qemu-x86_64", "-cpu", cpu, *cmd]
    start = time.time()
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(stage)} under {cpu or 'native'} failed:\n{proc.stderr[-3000:]}")
    return time.time() - start


def one_cpu(cpu: str, threads: int, golden: dict[str, str]) -> dict:
    """Build the tiny graph with ``cpu`` emulated for every training or evaluating stage; the record."""
    with tempfile.TemporaryDirectory() as tmp:
        repo = _make_repo(Path(tmp) / "graph")
        for stage in NATIVE:
            run(stage, repo, None, threads)
        secs = {" ".join(stage): round(run(stage, repo, cpu, threads)) for stage in EMULATED}
        diff = first_difference(graph_hashes(repo), golden)
    return {"date": time.strftime("%Y-%m-%d"), "host_cpu": cpu_info()["cpu"], "qemu_cpu": cpu,
            "threads": threads, "files": len(golden), "equal": diff is None, "first_difference": diff,
            "stage_seconds": secs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cpus", nargs="*", default=["Haswell", "EPYC-Rome"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    golden = {k: v for k, v in json.loads(GOLDEN.read_text())["sha256"].items() if not k.startswith("sft20/")}
    for cpu in args.cpus:
        record = one_cpu(cpu, args.threads, golden)
        verdict = (f"all {len(golden)} hashes equal the golden ones" if record["equal"]
                   else f"DIFFERENT: {record['first_difference']}")
        print(f"qemu -cpu {cpu}: {verdict}; stage seconds {record['stage_seconds']}", flush=True)
        with args.out.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
