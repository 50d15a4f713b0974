"""Square roots and sums whose bits do not depend on the CPU or on the thread count.

Why the project owns these (bench/RESULTS.md, "Exact on every x86 CPU"):
- CPU ``torch.sqrt`` (also ``x ** 0.5``, ``torch._foreach_sqrt`` and so AdamW's denominator) goes
  through MKL's vector maths, which is accurate to one ulp but not correctly rounded, and which
  floats come out one ulp off follows the CPU: of 1M floats, 152,841 on an Intel Xeon with AVX-512,
  144,487 (another set) on AVX2 CPUs, 155,678 on an AMD EPYC with AVX-512. IEEE 754 defines one
  correct answer; :func:`sqrt` computes it.
- ATen reduces a whole tensor of 32,768 or more elements (``x.sum()``, a vector norm) with one
  partial sum per thread, so the result moves with the thread count. :func:`sum_of_squares`
  reduces in fixed rows instead, each row by one thread from start to end.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

# Row length of the fixed-order sums: below ATen's parallel grain (32,768), so a row is summed
# serially by one thread, and rows are independent, so threads only pick which row they take.
ROW = 4096


def sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded square root (IEEE 754) of a float tensor, the same bits on every CPU.

    float32 (and narrower floats, through float32): a first guess from float64, within one float32
    ulp whatever kernel computed it, then corrected exactly: the midpoint ``m`` between the guess
    and a neighbour has 25 significant bits, so ``m * m`` (50 bits) and the comparison with ``x``
    are exact in float64; ``x > m_up**2`` means the root lies above the midpoint, and so on.
    float64: NumPy's square root, the CPU's IEEE instruction (``sqrtpd``), correctly rounded."""
    if not x.dtype.is_floating_point:
        raise TypeError(f"exact_math.sqrt needs a float tensor, got {x.dtype}")
    if x.dtype == torch.float64:
        if x.device.type != "cpu":
            return x.sqrt()  # CUDA's double sqrt is IEEE-rounded
        return torch.from_numpy(_numpy_sqrt(x.detach().numpy()))
    if x.dtype != torch.float32:
        # float16/bfloat16: rounding the correct float32 root again is exact (24 >= 2p + 2 bits).
        return sqrt(x.float()).to(x.dtype)
    wide = x.detach().double()
    guess = wide.sqrt().float()                                       # [*], within one ulp
    up = torch.nextafter(guess, torch.full_like(guess, math.inf))
    down = torch.nextafter(guess, torch.zeros_like(guess))
    above = (guess.double() + up.double()) * 0.5                      # exact midpoints
    below = (guess.double() + down.double()) * 0.5
    return torch.where(wide > above * above, up, torch.where(wide < below * below, down, guess))


# ln 2 split in two (fdlibm): e * LN2_HI is exact for any float64 exponent e.
LN2_HI = 6.93147180369123816490e-01
LN2_LO = 1.90821492927058770002e-10
SQRT_HALF = 0.70710678118654752440
LOG_TERMS = 12  # atanh series terms: |s| <= 0.172, so s**24 / 25 is below float64's resolution


def log(x: torch.Tensor) -> torch.Tensor:
    """Natural logarithm of a positive float64 tensor from ``frexp``, +, -, * and / only, each
    rounded by IEEE 754 alike on every CPU (``torch.log`` of float64 is not: an AVX-512 and an AVX2
    CPU part on some of 1M inputs). Within a few ulps of the true value.

    ``x = m * 2**e`` with ``m`` in [sqrt(1/2), sqrt(2)); ``log m = 2 atanh(s)``, ``s = (m-1)/(m+1)``,
    summed as ``2 s (1 + s^2/3 + s^4/5 + ...)`` by Horner's rule; ``log x = log m + e ln 2``."""
    if x.dtype != torch.float64:
        raise TypeError(f"exact_math.log needs a float64 tensor, got {x.dtype}")
    # In place on the temporaries (the same roundings, op for op): a sampler calls this on every
    # vocabulary entry of every row at every step, and fresh tensors for each op cost more there.
    m, e = torch.frexp(x)                          # m in [0.5, 1)
    low = m < SQRT_HALF
    m = torch.where(low, m * 2, m)                 # exact
    e = (e - low.to(e.dtype)).to(torch.float64)
    s = (m - 1).div_(m.add_(1))                    # (m - 1) / (m + 1)
    s2 = s * s
    series = torch.full_like(s, 1.0 / (2 * LOG_TERMS - 1))
    for k in range(LOG_TERMS - 2, -1, -1):
        series.mul_(s2).add_(1.0 / (2 * k + 1))    # series * s2 + 1 / (2k + 1)
    return s.mul_(2).mul_(series).add_(e * LN2_LO).add_(e.mul_(LN2_HI))  # (2 s series + e lo) + e hi


