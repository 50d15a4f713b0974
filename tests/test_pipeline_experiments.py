"""DVC experiments on the tiny pipeline: `dvc exp run -S` and `dvc metrics diff`, the same params
twice from a fresh clone. (A file of its own so that pytest-xdist runs it beside the other DVC
workflow files.)"""

from __future__ import annotations

import json

import pytest

from dvc_repo import ALL, _dvc, _ran, _run, ran_repo, repo  # noqa: F401 (ran_repo, repo: fixtures)


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


@pytest.mark.slow
def test_same_params_twice_give_byte_identical_metrics(repo):
    """The whole tiny graph run again from a fresh clone (no outputs, no checkpoints) writes the
    same bytes into every metrics file as the committed run."""
    fresh = repo.parent / "again"
    _run(["git", "clone", "-q", str(repo), str(fresh)], repo.parent)
    ran = _ran(_dvc("repro", cwd=fresh))
    # compare's and overopt's outputs are in git (metrics and plots, not cached), and so are the
    # sample tables overopt reads: each reruns only if its inputs differ (the golden reruns force it)
    assert ran >= ALL - {"compare", "overopt"}
    names = sorted(p.name for p in (repo / "metrics").glob("*.json"))
    assert names == ["compare.json", "data.json", "dpo.json", "eval_base.json", "eval_bon.json", "eval_dpo.json",
                     "eval_grpo.json", "eval_online_dpo.json", "eval_ppo.json", "eval_sft.json", "grpo.json",
                     "online_dpo.json", "overopt.json", "ppo.json", "reward_classification.json",
                     "reward_regression.json", "sft.json"]
    for name in names:
        assert (fresh / "metrics" / name).read_bytes() == (repo / "metrics" / name).read_bytes(), name
    assert json.loads(_dvc("metrics", "diff", "--json", cwd=fresh).stdout or "{}") == {}
