"""Which CPU maths gives other bits on another CPU: sha256 (16 hex digits) of each op the pipeline
computes with, on fixed inputs, under the current numeric mode. Run it natively and under
``qemu-x86_64 -cpu Haswell`` / ``-cpu EPYC-Rome`` and diff (bench/probe_numerics.sh does all three;
results in bench/RESULTS.md, "Exact on every x86 CPU").

    python bench/probe_numerics.py            # from the project root, in its venv
"""

from __future__ import annotations

import hashlib
import math
import sys

import cqa_rlhf  # noqa: F401  (the numeric pin, before torch)
import torch
import torch.nn.functional as F

from cqa_rlhf import exact_math, numerics
from cqa_rlhf.generation import gumbel_noise


def h(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:16]


def inputs(n: int) -> dict[str, torch.Tensor]:
    """Inputs made exactly from integers (no CPU-dependent random kernels)."""
    k = torch.arange(n, dtype=torch.int64)
    u = ((k * 2654435761) % 1000003).to(torch.float64) / 1000003.0  # [0, 1)
    return {"pos": (u * 10 + 1e-3).float(), "sym": ((u - 0.5) * 16).float(), "unit": u.clamp(min=1e-9)}


def ops(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    pos, sym, unit = x["pos"], x["sym"], x["unit"]
    rows = sym[: max(sym.numel() // 864, 1) * 864].view(-1, 864) if sym.numel() >= 864 else sym.view(1, -1)
    return {
        "torch.sqrt": pos.sqrt(), "x**0.5": pos ** 0.5, "rsqrt": pos.rsqrt(), "exact_math.sqrt": exact_math.sqrt(pos),
        "sqrt f64": pos.double().sqrt(), "exp": sym.exp(), "expm1": sym.expm1(), "log": pos.log(),
        "log1p": pos.log1p(), "log f64": -torch.log(-torch.log(unit)),
        "exact_math.log f64": -exact_math.log(-exact_math.log(unit)), "gumbel_noise": gumbel_noise(max(pos.numel() // 100, 7), 5), "tanh": sym.tanh(),
        "sigmoid": sym.sigmoid(), "logsigmoid": F.logsigmoid(sym), "softplus": F.softplus(sym), "erf": sym.erf(),
        "pow 3": sym.pow(3.0), "pow 0.5": pos.pow(0.5), "gelu": F.gelu(sym), "gelu tanh": F.gelu(sym, approximate="tanh"),
        "softmax": rows.softmax(-1), "log_softmax": rows.log_softmax(-1),
        "layer_norm": F.layer_norm(rows, rows.shape[-1:]), "var": rows.var(-1), "std": rows.std(-1),
        "sum (whole)": sym.sum().reshape(1), "fixed_order_sum": exact_math.fixed_order_sum(sym.double()).reshape(1),
        "linalg.vector_norm": torch.linalg.vector_norm(sym).reshape(1),
        "exact_math.grad_norm": torch.tensor([exact_math.grad_norm([_with_grad(sym)])], dtype=torch.float64),
        **draws(pos.numel()),
    }


def draws(n: int) -> dict[str, torch.Tensor]:
    """Weight initialisation and sampling: normal (Box-Muller), uniform, multinomial, bernoulli."""
    g = torch.Generator().manual_seed(11)
    probs = torch.softmax(torch.arange(864, dtype=torch.float32) / 97.0, -1).expand(max(n // 864, 1), 864)
    return {"randn": torch.randn(n, generator=g), "normal_": torch.empty(n).normal_(0.0, 0.02, generator=g),
            "rand f64": torch.rand(n, generator=g, dtype=torch.float64),
            "multinomial": torch.multinomial(probs, 1, generator=g).float(),
            "bernoulli_": torch.empty(n).bernoulli_(0.1, generator=g)}


def _with_grad(g: torch.Tensor) -> torch.Tensor:
    p = torch.zeros_like(g)
    p.grad = g
    return p


def main() -> None:
    numerics.check() if numerics.mode() == "pinned" else None
    print(f"# {numerics.state()} threads {torch.get_num_threads()} gemm {numerics._gemm_probe()} python {sys.version.split()[0]} torch {torch.__version__}")
    for n in (7, 1000, 1_000_000):
        for name, y in ops(inputs(n)).items():
            print(f"{n:>8} {name:22s} {h(y)}")
    ref = torch.from_numpy(__import__("numpy").sqrt(inputs(1_000_000)["pos"].numpy()))
    print(f"torch.sqrt off correct rounding in {(inputs(1_000_000)['pos'].sqrt() != ref).sum().item()} of 1000000; "
          f"exact_math.sqrt in {(exact_math.sqrt(inputs(1_000_000)['pos']) != ref).sum().item()}")
    assert math.isfinite(float(ref.sum()))


if __name__ == "__main__":
    main()
