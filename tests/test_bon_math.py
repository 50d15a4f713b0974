"""Best-of-N and over-optimisation maths (cqa_rlhf/bon_math.py) on hand-computed numbers."""

from __future__ import annotations

import math

import pytest

from cqa_rlhf.bon_math import (best_index, best_of_n_expectation, empirical_kl, ex, gao_fit, gao_peak, kl_bound,
                               ln)


def test_kl_bound_is_log_n_minus_n_minus_one_over_n():
    assert kl_bound(1) == 0.0
    assert kl_bound(2) == pytest.approx(math.log(2) - 0.5, abs=1e-15)   # 0.193147...
    assert kl_bound(16) == pytest.approx(2.772588722239781 - 0.9375, abs=1e-15)
    with pytest.raises(ValueError, match="n must be >= 1"):
        kl_bound(0)


def test_ln_and_ex_agree_with_the_true_values_to_an_ulp():
    for x in (1e-300, 0.001, 0.5, 1.0, 2.0, 10.0, 1e300):
        assert ln(x) == pytest.approx(math.log(x), rel=3e-16, abs=3e-16)
    for x in (-700.0, -3.0, -0.1, 0.0, 0.3, 1.0, 2.5, 50.0, 700.0):
        assert ex(x) == pytest.approx(math.exp(x), rel=3e-16)
    assert ex(0.0) == 1.0


def test_best_index_takes_the_first_of_equal_scores():
    assert best_index([0.1, 0.7, 0.3]) == 1
    assert best_index([0.5, 0.9, 0.9]) == 1
    assert best_index([2.0]) == 0


def test_empirical_kl_of_best_of_two_from_two_distinct_answers():
    # Sorted by score, F = 1/2, 1: P = 1/4, 3/4; KL = 1/4 log(1/2) + 3/4 log(3/2) = 0.130812...
    want = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert empirical_kl([0.2, 0.9], ["a", "b"], 2) == pytest.approx(want, abs=1e-15)
    assert empirical_kl([0.9, 0.2], ["b", "a"], 2) == pytest.approx(want, abs=1e-15)  # order of the pool is irrelevant


def test_empirical_kl_merges_equal_answers_and_is_zero_for_one_draw():
    assert empirical_kl([0.3, 0.3], ["same", "same"], 2) == 0.0  # one distinct answer: BoN is the base
    assert empirical_kl([0.1, 0.4, 0.8], ["a", "b", "c"], 1) == pytest.approx(0.0, abs=1e-16)
    # Pool a, a, b with b best: F = 2/3, 1; P = 4/9, 5/9; KL = 4/9 log(2/3) + 5/9 log(5/3).
    want = 4 / 9 * math.log(2 / 3) + 5 / 9 * math.log(5 / 3)
    assert empirical_kl([0.1, 0.1, 0.5], ["a", "a", "b"], 2) == pytest.approx(want, abs=1e-15)


def test_empirical_kl_approaches_the_bound_from_below_as_the_pool_grows():
    n = 4
    small = empirical_kl([float(i) for i in range(8)], list(range(8)), n)
    large = empirical_kl([float(i) for i in range(4096)], list(range(4096)), n)
    assert small < large < kl_bound(n)
    assert large == pytest.approx(kl_bound(n), abs=2e-3)


def test_best_of_n_expectation_averages_over_every_subset():
    proxy, target = [3.0, 1.0, 2.0], [30.0, 10.0, 20.0]
    # subsets {0,1} -> 30, {0,2} -> 30, {1,2} -> 20
    assert best_of_n_expectation(proxy, target, 2) == pytest.approx(80 / 3, abs=1e-12)
    assert best_of_n_expectation(proxy, target, 1) == pytest.approx(20.0, abs=1e-12)  # the mean
    assert best_of_n_expectation(proxy, target, 3) == 30.0  # the best of all
    # the target need not follow the proxy: by proxy 1 < 2 < 3 the gold is 5, 9, 1
    assert best_of_n_expectation([3.0, 1.0, 2.0], [1.0, 5.0, 9.0], 2) == pytest.approx((1 + 1 + 9) / 3, abs=1e-12)
    with pytest.raises(ValueError, match="pool size 3"):
        best_of_n_expectation(proxy, target, 4)


def test_gao_fit_recovers_the_coefficients_of_either_form():
    d = [0.5, 1.0, 1.5, 2.0, 3.0]
    bon = [x * (1.2 - 0.4 * x) for x in d]
    alpha, beta = gao_fit(d, bon, "bon")
    assert (alpha, beta) == (pytest.approx(1.2, abs=1e-12), pytest.approx(0.4, abs=1e-12))
    rl = [x * (0.8 - 0.3 * math.log(x)) for x in d]
    alpha, beta = gao_fit([0.0, *d], [0.0, *rl], "rl")  # d = 0 adds nothing (its terms are 0)
    assert (alpha, beta) == (pytest.approx(0.8, abs=1e-12), pytest.approx(0.3, abs=1e-12))
    with pytest.raises(ValueError, match="cannot fit the bon form"):
        gao_fit([0.0, 0.0], [0.0, 0.0], "bon")


def test_gao_peak_is_where_the_fitted_gain_turns_down():
    assert gao_peak(1.2, 0.4, "bon") == pytest.approx(1.5)         # d (1.2 - 0.4 d) peaks at 1.2 / 0.8
    assert gao_peak(0.8, 0.4, "rl") == pytest.approx(math.e)       # 0.8 = 0.4 (log d + 1)
    assert gao_peak(1.0, 0.0, "bon") is None and gao_peak(1.0, -0.1, "rl") is None
