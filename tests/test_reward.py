"""Reward models: losses on hand-computed numbers, padding invariance, tiny runs, exports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from cqa_rlhf.config import ModelConfig, PromptConfig
from cqa_rlhf.losses import center_penalty, pairwise_loss, regression_loss
from cqa_rlhf.models import build_model
from cqa_rlhf.prompts import PromptFormatter
from cqa_rlhf.batches import pad_rows
from cqa_rlhf.data.tables import question_half, read_table, training_rows
from cqa_rlhf.reward import normalization, pair_metrics, reward_forward, score
from cqa_rlhf.tokenizer import load_tokenizer

from conftest import run_stage
from helpers import TINY_MODEL, tiny_params


def test_pairwise_loss_hand_computed():
    rc, rr = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    # -log sigmoid(1) = log(1 + e^-1) = 0.3132617; -log sigmoid(0) = log 2 = 0.6931472
    assert pairwise_loss(rc, rr).item() == pytest.approx((0.3132617 + 0.6931472) / 2, abs=1e-6)
    # with margins 0.5 and -1: log(1 + e^-0.5) = 0.4740770, log(1 + e^-1) = 0.3132617
    m = torch.tensor([0.5, -1.0])
    assert pairwise_loss(rc, rr, m).item() == pytest.approx((0.4740770 + 0.3132617) / 2, abs=1e-6)
    assert center_penalty(torch.tensor([1.0, -1.0]), torch.tensor([1.0, 0.0])).item() == pytest.approx(2.5)
    assert regression_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0]), "mse").item() == pytest.approx(2.5)
    assert regression_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0]), "mae").item() == pytest.approx(1.5)


def test_pair_metrics_and_length_baseline():
    m = pair_metrics([1.0, 0.0, 2.0, 0.5], [0.0, 1.0, 1.0, 0.5], ["long one", "a", "bb", "xy"], ["s", "longer", "bb", "ab"])
    assert m["pairwise_accuracy"] == 0.5  # ties in score are not wins
    assert m["length_baseline_accuracy"] == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)
    assert m["mean_margin"] == pytest.approx((1 - 1 + 1 + 0) / 4) and m["chance_accuracy"] == 0.5
    # Wilson intervals: 2 of 4 correct; 2 of 4 (ties half) for the length baseline
    assert m["pairwise_accuracy_ci95"] == m["length_baseline_ci95"] == {"low": 0.15, "high": 0.85}
    # paired differences per pair: 1-1, 0-0, 1-0.5, 0-0.5 -> mean 0, bootstrap ends among the resampled means
    assert m["accuracy_over_length"] == 0.0
    assert -0.5 <= m["accuracy_over_length_ci95"]["low"] < 0 < m["accuracy_over_length_ci95"]["high"] <= 0.5


@pytest.fixture(scope="module")
def rm_and_fmt(prepared):
    tok = load_tokenizer(prepared / "tok")
    torch.manual_seed(0)
    model = build_model(ModelConfig(config=TINY_MODEL), tok, "reward").eval()
    return model, PromptFormatter(PromptConfig(), tok)


def test_scores_do_not_depend_on_padding_or_batch(rm_and_fmt):
    model, fmt = rm_and_fmt
    pairs = [("How do I sort a git branch?", "Use the git cli."),
             ("Why does my sql cache crash?", "Because the sql cache is never closed. " * 3),
             ("What is a json queue used for?", "- one\n- two")]
    alone = [score(model, fmt, [p], 128)[0] for p in pairs]
    together = score(model, fmt, pairs, 128, batch_size=3)
    reordered = score(model, fmt, pairs[::-1], 128, batch_size=2)[::-1]
    assert together == pytest.approx(alone, abs=1e-5) and reordered == pytest.approx(alone, abs=1e-5)
    # Left padding gives the same scores as right padding (positions come from the mask).
    rows = [fmt.encode(q, a, 128).input_ids for q, a in pairs]
    ids_r, mask_r = pad_rows(rows, fmt.tok.pad_token_id)
    ids_l, mask_l = pad_rows(rows, fmt.tok.pad_token_id, "left")
    assert mask_l[0].tolist() != mask_r[0].tolist()  # the rows really differ in length
    with torch.no_grad():
        right, left = reward_forward(model, ids_r, mask_r), reward_forward(model, ids_l, mask_l)
    assert left.tolist() == pytest.approx(right.tolist(), abs=1e-5)
    assert right.tolist() == pytest.approx(alone, abs=1e-5)


def test_missing_normalisation_is_an_error(rm_and_fmt):
    from cqa_rlhf.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^ppo\.reward_model: .* has no cqa_score_mean/std"):
        normalization(rm_and_fmt[0], "ppo.reward_model")


@pytest.fixture(scope="module")
def pairs_data(tmp_path_factory) -> Path:
    """A larger test split than the shared tiny data, so pairwise accuracies are measurable."""
    work = tmp_path_factory.mktemp("rmdata")
    params = tiny_params(work)
    params["synth"]["n_questions"] = 300
    params["data"]["splits"] = {"train": 0.6, "val": 0.2, "test": 0.2}
    for stage in ("synth", "data", "tokenizer"):
        proc = run_stage(stage, params, work)
        assert proc.returncode == 0, proc.stderr
    return work


def _reward_params(prepared: Path, work: Path, kind: str, **extra) -> dict:
    params = tiny_params(prepared)
    params["reward"] = {kind: {"data": str(prepared / "prepared"), "init": "model", "out": str(work / kind),
                               "metrics": str(work / f"{kind}.json"), "live_dir": str(work / "live"),
                               "checkpoint_dir": str(work / "ckpt"), "batch_size": 16, "max_length": 96,
                               "max_epochs": -1, "max_steps": 80, "val_check_interval": 20, "optim": {"lr": 3e-3}, **extra}}
    return params


@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_tiny_reward_run_beats_the_untrained_head_and_exports(tmp_path, pairs_data, kind):
    proc = run_stage("reward", _reward_params(pairs_data, tmp_path, kind), tmp_path, args=("--kind", kind))
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / f"{kind}.json").read_text())
    assert m["pairs"] > 150
    assert m["pairwise_accuracy"] > m["untrained_pairwise_accuracy"] + 0.05, m
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / kind)
    tok = AutoTokenizer.from_pretrained(tmp_path / kind)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    mean, std = normalization(model)
    assert mean == pytest.approx(m["score_mean_sft_train"], abs=1e-5) and std > 0
    assert math.isfinite(m["mean_margin"]) and 0 <= m["length_baseline_accuracy"] <= 1


def test_question_halves_are_disjoint_fixed_and_even(pairs_data):
    rows = read_table(pairs_data / "prepared" / "train" / "pairs").to_pylist()
    a, b = training_rows(rows, "half_a"), training_rows(rows, "half_b")
    qa, qb = {r["question_id"] for r in a}, {r["question_id"] for r in b}
    assert not qa & qb and qa | qb == {r["question_id"] for r in rows} and len(a) + len(b) == len(rows)
    assert 0.35 < len(qa) / len(qa | qb) < 0.65
    assert training_rows(rows, "all") == rows
    assert [question_half(i) for i in (0, 1, 2, -5, 2**62)] == [question_half(i) for i in (0, 1, 2, -5, 2**62)]
    assert {question_half(i) for i in range(40)} == {"half_a", "half_b"}


def test_a_judge_on_half_b_learns_from_half_b_only(tmp_path, pairs_data):
    """One epoch on the half: the steps are its batches, and the export records the half."""
    params = _reward_params(pairs_data, tmp_path, "classification", train_questions="half_b", max_epochs=1,
                            max_steps=-1, val_check_interval=5)
    proc = run_stage("reward", params, tmp_path, args=("--kind", "classification"))
    assert proc.returncode == 0, proc.stderr
    rows = read_table(pairs_data / "prepared" / "train" / "pairs").to_pylist()
    half = training_rows(rows, "half_b")
    assert json.loads((tmp_path / "classification.json").read_text())["steps"] == math.ceil(len(half) / 16) < len(rows) / 16
    assert yaml.safe_load((tmp_path / "classification" / "params.yaml").read_text())["reward"]["classification"][
        "train_questions"] == "half_b"


def test_a_reward_stage_from_the_sft_policy_logs_its_summary_line_only(tmp_path, prepared_session, rlhf_inputs):
    """From the SFT policy the new score head is "missing" in transformers' load report: the log
    must hold the stage's own line and nothing of the libraries' (no report, no ANSI colour)."""
    params = tiny_params(prepared_session)
    params["reward"] = {"regression": {"data": str(prepared_session / "prepared"), "sft_dir": str(rlhf_inputs / "sft"),
                                       "out": str(tmp_path / "rm"), "metrics": str(tmp_path / "rm.json"),
                                       "live_dir": str(tmp_path / "live"), "checkpoint_dir": str(tmp_path / "ckpt"),
                                       "batch_size": 16, "max_length": 96, "max_steps": 4, "val_check_interval": 2}}
    proc = run_stage("reward", params, tmp_path, args=("--kind", "regression"))
    assert proc.returncode == 0, proc.stderr
    log = proc.stdout + proc.stderr
    assert "\x1b[" not in log and "LOAD REPORT" not in log and "MISSING" not in log, log
    assert [line for line in log.splitlines() if line.strip()] == [line for line in proc.stdout.splitlines() if
                                                                  line.startswith("reward@regression: ")], log


@pytest.mark.long  # outside CI (it would pass 20 minutes): python -m pytest -m long
def test_killed_reward_stage_resumes_and_matches_an_uninterrupted_run(tmp_path, pairs_data):
    from conftest import run_until_killed

    full, cut = tmp_path / "full", tmp_path / "cut"
    args = dict(max_steps=40, val_check_interval=10, center_coef=0.01)
    full.mkdir()
    cut.mkdir()
    proc = run_stage("reward", _reward_params(pairs_data, full, "classification", **args), full,
                     args=("--kind", "classification"))
    assert proc.returncode == 0, proc.stderr

    params = _reward_params(pairs_data, cut, "classification", **args)
    run_until_killed("reward", params, cut, ready=(cut / "ckpt" / "last.ckpt").exists, args=("--kind", "classification"))
    assert not (cut / "classification.json").exists(), "the run finished before it could be interrupted"
    step = torch.load(cut / "ckpt" / "last.ckpt", weights_only=True)["global_step"]
    assert 10 <= step < 40

    resumed = run_stage("reward", params, cut, args=("--kind", "classification"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    assert (cut / "classification.json").read_bytes() == (full / "classification.json").read_bytes()
    assert (cut / "classification" / "model.safetensors").read_bytes() == \
        (full / "classification" / "model.safetensors").read_bytes()
    curve = Path("plots/metrics/val/accuracy.tsv")
    assert (cut / "live" / curve).read_text() == (full / "live" / curve).read_text()  # no gap, no repeats
