"""DPO/IPO/cDPO maths on hand-computed numbers, and DPO against the paper's formula."""

from __future__ import annotations

import math

import pytest
import torch

from cqa_rlhf.preference_math import (answer_logps, best_worst_pairs, dpo_loss, implicit_rewards, preference_logits,
                                      sequence_logps)
from cqa_rlhf.prompts import IGNORE_INDEX

# One pair: log pi and log pi_ref of the chosen (w) and rejected (l) answers.
POL_W, REF_W, POL_L, REF_L, BETA = -10.0, -12.0, -15.0, -14.0, 0.1


def _h() -> torch.Tensor:
    return preference_logits(torch.tensor([POL_W]), torch.tensor([POL_L]), torch.tensor([REF_W]), torch.tensor([REF_L]))


def test_preference_logit_and_implicit_rewards():
    assert _h().item() == pytest.approx(3.0)  # (-10 + 12) - (-15 + 14)
    assert implicit_rewards(torch.tensor([POL_W, POL_L]), torch.tensor([REF_W, REF_L]), BETA).tolist() == \
        pytest.approx([0.2, -0.1])


def test_sigmoid_loss_is_the_dpo_paper_formula_on_a_worked_example():
    """Rafailov et al. (2023), eq. 7: -log sigma(beta log pi(y_w)/ref(y_w) - beta log pi(y_l)/ref(y_l)),
    here written with the probabilities themselves."""
    p_w, r_w, p_l, r_l = (math.exp(v) for v in (POL_W, REF_W, POL_L, REF_L))
    paper = -math.log(1 / (1 + math.exp(-(BETA * math.log(p_w / r_w) - BETA * math.log(p_l / r_l)))))
    assert paper == pytest.approx(math.log1p(math.exp(-0.3)), rel=1e-12)  # = 0.554355...
    assert dpo_loss(_h().double(), BETA).item() == pytest.approx(paper, rel=1e-12)


def test_sigmoid_loss_gradient_is_the_papers():
    """Eq. 8: grad = -beta sigma(r_l - r_w) (grad log pi(y_w) - grad log pi(y_l)), r = beta log pi/ref."""
    pol = torch.tensor([POL_W, POL_L], dtype=torch.float64, requires_grad=True)
    h = preference_logits(pol[:1], pol[1:], torch.tensor([REF_W], dtype=torch.float64),
                          torch.tensor([REF_L], dtype=torch.float64))
    dpo_loss(h, BETA).sum().backward()
    weight = BETA / (1 + math.exp(0.3))  # beta sigma(r_l - r_w), r_w - r_l = 0.3
    assert pol.grad.tolist() == pytest.approx([-weight, weight], rel=1e-12)


def test_conservative_dpo_and_ipo():
    eps = 0.1
    cdpo = 0.9 * math.log1p(math.exp(-0.3)) + 0.1 * math.log1p(math.exp(0.3))
    assert dpo_loss(_h().double(), BETA, "sigmoid", eps).item() == pytest.approx(cdpo, rel=1e-12)  # 0.584355
    assert dpo_loss(_h(), BETA, "ipo").item() == pytest.approx((3.0 - 1 / (2 * BETA)) ** 2)  # (3 - 5)^2 = 4
    with pytest.raises(ValueError):
        dpo_loss(_h(), BETA, "kto")


def test_answer_logps_sum_the_labelled_tokens_only():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]])  # [1, T=3, V=2]
    labels = torch.tensor([[IGNORE_INDEX, 1, 0]])  # position 0 predicts token 1, position 1 token 0
    total, count = answer_logps(logits, labels)
    assert total.item() == pytest.approx(math.log(0.5) + math.log(0.75), rel=1e-6) and count.tolist() == [2]
    padded = torch.tensor([[IGNORE_INDEX, 1, IGNORE_INDEX]])
    total, count = answer_logps(logits, padded)
    assert total.item() == pytest.approx(math.log(0.5), rel=1e-6) and count.tolist() == [1]


def test_sequence_logps_sum_answer_tokens_or_average_them_for_ipo():
    logps = torch.tensor([[-1.0, -2.0, -4.0], [-0.5, -0.5, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert sequence_logps(logps, mask).tolist() == [-7.0, -1.0]
    assert sequence_logps(logps, mask, "ipo").tolist() == pytest.approx([-7.0 / 3, -0.5])


def test_best_worst_pairs_index_the_flat_batch_and_drop_ties():
    scores = torch.tensor([[0.1, 0.9, -0.3],     # best 1, worst 2
                           [0.5, 0.5, 0.5],      # all tie: no pair
                           [2.0, -1.0, 2.0]])    # the first best (0), the worst (1)
    chosen, rejected, valid = best_worst_pairs(scores)
    assert chosen.tolist() == [1, 3, 6]
    assert rejected.tolist() == [2, 3, 7]
    assert valid.tolist() == [True, False, True]
