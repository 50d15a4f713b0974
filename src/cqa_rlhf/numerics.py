"""The CPU's numeric code paths, pinned so that every x86-64 CPU computes the same bits.

Float results depend on which kernels run, and the libraries pick kernels by the CPU:
- MKL (every float32 GEMM, and ATen's exp/log/tanh through MKL's vector maths) dispatches by
  instruction set and vendor. Only its ``COMPATIBLE`` branch gives the same bits on Intel and AMD:
  a branch such as ``AVX2`` is honoured on Intel only, and non-Intel CPUs fall back to ``AUTO``
  (oneMKL developer guide, "Getting Started with Conditional Numerical Reproducibility"; measured
  in bench/RESULTS.md: an Intel Xeon and an AMD EPYC agree under ``COMPATIBLE``, not under ``AVX2``).
- ATen's vectorised kernels (softmax, layer norm, sums, sampling) use AVX-512 where the CPU has it;
  ``ATEN_CPU_CAPABILITY=avx2`` selects the AVX2 build of the same kernels, with torch's own SLEEF
  maths, so the system's libm does not enter.
- Reductions split across threads: a fixed thread count fixes their order (MKL's reproducibility
  also requires it).
All of these are read when torch first loads, so ``cqa_rlhf/__init__`` calls
:func:`pin_environment` before anything imports torch; stages then :func:`check` that it held.

``CQA_NUMERICS`` switches it: ``pinned`` (the default) or ``free`` (the libraries' fastest paths
and every core: about twice as fast on the default model, but other CPUs give other numbers).
"""

from __future__ import annotations

import os
import sys

from cqa_rlhf.errors import CqaError

SWITCH = "CQA_NUMERICS"
MODES = ("pinned", "free")
THREADS = 2
PIN = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OMP_NUM_THREADS": str(THREADS),
    "MKL_NUM_THREADS": str(THREADS),
}

_torch_was_loaded = False  # torch imported before cqa_rlhf: too late to pin


class NumericsError(CqaError):
    """The numeric pin was asked for but is not in effect in this process."""


def mode() -> str:
    """The ``CQA_NUMERICS`` setting; anything else is refused by :func:`check`."""
    return os.environ.get(SWITCH, "pinned").strip().lower() or "pinned"


def pin_environment() -> None:
    """Set the pinned code paths in the environment, overriding the user's (pinned means pinned),
    unless ``CQA_NUMERICS=free``. Called on import of the package, before torch loads."""
    global _torch_was_loaded
    if mode() != "pinned":
        return
    if "torch" in sys.modules:
        _torch_was_loaded = True
        return
    os.environ.update(PIN)


def state() -> dict[str, str | int]:
    """What is in effect in this process (recorded beside every exported model)."""
    import torch

    return {"mode": mode(), "aten": torch.backends.cpu.get_cpu_capability(),
            "mkl_cbwr": os.environ.get("MKL_CBWR", "AUTO"), "threads": torch.get_num_threads()}


def check() -> dict[str, str | int]:
    """:func:`state`, after making sure the pin holds when it is asked for (one-line errors)."""
    if mode() not in MODES:
        raise NumericsError(f"{SWITCH}={os.environ[SWITCH]!r}: expected one of {', '.join(MODES)}")
    now = state()
    if mode() == "free":
        return now
    if _torch_was_loaded:
        raise NumericsError(f"torch was imported before cqa_rlhf, so its numeric code paths are not pinned: "
                            f"import cqa_rlhf first, or set {SWITCH}=free to run unpinned")
    if now["aten"] != "AVX2":
        raise NumericsError(f"this CPU runs ATen's {now['aten']} kernels, not AVX2: the pinned numbers need an "
                            f"x86-64 CPU with AVX2 (or set {SWITCH}=free to run unpinned)")
    if now["threads"] != THREADS or now["mkl_cbwr"] != PIN["MKL_CBWR"]:
        raise NumericsError(f"numeric pin overridden in this process (threads {now['threads']}, MKL_CBWR "
                            f"{now['mkl_cbwr']}; pinned: {THREADS}, {PIN['MKL_CBWR']})")
    return now
