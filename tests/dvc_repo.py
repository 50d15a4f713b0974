"""A tiny copy of the project's pipeline in a temporary git + DVC repository, run with real
`dvc repro` once per test module, and helpers to run `dvc` in it (the DVC workflow tests)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, built_once, init_dvc_repo, stage_env

REWARD = {"reward@regression", "reward@classification"}
METHODS = {"ppo", "dpo", "grpo", "online_dpo"}
EVAL = {"evaluate@base", "evaluate@sft", "evaluate@ppo", "evaluate@dpo", "evaluate@grpo", "evaluate@online_dpo"}
ALL = {"synth", "data", "tokenizer", "sft", *REWARD, *METHODS, "base", *EVAL, "bon", "overopt", "compare"}


def _run(args: list[str], cwd: Path, check: bool = True, **extra_env: str) -> subprocess.CompletedProcess:
    env = {**stage_env(), "PYTHONPATH": str(cwd / "src"), **extra_env}  # stages run the temp repo's code
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _dvc(*args: str, cwd: Path, check: bool = True, **extra_env: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "dvc", *args], cwd, check, **extra_env)


def _ran(proc: subprocess.CompletedProcess) -> set[str]:
    return {line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage")}


def _make_repo(r: Path) -> Path:
    """A git + DVC repo holding the project's pipeline, with a small synthetic site."""
    r.mkdir()
    # .gitignore too: as in the project, checkpoints are not committed, so a clone retrains (a
    # committed last.ckpt at the last step would let every training stage "resume" with nothing to do)
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "models/pretrained/README.md"):
        (r / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, r / name)
    shutil.copytree(ROOT / "src", r / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = yaml.safe_load((r / "params.yaml").read_text())
    params["synth"]["n_questions"] = 300
    params["model"]["config"] = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
                                 "max_position_embeddings": 128, "attention_types": [[["global", "local"], 1]]}
    params["tokenizer"]["vocab_size"] = 400
    params["sft"].update(max_steps=10, val_check_interval=5, max_length=96, sample={"n": 4, "max_new_tokens": 16})
    for kind in ("regression", "classification"):
        params["reward"][kind].update(max_steps=6, val_check_interval=3, max_length=96, batch_size=8)
    params["ppo"].update(iterations=2, rollout_batch_size=8, mini_batch_size=8, micro_batch_size=8, ppo_epochs=1,
                         eval_every=2, eval_prompts=8, samples_every=2, max_prompt_length=48, max_length=96,
                         sample={"max_new_tokens": 12, "batch_size": 8})
    params["dpo"].update(max_steps=4, val_check_interval=2, max_length=96, batch_size=4, eval_batch_size=8)
    params["grpo"].update(iterations=2, rollout_batch_size=2, num_generations=4, mini_batch_size=8, micro_batch_size=8,
                          eval_every=2, eval_prompts=8, samples_every=2, max_prompt_length=48, max_length=96,
                          sample={"max_new_tokens": 12, "batch_size": 8})
    params["online_dpo"].update(iterations=2, rollout_batch_size=4, num_generations=2, mini_batch_size=4,
                                micro_batch_size=4, eval_every=2, eval_prompts=8, samples_every=2, max_prompt_length=48,
                                max_length=96, sample={"max_new_tokens": 12, "batch_size": 8})
    params["bon"].update(n=4)
    params["overopt"].update(prompts=4, pool=4)
    params["evaluate"].update(max_questions=8, max_prompt_length=48, max_length=96,
                              sample={"max_new_tokens": 12, "batch_size": 8})
    (r / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return init_dvc_repo(r, "pipeline")


def _build_ran_repo(r: Path) -> Path:
    """The tiny pipeline in ``r``, run with `dvc repro` (every stage) and committed."""
    _make_repo(r)
    # At the pin's own default, every core (an empty CQA_THREADS; the tests' default is one thread,
    # conftest.py): test_golden's reruns at 1 and 4 threads compare against this run.
    assert _ran(_dvc("repro", cwd=r, CQA_THREADS="")) == ALL
    metrics = json.loads((r / "metrics/data.json").read_text())
    assert metrics["input"]["questions"] == 300 and metrics["train"]["pairs"] > 0
    assert (r / "data/prepared/train/sft/part-00000.parquet").is_file()
    _run(["git", "add", "-A"], r)
    _run(["git", "commit", "-qm", "run"], r)
    return r


@pytest.fixture(scope="session")
def ran_repo(tmp_path_factory) -> Path:
    """The tiny pipeline, run once per test session and committed (shared by the DVC workflow
    files, which pytest-xdist spreads over its workers: conftest.built_once); tests only read
    it, :func:`repo` gives each its own copy."""
    return built_once(tmp_path_factory, "ran_repo", lambda home: _build_ran_repo(home / "repo")) / "repo"


@pytest.fixture
def repo(ran_repo, tmp_path) -> Path:
    """A private copy of the run repository (git history, DVC cache, outputs and all)."""
    dst = tmp_path / "repo"
    shutil.copytree(ran_repo, dst, symlinks=True)
    return dst
