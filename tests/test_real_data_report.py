"""The real-data run's bookkeeping (bench/real_data): collect.py's stage times and peak memory from
monitor.sh's samples, and report.py's tables, whose figures must be the collected metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dvc_repo import ran_repo  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "real_data"))

import collect  # noqa: E402
import pair_analysis  # noqa: E402
import report  # noqa: E402


def test_stage_usage_sums_sampled_time_skips_pauses_and_keeps_the_peak(tmp_path):
    mem = tmp_path / "mem.tsv"
    rows = [(0, "sft", 100, 150), (20, "sft", 120, 200), (40, "sft", 90, 200),  # 40 s running
            (1000, "sft", 110, 180),  # resumed in a later session: a new process, its own peak
            (1020, "sft", 100, 180), (1040, "reward@regression", 50, 60)]  # 20 s more of sft
    mem.write_text("".join(f"{t}\t{s}\t{r}\t{h}\n" for t, s, r, h in rows))
    usage = collect.stage_usage(mem, every=20)
    assert usage["sft"] == {"sampled_wall_s": 60.0, "peak_rss_mb": round(200 / 1024, 1)}
    assert usage["reward@regression"] == {"sampled_wall_s": 0.0, "peak_rss_mb": round(60 / 1024, 1)}


def test_policy_table_wins_only_above_half_and_within_15_percent_of_sft_length():
    ci = lambda lo, hi: {"low": lo, "high": hi}  # noqa: E731
    compare = {"policies": {"sft": {"mean_tokens": 100.0, "eos_rate": 1.0, "kl_to_reference": 0.0},
                            "a": {"mean_tokens": 114.0, "eos_rate": 1.0, "kl_to_reference": 1.0},
                            "b": {"mean_tokens": 116.0, "eos_rate": 1.0, "kl_to_reference": 1.0},
                            "c": {"mean_tokens": 100.0, "eos_rate": 1.0, "kl_to_reference": 1.0}},
               "a_vs_sft": {"win_rate": {"j": 0.6}, "win_rate_ci95": {"j": ci(0.51, 0.7)}},
               "b_vs_sft": {"win_rate": {"j": 0.7}, "win_rate_ci95": {"j": ci(0.6, 0.8)}},
               "c_vs_sft": {"win_rate": {"j": 0.55}, "win_rate_ci95": {"j": ci(0.49, 0.6)}}}
    rows = {r.split(" | ")[0].strip("| "): r for r in report.policy_table(compare, "j")[2:]}
    assert rows["a"].endswith("| 1.14 | 1.000 | 1.00 | yes |")  # above 0.5, 14% longer
    assert rows["b"].endswith("| no |")  # above 0.5 but 16% longer
    assert rows["c"].endswith("| no |")  # same length, interval reaches 0.5


@pytest.mark.slow  # needs the tiny graph run under dvc (built once per session in CI)
def test_collect_and_report_on_a_finished_run(ran_repo, tmp_path):  # noqa: F811 (fixture)
    out = tmp_path / "collected"
    for cmd in (["collect.py", "--run", str(ran_repo), "--out", str(out), "--preset", "params.yaml", "--wall", "5"],
                ["report.py", str(out), "--judge", "regression"]):
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "real_data" / cmd[0]), *cmd[1:]],
                              capture_output=True, text=True, cwd=ran_repo)
        assert proc.returncode == 0, proc.stderr
    text = (out / "report.md").read_text()
    for kind in ("classification", "regression"):
        m = json.loads((ran_repo / "metrics" / f"reward_{kind}.json").read_text())
        assert f"{m['pairwise_accuracy']:.3f} [{m['pairwise_accuracy_ci95']['low']:.3f}" in text
        assert f"{m['accuracy_over_length']:+.3f}" in text
        assert (out / "dvclive" / "reward" / kind / "metrics.json").is_file()
    compare = json.loads((ran_repo / "metrics" / "compare.json").read_text())
    assert f"{compare['ppo_vs_sft']['win_rate']['regression']:.3f}" in text
    assert (ran_repo / "metrics" / "leaderboard.md").read_text().strip() in text
    assert "**Q:**" in text and json.loads((out / "run.json").read_text())["last_invocation_wall_s"] == 5
    pairs = json.loads((out / "pairs.json").read_text())["test"]
    shorter = pairs["classification"]["accuracy_voters_chose_shorter"]
    assert f"| classification | {pairs['classification']['accuracy_voters_chose_longer']['rate']:.3f} [" in text
    assert f"{shorter['rate']:.3f} [{shorter['ci95']['low']:.3f}, {shorter['ci95']['high']:.3f}] (n {shorter['n']})" in text


def test_pair_analysis_splits_accuracy_by_which_answer_the_voters_preferred():
    rows = [{"chosen": "long answer", "rejected": "short"},  # voters chose the longer
            {"chosen": "longer one", "rejected": "tiny"},
            {"chosen": "ok", "rejected": "rambling"},  # voters chose the shorter
            {"chosen": "same", "rejected": "size"}]  # equal length: in neither subset
    margins = [1.0, -2.0, -0.5, 3.0]  # a model right on pairs 1 and 4 that picks the longer answer twice in 3
    split = pair_analysis.split_by_length(rows, margins)
    assert split["accuracy"]["rate"] == 0.5 and split["accuracy"]["n"] == 4
    assert split["accuracy_voters_chose_longer"]["rate"] == 0.5 and split["accuracy_voters_chose_longer"]["n"] == 2
    assert split["accuracy_voters_chose_shorter"]["rate"] == 0.0 and split["accuracy_voters_chose_shorter"]["n"] == 1
    assert split["picks_the_longer"]["rate"] == round(2 / 3, 4) and split["picks_the_longer"]["n"] == 3


def test_pair_analysis_judges_agreement():
    rows = [{"chosen": "aaaa", "rejected": "b"}, {"chosen": "c", "rejected": "dddd"}, {"chosen": "ee", "rejected": "f"}]
    scores = {"regression": ([1.0, 0.0, 2.0], [0.0, 1.0, 1.0]),  # margins +1, -1, +1
              "classification": ([3.0, 5.0, 0.0], [1.0, 4.0, 1.0])}  # margins +2, +1, -1
    result = pair_analysis.analyse(rows, scores)
    assert result["same_pick"]["rate"] == round(1 / 3, 4)  # only the first pair
    assert result["voters_chose_longer"]["rate"] == round(2 / 3, 4)
    # scores 1, 0, 2, 0, 1, 1 rank 4, 1.5, 6, 1.5, 4, 4; lengths 4, 1, 2, 1, 4, 1 rank 5.5, 2, 4, 2, 5.5, 2:
    # Pearson's r of the ranks is 8.5 / sqrt(15 * 15)
    assert result["regression"]["spearman_score_length"] == round(8.5 / 15, 4)


@pytest.mark.slow  # needs the tiny graph run under dvc (built once per session in CI)
def test_pair_analysis_reproduces_the_reward_stages_test_accuracy(ran_repo, tmp_path):  # noqa: F811 (fixture)
    out = tmp_path / "pairs.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "real_data" / "pair_analysis.py"), "--run", str(ran_repo),
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    for kind in ("classification", "regression"):
        m = json.loads((ran_repo / "metrics" / f"reward_{kind}.json").read_text())
        assert result["test"][kind]["accuracy"]["rate"] == m["pairwise_accuracy"]
        assert result["test"][kind]["accuracy"]["n"] == m["pairs"]
