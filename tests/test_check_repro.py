"""scripts/check_repro.py: a run's metrics against a revision's, within seed-study tolerances,
through real `dvc metrics diff` in a temporary git + DVC repository."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, init_dvc_repo, stage_env

SCRIPT = [sys.executable, str(ROOT / "scripts" / "check_repro.py")]


def _repo(tmp_path):
    (tmp_path / "dvc.yaml").write_text("metrics:\n  - m.json\n")
    (tmp_path / "m.json").write_text(json.dumps({"acc": 0.70, "n": 391, "policy": "ppo", "win": {"gold": 0.75}}))
    init_dvc_repo(tmp_path)
    (tmp_path / "sd.json").write_text(json.dumps({"seeds": [0, 1], "sd": {"m.json:acc": 0.01, "m.json:n": 0.0,
                                                                       "m.json:win.gold": 0.02}}))
    return tmp_path


def _check(repo, metrics: dict, *args: str) -> subprocess.CompletedProcess:
    (repo / "m.json").write_text(json.dumps(metrics))
    return subprocess.run(SCRIPT + ["--tolerances", str(repo / "sd.json"), *args], cwd=repo, capture_output=True,
                          text=True, env=stage_env(), timeout=300)


def test_within_tolerance_passes_and_beyond_fails_naming_the_metric(tmp_path):
    repo = _repo(tmp_path)
    ok = _check(repo, {"acc": 0.725, "n": 391, "policy": "ppo", "win": {"gold": 0.80}})  # 2.5 sd and 2.5 sd
    assert ok.returncode == 0, ok.stderr
    assert "4 of 4 metrics within 3 seed sd of HEAD" in ok.stdout
    bad = _check(repo, {"acc": 0.75, "n": 390, "policy": "sft", "win": {"gold": 0.80}})
    assert bad.returncode == 1
    lines = sorted(bad.stderr.strip().splitlines())
    assert lines[0].startswith("m.json:acc: 0.7 -> 0.75: moved 0.05 > 3 x seed sd 0.01")
    assert lines[1].startswith("m.json:n: 391 -> 390: moved 1")  # constant across seeds: must match exactly
    assert lines[2] == "m.json:policy: 'ppo' -> 'sft'" and len(lines) == 3
    tighter = _check(repo, {"acc": 0.725, "n": 391, "policy": "ppo", "win": {"gold": 0.70}}, "--k", "2")
    assert tighter.returncode == 1 and "acc" in tighter.stderr and "win.gold" in tighter.stderr


def test_a_metric_without_tolerance_or_missing_on_one_side_fails(tmp_path):
    repo = _repo(tmp_path)
    (repo / "sd.json").write_text(json.dumps({"seeds": [0, 1], "sd": {"m.json:acc": 0.01, "m.json:n": 0.0}}))
    proc = _check(repo, {"acc": 0.70, "n": 391, "policy": "ppo", "win": {"gold": 0.75}, "new": 1.0})
    assert proc.returncode == 1
    assert sorted(proc.stderr.strip().splitlines()) == [
        "m.json:new: None -> 1.0",  # a metric the revision does not have
        "m.json:win.gold: 0.75 -> 0.75: no tolerance (rerun bench/seed_study.py)"]
