"""Online DPO through the real stage: the reward model's score rises, pairs are the policy's own
answers, TRL's OnlineDPO statistics, the sample tables the over-optimisation curves read, resume
after a kill, NaN stops. (Two processes against one: tests/test_distributed.py.)"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import run_stage, run_until_killed
from helpers import tiny_params

TRL_NAMES = ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
             "objective/scores", "objective/scores_margin", "rewards/chosen", "rewards/rejected",
             "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "val/contain_eos_token", "beta")


@pytest.fixture(scope="module")
def prepared(prepared_session):
    return prepared_session


def _params(prepared: Path, inputs: Path, out: Path, **own) -> dict:
    params = tiny_params(prepared)
    params["online_dpo"] = {
        "data": str(prepared / "prepared"), "sft_dir": str(inputs / "sft"), "reward_model": str(inputs / "rm"),
        "out": str(out / "odpo"), "metrics": str(out / "odpo.json"), "live_dir": str(out / "live"),
        "checkpoint_dir": str(out / "ckpt"), "iterations": 6, "rollout_batch_size": 4, "num_generations": 4,
        "mini_batch_size": 4, "micro_batch_size": 2, "optim": {"lr": 2e-3, "weight_decay": 0.0, "warmup_frac": 0.0},
        "max_prompt_length": 48, "max_length": 96, "sample": {"max_new_tokens": 16, "batch_size": 16},
        "eval_every": 2, "eval_prompts": 16, "samples_every": 2, "trainer": {"log_every_n_steps": 1}, **own}
    return params


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_tiny_online_dpo_raises_the_reward_and_logs_trl_names(tmp_path, whole_answers):
    params = _params(whole_answers, whole_answers, tmp_path, iterations=8, rollout_batch_size=8, mini_batch_size=8,
                     micro_batch_size=4, beta=0.5, dpo_epochs=2, eval_every=4, samples_every=4,
                     sample={"max_new_tokens": 48, "batch_size": 32})
    proc = run_stage("online_dpo", params, tmp_path)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "odpo.json").read_text())
    assert m["iterations"] == 8 and m["steps"] == 8 * 2  # 8 pairs an iteration, minibatches of 8, 2 epochs
    assert m["final"]["score_normalized"] > m["sft"]["score_normalized"] + 0.2, m
    assert m["sft"]["kl"] == 0.0 and m["final"]["kl"] > 0.0
    for name in TRL_NAMES:
        rows = (tmp_path / "live/plots/metrics" / f"{name}.tsv").read_text().splitlines()
        assert [r.split("\t")[0] for r in rows[1:]] == [str(i) for i in range(1, 9)], name  # x = iteration
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "odpo").config.pad_token_id is not None
    # the held-out answers of iteration 0 (SFT) and of every evaluation, with their KL, for the curves
    tables = sorted(p.name for p in (tmp_path / "live" / "samples").glob("*.csv"))
    assert tables == ["iteration_0000.csv", "iteration_0004.csv", "iteration_0008.csv"]
    sft, last = (_rows(tmp_path / "live" / "samples" / t) for t in ("iteration_0000.csv", "iteration_0008.csv"))
    assert [r["question"] for r in sft] == [r["question"] for r in last] and sft  # the same held-out prompts
    assert {float(r["kl"]) for r in sft} == {0.0}  # the SFT policy is the reference
    assert sum(float(r["kl"]) for r in last) > 0


@pytest.mark.long  # outside CI (it would pass 20 minutes): python -m pytest -m long
def test_killed_online_dpo_resumes_and_matches_an_uninterrupted_run(tmp_path, prepared, rlhf_inputs):
    full, cut = tmp_path / "full", tmp_path / "cut"
    full.mkdir()
    cut.mkdir()
    assert run_stage("online_dpo", _params(prepared, rlhf_inputs, full), full).returncode == 0
    params = _params(prepared, rlhf_inputs, cut)
    curve = cut / "live" / "plots" / "metrics" / "objective" / "scores.tsv"
    run_until_killed("online_dpo", params, cut, settle=0.0, ready=lambda: (
        (cut / "ckpt" / "last.ckpt").exists() and curve.exists() and len(curve.read_text().splitlines()) >= 4))
    assert not (cut / "odpo.json").exists(), "the run finished before it could be interrupted"
    assert 2 <= torch.load(cut / "ckpt" / "last.ckpt", weights_only=True)["cqa_online"]["iteration"] < 6
    resumed = run_stage("online_dpo", params, cut)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    assert (cut / "odpo.json").read_bytes() == (full / "odpo.json").read_bytes()
    assert (cut / "odpo" / "model.safetensors").read_bytes() == (full / "odpo" / "model.safetensors").read_bytes()
    for name in ("objective/scores.tsv", "rewards/margins.tsv", "eval/score.tsv"):
        path = Path("live/plots/metrics") / name
        assert (cut / path).read_text() == (full / path).read_text(), name  # no gap, no repeats
    assert sorted(p.name for p in (cut / "live/samples").glob("*.csv")) == \
        sorted(p.name for p in (full / "live/samples").glob("*.csv"))


def test_nan_reward_stops_online_dpo_with_one_line(tmp_path, prepared, rlhf_inputs):
    rm = tmp_path / "rm"
    shutil.copytree(rlhf_inputs / "rm", rm)
    weights = load_file(rm / "model.safetensors")
    weights["score.weight"] = torch.full_like(weights["score.weight"], float("nan"))
    save_file(weights, rm / "model.safetensors", metadata={"format": "pt"})
    proc = run_stage("online_dpo", _params(prepared, rlhf_inputs, tmp_path, reward_model=str(rm)), tmp_path)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: online_dpo: iteration 1: scores is not finite"), last
    assert not (tmp_path / "odpo.json").exists() and not (tmp_path / "odpo").exists()


def test_label_smoothing_with_ipo_is_refused_with_one_line(tmp_path, prepared, rlhf_inputs):
    proc = run_stage("online_dpo", _params(prepared, rlhf_inputs, tmp_path, loss="ipo", label_smoothing=0.1), tmp_path)
    assert proc.returncode != 0
    assert "label_smoothing applies to loss: sigmoid only" in proc.stderr.strip().splitlines()[-1]
