"""Group advantages (GRPO, Dr. GRPO, RLOO), clip-higher and k3 on hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from cqa_rlhf.group_math import batch_std, group_advantages, group_baseline, zero_std_share
from cqa_rlhf.ppo_math import kl_per_token, policy_loss

REWARDS = torch.tensor([[1.0, 2.0, 3.0, 6.0]])  # one group of G = 4: mean 3, unbiased std sqrt(14/3)
STD = math.sqrt(14 / 3)


def test_grpo_advantages_are_standardised_within_the_group():
    adv = group_advantages(REWARDS, "grpo", "group")
    assert adv[0].tolist() == pytest.approx([x / (STD + 1e-4) for x in (-2.0, -1.0, 0.0, 3.0)], rel=1e-6)


def test_dr_grpo_drops_the_std_and_rloo_leaves_one_out():
    assert group_advantages(REWARDS, "grpo", "none")[0].tolist() == pytest.approx([-2.0, -1.0, 0.0, 3.0])
    # baseline of answer i: the mean of the other three, (12 - r_i) / 3
    assert group_baseline(REWARDS, "rloo")[0].tolist() == pytest.approx([11 / 3, 10 / 3, 3.0, 2.0])
    assert group_advantages(REWARDS, "rloo", "none")[0].tolist() == pytest.approx([-8 / 3, -4 / 3, 0.0, 4.0])
    with pytest.raises(ValueError):
        group_baseline(torch.ones(2, 1), "rloo")


def test_batch_scaling_uses_the_std_of_every_reward():
    rewards = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # the same four rewards in two groups
    assert batch_std(rewards).item() == pytest.approx(STD)
    adv = group_advantages(rewards, "grpo", "batch")
    assert adv.flatten().tolist() == pytest.approx([x / (STD + 1e-4) for x in (-0.5, 0.5, -1.5, 1.5)], rel=1e-6)
    # with a sum over processes (here: two identical processes) the std is that of all 8 rewards
    doubled = batch_std(rewards, all_sum=lambda t: 2 * t).item()
    assert doubled == pytest.approx(math.sqrt(28 / 7), rel=1e-9)  # 8 rewards, mean 3: sum of squares 28


def test_groups_with_equal_rewards_are_counted():
    assert zero_std_share(torch.tensor([[1.0, 1.0], [2.0, 3.0]])).item() == 0.5
    assert group_advantages(torch.tensor([[1.0, 1.0]]), "grpo", "group").tolist() == [[0.0, 0.0]]


def test_k3_kl_on_a_hand_computed_token():
    # log pi = log 0.5, log pi_ref = log 0.25: r = pi_ref / pi = 0.5, k3 = r - 1 - log r = -0.5 + log 2
    k3 = kl_per_token(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]), "k3")
    assert k3.item() == pytest.approx(math.log(2) - 0.5, rel=1e-6)
    assert kl_per_token(torch.tensor([0.3]), torch.tensor([0.3]), "k3").item() == 0.0


def test_clip_higher_widens_the_upper_clip_only():
    new, old = torch.tensor([[math.log(1.25), math.log(0.7)]]), torch.zeros(1, 2)
    adv, mask = torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    # symmetric eps 0.2: token 0 clipped at 1.2 (A > 0), token 1 clipped at 0.8 (A < 0)
    loss, stats = policy_loss(new, old, adv, mask, cliprange=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert (stats["clip_high"].item(), stats["clip_low"].item(), stats["clip_region"].item()) == (0.5, 0.5, 1.0)
    # eps_high 0.28: token 0's ratio 1.25 is inside, unclipped
    loss, stats = policy_loss(new, old, adv, mask, cliprange=0.2, cliprange_high=0.28)
    assert loss.item() == pytest.approx((-1.25 + 0.8) / 2)
    assert (stats["clip_high"].item(), stats["clip_region"].item()) == (0.0, 0.5)
