"""DVC experiments on the tiny pipeline: `dvc exp run -S` and `dvc metrics diff`. (The same params
twice from a fresh clone: test_golden.py, which also checks the bits against the golden hashes.
A file of its own so that pytest-xdist runs it beside the other DVC workflow files.)"""

from __future__ import annotations

import json

import pytest

from dvc_repo import _dvc, _ran, _run, ran_repo, repo  # noqa: F401 (ran_repo, repo: fixtures)


@pytest.mark.slow
def test_experiment_and_metrics_diff(repo):
    before = json.loads((repo / "metrics/data.json").read_text())
    # The data stage alone (a target): what follows a data change is test_pipeline.py's.
    assert _ran(_dvc("exp", "run", "-S", "data.pairs.min_score_gap=4", "--name", "gap4", "data", cwd=repo)) == {"data"}
    after = json.loads((repo / "metrics/data.json").read_text())
    assert after["train"]["pairs"] < before["train"]["pairs"]
    diff = json.loads(_dvc("metrics", "diff", "--json", cwd=repo).stdout)
    changed = diff["metrics/data.json"]
    assert changed["train.pairs"]["old"] == before["train"]["pairs"]
    assert changed["train.pairs"]["new"] == after["train"]["pairs"]
    shown = json.loads(_dvc("exp", "show", "--json", cwd=repo).stdout)
    assert "gap4" in json.dumps(shown)

    # A PPO experiment: only ppo and what follows it rerun; the diff shows its changed metrics.
    _run(["git", "checkout", "--", "."], repo)  # back to the baseline commit's params and results
    _dvc("checkout", "--force", cwd=repo)
    before_ppo = json.loads((repo / "metrics/ppo.json").read_text())
    proc = _dvc("exp", "run", "-S", "ppo.optim.lr=0.01", "--name", "ppo-lr", cwd=repo)
    assert _ran(proc) == {"ppo", "evaluate@ppo", "overopt", "compare"}
    after_ppo = json.loads((repo / "metrics/ppo.json").read_text())
    assert after_ppo["final"] != before_ppo["final"]
    diff = json.loads(_dvc("metrics", "diff", "--json", cwd=repo).stdout)
    assert diff["metrics/ppo.json"]["final.score"]["old"] == before_ppo["final"]["score"]
    assert diff["metrics/ppo.json"]["final.score"]["new"] == after_ppo["final"]["score"]
    assert "metrics/eval_ppo.json" in diff and "metrics/eval_sft.json" not in diff
    assert "ppo-lr" in json.dumps(json.loads(_dvc("exp", "show", "--json", cwd=repo).stdout))
