"""Hashes of float32 results that depend on the CPU's code paths, for comparing two machines.

Prints one line per computation: MKL sgemm (torch.mm) and batched GEMM at the shapes of the
default model, and ATen's vectorised kernels (softmax, layer norm, GELU, exp/log, a long sum).
Run it under different settings (ATEN_CPU_CAPABILITY, MKL_CBWR, OMP_NUM_THREADS) on two machines
and compare the hashes: equal hashes = bit-identical results. Inputs come from torch's CPU
generator (the same on every machine), so only the arithmetic can differ.

    ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=COMPATIBLE OMP_NUM_THREADS=2 python bench/probe_cross_cpu.py
"""

import hashlib
import os

import torch


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:12]


def main() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16 * 200, 128, generator=g)
    w = torch.randn(128, 512, generator=g)
    q = torch.randn(64, 200, 32, generator=g)
    rows = {
        "mm 3200x128x512": a @ w,
        "mm 3200x512x128": (a @ w) @ w.T,
        "bmm 64x200x32x200": torch.bmm(q, q.transpose(1, 2)),
        "softmax": torch.softmax(a @ w, dim=-1),
        "layer_norm": torch.nn.functional.layer_norm(a, (128,)),
        "gelu_new(tanh)": torch.nn.functional.gelu(a, approximate="tanh"),
        "exp/log": torch.log1p(torch.exp(a.clamp(max=20))),
        "sum 1.6M": (a @ w).sum(),
    }
    env = " ".join(f"{k}={os.environ.get(k, '-')}" for k in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "OMP_NUM_THREADS"))
    print(f"# torch {torch.__version__} capability {torch.backends.cpu.get_cpu_capability()} "
          f"threads {torch.get_num_threads()} :: {env}")
    for name, t in rows.items():
        print(f"{digest(t)}  {name}")


if __name__ == "__main__":
    main()
