"""The maths of Best-of-N and of reward over-optimisation as small pure functions, each
unit-tested on hand-computed numbers. [Stiennon] Stiennon et al. 2020, "Learning to summarize
from human feedback" (appendix: the KL of Best-of-N); [Gao] Gao et al. 2022, "Scaling Laws for
Reward Model Overoptimization"; [Nakano] Nakano et al. 2021, "WebGPT" (the unbiased Best-of-N
estimator from a larger pool).

Every logarithm goes through :func:`cqa_rlhf.exact_math.log` and every sum runs in a fixed
order in Python floats, so these figures are the same bits on every CPU and libm.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Literal

import torch

from cqa_rlhf.exact_math import LN2_HI, LN2_LO
from cqa_rlhf.exact_math import log as exact_log

EXP_TERMS = 22  # |r| <= 0.347: the 22nd term is below 1e-30


def ln(x: float) -> float:
    """The natural log of a positive float, the same bits on every CPU."""
    return float(exact_log(torch.tensor([x], dtype=torch.float64))[0])


def ex(x: float) -> float:
    """exp(x) from +, -, * and ldexp only (libm's exp may differ between libraries):
    x = k ln 2 + r with |r| <= ln 2 / 2, exp(r) by its Taylor series (Horner), times 2^k."""
    k = round(x / LN2_HI)
    r = (x - k * LN2_HI) - k * LN2_LO
    term = 1.0
    for i in range(EXP_TERMS, 0, -1):
        term = 1.0 + term * r / i
    return math.ldexp(term, k)


def kl_bound(n: int) -> float:
    """KL(Best-of-n || base) <= log n - (n - 1) / n nats, with equality for a continuous score
    and no repeated answers [Stiennon, Gao]."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return ln(n) - (n - 1) / n


def best_index(scores: Sequence[float]) -> int:
    """The index of the highest score; the first of equal ones (argmax's rule)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def empirical_kl(scores: Sequence[float], answers: Sequence[Hashable], n: int) -> float:
    """The exact KL of Best-of-``n`` drawn from the empirical distribution of one prompt's pool of
    samples (``scores`` and ``answers`` [M], equal answers merged) to that distribution.

    Distinct answers sorted by score with counts m_j and CDF F_j = (m_1 + ... + m_j) / M:
    Best-of-n picks answer j with P_j = F_j^n - F_{j-1}^n, so KL = sum_j P_j log(P_j M / m_j).
    With M distinct answers it is below :func:`kl_bound` and tends to it as M grows; repeated
    answers (short, likely ones) lower it further, which the bound does not see."""
    pool: dict[Hashable, tuple[float, int]] = {}
    for s, a in zip(scores, answers):
        pool[a] = (s, pool[a][1] + 1) if a in pool else (s, 1)
    m = len(scores)
    kl, below = 0.0, 0
    for _, count in sorted(pool.values(), key=lambda sc: sc[0]):
        p = ((below + count) / m) ** n - (below / m) ** n
        if p > 0:
            kl += p * ln(p * m / count)
        below += count
    return kl


def best_of_n_expectation(proxy: Sequence[float], target: Sequence[float], n: int) -> float:
    """E[target of the best-by-proxy of n answers drawn without replacement from a pool of M]:
    sorted by proxy (ascending; ties by index), the k-th answer (k = 1..M) is the best of a
    random n-subset with probability C(k-1, n-1) / C(M, n) [Nakano]. Unbiased for Best-of-n
    with n <= M, and far less noisy than one draw."""
    m = len(proxy)
    if not 1 <= n <= m:
        raise ValueError(f"best of {n} needs 1 <= n <= pool size {m}")
    order = sorted(range(m), key=lambda i: (proxy[i], -i))
    total = math.comb(m, n)
    return sum(math.comb(k, n - 1) * target[i] for k, i in enumerate(order)) / total


Form = Literal["bon", "rl"]


def gao_features(d: float, form: Form) -> tuple[float, float]:
    """The two terms of Gao's forms with d = sqrt(KL): Best-of-N R = d(alpha - beta d), RL
    R = d(alpha - beta log d) [Gao]; R is the gold gain over the initial policy (0 at d = 0)."""
    if form == "bon":
        return d, -d * d
    return d, (-d * ln(d) if d > 0 else 0.0)


def gao_fit(d: Sequence[float], gain: Sequence[float], form: Form) -> tuple[float, float]:
    """(alpha, beta) of Gao's form by least squares (no intercept: the gain is 0 at d = 0)."""
    rows = [gao_features(x, form) for x in d]
    a11 = sum(u * u for u, _ in rows)
    a12 = sum(u * v for u, v in rows)
    a22 = sum(v * v for _, v in rows)
    b1 = sum(u * g for (u, _), g in zip(rows, gain))
    b2 = sum(v * g for (_, v), g in zip(rows, gain))
    det = a11 * a22 - a12 * a12
    if det <= 1e-12 * max(a11 * a22, 1e-300):
        raise ValueError(f"cannot fit the {form} form: the points do not separate its two terms")
    return (b1 * a22 - b2 * a12) / det, (a11 * b2 - a12 * b1) / det


def gao_peak(alpha: float, beta: float, form: Form) -> float | None:
    """The d = sqrt(KL) where the fitted gold gain peaks (None when it never turns down):
    bon: alpha / (2 beta); rl: d with alpha = beta (log d + 1), i.e. exp(alpha / beta - 1)."""
    if beta <= 0:
        return None
    return alpha / (2 * beta) if form == "bon" else ex(alpha / beta - 1)
