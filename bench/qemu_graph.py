"""The tiny graph of the tests (tests/dvc_repo.py) under qemu-user's emulated CPUs, compared file by
file with the golden hashes (tests/golden.json). synth, data and tokenizer run natively (no float
maths a CPU changes); every stage that trains or evaluates runs under ``qemu-x86_64 -cpu <CPU>``,
launched directly (a process qemu-user runs starts its children natively, so not through dvc).
Slow: each stage pays torch's import under emulation.

    python bench/qemu_graph.py Haswell EPYC-Rome       # from the project root, in the venv
"""

from __future__ import annotations

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
from golden import GOLDEN, first_difference, graph_hashes  # noqa: E402

NATIVE = (("synth",), ("data",), ("tokenizer",))
EMULATED = (("sft",), ("reward", "--kind", "regression"), ("reward", "--kind", "classification"), ("ppo",),
            ("dpo",), ("grpo",), ("base",), *(("evaluate", "--policy", p) for p in ("base", "sft", "ppo", "dpo", "grpo")))


def run(stage: tuple[str, ...], repo: Path, cpu: str | None) -> float:
    """One stage in ``repo`` (natively, or under qemu with ``cpu``); its seconds."""
    python = os.path.realpath(sys.executable)
    cmd = [python, "-m", f"cqa_rlhf.stages.{stage[0]}", *stage[1:]]
    env = {**os.environ, "PYTHONPATH": f"{repo / 'src'}{os.pathsep}{site.getsitepackages()[0]}", "CQA_THREADS": "2"}
    if cpu:
        cmd = ["qemu-x86_64", "-cpu", cpu, *cmd]
    start = time.time()
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(stage)} under {cpu or 'native'} failed:\n{proc.stderr[-3000:]}")
    return time.time() - start


def main() -> None:
    import json

    golden = {k: v for k, v in json.loads(GOLDEN.read_text())["sha256"].items() if not k.startswith("sft20/")}
    for cpu in sys.argv[1:] or ["Haswell", "EPYC-Rome"]:
        with tempfile.TemporaryDirectory() as tmp:
            repo = _make_repo(Path(tmp) / "graph")
            for stage in NATIVE:
                run(stage, repo, None)
            secs = {" ".join(stage): round(run(stage, repo, cpu)) for stage in EMULATED}
            diff = first_difference(graph_hashes(repo), golden)
            verdict = f"all {len(golden)} hashes equal the golden ones" if diff is None else f"DIFFERENT: {diff}"
            print(f"qemu -cpu {cpu}: {verdict}; stage seconds {secs}", flush=True)


if __name__ == "__main__":
    main()
