"""Golden hashes (tests/golden.py): every CPU, at every thread count, must reproduce the committed
sha256 of the tiny graph's training outputs (SFT, both reward models, PPO, DPO, GRPO: weights and
metrics; every evaluation's metrics) and of the default model's first 20 SFT steps. Where two
machines disagree, the one that fails names the first file that differs. The graph is trained
again at 1 and 4 threads (the fixture's run uses every core), on forced code paths, from a copy
without checkpoints and from a fresh clone: the same bits. This is the check of
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
from dvc_repo import ALL, _dvc, _ran, _run, ran_repo  # noqa: F401 (fixture)
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


def _pinned_env(repo, path: str, threads: str) -> dict[str, str]:
    """The stages' environment forced through another CPU code path by the variables the pin
    overrides (ATen's generic or best kernels, another MKL branch, OpenMP threads): the pin must
    win over all of them."""
    return {**stage_env(), **CODE_PATHS[path], "PYTHONPATH": str(repo / "src"), "CQA_THREADS": threads,
            "CQA_NUMERICS": "pinned"}


def _repro(repo, env, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", *args], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _assert_golden_and_pinned(repo, what: str) -> None:
    diff = first_difference(graph_hashes(repo), GRAPH)
    assert diff is None, _explain(f"{what}: {diff}")
    exported = yaml.safe_load((repo / "models" / "sft" / "params.yaml").read_text(encoding="utf-8"))
    assert exported["numerics"] == {"mode": "pinned", "aten": "AVX2", "mkl_cbwr": "AVX2,STRICT"}


@pytest.mark.long  # outside CI (it would pass 20 minutes): python -m pytest -m long
def test_tiny_graph_retrained_at_one_thread_on_the_generic_path_matches_too(ran_repo, tmp_path):  # noqa: F811
    """The whole graph trained again (`dvc repro --force` in a copy without its checkpoints, so no
    stage can resume from its finished run) with CQA_THREADS=1 on ATen's generic kernels."""
    repo = tmp_path / "graph"
    shutil.copytree(ran_repo, repo, symlinks=True)
    shutil.rmtree(repo / "checkpoints")
    proc = _repro(repo, _pinned_env(repo, "generic", "1"), "--force")
    assert "resuming from" not in proc.stderr
    _assert_golden_and_pinned(repo, "CQA_THREADS=1, generic code path")


@pytest.mark.slow
def test_a_fresh_clone_at_four_threads_writes_the_same_bytes(ran_repo, tmp_path):  # noqa: F811
    """The same params twice: a fresh git clone (no outputs, no checkpoints, no DVC cache) and
    plain `dvc repro`, with CQA_THREADS=4 (oversubscribing a 2-core machine: fine) on the best
    kernels. Every stage reruns (compare and overopt need not: their outputs are in git), every
    metrics file is the committed bytes, and the golden hashes
    hold."""
    fresh = tmp_path / "again"
    _run(["git", "clone", "-q", str(ran_repo), str(fresh)], tmp_path)
    assert not (fresh / "checkpoints").exists() and not (fresh / "models" / "sft").exists()
    ran = _ran(_repro(fresh, _pinned_env(fresh, "best", "4")))
    assert ran >= ALL - {"compare", "overopt"}, ran
    names = sorted(p.name for p in (ran_repo / "metrics").glob("*.json"))
    assert names == ["compare.json", "data.json", "dpo.json", "eval_base.json", "eval_bon.json", "eval_dpo.json",
                     "eval_grpo.json", "eval_online_dpo.json", "eval_ppo.json", "eval_sft.json", "grpo.json",
                     "online_dpo.json", "overopt.json", "ppo.json", "reward_classification.json",
                     "reward_regression.json", "sft.json"]
    for name in names:
        assert (fresh / "metrics" / name).read_bytes() == (ran_repo / "metrics" / name).read_bytes(), name
    assert json.loads(_dvc("metrics", "diff", "--json", cwd=fresh).stdout or "{}") == {}
    _assert_golden_and_pinned(fresh, "a fresh clone, CQA_THREADS=4, best code path")


def test_first_difference_names_the_first_file_in_golden_order():
    want = {"a": "1", "b": "2", "c": "3"}
    assert first_difference(dict(want), want) is None
    assert first_difference({"a": "1", "b": "x", "c": "y"}, want) == "b: x here, 2 golden"
    assert first_difference({"a": "1"}, want) == "b: missing here, 2 golden"
