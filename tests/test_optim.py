"""The owned AdamW: a hand-computed step, torch's AdamW on the same inputs (bit for bit wherever
torch's square root happens to be correctly rounded, within an ulp of the denominator elsewhere),
torch's state layout, and a resumed run equal to an uninterrupted one."""

from __future__ import annotations

import math

import pytest
import torch

from cqa_rlhf.exact_math import sqrt
from cqa_rlhf.optim import AdamW, adamw_update


def test_one_step_by_hand():
    # p = 1, g = 0.5: m = 0.05, v = 0.00025; bias-corrected 0.5 and 0.25, so the step is
    # lr * 0.5 / (0.5 + eps), and decoupled decay first scales p by 1 - lr * wd.
    p, g = torch.tensor([1.0]), torch.tensor([0.5])
    m, v = torch.zeros(1), torch.zeros(1)
    adamw_update(p, g, m, v, step=1, lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    assert m.item() == pytest.approx(0.05, rel=1e-7) and v.item() == pytest.approx(0.00025, rel=1e-6)
    assert p.item() == pytest.approx(0.99 - 0.1 * 0.5 / (0.5 + 1e-8), rel=1e-7)


def _twins(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = ((64, 48), (48,), (5000,))
    ours = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    return ours, theirs


def _set_grads(params_a, params_b, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for a, b in zip(params_a, params_b):
        a.grad = torch.randn(a.shape, generator=g) * 1e-2
        b.grad = a.grad.clone()


def test_matches_torch_adamw_bit_for_bit_where_torch_sqrt_is_correct():
    ours, theirs = _twins(0)
    opt = AdamW([{"params": ours[:1], "weight_decay": 0.1}, {"params": ours[1:], "weight_decay": 0.0}], lr=1e-3)
    ref = torch.optim.AdamW([{"params": theirs[:1], "weight_decay": 0.1}, {"params": theirs[1:], "weight_decay": 0.0}],
                            lr=1e-3, foreach=False)
    for step in range(1, 6):
        _set_grads(ours, theirs, step)
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs):
            sa, sb = opt.state[a], ref.state[b]
            assert sa["step"].item() == sb["step"].item() == step
            assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
            if step == 1:  # same weights before: the one difference can be torch's square root
                same_root = torch.sqrt(sb["exp_avg_sq"]) == sqrt(sb["exp_avg_sq"])
                assert torch.equal(a.detach()[same_root], b.detach()[same_root])
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-9)
            b.data.copy_(a.detach())  # next step from the same weights


def test_state_is_torch_layout_and_resume_is_exact():
    ours, _ = _twins(1)
    twin = [p.detach().clone().requires_grad_() for p in ours]
    opt, straight = AdamW(ours, lr=1e-2, weight_decay=0.0), AdamW(twin, lr=1e-2, weight_decay=0.0)
    for step in range(1, 4):
        _set_grads(ours, twin, step)
        opt.step()
        straight.step()
    state = opt.state_dict()
    assert set(state["state"][0]) == {"step", "exp_avg", "exp_avg_sq"} and state["state"][0]["step"].dtype == torch.float32
    resumed = AdamW([p.detach().clone().requires_grad_() for p in ours], lr=1e-2, weight_decay=0.0)
    resumed.load_state_dict(state)
    params = [p for group in resumed.param_groups for p in group["params"]]
    for step in range(4, 6):
        _set_grads(params, twin, step)
        resumed.step()
        straight.step()
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(params, twin))


def test_closure_and_bad_settings():
    p = torch.zeros(2, requires_grad=True)
    opt = AdamW([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = ((p - 1) ** 2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 2.0 and p.tolist() == [pytest.approx(0.1, rel=1e-5)] * 2
    with pytest.raises(ValueError, match="betas"):
        AdamW([p], betas=(0.9, 1.0))
    assert not math.isnan(p.sum().item())
