"""Golden hashes: the sha256 of the tiny graph's training outputs and of the default model's first
20 SFT steps, committed in tests/golden.json. Every CPU, Intel or AMD, AVX2 or AVX-512, at any
thread count, must reproduce them bit for bit under the numeric pin (tests/test_golden.py).

Re-record after a change that is meant to move the numbers (a new pin, new maths, new defaults):

    python tests/golden.py --record          # from the project root, in the venv (~3 minutes)
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from pathlib import Path

import yaml

GOLDEN = Path(__file__).with_name("golden.json")
MODELS = ("sft", "reward/regression", "reward/classification", "ppo", "dpo", "grpo", "online_dpo")
# Metrics of every stage that trains or evaluates; compare.json and the leaderboard also hold wall times.
METRICS = ("data", "sft", "reward_regression", "reward_classification", "ppo", "dpo", "grpo", "online_dpo",
           "eval_base", "eval_sft", "eval_ppo", "eval_dpo", "eval_grpo", "eval_online_dpo", "eval_bon", "overopt")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def graph_hashes(repo: Path) -> dict[str, str]:
    """sha256 of every trained model's weights and every stage's metrics in a ran tiny graph."""
    files = [f"models/{m}/model.safetensors" for m in MODELS] + [f"metrics/{m}.json" for m in METRICS]
    return {f: sha256(repo / f) for f in files}


def first_difference(got: dict[str, str], want: dict[str, str]) -> str | None:
    """The first file (in the golden order) whose hash differs, with both hashes; None if all equal."""
    for name, digest in want.items():
        if got.get(name) != digest:
            return f"{name}: {got.get(name, 'missing')} here, {digest} golden"
    return None


def sft20_params(root: Path, work: Path) -> Path:
    """The default params with SFT cut to 20 steps, every output under ``work`` (the default
    graph's synth, data and tokenizer too, so nothing of the workspace is read or written)."""
    p = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
    p["synth"]["out"] = str(work / "raw")
    p["data"].update(source=str(work / "raw"), out=str(work / "prepared"), metrics=str(work / "data.json"))
    p["tokenizer"]["out"] = str(work / "tok")
    p["sft"].update(data=str(work / "prepared"), max_steps=20, val_check_interval=10, out=str(work / "sft"),
                    metrics=str(work / "sft.json"), live_dir=str(work / "live"), checkpoint_dir=str(work / "ckpt"))
    p["trainer"]["log_every_n_steps"] = 1
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(p, sort_keys=False), encoding="utf-8")
    return path


def sft20_hashes(root: Path, work: Path, env: dict[str, str]) -> dict[str, str]:
    """The default model's first 20 SFT steps (default data and tokenizer): weights, metrics and
    the loss of every step."""
    params = sft20_params(root, work)
    for stage in ("synth", "data", "tokenizer", "sft"):
        proc = subprocess.run([sys.executable, "-m", f"cqa_rlhf.stages.{stage}", "--params", str(params)],
                              capture_output=True, text=True, env=env, cwd=work, timeout=900)
        if proc.returncode != 0:
            raise AssertionError(f"{stage} failed:\n{proc.stderr[-3000:]}")
    return {"sft20/model.safetensors": sha256(work / "sft" / "model.safetensors"),
            "sft20/sft.json": sha256(work / "sft.json"),
            "sft20/train_loss.tsv": sha256(work / "live" / "plots" / "metrics" / "train" / "loss.tsv")}


def cpu_info() -> dict[str, str | bool]:
    """The CPU's name and vendor, and whether it has AVX-512 (/proc/cpuinfo)."""
    info = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return {"cpu": info.get("model name", platform.processor()), "vendor": info.get("vendor_id", ""),
            "avx512": "avx512f" in info.get("flags", "").split()}


def record() -> None:
    """Run both and write tests/golden.json (from the project root)."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import ROOT, stage_env
    from dvc_repo import _build_ran_repo

    with tempfile.TemporaryDirectory() as tmp:
        repo = _build_ran_repo(Path(tmp) / "graph")
        hashes = graph_hashes(repo)
        (Path(tmp) / "sft20").mkdir()
        hashes |= sft20_hashes(ROOT, Path(tmp) / "sft20", stage_env())
    import torch

    recorded = {**cpu_info(), "python": platform.python_version(), "torch": torch.__version__}
    GOLDEN.write_text(json.dumps({"recorded_on": recorded, "sha256": hashes}, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN}: {len(hashes)} hashes")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit(__doc__)
    record()
