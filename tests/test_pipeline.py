"""The DVC graph: declared deps match what stages import, and real `dvc` runs in a temp git repo:
a no-op repro, what each change invalidates and reruns, the stale-lock check. (The DVC workflow
tests are spread over several files so that pytest-xdist's workers share them; they share one
ran repository, dvc_repo.ran_repo.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, stage_env
from dvc_repo import EVAL, METHODS, REWARD, _dvc, _ran, _run, ran_repo, repo  # noqa: F401 (ran_repo, repo: fixtures)

STAGE_MODULES = {s: f"cqa_rlhf.stages.{s}" for s in ("gguf", "synth", "data", "tokenizer", "sft", "reward", "ppo",
                                                      "dpo", "grpo", "online_dpo", "base", "evaluate", "bon", "overopt",
                                                      "compare")}


def _declared_src_deps(stage: str) -> set[str]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    spec = spec.get("do", spec)  # foreach stages keep their body under `do`
    return {d for d in spec["deps"] if d.startswith("src/")}


@pytest.fixture(scope="module")
def imported() -> dict[str, set[str]]:
    """Each stage module's imports from the package (files under src/), all found in one
    interpreter: torch and the libraries load once, the package is dropped from ``sys.modules``
    before each stage so that each stage imports it afresh (the same sets in any stage order)."""
    code = (
        "import sys, importlib, json, pathlib; root = pathlib.Path(sys.argv[1]).resolve(); out = []\n"
        "for module in sys.argv[2:]:\n"
        "    for name in [n for n in sys.modules if n.split('.')[0] == 'cqa_rlhf']: del sys.modules[name]\n"
        "    importlib.import_module(module)\n"
        "    out.append([str(pathlib.Path(m.__file__).resolve().relative_to(root)) for n, m in "
        "list(sys.modules.items()) if n.split('.')[0] == 'cqa_rlhf' and getattr(m, '__file__', None)])\n"
        "print(json.dumps(out))"
    )
    stages = sorted(STAGE_MODULES)
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), *(STAGE_MODULES[s] for s in stages)],
                         capture_output=True, text=True, check=True,
                         env={**stage_env(), "PYTHONPATH": str(ROOT / "src")}).stdout
    return {stage: set(files) for stage, files in zip(stages, json.loads(out), strict=True)}


@pytest.mark.parametrize("stage", sorted(STAGE_MODULES))
def test_stage_deps_are_exactly_the_modules_it_imports(stage, imported):
    # numerics.py loads MKL's vendor shim, built from this C source, before torch: it sets the bits too.
    assert "src/cqa_rlhf/numerics.py" in imported[stage]
    assert imported[stage] | {"src/cqa_rlhf/_mkl_intel.c"} == _declared_src_deps(stage)


def _invalidated(repo) -> set[str]:
    """The stages `dvc status` reports changed: their own params, deps or outputs differ."""
    return set(json.loads(_dvc("status", "--json", cwd=repo).stdout or "{}"))


@pytest.mark.slow
def test_repro_noop_and_selective_reruns(repo):
    assert _ran(_dvc("repro", cwd=repo)) == set()  # nothing changed, nothing runs
    assert _invalidated(repo) == set()

    # What each param invalidates by itself (the params each stage declares): a training
    # section's param its stage only; the one seed every stage that trains or samples.
    text = (repo / "params.yaml").read_text()
    for key, value, stages in (("sft.optim.lr", 0.002, {"sft"}),
                               ("reward.regression.optim.lr", 0.002, {"reward@regression"}),
                               ("ppo.optim.lr", 0.002, {"ppo"}), ("dpo.beta", 0.2, {"dpo"}),
                               ("grpo.scale_rewards", "none", {"grpo"}),
                               ("evaluate.max_questions", 4, {*EVAL, "bon", "overopt"}),
                               ("seed", 1, {"sft", *REWARD, *METHODS, "base", *EVAL, "bon", "overopt"})):
        params = yaml.safe_load(text)
        *path, last = key.split(".")
        section = params
        for name in path:
            section = section[name]
        section[last] = value
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        assert _invalidated(repo) == stages, key
    (repo / "params.yaml").write_text(text)

    # What an output's content invalidates: a pairs param changes only the pairs tables, so once
    # `data` reruns, the stages that read pairs (the reward models, DPO) are stale, but not sft or
    # the tokenizer, whose inputs come out byte-identical. (That `dvc repro` then reruns the stale
    # stages and everything after them: a method's param below, a ppo param through `dvc exp run`
    # in test_pipeline_experiments.py, a killed run in test_pipeline_recovery.py.)
    params = yaml.safe_load(text)
    params["data"]["pairs"]["min_score_gap"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_dvc("repro", "data", cwd=repo)) == {"data"}
    assert _invalidated(repo) == {*REWARD, "dpo"}
    _run(["git", "checkout", "--", "."], repo)  # back to the baseline's params, lock and outputs
    _dvc("checkout", "--force", cwd=repo)
    params = yaml.safe_load(text)
    params["dpo"]["beta"] = 0.2  # one method's param: that method, its evaluation and the leaderboard
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_dvc("repro", cwd=repo)) == {"dpo", "evaluate@dpo", "compare"}

    # Editing a module reruns exactly the stages that import it.
    with open(repo / "src/cqa_rlhf/data/json_source.py", "a") as f:
        f.write("\n# touched\n")
    assert _ran(_dvc("repro", cwd=repo)) == {"data"}
    with open(repo / "src/cqa_rlhf/sft.py", "a") as f:
        f.write("\n# touched\n")
    # sft reruns (fresh: its code changed) and, being deterministic, writes the same model, so
    # the reward models that start from it are not rerun. The leaderboard reruns only to show a
    # new wall time: whether the rerun's time differs from the last one at 0.1 s is chance.
    timing = repo / params["sft"]["live_dir"] / "timing.json"
    before = timing.read_text()
    ran = _ran(_dvc("repro", cwd=repo))
    assert ran == {"sft", *({"compare"} if timing.read_text() != before else set())}, (ran, before)
    with open(repo / "src/cqa_rlhf/ppo_math.py", "a") as f:
        f.write("\n# touched\n")
    # every online method, every evaluation, bon and overopt import the KL helper (through the
    # rollout engine). (A module every stage imports, config.py, is in every stage's deps:
    # test_stage_deps_are_exactly_the_modules_it_imports.)
    assert _invalidated(repo) == {"ppo", "grpo", "online_dpo", *EVAL, "bon", "overopt"}


@pytest.mark.slow
def test_check_lock_catches_stale_lock(repo):
    check = [sys.executable, str(ROOT / "scripts" / "check_lock.py")]
    fresh = repo.parent / "fresh"
    _run(["git", "clone", "-q", str(repo), str(fresh)], repo.parent)
    assert _run(check, fresh, check=False).returncode == 0  # outputs missing on a clone: fine
    with open(fresh / "src/cqa_rlhf/data/prepare.py", "a") as f:
        f.write("\n# changed without rerunning\n")
    proc = _run(check, fresh, check=False)
    assert proc.returncode == 1 and "data: src/cqa_rlhf/data/prepare.py modified" in proc.stderr
    _run(["git", "checkout", "--", "."], fresh)
    spec = (fresh / "dvc.yaml").read_text().replace("      - src/cqa_rlhf/data/json_source.py\n", "", 1)
    (fresh / "dvc.yaml").write_text(spec)
    proc = _run(check, fresh, check=False)
    assert proc.returncode == 1 and "json_source.py removed from dvc.yaml" in proc.stderr
    _run(["git", "checkout", "--", "."], fresh)
    params = yaml.safe_load((fresh / "params.yaml").read_text())
    params["dpo"]["beta"] = 0.3  # changed without rerunning: the stage declares the whole `dpo` section
    (fresh / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = _run(check, fresh, check=False)
    assert proc.returncode == 1 and "dpo: param dpo (params.yaml) modified" in proc.stderr, proc.stderr
