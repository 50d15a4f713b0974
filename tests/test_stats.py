"""The interval maths (stats.py), on hand-computed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cqa_rlhf.stats import (bootstrap_ci, correlation, exact_mean, interval, paired_comparison, ranks, resample_indices,
                            verdict_agreement, wilson, win_points)


def test_wilson_matches_hand_computed_intervals():
    # 8 of 10: centre (0.8 + z²/20) / (1 + z²/10), half-width z·sqrt(0.016 + z²/400) / (1 + z²/10)
    lo, hi = wilson(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    lo, hi = wilson(0, 20)  # never below 0, and not the degenerate [0, 0] of the normal approximation
    assert lo == 0.0 and round(hi, 4) == 0.1611
    lo, hi = wilson(195.5, 391)  # ties counted half are allowed: 0.5 of 391
    assert lo < 0.5 < hi and round(hi - lo, 4) == 0.0986  # 2·1.96·sqrt(0.25/391 + z²/(4·391²)) / (1 + z²/391)
    assert all(math.isnan(x) for x in wilson(0, 0))


def test_win_points_count_ties_half_and_refuse_unpaired_lists():
    assert win_points([1.0, 2.0, 3.0], [1.0, 1.0, 4.0]) == [0.5, 1.0, 0.0]
    with pytest.raises(ValueError):
        win_points([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        win_points([], [])


def test_exact_mean_does_not_depend_on_order():
    values = [1e16, 1.0, -1e16, 3.0]
    assert exact_mean(values) == 1.0 and exact_mean(values[::-1]) == 1.0  # a naive sum gives 0.75 or 0.0


def test_bootstrap_is_seeded_and_brackets_the_mean():
    a, b = resample_indices(5, resamples=100), resample_indices(5, resamples=100)
    assert a.shape == (100, 5) and (a == b).all() and a.min() >= 0 and a.max() <= 4
    assert bootstrap_ci([0.25] * 7, resample_indices(7)) == (0.25, 0.25)  # no spread, no width
    values = [0.0, 1.0] * 50
    lo, hi = bootstrap_ci(values, resample_indices(100))
    assert lo < 0.5 < hi and 0.16 < hi - lo < 0.24  # ±1.96·0.05 for a mean of 100 fair coins
    # the interval ends are resampled means themselves: multiples of 1/100 here
    assert round(lo * 100, 9).is_integer() and round(hi * 100, 9).is_integer()


def test_paired_comparison_uses_the_same_questions_for_both_figures():
    cand, base = [3.0, 2.0, 1.0, 5.0], [1.0, 2.0, 2.0, 4.0]
    c = paired_comparison(cand, base)
    assert c["win_rate"] == (1 + 0.5 + 0 + 1) / 4 and c["score_diff"] == (2 + 0 - 1 + 1) / 4
    assert c["win_rate_low"] <= c["win_rate"] <= c["win_rate_high"]
    assert c["score_diff_low"] <= c["score_diff"] <= c["score_diff_high"]
    # one resample that picks question 0 four times: win rate 1, difference 2 -- paired
    only_first = np.zeros((1, 4), dtype=np.int64)
    one = paired_comparison(cand, base, only_first)
    assert (one["win_rate_low"], one["win_rate_high"], one["score_diff_low"], one["score_diff_high"]) == (1.0, 1.0, 2.0, 2.0)


def test_interval_is_a_mapping_dvc_can_show():
    assert interval((0.123456, 0.98765)) == {"low": 0.1235, "high": 0.9877}


def test_ranks_share_ties_mean_rank():
    assert ranks([10.0, 30.0, 20.0, 20.0]) == [1.0, 4.0, 2.5, 2.5]
    assert ranks([5.0, 5.0, 5.0]) == [2.0, 2.0, 2.0]


def test_correlation_hand_computed():
    # x = 1, 2, 3; y = 1, 3, 2: deviations (-1, 0, 1) and (-1, 1, 0): sxy = 1, sxx = syy = 2 -> r = 0.5
    assert correlation([1.0, 2.0, 3.0], [1.0, 3.0, 2.0]) == 0.5
    assert correlation([1.0, 2.0, 3.0], [6.0, 4.0, 2.0]) == -1.0
    assert math.isnan(correlation([1.0, 1.0], [1.0, 2.0]))  # a constant judge has no correlation
    # Spearman = Pearson on ranks: a monotone but not linear relation is 1
    assert correlation(ranks([1.0, 2.0, 10.0]), ranks([1.0, 4.0, 100.0])) == 1.0 > correlation([1.0, 2.0, 10.0], [1.0, 4.0, 100.0])
    with pytest.raises(ValueError):
        correlation([1.0], [1.0])


def test_verdict_agreement_counts_win_tie_and_loss_alike():
    # verdicts: (win, win) same, (loss, win) differ, (tie, tie) same, (win, tie) differ -> 2 of 4
    assert verdict_agreement([0.3, -0.1, 0.0, 2.0], [1.0, 0.2, 0.0, 0.0]) == 0.5
    with pytest.raises(ValueError):
        verdict_agreement([1.0], [])
