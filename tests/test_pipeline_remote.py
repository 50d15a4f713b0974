"""Sharing runs through a DVC remote (a local folder here; S3, GCS or SSH alike): a teammate's
fresh clone pulls every stage's outputs and has nothing to rerun; an experiment pushed from one
clone shows in another's `dvc exp show`. (A file of its own so that pytest-xdist runs it beside
the other DVC workflow files.)"""

from __future__ import annotations

import json

import pytest

from dvc_repo import _dvc, _ran, _run, ran_repo, repo  # noqa: F401 (ran_repo, repo: fixtures)


@pytest.mark.slow
def test_a_pulled_clone_is_up_to_date_and_sees_a_pushed_experiment(repo, tmp_path):
    remote = tmp_path / "remote"
    _dvc("remote", "add", "-d", "shared", str(remote), cwd=repo)
    _run(["git", "commit", "-qam", "a DVC remote"], repo)
    _dvc("push", cwd=repo)
    assert any(remote.rglob("*"))  # the cached outputs (models, prepared tables) are there

    # 1. A teammate clones the git repo and pulls: every output in place, nothing to run.
    mate = tmp_path / "mate"
    _run(["git", "clone", "-q", str(repo), str(mate)], tmp_path)
    assert not (mate / "models" / "sft").exists()  # cached outputs are not in git
    _dvc("pull", cwd=mate)
    assert (mate / "models" / "sft" / "model.safetensors").is_file()
    assert "Data and pipelines are up to date" in _dvc("status", cwd=mate).stdout
    assert _ran(_dvc("repro", cwd=mate)) == set()

    # 2. The teammate runs an experiment and pushes it; a third clone pulls and shows it.
    assert _ran(_dvc("exp", "run", "-S", "compare.baseline=base", "--name", "vs-base", cwd=mate)) == {"compare"}
    _dvc("exp", "push", "origin", "vs-base", cwd=mate)
    third = tmp_path / "third"
    _run(["git", "clone", "-q", str(repo), str(third)], tmp_path)
    _dvc("exp", "pull", "origin", "vs-base", cwd=third)
    shown = json.dumps(json.loads(_dvc("exp", "show", "--json", cwd=third).stdout))
    assert "vs-base" in shown and "ppo_vs_base" in shown  # its metrics: the leaderboard against base
