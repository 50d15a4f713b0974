"""PPO's maths on hand-computed tensors (each number below is worked out in the comment beside it)."""

from __future__ import annotations

import math

import pytest
import torch

from cqa_rlhf.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    check_finite,
    entropy_from_logits,
    gae,
    kl_per_token,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)


def approx(t: torch.Tensor, expected, abs: float = 1e-6) -> bool:
    return t.flatten().tolist() == pytest.approx(torch.tensor(expected).flatten().tolist(), abs=abs)


def test_masked_statistics_ignore_masked_positions():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    m = torch.tensor([1, 1, 1, 0])
    assert masked_mean(x, m).item() == pytest.approx(2.0)
    assert masked_var(x, m).item() == pytest.approx(1.0)  # (1 + 0 + 1) / (3 - 1)
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(2 / 3)
    assert approx(masked_whiten(x, m), [-1.0, 0.0, 1.0, 0.0], abs=1e-4)
    assert approx(masked_whiten(x, m, shift_mean=False), [1.0, 2.0, 3.0, 0.0], abs=1e-4)  # mean 2 added back
    rows = torch.tensor([[1.0, 3.0], [5.0, 7.0]])
    assert approx(masked_mean(rows, torch.tensor([[1, 1], [1, 0]]), dim=1), [2.0, 5.0])


def test_logprobs_and_entropy_use_the_sampling_temperature():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # p = [0.25, 0.75]
    token = torch.tensor([[1]])
    assert logprobs_from_logits(logits, token).item() == pytest.approx(math.log(0.75))
    # T = 2: p ~ [1, sqrt(3)], p1 = 1.7320508 / 2.7320508 = 0.6339746
    assert logprobs_from_logits(logits, token, temperature=2.0).item() == pytest.approx(math.log(0.6339746), abs=1e-6)
    # H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.3465736 + 0.2157616
    assert entropy_from_logits(logits).item() == pytest.approx(0.5623351, abs=1e-6)


def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_per_token(logp, ref, "k1").item() == pytest.approx(math.log(2))  # 0.6931472
    # k3: r = 0.25 / 0.5 = 0.5; (r - 1) - log r = -0.5 + 0.6931472
    assert kl_per_token(logp, ref, "k3").item() == pytest.approx(0.1931472, abs=1e-6)
    # k1 can be negative on a token; k3 never is
    assert kl_per_token(ref, logp, "k1").item() < 0 < kl_per_token(ref, logp, "k3").item()
    with pytest.raises(ValueError):
        kl_per_token(logp, ref, "k2")  # type: ignore[arg-type]


def test_token_rewards_put_the_score_on_the_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    r = token_rewards(torch.tensor([2.0, -1.0]), kl, mask, beta=0.5)
    # row 0: [-0.05, -0.1 + 2, 0 (after EOS)]; row 1: [-0.2 - 1, 0, 0]
    assert approx(r, [[-0.05, 1.9, 0.0], [-1.2, 0.0, 0.0]])


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.1]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5)
    # t2: 1 - 0.1 = 0.9; t1: 0 + 0.1 - 0.2 + 0.5 * 0.9 = 0.35; t0: 0.2 - 0.5 + 0.5 * 0.35 = -0.125
    assert approx(adv, [[-0.125, 0.35, 0.9]])
    assert approx(ret, [[0.375, 0.55, 1.0]])


def test_gae_stops_at_the_mask_and_ignores_what_follows_eos():
    mask = torch.tensor([[1, 1, 0]])
    adv, ret = gae(torch.tensor([[0.0, 1.0, 5.0]]), torch.tensor([[0.5, 0.2, 9.0]]), mask, gamma=0.9, lam=1.0)
    # past EOS: V = r = 0. t1: 1 + 0.9 * 0 - 0.2 = 0.8; t0: 0.9 * 0.2 - 0.5 + 0.9 * 0.8 = 0.4
    assert approx(adv, [[0.4, 0.8, 0.0]])
    assert approx(ret, [[0.9, 1.0, 0.0]])
    # garbage after EOS changes nothing
    adv2, ret2 = gae(torch.tensor([[0.0, 1.0, -7.0]]), torch.tensor([[0.5, 0.2, -3.0]]), mask, 0.9, 1.0)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)


def test_clipped_policy_loss():
    old = torch.zeros(1, 2)
    new = torch.full((1, 2), math.log(1.5))  # ratio 1.5 on both tokens
    adv = torch.tensor([[1.0, -1.0]])
    loss, stats = policy_loss(new, old, adv, torch.ones(1, 2), cliprange=0.2)
    # A = 1: max(-1.5, -1.2) = -1.2 (clipped); A = -1: max(1.5, 1.2) = 1.5 (unclipped)
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert stats["approxkl"].item() == pytest.approx(0.5 * math.log(1.5) ** 2)  # 0.0822012
    assert stats["ratio"].item() == pytest.approx(1.5)
    # a masked token (say, after EOS) does not count
    loss_m, _ = policy_loss(new, old, adv, torch.tensor([[1, 0]]), cliprange=0.2)
    assert loss_m.item() == pytest.approx(-1.2)


def test_clipped_value_loss():
    v, old, ret = torch.tensor([[1.0, 0.6]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[2.0, 0.6]])
    loss, stats = value_loss(v, old, ret, torch.ones(1, 2), cliprange_value=0.2)
    # token 0: clip(1.0, 0.3, 0.7) = 0.7; max((1 - 2)^2, (0.7 - 2)^2) = 1.69. token 1: 0
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.0) / 2)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_kl_controllers():
    ctl = AdaptiveKLController(beta=0.2, target=6.0, horizon=10000)
    ctl.update(9.0, 64)  # e = clip(9/6 - 1) = 0.2 -> 0.2 * (1 + 0.2 * 64 / 10000)
    assert ctl.beta == pytest.approx(0.200256)
    ctl.update(3.0, 64)  # e = clip(-0.5) = -0.2
    assert ctl.beta == pytest.approx(0.200256 * (1 - 0.00128))
    saved = ctl.state_dict()
    other = AdaptiveKLController(beta=1.0, target=6.0, horizon=10000)
    other.load_state_dict(saved)
    assert other.beta == ctl.beta
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.beta == 0.05


def test_check_finite_names_the_iteration_and_quantity():
    check_finite(3, a=torch.ones(2), b=1.0)
    with pytest.raises(FloatingPointError, match=r"iteration 7: loss/value is not finite"):
        check_finite(7, **{"loss/policy": torch.ones(1), "loss/value": torch.tensor([1.0, float("nan")])})
    with pytest.raises(FloatingPointError, match="iteration 2: scores"):
        check_finite(2, scores=float("inf"))