def _numpy_sqrt(a):
    import numpy as np

    return np.asarray(np.sqrt(a))  # a 0-d array's root comes back as a NumPy scalar


def std(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """Unbiased (n - 1) standard deviation along ``dim``, as ``torch.std``, with :func:`sqrt`."""
    return sqrt(x.var(dim, keepdim=keepdim))


def fixed_order_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a 1-D tensor in an order that no thread count changes: rows of :data:`ROW`
    elements summed one row per thread, then the row sums the same way, until one row is left."""
    while x.numel() > ROW:
        x = F.pad(x, (0, (-x.numel()) % ROW)).view(-1, ROW).sum(1)  # [ceil(n / ROW)]; zeros add nothing
    return x.sum()


def sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    """Sum of the squares of every element of ``x``, in float64, in a fixed order: [*] -> []."""
    flat = x.detach().reshape(-1).double()
    return fixed_order_sum(flat * flat)


def grad_norm(parameters: Iterable[torch.Tensor]) -> float:
    """The L2 norm of every gradient together (``torch.nn.utils.clip_grad_norm_``'s total norm),
    summed in float64 in a fixed order and correctly rounded, so every CPU and thread count gives
    the same number."""
    total = 0.0
    for p in parameters:
        if p.grad is not None:
            total += float(sum_of_squares(p.grad))
    return math.sqrt(total)


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> float:
    """Scale the gradients so that their total norm is at most ``max_norm`` (as
    ``clip_grad_norm_``: coefficient ``max_norm / (norm + 1e-6)``, capped at 1); returns the norm."""
    params = [p for p in parameters if p.grad is not None]
    norm = grad_norm(params)
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for p in params:
            p.grad.mul_(coef)
    return norm


class _LayerNorm(torch.autograd.Function):
    """ATen's layer norm and its input gradient (both row by row), with the weight and bias
    gradients summed over rows as column sums. ATen's own backward keeps one partial sum of
    them per thread and adds the partials at the end, so its bits follow the thread count; a
    column sum (``sum(0)``, as ``nn.Linear``'s bias gradient) gives each column to one thread."""

    @staticmethod
    def forward(ctx, x, weight, bias, shape: tuple[int, ...], eps: float):
        out, mean, rstd = torch.ops.aten.native_layer_norm(x, shape, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.shape = shape
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.ops.aten.native_layer_norm_backward(grad, x, ctx.shape, mean, rstd, weight, bias,
                                                           [True, False, False])[0]
        n = math.prod(ctx.shape)
        rows = grad.reshape(-1, n)                                               # [M, N]
        dw = db = None
        if weight is not None and ctx.needs_input_grad[1]:
            xhat = (x.reshape(-1, n) - mean.reshape(-1, 1)) * rstd.reshape(-1, 1)  # [M, N]
            dw = (rows * xhat).sum(0).view(ctx.shape)
        if bias is not None and ctx.needs_input_grad[2]:
            db = rows.sum(0).view(ctx.shape)
        return dx, dw, db, None, None


class LayerNorm(torch.nn.LayerNorm):
    """``nn.LayerNorm`` whose gradients do not depend on the thread count (:class:`_LayerNorm`);
    the same parameters and state dict, so exported models load as plain ``nn.LayerNorm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LayerNorm.apply(x, self.weight, self.bias, tuple(self.normalized_shape), self.eps)


def use_thread_free_layer_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Turn every plain ``nn.LayerNorm`` of ``model`` into a :class:`LayerNorm`, in place."""
    for module in model.modules():
        if type(module) is torch.nn.LayerNorm:
            module.__class__ = LayerNorm
    return model


def softmax_backward(grad: torch.Tensor, output: torch.Tensor, dim: int, input_dtype: torch.dtype) -> torch.Tensor:
    """The gradient of ``softmax`` along ``dim``: ``y * (g - sum(g * y))`` row by row.

    ATen's CPU kernel for it gives other bits at another thread count whenever the row length is
    not a multiple of 8 (attention over 93 positions, a vocabulary of 50,257: bench/RESULTS.md),
    while an element-wise product and a sum along one row do not depend on how rows are split."""
    gy = grad * output
    return (output * (grad - gy.sum(dim, keepdim=True))).to(input_dtype)


_OVERRIDES: list = []  # the torch.library handle must live as long as the process


def install_softmax_backward() -> None:
    """Make :func:`softmax_backward` ATen's CPU ``_softmax_backward_data`` in this process (once),
    so every model family's attention, whatever module calls ``softmax``, gets it."""
    if _OVERRIDES:
        return
    import warnings

    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():  # "overriding a previously registered kernel": the point
        warnings.simplefilter("ignore")
        lib.impl("_softmax_backward_data", softmax_backward, "CPU")
    _OVERRIDES.append(lib)
