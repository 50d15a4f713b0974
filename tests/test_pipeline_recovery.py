"""The tiny pipeline under interruption and in DVC's queue: a killed `dvc repro` resumes to the
bytes of an uninterrupted one; a queued experiment under another seed runs under the numeric pin."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import stage_env
from dvc_repo import EVAL, METHODS, REWARD, _dvc, _ran, _run, ran_repo, repo  # noqa: F401 (ran_repo, repo: fixtures)


@pytest.mark.long  # outside CI (it would pass 20 minutes): python -m pytest -m long
def test_killed_dvc_repro_resumes_and_matches_an_uninterrupted_run(repo):
    """A crash in the middle of `dvc repro` (the whole process group SIGKILLed while `ppo` trains,
    after its first checkpoint), then `dvc repro` again: ppo resumes and the metrics downstream
    are the bytes an uninterrupted `dvc repro` writes."""
    import os
    import signal
    import time

    import torch

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["ppo"].update(iterations=30, eval_every=5, samples_every=5)  # long enough to interrupt
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "commit", "-qam", "30 ppo iterations"], repo)
    whole = repo.parent / "whole"
    _run(["git", "clone", "-q", str(repo), str(whole)], repo.parent)
    shutil.copytree(repo / ".dvc" / "cache", whole / ".dvc" / "cache", dirs_exist_ok=True)
    _dvc("checkout", cwd=whole)
    assert _ran(_dvc("repro", cwd=whole)) == {"ppo", "evaluate@ppo", "overopt", "compare"}

    env = {**stage_env(), "PYTHONPATH": str(repo / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # The committed 2-iteration run left a last.ckpt: wait for one written by this run.
    last, deadline = repo / "checkpoints" / "ppo" / "last.ckpt", time.time() + 300
    old = last.stat().st_mtime_ns if last.exists() else 0
    while proc.poll() is None and time.time() < deadline and not (last.exists() and last.stat().st_mtime_ns > old):
        time.sleep(0.05)
    time.sleep(0.5)  # the checkpoint is written atomically; let the iteration after it start
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = repo / "metrics" / "ppo.json"
    assert not done.exists() or done.read_bytes() != (whole / "metrics" / "ppo.json").read_bytes()
    saved = torch.load(last, weights_only=True)
    assert 5 <= saved["cqa_online"]["iteration"] < 30

    again = _dvc("repro", cwd=repo)
    assert "ppo: resuming from" in again.stderr
    assert _ran(again) == {"ppo", "evaluate@ppo", "overopt", "compare"}
    for name in ("ppo.json", "eval_ppo.json", "compare.json"):
        assert (repo / "metrics" / name).read_bytes() == (whole / "metrics" / name).read_bytes(), name
    assert (repo / "models/ppo/model.safetensors").read_bytes() == (whole / "models/ppo/model.safetensors").read_bytes()


@pytest.mark.slow
def test_queued_experiment_under_another_seed_runs_pinned(repo):
    """`dvc exp run --queue -S seed=1 sft`: the queued run (a celery worker in .dvc/tmp/exps)
    computes under the numeric pin even when its environment asks for other code paths, as `dvc
    repro` does, and the seed makes another model. The SFT stage is the target (the pin is set by
    every stage's same start-up); that the seed invalidates every training and sampling stage is
    checked by `dvc status` after applying it (and in test_pipeline.py)."""
    env = {**stage_env(), "PYTHONPATH": str(repo / "src"), "ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "AUTO",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("CQA_NUMERICS", None)
    pinned = {"mode": "pinned", "aten": "AVX2", "mkl_cbwr": "AVX2,STRICT"}  # no thread count: it changes nothing
    # the committed run of the fixture, made by plain `dvc repro`, was pinned too
    assert yaml.safe_load((repo / "models/sft/params.yaml").read_text())["numerics"] == pinned
    dvc = [sys.executable, "-m", "dvc"]
    for args in (["exp", "run", "--queue", "-S", "seed=1", "--name", "seed1", "sft"], ["queue", "start", "-j", "1"],
                 ["queue", "logs", "--follow", "seed1"]):
        proc = subprocess.run(dvc + args, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{args}: {proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert _ran(proc) == {"sft"}  # the queued run's log names the stages it ran
    before = json.loads((repo / "metrics/sft.json").read_text())
    _dvc("exp", "apply", "seed1", cwd=repo)
    after = json.loads((repo / "metrics/sft.json").read_text())
    assert after["val_loss"] != before["val_loss"]  # another seed, another model
    exported = yaml.safe_load((repo / "models/sft/params.yaml").read_text())
    assert exported["numerics"] == pinned and exported["sft"]["seed"] == 1
    # the data do not depend on the seed; every other stage that trains or samples does (compare
    # may show too: it reads sft's wall time, which differs at 0.1 s only by chance)
    stale = set(json.loads(_dvc("status", "--json", cwd=repo).stdout or "{}"))
    assert stale - {"compare"} == {*REWARD, *METHODS, "base", *EVAL, "bon", "overopt"}, stale
