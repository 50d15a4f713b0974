"""exact_math: correctly rounded square roots, a float64 log from basic operations, and sums and
gradient norms whose bits do not depend on the thread count (hand-computed values, IEEE
references, and the same tensor summed on 1 and 4 threads)."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch

from cqa_rlhf import exact_math


def _f32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _wide_floats(n: int, seed: int = 0) -> torch.Tensor:
    """Positive float32s over every exponent, denormals included (random bit patterns)."""
    g = np.random.default_rng(seed)
    bits = g.integers(0, 0x7F800000, size=n, dtype=np.uint32)
    return torch.from_numpy(bits.view(np.float32).copy())


def test_sqrt_hand_values():
    x = torch.tensor([4.0, 2.0, 0.0, -0.0, 1.0, math.inf, 0.25], dtype=torch.float32)
    got = exact_math.sqrt(x)
    assert got.tolist()[:2] == [2.0, _f32(0x3FB504F3)]  # sqrt(2) rounds to 1.41421353816986083984375
    assert got.tolist()[2:] == [0.0, -0.0, 1.0, math.inf, 0.5]
    assert math.copysign(1.0, got[3].item()) == -1.0  # IEEE: sqrt(-0) = -0
    assert torch.isnan(exact_math.sqrt(torch.tensor([-1.0, math.nan]))).all()


def test_sqrt_is_correctly_rounded_on_every_exponent():
    # NumPy's float32 square root is the CPU's IEEE instruction (sqrtps): correctly rounded.
    x = _wide_floats(1_000_000)
    want = torch.from_numpy(np.sqrt(x.numpy()))
    assert torch.equal(exact_math.sqrt(x), want)


def test_sqrt_fixes_what_a_one_ulp_guess_gets_wrong():
    # Squares of floats and their neighbours: the roots sit exactly on, or next to, a float, where
    # a guess one ulp off is most often wrong. The guess itself is perturbed by one ulp here, and
    # the correction must undo it.
    roots = _wide_floats(100_000, seed=1).clamp(max=1e18)
    x = (roots.double() ** 2).float()
    x = torch.cat([x, torch.nextafter(x, torch.full_like(x, math.inf)), torch.nextafter(x, torch.zeros_like(x))])
    assert torch.equal(exact_math.sqrt(x), torch.from_numpy(np.sqrt(x.numpy())))


def test_sqrt_of_other_dtypes():
    x64 = torch.tensor([2.0, 9.0], dtype=torch.float64)
    assert exact_math.sqrt(x64).tolist() == [math.sqrt(2.0), 3.0]
    scalar = exact_math.sqrt(torch.tensor(2.0, dtype=torch.float64))  # 0-d stays a 0-d tensor
    assert scalar.shape == () and scalar.dtype == torch.float64 and scalar.item() == math.sqrt(2.0)
    bf = torch.tensor([2.0, 16.0], dtype=torch.bfloat16)
    assert exact_math.sqrt(bf).dtype == torch.bfloat16 and exact_math.sqrt(bf).tolist() == [1.4140625, 4.0]
    with pytest.raises(TypeError, match="float tensor"):
        exact_math.sqrt(torch.tensor([4]))


def test_std_is_unbiased_and_the_correct_root_of_var():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0]])
    got = exact_math.std(x, 1)
    assert got.tolist() == [pytest.approx(math.sqrt(5 / 3), abs=1e-7), 0.0]
    assert torch.equal(got, exact_math.sqrt(x.var(1)))
    assert exact_math.std(x, 1, keepdim=True).shape == (2, 1)


def test_log_hand_values_and_accuracy():
    x = torch.tensor([1.0, 2.0, 0.5, math.e, 1e-300, 690.0], dtype=torch.float64)
    got = exact_math.log(x).tolist()
    assert got[:3] == [0.0, math.log(2.0), -math.log(2.0)]
    for g, v in zip(got[3:], x.tolist()[3:]):
        assert abs(g - math.log(v)) <= 2 * math.ulp(math.log(v))
    u = torch.from_numpy(np.random.default_rng(2).uniform(1e-12, 1.0, 50_000))
    err = (exact_math.log(u) - torch.from_numpy(np.log(u.numpy()))).abs() / torch.from_numpy(np.log(u.numpy())).abs()
    assert err.max().item() < 1e-15
    with pytest.raises(TypeError, match="float64"):
        exact_math.log(torch.tensor([1.0]))


def test_log_leaves_its_input_alone_and_gives_each_value_whatever_its_neighbours():
    x = torch.from_numpy(np.random.default_rng(3).uniform(1e-300, 1e300, 1000))
    before = x.clone()
    whole = exact_math.log(x)
    assert torch.equal(x, before)  # the in-place steps work on temporaries only
    assert torch.equal(torch.cat([exact_math.log(x[i:i + 7]) for i in range(0, 1000, 7)]), whole)
    assert torch.equal(exact_math.log(x.view(10, 100)), whole.view(10, 100))


def test_fixed_order_sum_hand_values_and_padding():
    assert exact_math.fixed_order_sum(torch.arange(1, 11, dtype=torch.float64)).item() == 55.0
    n = exact_math.ROW * 3 + 5  # not a whole number of rows: the zero padding adds nothing
    assert exact_math.fixed_order_sum(torch.ones(n, dtype=torch.float64)).item() == n


def _on_threads(n: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def test_sums_and_norms_do_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3_000_000, generator=g)  # above ATen's grain: its whole-tensor sum splits by thread
    ours = [_on_threads(t, lambda: exact_math.sum_of_squares(x)) for t in (1, 4)]
    assert torch.equal(ours[0], ours[1])
    assert ours[0].item() == pytest.approx(math.fsum(v * v for v in x.double().tolist()), rel=1e-12)
    # The premise: ATen's own sum of the same tensor moves with the thread count.
    theirs = [_on_threads(t, lambda: (x.double() * x.double()).sum()) for t in (1, 4)]
    assert not torch.equal(theirs[0], theirs[1])


def test_grad_norm_and_clip_hand_values():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(1, requires_grad=True)
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert exact_math.grad_norm([a, b]) == 5.0
    assert exact_math.clip_grad_norm([a, b], 1.0) == 5.0
    coef = 1.0 / (5.0 + 1e-6)
    assert a.grad.tolist() == [pytest.approx(3 * coef, rel=1e-7), 0.0] and b.grad.item() == pytest.approx(4 * coef, rel=1e-7)
    before = a.grad.clone()
    exact_math.clip_grad_norm([a, b], 10.0)  # under the bound: untouched, bit for bit
    assert torch.equal(a.grad, before)


def test_clip_agrees_with_torch():
    g = torch.Generator().manual_seed(3)
    params = [torch.zeros(s, requires_grad=True) for s in ((64, 32), (32,), (100_000,))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    twins = [torch.zeros_like(p, requires_grad=True) for p in params]
    for p, t in zip(params, twins):
        t.grad = p.grad.clone()
    norm = exact_math.clip_grad_norm(params, 1.0)
    torch_norm = torch.nn.utils.clip_grad_norm_(twins, 1.0)
    assert norm == pytest.approx(torch_norm.item(), rel=1e-6)
    for p, t in zip(params, twins):
        torch.testing.assert_close(p.grad, t.grad, rtol=1e-6, atol=0)


def test_layer_norm_matches_torch_and_its_gradients_do_not_follow_the_thread_count():
    g = torch.Generator().manual_seed(4)
    plain = torch.nn.LayerNorm(128)
    with torch.no_grad():
        plain.weight.normal_(generator=g)
        plain.bias.normal_(generator=g)
    ours = exact_math.use_thread_free_layer_norms(torch.nn.Sequential(torch.nn.LayerNorm(128)))[0]
    ours.load_state_dict(plain.state_dict())
    assert type(ours) is exact_math.LayerNorm and isinstance(ours, torch.nn.LayerNorm)
    x = torch.randn(16, 93, 128, generator=g, requires_grad=True)
    up = torch.randn(16, 93, 128, generator=g)

    def grads(module, threads):
        def run():
            module.zero_grad(set_to_none=True)
            x.grad = None
            out = module(x)
            out.backward(up)
            return out.detach(), x.grad.clone(), module.weight.grad.clone(), module.bias.grad.clone()
        return _on_threads(threads, run)

    ref = grads(plain, 1)
    one, four = grads(ours, 1), grads(ours, 4)
    assert all(torch.equal(a, b) for a, b in zip(one, four))
    assert torch.equal(one[0], ref[0]) and torch.equal(one[1], ref[1])  # forward and input gradient: ATen's own
    # Weight and bias gradients: float32 sums over 1,488 rows in another order than ATen's, so
    # compare both with the float64 truth: ours at most twice as far from it as ATen's.
    xhat = torch.nn.functional.layer_norm(x.detach().double(), (128,))
    exact = ((up.double() * xhat).sum((0, 1)), up.double().sum((0, 1)))
    for a, b, e in zip(one[2:], ref[2:], exact):
        assert (a.double() - e).abs().max() <= 2 * (b.double() - e).abs().max() + 1e-6
    # The premise: ATen's own weight gradient moves with the thread count at this shape.
    assert not torch.equal(grads(plain, 1)[2], grads(plain, 4)[2])


def test_models_get_the_thread_free_layer_norm_and_export_a_plain_one(tmp_path):
    from transformers import AutoModelForCausalLM, GPTNeoConfig

    from cqa_rlhf.config import ModelConfig
    from cqa_rlhf.models import _load

    cfg = GPTNeoConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=32,
                       attention_types=[[["global", "local"], 1]])
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    m = _load(AutoModelForCausalLM, str(tmp_path), ModelConfig(), None)
    norms = [type(x) for x in m.modules() if isinstance(x, torch.nn.LayerNorm)]
    assert norms and set(norms) == {exact_math.LayerNorm}
    m.save_pretrained(tmp_path / "again")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert {type(x) for x in plain.modules() if isinstance(x, torch.nn.LayerNorm)} == {torch.nn.LayerNorm}


def test_softmax_backward_matches_torch_and_is_thread_free():
    g = torch.Generator().manual_seed(5)
    y = torch.softmax(torch.randn(64, 90, 93, generator=g), -1)
    up = torch.randn(64, 90, 93, generator=g)
    ours = [_on_threads(t, lambda: exact_math.softmax_backward(up, y, -1, torch.float32)) for t in (1, 4)]
    assert torch.equal(ours[0], ours[1])
    theirs = [_on_threads(t, lambda: torch.ops.aten._softmax_backward_data(up, y, -1, torch.float32)) for t in (1, 4)]
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    # hand-computed: y = (0.25, 0.75), g = (1, 0): sum(g y) = 0.25, so dx = (0.25 * 0.75, 0.75 * -0.25)
    dx = exact_math.softmax_backward(torch.tensor([1.0, 0.0]), torch.tensor([0.25, 0.75]), 0, torch.float32)
    assert dx.tolist() == [0.1875, -0.1875]
