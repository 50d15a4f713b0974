"""Golden hashes (tests/golden.py): every CPU, at every thread count, must reproduce the committed
sha256 of the tiny graph's training outputs (SFT, both reward models, PPO, DPO, GRPO: weights and
metrics; every evaluation's metrics) and of the default model's first 20 SFT steps. Where two
machines disagree, the one that fails names the first file that differs. This is the check of
cross-CPU exactness: each CI run, on whatever CPU it lands, compares against bits recorded on
another machine (tests/golden.json says which)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, stage_env
from dvc_repo import ran_repo  # noqa: F401 (fixture)
from golden import GOLDEN, first_difference, graph_hashes, sft20_hashes
from helpers import CODE_PATHS, cpu_flags

pytestmark = pytest.mark.skipif(" avx2 " not in cpu_flags(),
                                reason="the pinned numbers need an x86-64 CPU with AVX2")
GOLD = json.loads(GOLDEN.read_text(encoding="utf-8"))
GRAPH = {k: v for k, v in GOLD["sha256"].items() if not k.startswith("sft20/")}
SFT20 = {k: v for k, v in GOLD["sha256"].items() if k.startswith("sft20/")}


def _explain(diff: str | None) -> str:
    return f"{diff} (golden recorded on {GOLD['recorded_on']['cpu']}; re-record only for an intended change: python tests/golden.py --record)"


def test_default_sft_first_20_steps_match_the_golden_hashes(tmp_path):
    got = sft20_hashes(ROOT, tmp_path, {**stage_env(), "CQA_NUMERICS": "pinned"})
    diff = first_difference(got, SFT20)
    assert diff is None, _explain(diff)


@pytest.mark.slow
def test_tiny_graph_matches_the_golden_hashes(ran_repo):  # noqa: F811 (fixture)
    diff = first_difference(graph_hashes(ran_repo), GRAPH)
    assert diff is None, _explain(diff)


@pytest.mark.slow
@pytest.mark.parametrize("threads, path", [("1", "generic"), ("4", "best")])
def test_tiny_graph_at_other_thread_counts_and_code_paths_matches_too(ran_repo, tmp_path, threads, path):  # noqa: F811
    """The whole graph again with CQA_THREADS=1 and 4 (4 oversubscribes a 2-core machine: fine),
    each forced through another CPU code path by the variables the pin overrides (ATen's generic
    or best kernels, another MKL branch, OpenMP threads): the pin must win over all of them."""
    repo = tmp_path / "graph"
    shutil.copytree(ran_repo, repo, symlinks=True)
    env = {**stage_env(), **CODE_PATHS[path], "PYTHONPATH": str(repo / "src"), "CQA_THREADS": threads,
           "CQA_NUMERICS": "pinned"}
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "--force", "-q"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    diff = first_difference(graph_hashes(repo), GRAPH)
    assert diff is None, _explain(f"CQA_THREADS={threads}, {path} code path: {diff}")
    exported = yaml.safe_load((repo / "models" / "sft" / "params.yaml").read_text(encoding="utf-8"))
    assert exported["numerics"] == {"mode": "pinned", "aten": "AVX2", "mkl_cbwr": "AVX2,STRICT"}


def test_first_difference_names_the_first_file_in_golden_order():
    want = {"a": "1", "b": "2", "c": "3"}
    assert first_difference(dict(want), want) is None
    assert first_difference({"a": "1", "b": "x", "c": "y"}, want) == "b: x here, 2 golden"
    assert first_difference({"a": "1"}, want) == "b: missing here, 2 golden"
