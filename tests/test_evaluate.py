"""Evaluation: metric helpers on hand-computed numbers, the base/evaluate/compare stages on a tiny
setup, and the answer command."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cqa_rlhf.evaluation import bleu, rouge
from cqa_rlhf.stats import correlation

from conftest import run_stage, stage_env
from helpers import tiny_params


def test_reference_overlap():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert bleu(["dogs run"], ["the cat sat on the mat"]) == pytest.approx(0.0)
    r = rouge(["the cat sat on a mat"], ["the cat sat on the mat"])
    # 5 of 6 unigrams shared; bigrams: the-cat, cat-sat, sat-on shared of 5 -> 3/5
    assert r["rouge1"] == pytest.approx(5 / 6) and r["rouge2"] == pytest.approx(3 / 5)
    assert r["rougeL"] == pytest.approx(5 / 6)


@pytest.fixture(scope="module")
def evaluated(prepared_session, rlhf_inputs, tmp_path_factory) -> tuple[Path, dict]:
    """base, evaluate@base, evaluate@sft (both reward models = the tiny one), bon (N = 4), compare."""
    work = tmp_path_factory.mktemp("eval")
    params = tiny_params(prepared_session)
    params["base"] = {"out": str(work / "base")}
    params["evaluate"] = {
        "data": str(prepared_session / "prepared"), "reference": str(rlhf_inputs / "sft"),
        "policies": {"base": str(work / "base"), "sft": str(rlhf_inputs / "sft")},
        "reward_models": {"classification": str(rlhf_inputs / "rm")}, "out": str(work / "eval"),
        "metrics_dir": str(work / "metrics"), "max_prompt_length": 48, "max_length": 96,
        "sample": {"max_new_tokens": 24, "batch_size": 16}}
    params["compare"] = {"baseline": "base", "methods": {"sft": "sft"}, "metrics": str(work / "metrics" / "compare.json"),
                         "plot": str(work / "metrics" / "compare.csv"), "table": str(work / "metrics" / "leaderboard.md")}
    params["bon"] = {"policy": str(rlhf_inputs / "sft"), "n": 4, "reward_model": "classification",
                     "out": str(work / "eval" / "bon"), "metrics": str(work / "metrics" / "eval_bon.json")}
    params["sft"]["live_dir"] = str(rlhf_inputs / "sft_live")  # the SFT stage's wall time is there
    for stage, args in (("base", ()), ("evaluate", ("--policy", "base")), ("evaluate", ("--policy", "sft")),
                        ("bon", ()), ("compare", ())):
        proc = run_stage(stage, params, work, args=args)
        assert proc.returncode == 0, proc.stderr
    return work, params


def test_evaluate_writes_metrics_and_a_generations_table(evaluated):
    work, _ = evaluated
    m = json.loads((work / "metrics" / "eval_sft.json").read_text())
    for key in ("score_classification", "score_classification_normalized", "gold", "gold_reference", "bleu",
                "rouge1", "rouge2", "rougeL", "mean_tokens", "eos_rate", "kl_to_reference"):
        assert key in m, key
    assert m["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)  # the SFT policy is the reference
    table = pd.read_parquet(work / "eval" / "sft" / "generations.parquet")
    assert len(table) == m["questions"] > 0
    assert {"question", "reference", "generated", "score_classification", "gold", "kl", "ended"} <= set(table.columns)
    base = json.loads((work / "metrics" / "eval_base.json").read_text())
    assert base["kl_to_reference"] > 1.0  # an untrained model is far from the SFT policy
    assert m["gold"] > base["gold"]  # SFT answers beat random tokens on the hidden quality
    assert (pd.read_parquet(work / "eval" / "base" / "generations.parquet")["question"] == table["question"]).all()


def test_compare_is_a_leaderboard_with_win_rates_by_judge(evaluated):
    work, params = evaluated
    board = json.loads((work / "metrics" / "compare.json").read_text())
    c = board["sft_vs_base"]
    assert set(c["win_rate"]) == set(c["win_rate_ci95"]) == set(c["score_diff_ci95"]) == {"classification", "gold"}
    assert c["win_rate"]["gold"] > 0.5 and board["bootstrap_resamples"] == 10_000 and board["baseline"] == "base"
    eval_sft = json.loads((work / "metrics" / "eval_sft.json").read_text())
    own = board["policies"]["sft"]  # each policy's own figures, the evaluation's
    assert (own["eos_rate"], own["mean_tokens"], own["gold"]) == (eval_sft["eos_rate"], eval_sft["mean_tokens"], eval_sft["gold"])
    assert own["kl_to_reference"] == pytest.approx(eval_sft["kl_to_reference"], abs=1e-6)
    table = (work / "metrics" / "leaderboard.md").read_text().splitlines()
    seconds = json.loads((Path(params["sft"]["live_dir"]) / "timing.json").read_text())["wall_seconds"]
    assert table[0].startswith("| policy | win vs base: gold [95% CI] | win vs base: classification [95% CI] |")
    assert table[2].startswith("| base | baseline | baseline |") and table[2].endswith("| — |")  # no stage trained it
    sft_row = table[3].split(" | ")
    assert sft_row[0] == "| sft" and sft_row[1].startswith(f"{c['win_rate']['gold']:.3f} [")
    assert sft_row[-1] == f"{seconds:.0f} |"  # the wall time of the stage that trained it
    for judge, rate in c["win_rate"].items():  # each figure inside its paired-bootstrap interval
        assert c["win_rate_ci95"][judge]["low"] <= rate <= c["win_rate_ci95"][judge]["high"]
        assert c["score_diff_ci95"][judge]["low"] <= c["score_diff"][judge] <= c["score_diff_ci95"][judge]["high"]
        assert 0.0 <= c["win_rate_ci95"][judge]["low"] and c["win_rate_ci95"][judge]["high"] <= 1.0
    agree = board["judges"]["gold~classification"]  # the judges' agreement: SFT, base and Best-of-N answers
    assert -1.0 <= agree["pearson"] <= 1.0 and -1.0 <= agree["spearman"] <= 1.0 and 0.0 <= agree["verdict_agreement"] <= 1.0
    scores = {j: [v for p in ("base", "sft") for v in pd.read_parquet(work / "eval" / p / "generations.parquet")[j]]
              + list(pd.read_parquet(work / "eval" / "bon" / "generations.parquet")[j]) for j in ("score_classification", "gold")}
    assert agree["pearson"] == round(correlation(scores["score_classification"], scores["gold"]), 6)
    plot = pd.read_csv(work / "metrics" / "compare.csv")
    assert list(plot.columns) == ["comparison", "win_rate", "ci_low", "ci_high"]
    assert set(plot["comparison"]) == {f"{p}: {j}" for p in ("sft", "bon", "bon_oracle") for j in ("classification", "gold")}
    assert (plot["ci_low"] <= plot["win_rate"]).all() and (plot["win_rate"] <= plot["ci_high"]).all()


def test_gold_is_off_for_real_data(evaluated, tmp_path):
    _, params = evaluated
    params = json.loads(json.dumps(params))
    params["data"]["source"] = str(tmp_path / "somewhere" / "Posts.xml")  # not the synthetic site
    params["evaluate"]["metrics_dir"] = str(tmp_path)
    params["evaluate"]["out"] = str(tmp_path / "eval")
    proc = run_stage("evaluate", params, tmp_path, args=("--policy", "sft"))
    assert proc.returncode == 0, proc.stderr
    assert "gold" not in json.loads((tmp_path / "eval_sft.json").read_text())


def _answer(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cqa_rlhf.answer", *args], capture_output=True, text=True,
                          cwd=cwd, env=stage_env(), timeout=300)


def test_answer_command(rlhf_inputs, tmp_path):
    sft = str(rlhf_inputs / "sft")
    first = _answer("--model", sft, "How do I sort a git branch?", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() and "Question:" not in first.stdout
    again = _answer("--model", sft, "How do I sort a git branch?", cwd=tmp_path)
    assert again.stdout == first.stdout  # seeded
    bad = _answer("--model", str(tmp_path / "missing"), "How?", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        f"error: {tmp_path / 'missing'}: --model is not an exported model directory (no config.json)")
    empty = _answer("--model", sft, "   ", cwd=tmp_path)
    assert empty.returncode == 2 and empty.stderr.strip() == "error: question is empty"
    flag = _answer("--model", sft, "--temperature", "0", "Why?", cwd=tmp_path)
    assert flag.returncode == 2 and flag.stderr.strip().startswith("error: --temperature:")


def test_reward_model_without_normalisation_is_one_line_in_evaluate(evaluated, tmp_path):
    import shutil

    work, params = evaluated
    rm = tmp_path / "rm"
    shutil.copytree(params["evaluate"]["reward_models"]["classification"], rm)
    cfg = json.loads((rm / "config.json").read_text())
    del cfg["cqa_score_mean"], cfg["cqa_score_std"]
    (rm / "config.json").write_text(json.dumps(cfg))
    bad = json.loads(json.dumps(params))
    bad["evaluate"].update(reward_models={"classification": str(rm)}, out=str(tmp_path / "eval"),
                           metrics_dir=str(tmp_path / "metrics"))
    proc = run_stage("evaluate", bad, tmp_path, args=("--policy", "sft"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: evaluate.reward_models.classification: ") and "cqa_score_mean" in last, last
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "eval").exists()


def test_stage_run_in_process_returns_what_the_stage_writes(evaluated, tmp_path):
    """A stage's typed run(...) is callable from Python: compare in-process writes and returns the
    same metrics as the subprocess run of the fixture."""
    from cqa_rlhf.config import BoNConfig, CompareConfig, EvaluateConfig
    from cqa_rlhf.stages import compare

    work, params = evaluated
    cfg = CompareConfig.model_validate({**params["compare"], "metrics": str(tmp_path / "c.json"),
                                        "plot": str(tmp_path / "c.csv"), "table": str(tmp_path / "c.md")})
    metrics = compare.run(cfg, EvaluateConfig.model_validate(params["evaluate"]), {"sft": params["sft"]["live_dir"]},
                          BoNConfig.model_validate(params["bon"]))
    assert metrics == json.loads((work / "metrics" / "compare.json").read_text())
    assert (tmp_path / "c.json").read_text() == (work / "metrics" / "compare.json").read_text()
    assert (tmp_path / "c.csv").read_text() == (work / "metrics" / "compare.csv").read_text()


def test_best_of_n_picks_the_reward_models_best_and_the_oracle_golds_best(evaluated):
    work, _ = evaluated
    m = json.loads((work / "metrics" / "eval_bon.json").read_text())
    assert m["n"] == 4 and m["kl_bound"] == pytest.approx(math.log(4) - 0.75, abs=1e-6)
    bon = pd.read_parquet(work / "eval" / "bon" / "generations.parquet")
    oracle = pd.read_parquet(work / "eval" / "bon" / "oracle" / "generations.parquet")
    sft = pd.read_parquet(work / "eval" / "sft" / "generations.parquet")
    assert list(bon["question"]) == list(oracle["question"]) == list(sft["question"])  # the same test questions
    # both picked from the same 4 answers to each question: each is best by its own judge
    assert (oracle["gold"] >= bon["gold"]).all() and (bon["score_classification"] >= oracle["score_classification"]).all()
    assert ((bon["kl"] >= 0) & (bon["kl"] <= m["kl_bound"] + 1e-9)).all()
    assert m["best_of_n"]["gold"] == pytest.approx(bon["gold"].mean(), abs=1e-6)
    assert m["oracle"]["gold"] >= m["best_of_n"]["gold"]
    c = json.loads((work / "metrics" / "compare.json").read_text())
    assert {"bon_vs_base", "bon_oracle_vs_base"} <= set(c) and c["oracles"] == ["bon_oracle"]
    assert "| bon_oracle (oracle: not a method) |" in (work / "metrics" / "leaderboard.md").read_text()


def test_best_of_n_with_an_unknown_reward_model_is_one_line(evaluated, tmp_path):
    _, params = evaluated
    bad = json.loads(json.dumps(params))
    bad["bon"].update(reward_model="helpfulness", out=str(tmp_path / "bon"), metrics=str(tmp_path / "bon.json"))
    proc = run_stage("bon", bad, tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("error: bon.reward_model: 'helpfulness' is not a key of evaluate.reward_models "
                                   "(have classification)")
    assert not (tmp_path / "bon").exists() and not (tmp_path / "bon.json").exists()

