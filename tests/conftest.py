"""Shared fixtures: the real dumps in ../shared, and running stage CLIs as DVC would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# One thread per process unless the caller says otherwise: pytest-xdist runs a worker per core,
# and each worker's stages at every core would oversubscribe them (two workers at two threads on
# two cores took 244 s where one thread each took 175 s, on four test files). The bits do not
# depend on it (test_golden retrains the graph at 1, every core and 4 threads); tests that need a
# count set it themselves.
os.environ.setdefault("CQA_THREADS", "1")

# Before any test module imports torch: the package pins the CPU's numeric code paths on import
# (cqa_rlhf/numerics.py), here as in every stage process.
import cqa_rlhf  # noqa: E402, F401

ROOT = Path(__file__).resolve().parents[1]
SHARED_SE = ROOT.parent / "shared" / "data" / "stackexchange"
SITES = {
    "beer": SHARED_SE / "beer.stackexchange.com",
    "matheducators": SHARED_SE / "matheducators.stackexchange.com",
    "dsmeta": SHARED_SE / "datascience.meta.stackexchange.com",
}


@pytest.fixture(scope="session")
def real_site():
    """Path of a real dump in ../shared (tests needing it fail loudly if it is absent)."""

    def get(name: str) -> Path:
        path = SITES[name]
        assert (path / "Posts.xml").is_file(), f"missing real dump {path}: ../shared must sit beside the repo"
        return path

    return get


def stage_env() -> dict[str, str]:
    """Environment in which `python` and `dvc` are this interpreter's (the project venv)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("PYTHONPATH", None)
    return env


def init_dvc_repo(path: Path, message: str = "init") -> Path:
    """``path`` as a git + DVC repository (analytics off) with everything in it committed."""
    env = stage_env()
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"],
                ["git", "config", "user.name", "test"], dvc + ["init", "-q"], dvc + ["config", "core.analytics", "false"],
                ["git", "add", "-A"], ["git", "commit", "-qm", message]):
        proc = subprocess.run(cmd, cwd=path, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stderr}"
    return path


def run_stage(module: str, params: dict, tmp_path: Path, name: str = "params.yaml",
              args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run ``python -m cqa_rlhf.stages.<module> --params <file> [args]`` with ``params`` written to a file."""
    pfile = tmp_path / name
    pfile.write_text(yaml.safe_dump(params), encoding="utf-8")
    return subprocess.run(
        [sys.executable, "-m", f"cqa_rlhf.stages.{module}", "--params", str(pfile), *args],
        capture_output=True, text=True, cwd=tmp_path, env=stage_env(), timeout=600,
    )


def run_until_killed(module: str, params: dict, tmp_path: Path, ready, args: tuple[str, ...] = (),
                     settle: float = 0.5, timeout: float = 300) -> None:
    """Start ``python -m cqa_rlhf.stages.<module>`` on ``params`` and SIGKILL it once ``ready()``
    holds, ``settle`` seconds later (a checkpoint being written finishes first)."""
    import signal
    import time

    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params), encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", f"cqa_rlhf.stages.{module}", "--params", str(pfile), *args],
                            cwd=tmp_path, env=stage_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline and not ready():
        time.sleep(0.02)
    time.sleep(settle)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def built_once(tmp_path_factory, name: str, build) -> Path:
    """``build(dir)``'s directory, built once per test session even under pytest-xdist: the
    first worker that needs it builds it under a file lock in the directory this run's workers
    share (pytest-of-<user>/pytest-<n>); the others wait and reuse it. Tests only read it."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    home, done = shared / name, shared / f"{name}.done"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(home, ignore_errors=True)  # what a build that failed on another worker left
            home.mkdir()
            build(home)
            done.touch()
    return home


def _tiny_site(work: Path) -> Path:
    from helpers import tiny_params

    for stage in ("synth", "data", "tokenizer"):
        proc = run_stage(stage, tiny_params(work), work)
        assert proc.returncode == 0, proc.stderr
    return work


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A tiny synthetic site, prepared and tokenized by the real stages (see helpers.tiny_params)."""
    return _tiny_site(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def prepared_session(tmp_path_factory) -> Path:
    """The same tiny site, shared by every module that trains on it (the RLHF fixtures)."""
    return built_once(tmp_path_factory, "tiny_session", _tiny_site)


@pytest.fixture(scope="session")
def rlhf_inputs(prepared_session, tmp_path_factory) -> Path:
    """The tiny SFT policy and a Bradley-Terry reward model trained on it (real stages)."""
    return built_once(tmp_path_factory, "rlhf", lambda work: _rlhf_inputs(prepared_session, work))


def _rlhf_inputs(prepared: Path, work: Path) -> Path:
    from helpers import tiny_params

    params = tiny_params(prepared, max_steps=40, out=str(work / "sft"), metrics=str(work / "sft.json"),
                         live_dir=str(work / "sft_live"), checkpoint_dir=str(work / "sft_ckpt"))
    params["reward"] = {"classification": {
        "data": str(prepared / "prepared"), "sft_dir": str(work / "sft"), "out": str(work / "rm"),
        "metrics": str(work / "rm.json"), "live_dir": str(work / "rm_live"), "checkpoint_dir": str(work / "rm_ckpt"),
        "batch_size": 16, "max_length": 96, "max_epochs": -1, "max_steps": 40, "val_check_interval": 20, "optim": {"lr": 3e-3}}}
    for stage, args in (("sft", ()), ("reward", ("--kind", "classification"))):
        proc = run_stage(stage, params, work, args=args)
        assert proc.returncode == 0, proc.stderr
    return work


@pytest.fixture(scope="session")
def whole_answers(tmp_path_factory) -> Path:
    """A tiny site whose tokenizer covers the synthetic language (900 tokens: about a word a
    token), so most prompts + answers fit in the tiny models' 96 tokens with their EOS. The
    SFT policy learns to stop, and the reward model learns to judge finished answers, as on
    the default data. (With the shared 400-token tokenizer almost every answer is cut at 96
    tokens: the reward model never sees an EOS, and scored on the exact sampled ids it gives
    every unfinished answer the same score.)"""
    return built_once(tmp_path_factory, "whole", _whole_answers)


def _whole_answers(work: Path) -> Path:
    from helpers import tiny_params

    params = tiny_params(work, max_steps=60)
    params["tokenizer"]["vocab_size"] = 900
    params["reward"] = {"classification": {
        "data": str(work / "prepared"), "sft_dir": str(work / "sft"), "out": str(work / "rm"),
        "metrics": str(work / "rm.json"), "live_dir": str(work / "rm_live"), "checkpoint_dir": str(work / "rm_ckpt"),
        "batch_size": 16, "max_length": 96, "max_epochs": -1, "max_steps": 40, "val_check_interval": 20,
        "optim": {"lr": 3e-3}}}
    for stage, args in (("synth", ()), ("data", ()), ("tokenizer", ()), ("sft", ()), ("reward", ("--kind", "classification"))):
        proc = run_stage(stage, params, work, args=args)
        assert proc.returncode == 0, proc.stderr
    return work
